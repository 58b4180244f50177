"""GIFT and the baseline losses, each checked against an independent formula in float64."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from softserve.client.losses import (
    ALL_LOSS_NAMES,
    LOSS_NAMES,
    NEEDS_LOGITS,
    GIFTLoss,
    Targets,
    get_loss,
    gift_loss,
)
from softserve.format.refinement import beta_from_gamma, refine_labels, smooth_labels

B, C = 32, 10
ALPHA_BETA = [(0.1, 0.1), (0.0, 0.5), (0.3, 1.0), (0.1, 0.0), (0.05, 3.0)]
#: The paper's eight, as the official evaluator names them, and the other conventions.
PAPER_LOSSES = {"ce", "softce", "kl", "mse", "mse_ce", "softce_ce", "cosine", "gift"}
ALL_LOSSES = PAPER_LOSSES | {"kl_t2"}
LOGIT_LOSSES = {"softce", "kl", "kl_t2", "mse", "mse_ce", "softce_ce", "cosine"}
CLASS_COUNTS = [2, 10, 100]


def make_inputs(
    seed: int, b: int = B, c: int = C
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits, teacher logits (float32, logit-like scale) and hard labels (int64)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, c, generator=g) * 3
    teacher = torch.randn(b, c, generator=g) * 5
    hard = torch.randint(0, c, (b,), generator=g)
    return student, teacher, hard


def ref_smooth(hard: torch.Tensor, c: int, alpha: float) -> torch.Tensor:
    """1-alpha on the label, alpha/(C-1) elsewhere, built by index assignment."""
    s = torch.full((len(hard), c), alpha / (c - 1), dtype=torch.float64)
    s[torch.arange(len(hard)), hard] = 1.0 - alpha
    return s


def ref_refine(
    teacher: torch.Tensor, hard: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """r = t/|t| + beta * s/|s|."""
    t = teacher.double()
    s = ref_smooth(hard, t.shape[1], alpha)
    return t / t.norm(dim=1, keepdim=True) + beta * s / s.norm(dim=1, keepdim=True)


def ref_cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - mean over rows of (a.b) / (|a||b|)."""
    a, b = a.double(), b.double()
    return 1.0 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


def value_and_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], student: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss value and its gradient with respect to the student logits."""
    x = student.detach().clone().requires_grad_(True)
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().double(), grad.double()


def assert_same_loss(
    fn: Callable[[torch.Tensor], torch.Tensor],
    ref: Callable[[torch.Tensor], torch.Tensor],
    student: torch.Tensor,
) -> None:
    """Values and gradients agree to float32 precision (the reference runs in float64)."""
    v, g = value_and_grad(fn, student.float())
    rv, rg = value_and_grad(ref, student.double())
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-7)


def test_smooth_labels_matches_reference() -> None:
    """smooth_labels puts 1-alpha on the label and alpha/(C-1) elsewhere; rows sum to 1."""
    _, _, hard = make_inputs(0)
    s = smooth_labels(hard, C, 0.2)
    torch.testing.assert_close(s.double(), ref_smooth(hard, C, 0.2))
    torch.testing.assert_close(s.sum(1).double(), torch.ones(B, dtype=torch.float64))


@pytest.mark.parametrize(("alpha", "beta"), ALPHA_BETA)
@pytest.mark.parametrize("hard_shape", ["flat", "column"])
def test_refine_labels_matches_reference(alpha: float, beta: float, hard_shape: str) -> None:
    """refine_labels equals t/|t| + beta*s/|s| and returns float32."""
    _, teacher, hard = make_inputs(1)
    y = hard[:, None] if hard_shape == "column" else hard
    r = refine_labels(teacher, y, alpha, beta)
    assert r.dtype == torch.float32 and r.shape == (B, C)
    torch.testing.assert_close(
        r.double(), ref_refine(teacher, hard, alpha, beta), atol=1e-6, rtol=0
    )


def test_refine_labels_defaults_are_point_one() -> None:
    """Defaults alpha = beta = 0.1, as the official implementation."""
    _, teacher, hard = make_inputs(2)
    torch.testing.assert_close(
        refine_labels(teacher, hard).double(),
        ref_refine(teacher, hard, 0.1, 0.1),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize(("alpha", "beta"), ALPHA_BETA)
@pytest.mark.parametrize("hard_shape", ["flat", "column"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gift_loss_matches_reference(alpha: float, beta: float, hard_shape: str, seed: int) -> None:
    """gift_loss, GIFTLoss on refined labels and get_loss('gift') equal the formula, with grads."""
    student, teacher, hard = make_inputs(seed)
    y = hard[:, None] if hard_shape == "column" else hard
    refined_ref = ref_refine(teacher, hard, alpha, beta)

    def ref(x: torch.Tensor) -> torch.Tensor:
        return ref_cosine_loss(x, refined_ref)

    assert_same_loss(lambda x: gift_loss(x, teacher, y, alpha, beta), ref, student)
    batch = Targets(soft=refine_labels(teacher, y, alpha, beta), hard=y)
    assert_same_loss(lambda x: GIFTLoss()(x, batch), ref, student)
    assert_same_loss(lambda x: get_loss("gift")(x, batch), ref, student)


def test_gift_loss_defaults() -> None:
    """gift_loss without alpha/beta uses 0.1/0.1."""
    student, teacher, hard = make_inputs(5)
    expected = ref_cosine_loss(student, ref_refine(teacher, hard, 0.1, 0.1))
    torch.testing.assert_close(gift_loss(student, teacher, hard).double(), expected)


def test_gift_loss_is_zero_on_its_target() -> None:
    """A student that outputs a positive multiple of the refined label has zero loss."""
    _, teacher, hard = make_inputs(6)
    refined = ref_refine(teacher, hard, 0.1, 0.1).float()
    loss = gift_loss(3.0 * refined, teacher, hard)
    assert abs(float(loss)) < 1e-6


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_beta_from_gamma_matches_convex_form(gamma: float, alpha: float) -> None:
    """gamma*s_hat + (1-gamma)*t_hat points the same way as the additive form, same loss."""
    student, teacher, hard = make_inputs(7)
    t = teacher.double()
    s = ref_smooth(hard, C, alpha)
    convex = gamma * s / s.norm(dim=1, keepdim=True) + (1 - gamma) * t / t.norm(dim=1, keepdim=True)
    beta = beta_from_gamma(gamma)
    additive = refine_labels(teacher, hard, alpha, beta).double()
    cos = (convex * additive).sum(1) / (convex.norm(dim=1) * additive.norm(dim=1))
    torch.testing.assert_close(cos, torch.ones(B, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        gift_loss(student, teacher, hard, alpha, beta).double(),
        ref_cosine_loss(student, convex),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5])
def test_beta_from_gamma_rejects_out_of_range(gamma: float) -> None:
    """gamma outside [0, 1) raises ValueError."""
    with pytest.raises(ValueError):
        beta_from_gamma(gamma)


def softmax64(x: torch.Tensor) -> torch.Tensor:
    """Row softmax by exp / sum, max-shifted."""
    e = torch.exp(x - x.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def ref_ce(student: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """-(s_y - logsumexp(s)) averaged over rows."""
    s = student.double()
    lse = torch.log(torch.exp(s - s.max(1, keepdim=True).values).sum(1)) + s.max(1).values
    return -(s[torch.arange(len(hard)), hard] - lse).mean()


def ref_softce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """-(softmax(t) * log softmax(s)).sum(1).mean()."""
    return -(softmax64(teacher.double()) * torch.log(softmax64(student.double()))).sum(1).mean()


def ref_kl(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """sum_i KL(softmax(t_i/T) || softmax(s_i/T)) / B: KLDivLoss(batchmean), no T^2."""
    p = softmax64(teacher.double() / temp)
    q = softmax64(student.double() / temp)
    return (p * (torch.log(p) - torch.log(q))).sum() / len(p)


def ref_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over all entries."""
    return ((student.double() - teacher.double()) ** 2).mean()


RefLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Reference of each loss from (student, teacher logits, hard labels, refined labels).
REFERENCES: dict[str, RefLoss] = {
    "ce": lambda s, t, y, r: ref_ce(s, y),
    "softce": lambda s, t, y, r: ref_softce(s, t),
    "kl": lambda s, t, y, r: ref_kl(s, t, 20.0),
    "kl_t2": lambda s, t, y, r: 400.0 * ref_kl(s, t, 20.0),
    "mse": lambda s, t, y, r: ref_mse(s, t),
    "mse_ce": lambda s, t, y, r: ref_mse(s, t) + 0.1 * ref_ce(s, y),
    "softce_ce": lambda s, t, y, r: ref_softce(s, t) + 0.1 * ref_ce(s, y),
    "cosine": lambda s, t, y, r: ref_cosine_loss(s, t),
    "gift": lambda s, t, y, r: ref_cosine_loss(s, r),
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
@pytest.mark.parametrize("hard_shape", ["flat", "column"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("classes", CLASS_COUNTS)
def test_loss_by_name_matches_reference(
    name: str, hard_shape: str, seed: int, classes: int
) -> None:
    """get_loss(name)(student, batch) equals the loss's formula, value and gradient."""
    student, teacher, hard = make_inputs(seed, c=classes)
    y = hard[:, None] if hard_shape == "column" else hard
    soft = refine_labels(teacher, y)
    batch = Targets(soft=soft, hard=y, logits=teacher)
    loss = get_loss(name)

    def ref(x: torch.Tensor) -> torch.Tensor:
        return REFERENCES[name](x, teacher, hard, soft)

    assert_same_loss(lambda x: loss(x, batch), ref, student)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_kl_custom_temperature(temperature: float) -> None:
    """get_loss('kl', temperature=T) softens both sides by T; kl_t2 also scales by T^2."""
    student, teacher, hard = make_inputs(3)
    batch = Targets(soft=refine_labels(teacher, hard), hard=hard, logits=teacher)
    loss = get_loss("kl", temperature=temperature)
    assert_same_loss(lambda x: loss(x, batch), lambda x: ref_kl(x, teacher, temperature), student)
    hinton = get_loss("kl_t2", temperature=temperature)
    assert_same_loss(
        lambda x: hinton(x, batch), lambda x: temperature**2 * ref_kl(x, teacher, temperature),
        student,
    )  # fmt: skip


def test_kl_has_no_t2_factor() -> None:
    """The official 'kl' is KLDivLoss(batchmean) as is: a T^2 = 400 factor must not come back.

    Checked on the gradient, which is what the factor changes for an optimizer: the paper's
    finding that KL collapses under SGD depends on its size. An identity, so computed in
    float64: in float32 the two sides round differently on each CPU's SIMD kernels.
    """
    student, teacher, hard = (x.double() if x.is_floating_point() else x for x in make_inputs(8))
    batch = Targets(soft=refine_labels(teacher, hard), hard=hard, logits=teacher)
    _, grad = value_and_grad(lambda x: get_loss("kl")(x, batch), student)
    _, hinton = value_and_grad(lambda x: get_loss("kl_t2")(x, batch), student)
    torch.testing.assert_close(hinton, 400.0 * grad, rtol=1e-10, atol=0)
    official = torch.nn.KLDivLoss(reduction="batchmean")
    x = student.clone().requires_grad_(True)
    expected = official(torch.log_softmax(x / 20, 1), torch.softmax(teacher / 20, 1))
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize(("name", "soft_part"), [("mse_ce", ref_mse), ("softce_ce", ref_softce)])
def test_ce_weight_is_one_tenth(name: str, soft_part: Callable) -> None:
    """mse_ce and softce_ce add CE weighted 0.1 (the evaluator's loss_hyper), not 1."""
    student, teacher, hard = make_inputs(9)
    batch = Targets(soft=refine_labels(teacher, hard), hard=hard, logits=teacher)
    combined = float(get_loss(name)(student, batch))
    ce_part = (combined - float(soft_part(student, teacher))) / float(ref_ce(student, hard))
    assert ce_part == pytest.approx(0.1, rel=1e-4)
    heavier = float(get_loss(name, ce_weight=1.0)(student, batch))
    assert heavier - combined == pytest.approx(0.9 * float(ref_ce(student, hard)), rel=1e-4)


def test_loss_options_are_checked() -> None:
    """An option a loss does not take, or a non-positive temperature, is a ValueError."""
    with pytest.raises(ValueError, match="ce_weight"):
        get_loss("gift", ce_weight=0.5)
    with pytest.raises(ValueError, match="temperature"):
        get_loss("kl", temperature=0.0)


def test_kl_default_temperature_differs_from_one() -> None:
    """The default temperature is 20, not 1: the two give different values."""
    student, teacher, hard = make_inputs(4)
    batch = Targets(soft=refine_labels(teacher, hard), hard=hard, logits=teacher)
    default = float(get_loss("kl")(student, batch))
    assert default == pytest.approx(float(ref_kl(student, teacher, 20.0)), rel=1e-5)
    assert default != pytest.approx(float(ref_kl(student, teacher, 1.0)), rel=1e-3)


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_logit_losses_need_logits(name: str) -> None:
    """Losses on raw teacher logits raise a ValueError naming 'logits' when there are none."""
    student, teacher, hard = make_inputs(0)
    batch = Targets(soft=refine_labels(teacher, hard), hard=hard)
    with pytest.raises(ValueError, match="logits"):
        get_loss(name)(student, batch)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES - LOGIT_LOSSES))
def test_other_losses_work_without_logits(name: str) -> None:
    """ce and gift only need hard and soft labels."""
    student, teacher, hard = make_inputs(0)
    batch = Targets(soft=refine_labels(teacher, hard), hard=hard)
    assert torch.isfinite(get_loss(name)(student, batch))


def test_unknown_loss_lists_names() -> None:
    """An unknown name raises ValueError listing every valid name."""
    with pytest.raises(ValueError, match="nope") as info:
        get_loss("nope")
    for name in ALL_LOSSES:
        assert name in str(info.value)


def test_loss_names_and_needs_logits() -> None:
    """LOSS_NAMES holds exactly the paper's eight; NEEDS_LOGITS those on raw logits."""
    assert len(LOSS_NAMES) == 8
    assert set(LOSS_NAMES) == PAPER_LOSSES
    assert set(ALL_LOSS_NAMES) == ALL_LOSSES
    assert set(NEEDS_LOGITS) == LOGIT_LOSSES


def test_losses_reject_bad_hard_shape() -> None:
    """Hard labels that are neither (B,) nor (B, 1) raise ValueError."""
    student, teacher, hard = make_inputs(0)
    bad = hard[:, None].expand(B, 2)
    with pytest.raises(ValueError, match="hard"):
        get_loss("ce")(student, Targets(soft=teacher, hard=bad, logits=teacher))
    with pytest.raises(ValueError, match="hard"):
        refine_labels(teacher, bad)


def test_client_exports() -> None:
    """The loss API is importable from softserve.client."""
    from softserve.client import GIFTLoss as ExportedGIFTLoss
    from softserve.client import get_loss as exported_get_loss
    from softserve.client import gift_loss as exported_gift_loss
    from softserve.client import refine_labels as exported_refine_labels

    assert ExportedGIFTLoss is GIFTLoss
    assert exported_get_loss is get_loss
    assert exported_gift_loss is gift_loss
    assert exported_refine_labels is refine_labels
