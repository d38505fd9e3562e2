"""DINO, iBOT and KoLeo against references written from the papers' maths, plus gradients and centres.

The references below are deliberately written differently from the modules: Sinkhorn normalises
the (B, K) matrix without transposing, DINO uses DINOv2's flattened "swapped teacher" layout for
the global crops, and iBOT loops over images.
"""

from __future__ import annotations

import math

import pytest
import torch

from multiteach.errors import MultiteachError
from multiteach.losses.dino import DINOLoss, sinkhorn_knopp
from multiteach.losses.ibot import IBOTPatchLoss
from multiteach.losses.koleo import KoLeoLoss, koleo

F64 = torch.float64
STUDENT_T, TEACHER_T = 0.1, 0.05

# ---------------------------------------------------------------- references


def ref_centered_softmax(t: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    e = torch.exp((t - center) / temp)
    return e / e.sum(-1, keepdim=True)


def ref_sinkhorn(t: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """Equipartition on P (B samples x K prototypes): prototype columns get mass 1/K, sample rows 1/B."""
    p = torch.exp(t / temp)
    b, k = p.shape
    p = p / p.sum()
    for _ in range(iters):
        p = p / (k * p.sum(0, keepdim=True))
        p = p / (b * p.sum(1, keepdim=True))
    return b * p


def ref_targets(t: torch.Tensor, centering: str, center: torch.Tensor) -> torch.Tensor:
    return ref_centered_softmax(t, center, TEACHER_T) if centering == "softmax" else ref_sinkhorn(t, TEACHER_T)


def ref_ce(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """H(p, softmax(s / tau_s)) per row."""
    return -(p * torch.log_softmax(s / STUDENT_T, dim=-1)).sum(-1)


def ref_dinov2(globals_: list[torch.Tensor], locals_: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """DINOv2 layout: both global crops flattened against the swapped teacher (x2), locals vs every global."""
    n_terms = len(globals_) * (len(globals_) - 1) + len(locals_) * len(targets)
    global_loss = 2 * ref_ce(torch.cat(globals_), torch.cat([targets[1], targets[0]])).mean()
    local_loss = sum(ref_ce(s, p).mean() for s in locals_ for p in targets)
    return (global_loss + local_loss) / n_terms


def ref_ibot(s: torch.Tensor, p: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Masked: (1/B) sum_b (1/max(1, n_b)) sum_{masked n} H(p_bn, s_bn). No mask: mean over all tokens."""
    if mask is None:
        return ref_ce(s.flatten(0, 1), p.flatten(0, 1)).mean()
    total = torch.zeros((), dtype=s.dtype)
    for b in range(s.shape[0]):
        n_b = int(mask[b].sum())
        if n_b:
            total = total + ref_ce(s[b][mask[b]], p[b][mask[b]]).sum() / n_b
    return total / s.shape[0]


def ref_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-mean_i log(min_{j != i} ||x_i/|x_i| - x_j/|x_j||| + eps)."""
    xn = x / x.norm(dim=1, keepdim=True)
    d = torch.cdist(xn, xn) + torch.diag(torch.full((x.shape[0],), float("inf"), dtype=x.dtype))
    return -torch.log(d.min(dim=1).values + eps).mean()


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _mask(b: int, n: int, seed: int = 0) -> torch.Tensor:
    m = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < 0.4
    m[0] = False  # one image without masked tokens: it counts in the batch mean with zero loss
    m[1, 0] = True
    return m


# ---------------------------------------------------------------- DINO


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_dino_matches_dinov2_reference(centering: str) -> None:
    b, k = 6, 16
    loss = DINOLoss(k, student_temp=STUDENT_T, centering=centering).double()
    loss.center.copy_(_randn(1, k, seed=9) * 0.3)
    teacher = [_randn(b, k, seed=1), _randn(b, k, seed=2)]
    globals_ = [_randn(b, k, seed=3), _randn(b, k, seed=4)]
    locals_ = [_randn(b, k, seed=5 + i) for i in range(3)]
    # DINOv2 computes the targets of both global crops in one batch of 2B rows
    probs = loss.teacher_probs(torch.cat(teacher), TEACHER_T).split(b)
    ref_probs = ref_targets(torch.cat(teacher), centering, loss.center).split(b)
    for p, r in zip(probs, ref_probs):
        torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-6)
    got = loss(globals_ + locals_, list(probs))
    torch.testing.assert_close(got, ref_dinov2(globals_, locals_, list(ref_probs)), atol=1e-6, rtol=1e-6)
    # without the diagonal exclusion every (student, teacher) pair counts (frozen-teacher distillation)
    students = globals_ + locals_
    ref_all = sum(ref_ce(s, p).mean() for s in students for p in ref_probs) / (len(students) * 2)
    torch.testing.assert_close(loss(students, list(probs), ignore_diagonal=False), ref_all, atol=1e-6, rtol=1e-6)


def test_sinkhorn_marginals_and_stability() -> None:
    t = _randn(8, 5, seed=3)
    q = sinkhorn_knopp(t, 1.0, n_iterations=200)
    torch.testing.assert_close(q.sum(1), torch.ones(8, dtype=F64))  # each row a distribution
    torch.testing.assert_close(q.sum(0), torch.full((5,), 8 / 5, dtype=F64), atol=1e-5, rtol=0)  # equal usage
    big = sinkhorn_knopp(torch.tensor([[100.0, 0.0], [0.0, 100.0]]), 0.04)  # exp(2500) would overflow
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, torch.eye(2))


def test_dino_center_update_numbers() -> None:
    loss = DINOLoss(2, center_momentum=0.9)
    loss.update_center(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # batch mean [2, 3]; 0.9*0 + 0.1*[2, 3]
    torch.testing.assert_close(loss.center, torch.tensor([[0.2, 0.3]]))
    loss.update_center(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))  # 0.9*[0.2, 0.3] + 0.1*[1, 1] = [0.28, 0.37]
    torch.testing.assert_close(loss.center, torch.tensor([[0.28, 0.37]]))
    before = loss.center.clone()
    loss.teacher_probs(torch.randn(3, 2), 0.04)  # computing targets never moves the centre
    torch.testing.assert_close(loss.center, before)


def test_dino_errors() -> None:
    with pytest.raises(MultiteachError, match="softmax"):
        DINOLoss(4, centering="sinkhorn")
    loss = DINOLoss(4)
    with pytest.raises(MultiteachError):
        loss([torch.randn(2, 4)], [torch.rand(2, 4)])  # the only pair is the diagonal one
    with pytest.raises(MultiteachError):
        loss([torch.randn(2, 4), torch.randn(3, 4)], [torch.rand(2, 4)])


def test_distributed_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes with identical batches behave like one process with the batch repeated."""
    t = _randn(5, 7, seed=4)
    single = sinkhorn_knopp(torch.cat([t, t]), 0.1)[:5]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda x, op=None: x if op is not None else x.mul_(2))
    torch.testing.assert_close(sinkhorn_knopp(t, 0.1), single)
    loss = DINOLoss(7, center_momentum=0.5)
    loss.update_center(t)
    torch.testing.assert_close(loss.center, 0.5 * t.float().mean(0, keepdim=True))


# ---------------------------------------------------------------- iBOT


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
@pytest.mark.parametrize("masked", [True, False])
def test_ibot_matches_reference(centering: str, masked: bool) -> None:
    b, n, k = 4, 9, 12
    loss = IBOTPatchLoss(k, student_temp=STUDENT_T, centering=centering).double()
    loss.center.copy_(_randn(1, 1, k, seed=8) * 0.3)
    t, s = _randn(b, n, k, seed=1), _randn(b, n, k, seed=2)
    mask = _mask(b, n) if masked else None
    probs = loss.teacher_probs(t, TEACHER_T, mask=mask)
    if centering == "softmax":
        ref_probs = ref_centered_softmax(t, loss.center, TEACHER_T)
    elif mask is None:  # Sinkhorn over all B*N tokens
        ref_probs = ref_sinkhorn(t.flatten(0, 1), TEACHER_T).view(b, n, k)
    else:  # Sinkhorn over the masked tokens only
        ref_probs = torch.zeros_like(t)
        ref_probs[mask] = ref_sinkhorn(t[mask], TEACHER_T)
    sel = mask if mask is not None else torch.ones(b, n, dtype=torch.bool)
    torch.testing.assert_close(probs[sel], ref_probs[sel], atol=1e-6, rtol=1e-6)
    got = loss(s, probs, mask)
    torch.testing.assert_close(got, ref_ibot(s, ref_probs, mask), atol=1e-6, rtol=1e-6)
    if mask is not None:  # pre-gathered (M, K) rows give the same loss and targets
        gathered = loss.teacher_probs(t[mask], TEACHER_T, mask=mask)
        torch.testing.assert_close(gathered, probs[mask])
        torch.testing.assert_close(loss(s[mask], gathered, mask), got)


def test_ibot_center_update_numbers() -> None:
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (B=1, N=2, K=2)
    loss = IBOTPatchLoss(2, center_momentum=0.9)
    loss.update_center(tokens, mask=torch.tensor([[True, False]]))  # masked mean [1, 2] -> 0.1*[1, 2]
    torch.testing.assert_close(loss.center, torch.tensor([[[0.1, 0.2]]]))
    loss = IBOTPatchLoss(2, center_momentum=0.9)
    loss.update_center(tokens)  # all tokens: mean [2, 3] -> [0.2, 0.3]
    torch.testing.assert_close(loss.center, torch.tensor([[[0.2, 0.3]]]))
    loss.update_center(torch.zeros(2, 3, 2))  # 0.9*[0.2, 0.3]
    torch.testing.assert_close(loss.center, torch.tensor([[[0.18, 0.27]]]))


def test_ibot_mask_errors() -> None:
    loss = IBOTPatchLoss(3)
    mask = torch.tensor([[True, False], [True, True]])
    with pytest.raises(MultiteachError):
        loss(torch.randn(2, 3), torch.rand(2, 3), mask)  # 2 gathered rows, mask selects 3
    with pytest.raises(MultiteachError):
        loss(torch.randn(2, 3, 3), torch.rand(2, 3, 3), mask)  # mask (2, 2) vs tokens (2, 3, K)


# ---------------------------------------------------------------- KoLeo


def test_koleo_by_hand() -> None:
    # nearest neighbours at distance 2 -> -log 2
    assert koleo(torch.tensor([[0.0, 1.0], [0.0, -1.0]])).item() == pytest.approx(-math.log(2.0), abs=1e-6)
    # unnormalised input; every point's nearest neighbour is sqrt(2) away -> -log sqrt(2)
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]])
    assert KoLeoLoss()(x).item() == pytest.approx(-0.5 * math.log(2.0), abs=1e-6)
    with pytest.raises(MultiteachError):
        koleo(torch.randn(1, 4))


def test_koleo_matches_reference() -> None:
    x = _randn(16, 8, seed=6)
    torch.testing.assert_close(koleo(x), ref_koleo(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_dino_gradcheck(centering: str) -> None:
    loss = DINOLoss(5, centering=centering).double()
    probs = list(loss.teacher_probs(_randn(6, 5, seed=1), TEACHER_T).split(3))
    students = [_randn(3, 5, seed=i).requires_grad_() for i in range(3)]
    assert torch.autograd.gradcheck(lambda *s: loss(list(s), probs), tuple(students))
    assert torch.autograd.gradcheck(lambda *s: loss(list(s), probs, ignore_diagonal=False), tuple(students))


@pytest.mark.parametrize("masked", [True, False])
def test_ibot_gradcheck(masked: bool) -> None:
    loss = IBOTPatchLoss(4).double()
    mask = _mask(3, 5) if masked else None
    probs = loss.teacher_probs(_randn(3, 5, 4, seed=1), TEACHER_T)
    s = _randn(3, 5, 4, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, probs, mask), (s,))


def test_koleo_gradcheck() -> None:
    x = _randn(6, 4, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(koleo, (x,))
