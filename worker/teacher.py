"""Teachers by spec: ``torchvision:ARCH``, ``timm:ARCH``, ``module.path:callable`` or a
torch.export ``.pt2``."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from softserve.errors import InputError, brief
from softserve.storage.layout import sha256_file
from softserve.worker.exported import load_exported
from softserve.worker.sources import ImageSet, TeacherInputs

#: Seed of a teacher's initial weights, for those no weights file replaces.
TEACHER_INIT_SEED = 0


@dataclass
class Teacher:
    """A loaded teacher model, with what the manifest records about it."""

    model: nn.Module
    spec: str
    weights: str | None
    weights_sha256: str | None


def load_teacher(
    spec: str, weights: Path | None = None, num_classes: int | None = None,
    allow_pickle: bool = False, random_teacher: bool = False, in_chans: int = 3,
) -> Teacher:  # fmt: skip
    """Build the teacher named by ``spec`` and load ``weights`` into it (on the CPU).

    A torchvision or timm architecture without ``weights`` is refused unless
    ``random_teacher``: softserve never downloads weights, so it would label with random
    ones, which is never what a user means outside tests and benchmarks. timm models are
    built for ``num_classes`` and ``in_chans`` (the images' channels).

    A ``.pt2`` file is data unless ``allow_pickle``: loading one can run code from the
    file, so :mod:`softserve.worker.exported` refuses any that is more than tensors and
    torch's operators.
    """
    digest: str | None = None
    if spec.endswith(".pt2"):
        model = load_exported(Path(spec), allow_pickle)
        if weights is None:
            digest = sha256_file(Path(spec))
    elif spec.startswith(("torchvision:", "timm:")):
        zoo, _, arch = spec.partition(":")
        with _seeded_init():
            if zoo == "timm":
                model = _load_timm(arch, num_classes, in_chans)
            else:
                model = _load_torchvision(arch, num_classes)
        if weights is None and not random_teacher:
            raise InputError(
                f"{spec} without --weights would label with random weights (softserve never "
                "downloads weights); pass --weights FILE, or --random-teacher if a random "
                "teacher is really what you want (tests, benchmarks)"
            )
    elif ":" in spec:
        with _seeded_init():
            model = _load_factory(spec, num_classes)
    else:
        raise InputError(
            f"teacher spec {spec!r} not understood; use torchvision:ARCH, timm:ARCH, "
            "module.path:callable, or a .pt2 file from torch.export"
        )
    if weights is not None:
        _load_weights(model, spec, weights)
        digest = sha256_file(weights)
    with contextlib.suppress(NotImplementedError, RuntimeError):  # exported modules refuse eval()
        model.eval()
    return Teacher(
        model=model,
        spec=spec,
        weights=str(weights) if weights is not None else None,
        weights_sha256=digest,
    )


@contextlib.contextmanager
def _seeded_init() -> Iterator[None]:
    """Build a model from a fixed seed, leaving the caller's RNG as it was: weights a file
    does not replace (a random teacher) are then the same on every rank and every resume."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEACHER_INIT_SEED)
        yield


def load_teacher_of(inputs: TeacherInputs, data: ImageSet) -> Teacher:
    """The teacher of a relabel or an online training run over ``data``. --num-classes
    reaches a factory or torchvision only when given, so a factory without a num_classes
    argument works for both; a timm model takes the set's classes and channels."""
    timm = inputs.teacher.startswith("timm:")
    return load_teacher(
        inputs.teacher, inputs.weights,
        inputs.num_classes or (data.num_classes if timm else None),
        inputs.allow_pickle, inputs.random_teacher, in_chans=data.images.shape[1],
    )  # fmt: skip


def check_teacher_output(
    spec: str, run: Callable[[], torch.Tensor], shape: tuple[int, ...], num_classes: int
) -> None:
    """Run the teacher once on a batch of ``shape`` (``run``) and refuse a failure, or an
    output that is not one logit per class: one line before any work, not a traceback later."""
    try:
        out = run()
    except InputError:
        raise
    except Exception as exc:  # any failure of user code on our input
        raise InputError(
            f"teacher {spec!r} failed on a batch of shape {shape} ({brief(exc)}); "
            "check --teacher, --size and the image channels"
        ) from None
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise InputError(
            f"teacher {spec!r} outputs shape {tuple(out.shape)} but the images have "
            f"{num_classes} classes; use a teacher (or --num-classes) with one logit per class"
        )
    if out.shape[0] != shape[0]:
        raise InputError(
            f"teacher {spec!r} outputs {out.shape[0]} rows for a batch of {shape[0]} images; "
            "it must give one row of logits per image (does it reduce over the batch?)"
        )


def _load_torchvision(arch: str, num_classes: int | None) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise InputError(
            f"torchvision has no classification model {arch!r}; "
            f"e.g. {', '.join(sorted(available)[:8])}, ..."
        )
    if num_classes is None:
        raise InputError(f"torchvision:{arch} needs --num-classes")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _load_timm(arch: str, num_classes: int | None, in_chans: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise InputError(
            f"timm:{arch} needs timm; pip install 'softserve[worker]' (or pip install timm)"
        ) from None
    if not timm.is_model(arch):
        raise InputError(
            f"timm has no model {arch!r}; list them with python -c 'import timm; "
            "print(timm.list_models())'"
        )
    if num_classes is None:
        raise InputError(f"timm:{arch} needs --num-classes")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def _load_factory(spec: str, num_classes: int | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise InputError(
            f"teacher spec {spec!r} needs an absolute module.path:callable, e.g. mypkg.nets:make"
        )
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:  # for the import only: later imports must not pick up the user's files
        sys.path.insert(0, cwd)
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"cannot import {module_name!r} for teacher {spec!r} ({brief(exc)}); "
            "run from its folder or add it to PYTHONPATH"
        ) from None
    except Exception as exc:  # the module's own code failed while importing
        raise InputError(
            f"importing {module_name!r} for teacher {spec!r} failed ({brief(exc)})"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"{module_name!r} has no attribute {attr!r} (teacher {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"teacher {spec!r} is not callable")
    kwargs = {}
    if num_classes is not None:
        if "num_classes" not in inspect.signature(target).parameters:
            raise InputError(f"teacher factory {spec!r} takes no num_classes argument")
        kwargs["num_classes"] = num_classes
    try:
        model = target(**kwargs)
    except Exception as exc:  # the user's factory can raise anything
        raise InputError(f"teacher factory {spec!r} failed ({brief(exc)})") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"teacher factory {spec!r} returned {type(model).__name__}, not nn.Module")
    return model


def _load_weights(model: nn.Module, spec: str, path: Path) -> None:
    if not path.is_file():
        raise InputError(f"--weights {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise InputError(f"cannot load weights {path} ({brief(exc)})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise InputError(f"{path} holds {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(
            f"weights {path} do not fit teacher {spec!r} ({brief(exc, 300)}); "
            "check --teacher and --num-classes"
        ) from None
