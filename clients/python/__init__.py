"""softserve's client library: what a training job imports.

``Client(url).labelset(name).loader(batch_size)`` yields batches of views and labels from a
server, ``open_local("store/name").loader(batch_size)`` the same batches straight from a
store on this machine; the bundled losses take ``(student_logits, batch)``.

Views (:func:`apply_views`, :func:`apply_dsa` for DSA sets) and the GIFT refinement come
from the layers below the client, which the worker and the server import too, so the
student sees exactly the pixels the teacher labelled. Importing the client never imports
the server or h5py; ``open_local`` needs h5py (it reads the store).

Names load on first use, so that ``import softserve.client`` stays cheap until a name is
used (torch, httpx and the losses load with the first name that needs them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Every public name, by the module that defines it: the client's own, and the format
#: kernel's (:mod:`softserve.format`) and the pixel functions (:mod:`softserve.pixels`)
#: that the worker and the server share with it.
_EXPORTS = {
    "Loader": "softserve.client.loader",
    "ALL_LOSS_NAMES": "softserve.client.losses",
    "LOSS_NAMES": "softserve.client.losses",
    "NEEDS_LOGITS": "softserve.client.losses",
    "GIFTLoss": "softserve.client.losses",
    "KLLoss": "softserve.client.losses",
    "Targets": "softserve.client.losses",
    "WithCE": "softserve.client.losses",
    "cosine_loss": "softserve.client.losses",
    "get_loss": "softserve.client.losses",
    "gift_loss": "softserve.client.losses",
    "Batch": "softserve.client.labelset",
    "LabelSet": "softserve.client.labelset",
    "LocalLabelSet": "softserve.client.local",
    "open_local": "softserve.client.local",
    "Client": "softserve.client.remote",
    "RemoteLabelSet": "softserve.client.remote",
    "ClientError": "softserve.errors",
    "PayloadError": "softserve.errors",
    "beta_from_gamma": "softserve.format.refinement",
    "recover_logits": "softserve.format.refinement",
    "refine_labels": "softserve.format.refinement",
    "smooth_labels": "softserve.format.refinement",
    "Sharding": "softserve.format.sampling",
    "epoch_order": "softserve.format.sampling",
    "LabelSetDetail": "softserve.format.schema",
    "LabelSetSummary": "softserve.format.schema",
    "DSA_FIELDS": "softserve.format.augment",
    "NUM_DSA": "softserve.format.augment",
    "NUM_PARAMS": "softserve.format.augment",
    "PARAM_FIELDS": "softserve.format.augment",
    "DsaPolicy": "softserve.format.augment",
    "MixPolicy": "softserve.format.augment",
    "ViewPolicy": "softserve.format.augment",
    "sample_dsa": "softserve.format.augment",
    "sample_mix": "softserve.format.augment",
    "sample_views": "softserve.format.augment",
    "apply_dsa": "softserve.pixels",
    "apply_mix": "softserve.pixels",
    "apply_views": "softserve.pixels",
    "mixed_views": "softserve.pixels",
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
    from softserve.client.remote import Client, RemoteLabelSet
    from softserve.errors import ClientError, PayloadError
    from softserve.format.augment import (
        DSA_FIELDS,
        NUM_DSA,
        NUM_PARAMS,
        PARAM_FIELDS,
        DsaPolicy,
        MixPolicy,
        ViewPolicy,
        sample_dsa,
        sample_mix,
        sample_views,
    )
    from softserve.format.refinement import (
        beta_from_gamma,
        recover_logits,
        refine_labels,
        smooth_labels,
    )
    from softserve.format.sampling import Sharding, epoch_order
    from softserve.format.schema import LabelSetDetail, LabelSetSummary
    from softserve.pixels import apply_dsa, apply_mix, apply_views, mixed_views

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
