"""The manifest: everything needed to trust and serve a label set, written last."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from softserve import __version__
from softserve.errors import InputError, StoreError, brief, first_invalid
from softserve.format.augment import DSA_STRATEGY, DsaPolicy, ViewKind, ViewPolicy
from softserve.format.codecs import get_codec
from softserve.storage.layout import MANIFEST_FILE, PLAN_FILE, write_text_atomic

#: Written today: one stored label per view (see softserve.storage.shards); 1 still reads.
FORMAT_VERSION = 3


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherInfo(_Model):
    """The teacher as given on the command line, and the digest of its weights."""

    spec: str
    weights: str | None = None
    weights_sha256: str | None = None


class ViewInfo(_Model):
    """RandomResizedCrop + flip views (``--views rrc``, and every set before DSA views): the
    policy, the output size, and how a crop is resized to it (:mod:`softserve.pixels`):
    "bilinear" (every set before antialiased views, and relabel's) or "bilinear-antialias"
    (PIL's, as SRe2L's teacher saw downscaled crops)."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: bool
    output_size: tuple[int, int]
    interpolation: Literal["bilinear", "bilinear-antialias"] = "bilinear"

    @property
    def policy(self) -> ViewKind:
        return "rrc"

    def view_policy(self) -> ViewPolicy:
        return ViewPolicy(scale=self.scale, ratio=self.ratio, flip=self.flip)


class DsaInfo(_Model):
    """DSA's ranges (:class:`softserve.format.augment.DsaPolicy`) and its strategy's name."""

    strategy: Literal["color_crop_cutout_flip_scale_rotate"] = DSA_STRATEGY
    flip: float
    brightness: float
    saturation: float
    contrast: float
    crop: float
    scale: float
    rotate: float
    cutout: float


class DsaViewInfo(_Model):
    """DSA views (``--views dsa``): the whole image resized to the output size, then DSA in
    normalized pixels, its parameters stored per (epoch, sample) as float32 rows."""

    policy: Literal["dsa"] = "dsa"
    dsa: DsaInfo
    output_size: tuple[int, int]
    interpolation: Literal["bilinear"] = "bilinear"

    def view_policy(self) -> DsaPolicy:
        return DsaPolicy(**self.dsa.model_dump(exclude={"strategy"}))


def _view_kind(views: Any) -> str:
    """A set's view policy: written as ``policy`` by DSA sets, absent (crops) in the rest."""
    if isinstance(views, dict):
        return str(views.get("policy", "rrc"))
    return str(getattr(views, "policy", "rrc"))


#: The views of a set: crop + flip (no ``policy`` key: what every older set has) or DSA.
Views = Annotated[
    Annotated[ViewInfo, Tag("rrc")] | Annotated[DsaViewInfo, Tag("dsa")],
    Discriminator(_view_kind),
]


def view_info(
    policy: ViewPolicy | DsaPolicy, output_size: tuple[int, int]
) -> ViewInfo | DsaViewInfo:
    """The manifest's record of a view policy at an output size."""
    if isinstance(policy, DsaPolicy):
        return DsaViewInfo(dsa=DsaInfo(**vars(policy)), output_size=output_size)
    return ViewInfo(
        scale=policy.scale, ratio=policy.ratio, flip=policy.flip, output_size=output_size
    )


class MixInfo(_Model):
    """CutMix or Mixup per (epoch, sample): kind, probability, and λ's Beta(α, α)."""

    kind: Literal["cutmix", "mixup"]
    prob: float = Field(ge=0.0, le=1.0)
    alpha: float = Field(gt=0.0)


class RefinementInfo(_Model):
    """GIFT refinement parameters of the stored ``soft`` labels (and of recovering the
    teacher's logits from them)."""

    method: Literal["gift"] = "gift"
    alpha: float
    beta: float


class LabelSetConfig(_Model):
    """What defines a label set's content: a relabel that matches this may resume it."""

    num_samples: int = Field(gt=0)
    num_classes: int = Field(gt=1)
    class_names: list[str]
    image_shape: tuple[int, int, int]
    dataset_sha256: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    teacher: TeacherInfo
    views: Views
    #: None: views only (every set relabelled without --mix, and all older sets); left out
    #: of the file then, so a softserve that predates mixing still reads unmixed sets
    mix: MixInfo | None = Field(None, exclude_if=lambda mix: mix is None)
    refinement: RefinementInfo
    epochs: int = Field(gt=0)
    seed: int
    codec: str
    precision: Literal["fp32", "bf16", "fp16"]
    shard_epochs: int = Field(gt=0)
    chunk_rows: int = Field(gt=0)

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, name: str) -> str:
        try:
            get_codec(name)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return name

    @model_validator(mode="after")
    def _one_name_per_class(self) -> LabelSetConfig:
        """Class names are shown by class index: a name too many or too few mislabels."""
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names names {len(self.class_names)} classes but has {self.num_classes}"
            )
        return self

    def shard_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) epochs of every shard, in order."""
        return [
            (start, min(start + self.shard_epochs, self.epochs))
            for start in range(0, self.epochs, self.shard_epochs)
        ]

    def differences(self, other: LabelSetConfig) -> list[str]:
        """Names of the fields in which two configs differ."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [key for key in mine if mine[key] != theirs[key]]


class FileInfo(_Model):
    """One file of the set: a bare name inside the set's folder, never a path elsewhere."""

    file: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$", max_length=255)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ShardInfo(FileInfo):
    epoch_start: int
    epoch_stop: int

    @property
    def epochs(self) -> tuple[int, int]:
        """The [start, stop) epochs this shard holds."""
        return self.epoch_start, self.epoch_stop


class ProducerInfo(_Model):
    """How the labels were computed; informative, not part of the label set's identity."""

    softserve_version: str
    torch_version: str
    device: str
    batch_size: int
    world_size: int = 1


class Manifest(_Model):
    """The manifest of a complete label set."""

    format_version: Literal[1, 2, 3] = FORMAT_VERSION
    name: str
    created: datetime
    config: LabelSetConfig
    dataset: FileInfo
    shards: list[ShardInfo]
    producer: ProducerInfo

    @model_validator(mode="after")
    def _shards_cover_the_epochs(self) -> Manifest:
        """A reader finds epoch e in shard e // shard_epochs: a manifest whose shards say
        otherwise would serve one epoch's labels as another's."""
        found = [shard.epochs for shard in self.shards]
        expected = self.config.shard_ranges()
        if found != expected:
            raise ValueError(f"shards cover epochs {found}, the config says {expected}")
        return self

    def label_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def content_sha256(self) -> str:
        """What the set holds, not where or when it was built: the sha256 of its config
        (less the teacher's path) and its files' sha256. A rebuild of the same labels shares
        it (the writer's bytes are deterministic); the digest, which covers the manifest's
        creation time and paths, does not."""
        config = self.config.model_dump(mode="json")
        config["teacher"].pop("weights", None)
        content = {"format_version": self.format_version, "config": config,
                   "files": [f.sha256 for f in (self.dataset, *self.shards)]}  # fmt: skip
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _newer_format(raw: bytes) -> int | None:
    """The format version of a file that a newer softserve wrote, else None."""
    try:
        version = json.loads(raw).get("format_version")
    except (ValueError, AttributeError):  # not JSON, or not an object: _parse says so
        return None
    return version if isinstance(version, int) and version > FORMAT_VERSION else None


def _parse(raw: bytes, path: Path, model: type[_Model], what: str) -> _Model:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if (newer := _newer_format(raw)) is not None:
            raise StoreError(
                f"{path} is a {what} of format {newer}, written by a newer softserve; "
                f"softserve {__version__} reads formats 1 to {FORMAT_VERSION}: upgrade it"
            ) from None
        raise StoreError(
            f"{path} is not a valid {what} ({first_invalid(exc)}); relabel into a new path"
        ) from None
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise StoreError(
            f"{path} is not a valid {what} ({first}); relabel into a new path"
        ) from None


#: Far more than the manifest of a set of 100,000 shards (about 25 MB).
_MAX_JSON_BYTES = 1 << 26


def read_json_file(path: Path, what: str) -> bytes:
    """The bytes of a set's manifest or plan: a plain file in its folder (a symbolic link
    could make a set read any file), or a one-line StoreError. FileNotFoundError and
    NotADirectoryError when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as exc:
        kind = "a symbolic link" if path.is_symlink() else brief(exc)
        raise StoreError(
            f"cannot read the {what} {path} ({kind}); it must be a plain file"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe, socket or device"
            raise StoreError(f"the {what} {path} is {kind}; it must be a plain file")
        if st.st_size > _MAX_JSON_BYTES:  # read on every rescan: a huge one would stall them
            raise StoreError(f"the {what} {path} has {st.st_size} bytes, more than any {what}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(_MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise StoreError(f"cannot read the {what} {path} ({brief(exc)})") from None
    finally:
        os.close(fd)


def load_manifest(root: Path) -> tuple[Manifest, str]:
    """The manifest of the label set at ``root`` and its digest: the sha256 of the manifest
    file's bytes, read once. The digest is the label set's identity: the manifest lists
    every file's sha256, so two builds of one name never share it."""
    path = root / MANIFEST_FILE
    try:
        raw = read_json_file(path, "manifest")
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(_not_a_label_set(root)) from None
    manifest = _parse(raw, path, Manifest, "manifest")
    return manifest, hashlib.sha256(raw).hexdigest()  # type: ignore[return-value]


#: How to finish a folder holding a plan but no manifest: its writer left it part way.
RESUME_HINT = "rerun the same 'softserve relabel' or 'softserve transcode' command that started it"


def _not_a_label_set(root: Path) -> str:
    """Why ``root`` has no manifest: no such path, a file, a relabel still running, or a
    folder that is something else."""
    if not root.exists():
        return f"{root}: no such file or folder"
    if not root.is_dir():
        return f"{root} is a file, not a label set (a folder STORE/NAME)"
    if (root / PLAN_FILE).exists():
        return f"{root} holds no complete label set (no {MANIFEST_FILE}); finish it: {RESUME_HINT}"
    return f"{root} is not a label set: a folder with no {MANIFEST_FILE} and no relabel plan"


def read_manifest(root: Path) -> Manifest:
    """The manifest of the label set at ``root``; StoreError when absent or invalid."""
    return load_manifest(root)[0]


class PlanProducer(_Model):
    """What decides a relabel's bytes beside its config: a resume must run with the same."""

    batch_size: int
    device: str


class RelabelPlan(_Model):
    """What a relabel (or transcode) into a folder started with, written before its files."""

    config: LabelSetConfig
    #: None for a transcode (no teacher runs) and for plans written before it was kept
    producer: PlanProducer | None = None


def read_plan(root: Path) -> RelabelPlan | None:
    """The plan a relabel into ``root`` started with, if one did (an older plan is its bare
    config)."""
    path = root / PLAN_FILE
    try:
        raw = read_json_file(path, "relabel plan")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        bare = "config" not in json.loads(raw)
    except (ValueError, TypeError):  # not JSON, or not an object: _parse says so
        bare = False
    if bare:
        return RelabelPlan(config=_parse(raw, path, LabelSetConfig, "relabel plan"))  # type: ignore[arg-type]
    return _parse(raw, path, RelabelPlan, "relabel plan")  # type: ignore[return-value]


def write_model(path: Path, model: BaseModel) -> None:
    """Write a manifest or plan atomically, as indented JSON."""
    write_text_atomic(path, model.model_dump_json(indent=2) + "\n")
