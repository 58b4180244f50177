"""softserve's client library: what a training job imports.

``Client(url).labelset(name).loader(batch_size)`` yields batches of views and labels from a
server, ``open_local("store/name").loader(batch_size)`` the same batches straight from a
store on this machine; the bundled losses take ``(student_logits, batch)``.

Views (:func:`apply_views`) and the GIFT refinement are defined here and imported by the
worker too, so the student sees exactly the pixels the teacher labelled. Importing the
client never imports the server or h5py; ``open_local`` needs h5py (it reads the store).

Names load on first use: the server shares this package's torch-free modules (the wire
format, codecs, sampling, schema) and must not import torch by importing the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Every public name, by the module that defines it.
_EXPORTS = {
    "Loader": "loader",
    "ALL_LOSS_NAMES": "losses",
    "LOSS_NAMES": "losses",
    "NEEDS_LOGITS": "losses",
    "GIFTLoss": "losses",
    "KLLoss": "losses",
    "Targets": "losses",
    "WithCE": "losses",
    "cosine_loss": "losses",
    "get_loss": "losses",
    "gift_loss": "losses",
    "beta_from_gamma": "refinement",
    "recover_logits": "refinement",
    "refine_labels": "refinement",
    "smooth_labels": "refinement",
    "PayloadError": "payload",
    "Batch": "labelset",
    "LabelSet": "labelset",
    "LocalLabelSet": "local",
    "open_local": "local",
    "Client": "remote",
    "ClientError": "remote",
    "RemoteLabelSet": "remote",
    "Sharding": "sampling",
    "LabelSetDetail": "schema",
    "LabelSetSummary": "schema",
    "NUM_PARAMS": "payload",
    "PARAM_FIELDS": "payload",
    "MixPolicy": "mixing",
    "apply_mix": "mixing",
    "mixed_views": "mixing",
    "sample_mix": "mixing",
    "ViewPolicy": "views",
    "apply_views": "views",
    "epoch_order": "views",
    "sample_views": "views",
}

if TYPE_CHECKING:  # what type checkers read; a test checks it matches _EXPORTS
    from softserve.client.labelset import Batch, LabelSet
    from softserve.client.loader import Loader
    from softserve.client.local import LocalLabelSet, open_local
    from softserve.client.losses import (
        ALL_LOSS_NAMES,
        LOSS_NAMES,
        NEEDS_LOGITS,
        GIFTLoss,
        KLLoss,
        Targets,
        WithCE,
        cosine_loss,
        get_loss,
        gift_loss,
    )
    from softserve.client.mixing import MixPolicy, apply_mix, mixed_views, sample_mix
    from softserve.client.payload import NUM_PARAMS, PARAM_FIELDS, PayloadError
    from softserve.client.refinement import (
        beta_from_gamma,
        recover_logits,
        refine_labels,
        smooth_labels,
    )
    from softserve.client.remote import Client, ClientError, RemoteLabelSet
    from softserve.client.sampling import Sharding
    from softserve.client.schema import LabelSetDetail, LabelSetSummary
    from softserve.client.views import ViewPolicy, apply_views, epoch_order, sample_views

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
