"""softserve's client library: what a training job imports.

``Client(url).labelset(name).loader(batch_size)`` yields batches of views and labels from a
server; the bundled losses take ``(student_logits, batch)``.

Views (:func:`apply_views`) and the GIFT refinement are defined here and imported by the
worker too, so the student sees exactly the pixels the teacher labelled. The client never
imports the server or h5py.

Names load on first use: the server shares this package's torch-free modules (the wire
format, codecs, sampling, schema) and must not import torch by importing the package.
"""

from __future__ import annotations

import importlib
from typing import Any

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
    "Batch": "remote",
    "Client": "remote",
    "ClientError": "remote",
    "RemoteLabelSet": "remote",
    "Sharding": "sampling",
    "LabelSetDetail": "schema",
    "LabelSetSummary": "schema",
    "NUM_PARAMS": "payload",
    "PARAM_FIELDS": "payload",
    "ViewPolicy": "views",
    "apply_views": "views",
    "epoch_order": "views",
    "sample_views": "views",
}

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
