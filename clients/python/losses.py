"""GIFT label refinement and loss (ICLR 2025), and the baseline losses of its loss study.

With teacher logits t, hard labels y, C classes, smoothing α and weight β::

    s = label_smoothing(y, α)      # 1-α on y, α/(C-1) elsewhere
    r = t/‖t‖ + β · s/‖s‖           # refined soft label
    loss = 1 - mean_i cos(student_i, r_i)

Defaults α = β = 0.1 match the official implementation. The paper's convex form
γ·ŝ + (1-γ)·t̂ points the same way with β = γ/(1-γ) (:func:`beta_from_gamma`); cosine is
scale-free, so the loss is identical.

Every loss here has one signature, ``loss(student_logits, batch)``, where ``batch`` carries
``soft`` (GIFT-refined labels, as served), ``hard`` and, when a loss needs them, ``logits``
(raw teacher logits). Each loss takes the target it was defined on, so nobody refines twice
or feeds refined labels to a loss that expects logits.

The eight names of the paper's loss study (:data:`LOSS_NAMES`) are exactly the official
evaluator's losses and constants (LINs-lab/GIFT, ``validate/losses_benchmark.py``): ``kl``
at T = 20 with no T² factor, CE weighted 0.1 in ``mse_ce`` and ``softce_ce``. Other
conventions carry names of their own (``kl_t2``), never the paper's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from softserve.format.refinement import DEFAULT_ALPHA, DEFAULT_BETA, flat_labels, refine_labels

DEFAULT_KL_TEMPERATURE = 20.0
DEFAULT_CE_WEIGHT = 0.1


class LabelledBatch(Protocol):
    """What a loss reads from a batch: refined labels, hard labels, and optional logits."""

    soft: torch.Tensor
    hard: torch.Tensor
    logits: torch.Tensor | None


@dataclass
class Targets:
    """A minimal :class:`LabelledBatch` for targets held in memory."""

    soft: torch.Tensor
    hard: torch.Tensor
    logits: torch.Tensor | None = None


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 at least (half and bfloat16 logits are promoted), and in
    float64 when given it, so that an identity between losses can be checked exactly."""
    return x if x.dtype == torch.float64 else x.float()


def cosine_loss(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity between rows."""
    return 1.0 - F.cosine_similarity(_wide(student_logits), _wide(target), dim=1).mean()


def gift_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    hard_labels: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """GIFT from raw teacher logits: refine, then 1 - mean cos(student, refined)."""
    return cosine_loss(student_logits, refine_labels(teacher_logits, hard_labels, alpha, beta))


def _need_logits(batch: LabelledBatch, name: str) -> torch.Tensor:
    if batch.logits is None:
        raise ValueError(
            f"loss {name!r} is defined on raw teacher logits; request them with the batch "
            "(logits=True) or use a loss on refined labels such as 'gift'"
        )
    return batch.logits


def _softce(student: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return -(probs * F.log_softmax(_wide(student), dim=1)).sum(dim=1).mean()


def _ce(student: torch.Tensor, batch: LabelledBatch) -> torch.Tensor:
    return F.cross_entropy(_wide(student), flat_labels(batch.hard))


def _cosine(student: torch.Tensor, batch: LabelledBatch) -> torch.Tensor:
    return cosine_loss(student, _need_logits(batch, "cosine"))


def _mse(student: torch.Tensor, batch: LabelledBatch) -> torch.Tensor:
    return F.mse_loss(_wide(student), _wide(_need_logits(batch, "mse")))


def _softce_teacher(student: torch.Tensor, batch: LabelledBatch) -> torch.Tensor:
    return _softce(student, F.softmax(_wide(_need_logits(batch, "softce")), dim=1))


class KLLoss(nn.Module):
    """KL(teacher ‖ student) on temperature-softened distributions, batch-averaged.

    ``kl`` is the official evaluator's loss: ``KLDivLoss("batchmean")`` of
    ``log_softmax(s/T)`` against ``softmax(t/T)`` at T = 20, with **no** T² factor.
    ``kl_t2`` is Hinton's convention, the same divergence multiplied by T² (so its gradients
    keep their size as T grows); it is not what the GIFT paper evaluated.
    """

    def __init__(self, temperature: float = DEFAULT_KL_TEMPERATURE, scale_t2: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.scale_t2 = scale_t2

    def forward(self, student_logits: torch.Tensor, batch: LabelledBatch) -> torch.Tensor:
        t = self.temperature
        teacher = _wide(_need_logits(batch, "kl_t2" if self.scale_t2 else "kl")) / t
        loss = F.kl_div(
            F.log_softmax(_wide(student_logits) / t, dim=1),
            F.log_softmax(teacher, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return loss * (t * t) if self.scale_t2 else loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, scale_t2={self.scale_t2}"


class WithCE(nn.Module):
    """A soft-target loss plus ``ce_weight`` times cross-entropy on the hard labels.

    The official evaluator's ``mse_ce`` and ``softce_ce`` weight CE by 0.1 (``loss_hyper``).
    """

    def __init__(
        self, name: str, fn: Callable[[torch.Tensor, LabelledBatch], torch.Tensor],
        ce_weight: float = DEFAULT_CE_WEIGHT,
    ) -> None:  # fmt: skip
        super().__init__()
        self.name = name
        self.fn = fn
        self.ce_weight = ce_weight

    def forward(self, student_logits: torch.Tensor, batch: LabelledBatch) -> torch.Tensor:
        return self.fn(student_logits, batch) + self.ce_weight * _ce(student_logits, batch)

    def extra_repr(self) -> str:
        return f"{self.name}, ce_weight={self.ce_weight}"


class BatchLoss(nn.Module):
    """A named loss over (student logits, batch)."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor, LabelledBatch], torch.Tensor]):
        super().__init__()
        self.name = name
        self.fn = fn

    def forward(self, student_logits: torch.Tensor, batch: LabelledBatch) -> torch.Tensor:
        return self.fn(student_logits, batch)

    def extra_repr(self) -> str:
        return self.name


class GIFTLoss(nn.Module):
    """GIFT loss on a batch: 1 - mean cos(student, batch.soft).

    Served batches already hold refined labels (``soft``); the refinement happened once, at
    relabel time, with the label set's α and β. For raw logits held elsewhere, refine with
    :func:`refine_labels` or call :func:`gift_loss`.
    """

    def forward(self, student_logits: torch.Tensor, batch: LabelledBatch) -> torch.Tensor:
        return cosine_loss(student_logits, batch.soft)


_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": lambda: BatchLoss("ce", _ce),
    "softce": lambda: BatchLoss("softce", _softce_teacher),
    "kl": KLLoss,
    "mse": lambda: BatchLoss("mse", _mse),
    "mse_ce": lambda **kw: WithCE("mse_ce", _mse, **kw),
    "softce_ce": lambda **kw: WithCE("softce_ce", _softce_teacher, **kw),
    "cosine": lambda: BatchLoss("cosine", _cosine),
    "gift": GIFTLoss,
}
#: Conventions other than the official evaluator's, each under its own name.
_VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "kl_t2": lambda **kw: KLLoss(scale_t2=True, **kw),
}

#: The eight losses of the GIFT paper's study, as its official evaluator defines them.
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)
#: Every name :func:`get_loss` accepts: the paper's eight, then other conventions.
ALL_LOSS_NAMES: tuple[str, ...] = LOSS_NAMES + tuple(_VARIANTS)
#: Losses that need the raw teacher logits in the batch.
NEEDS_LOGITS: frozenset[str] = frozenset(
    {"softce", "kl", "kl_t2", "mse", "mse_ce", "softce_ce", "cosine"}
)


def get_loss(name: str, **kwargs: float) -> nn.Module:
    """A loss module by name, called as ``loss(student_logits, batch)``.

    Every name of :data:`LOSS_NAMES` is the official evaluator's loss with its constants
    (LINs-lab/GIFT ``validate/losses_benchmark.py``). ``kl`` and ``kl_t2`` take
    ``temperature`` (default 20); ``mse_ce`` and ``softce_ce`` take ``ce_weight`` (default
    0.1).
    """
    factory = _LOSSES.get(name) or _VARIANTS.get(name)
    if factory is None:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(ALL_LOSS_NAMES)}")
    try:
        return factory(**kwargs)
    except TypeError:
        raise ValueError(f"loss {name!r} takes no option {', '.join(kwargs)}") from None
