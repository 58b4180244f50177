"""The few array operations the label math needs, for NumPy arrays and torch tensors alike.

Codec decoding and GIFT's refinement and its inverse are each written once, against
:func:`ops_for`: a training job runs them on its device with torch, and the server runs
the same formulas with NumPy, so that it never imports torch. Each torch operation is the
one the formulas used before they were shared, so torch results are unchanged.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    Array = np.ndarray | torch.Tensor
else:
    Array = Any

#: The smallest norm a row is divided by (``torch.nn.functional.normalize``'s default).
NORM_EPS = 1e-12


class NumpyOps:
    """The operations on NumPy arrays."""

    @staticmethod
    def float32(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    @staticmethod
    def int64(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.int64)

    @staticmethod
    def full(shape: tuple[int, ...], value: float, like: np.ndarray) -> np.ndarray:
        """A float32 array of ``value``."""
        return np.full(shape, value, dtype=np.float32)

    @staticmethod
    def repeat_last(x: np.ndarray, n: int) -> np.ndarray:
        """A writable (…, n) array holding ``x`` (…) in every column."""
        return np.repeat(x[..., None], n, axis=-1)

    @staticmethod
    def scatter_last(out: np.ndarray, index: np.ndarray, values: Any) -> np.ndarray:
        """``out`` with ``values`` put at ``index`` along the last axis, in place."""
        np.put_along_axis(out, np.asarray(index, dtype=np.int64), values, axis=-1)
        return out

    @staticmethod
    def unpack_last(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
        """The first ``n`` ``bits``-bit fields of each row of bytes, low bits first, as
        float32 (…, n)."""
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        fields = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
        return fields.reshape(*packed.shape[:-1], -1)[..., :n].astype(np.float32)

    @staticmethod
    def normalize_last(x: np.ndarray) -> np.ndarray:
        """Rows divided by their L2 norm (at least :data:`NORM_EPS`)."""
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return x / np.maximum(norm, np.float32(NORM_EPS))

    @staticmethod
    def to_device_of(x: np.ndarray, like: np.ndarray) -> np.ndarray:
        return x


class TorchOps:
    """The operations on torch tensors (on any device)."""

    def __init__(self) -> None:
        import torch
        import torch.nn.functional as F

        self._torch = torch
        self._F = F

    def float32(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def int64(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()

    def full(self, shape: tuple[int, ...], value: float, like: torch.Tensor) -> torch.Tensor:
        return self._torch.full(shape, value, device=like.device)

    def repeat_last(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x[..., None].expand(*x.shape, n).clone()

    def scatter_last(self, out: torch.Tensor, index: torch.Tensor, values: Any) -> torch.Tensor:
        return out.scatter_(-1, index.long(), values)

    def unpack_last(self, packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
        torch = self._torch
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        fields = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        return fields.reshape(*packed.shape[:-1], -1)[..., :n].float()

    def normalize_last(self, x: torch.Tensor) -> torch.Tensor:
        return self._F.normalize(x, dim=-1, eps=NORM_EPS)

    def to_device_of(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.device)


NUMPY = NumpyOps()


@functools.cache
def _torch_ops() -> TorchOps:
    return TorchOps()


def ops_for(x: Array) -> NumpyOps | TorchOps:
    """The operations for ``x``'s kind: torch is imported only for a tensor."""
    if isinstance(x, np.ndarray | np.generic):
        return NUMPY
    return _torch_ops()
