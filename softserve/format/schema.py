"""JSON shapes of the HTTP API, shared by the server (which emits them) and the client."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class LabelSetSummary(_Schema):
    """One entry of ``GET /v1/labelsets``."""

    name: str
    num_samples: int
    num_classes: int
    epochs: int
    image_shape: tuple[int, int, int]
    output_size: tuple[int, int]
    codec: str
    teacher: str
    created: datetime
    digest: str


class DsaPolicyInfo(_Schema):
    """DSA's ranges, as :class:`softserve.format.augment.DsaPolicy` names them."""

    strategy: str
    flip: float
    brightness: float
    saturation: float
    contrast: float
    crop: float
    scale: float
    rotate: float
    cutout: float


class ViewPolicyInfo(_Schema):
    """The set's views: crops (``rrc``: scale, ratio, flip; what an older server always
    sends) or DSA (``dsa``: its ranges), and the resampling."""

    policy: Literal["rrc", "dsa"] = "rrc"
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    flip: bool | None = None
    dsa: DsaPolicyInfo | None = None
    interpolation: str


class MixPolicyInfo(_Schema):
    kind: str
    prob: float
    alpha: float


class RefinementParams(_Schema):
    method: str
    alpha: float
    beta: float


class LabelSetDetail(LabelSetSummary):
    """``GET /v1/labelsets/{name}``: what a training job needs to use the set."""

    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    views: ViewPolicyInfo
    #: CutMix or Mixup per (epoch, sample); None: views only
    mix: MixPolicyInfo | None = None
    refinement: RefinementParams
    seed: int
    precision: str
    teacher_weights_sha256: str | None
    dataset_sha256: str
    label_bytes: int
    #: The largest batch_size this server serves with every tensor included (its byte
    #: budget per batch over a sample's bytes); fewer tensors allow more. None: an older
    #: server that does not say.
    max_batch_size: int | None = None
    shards: int
    format_version: int


class ErrorBody(_Schema):
    code: str
    message: str


class ErrorResponse(_Schema):
    """Every error the server returns: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorBody
