"""Where and how the teacher runs: device choice, autocast precision, distributed ranks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from softserve.errors import InputError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` is this rank's GPU under
    torchrun (LOCAL_RANK); ``cuda:N`` one GPU, for a single process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device {name} but no CUDA device is visible; use --device cpu")
    count = torch.cuda.device_count()
    if not index:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % count)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(
            f"--device {name} would put every rank on one GPU; under torchrun use --device "
            "cuda (each rank takes the GPU of its LOCAL_RANK)"
        )
    if int(index) >= count:
        raise InputError(f"--device {name} but only {count} CUDA device(s) are visible")
    return torch.device("cuda", int(index))


def check_precision(device: torch.device, precision: str) -> None:
    """Raise unless ``precision`` is known and runs on ``device`` (reduced precision: CUDA)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown --precision {precision!r}; use {', '.join(PRECISIONS)}")
    if PRECISIONS[precision] is not None and device.type != "cuda":
        raise InputError(f"--precision {precision} runs on CUDA only; use fp32 on {device.type}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision``: none for fp32."""
    check_precision(device, precision)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the relabel workers."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[Ranks]:
    """Join the torchrun job this process belongs to, if any (NCCL on CUDA, gloo on CPU)."""
    if dist.is_available() and dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size())
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Ranks()
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()
