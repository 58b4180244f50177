"""softserve's client library: what a training job imports.

``Client(url).labelset(name).loader(batch_size)`` yields batches of views and labels from a
server, ``open_local("store/name").loader(batch_size)`` the same batches straight from a
store on this machine; the bundled losses take ``(student_logits, batch)``.

Views (:func:`apply_views`) and the GIFT refinement are defined here and imported by the
worker too, so the student sees exactly the pixels the teacher labelled. The client never
imports the server or h5py.
"""

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
    beta_from_gamma,
    cosine_loss,
    get_loss,
    gift_loss,
    recover_logits,
    refine_labels,
    smooth_labels,
)
from softserve.client.payload import PayloadError
from softserve.client.remote import Client, ClientError, RemoteLabelSet
from softserve.client.sampling import Sharding
from softserve.client.schema import LabelSetDetail, LabelSetSummary
from softserve.client.views import (
    NUM_PARAMS,
    PARAM_FIELDS,
    ViewPolicy,
    apply_views,
    epoch_order,
    sample_views,
)

__all__ = [
    "Batch",
    "Client",
    "ClientError",
    "LabelSet",
    "LabelSetDetail",
    "LabelSetSummary",
    "Loader",
    "LocalLabelSet",
    "PayloadError",
    "RemoteLabelSet",
    "Sharding",
    "ALL_LOSS_NAMES",
    "LOSS_NAMES",
    "NEEDS_LOGITS",
    "NUM_PARAMS",
    "PARAM_FIELDS",
    "GIFTLoss",
    "KLLoss",
    "Targets",
    "WithCE",
    "ViewPolicy",
    "apply_views",
    "beta_from_gamma",
    "cosine_loss",
    "epoch_order",
    "open_local",
    "get_loss",
    "gift_loss",
    "recover_logits",
    "refine_labels",
    "sample_views",
    "smooth_labels",
]
