"""Feature-distillation distances, patch-grid resampling and per-teacher standardisation."""

from __future__ import annotations

import math

import pytest
import torch

from multiteach.errors import MultiteachError
from multiteach.losses.feature import (
    DISTANCES,
    cosine_distance,
    get_distance,
    kl_feature,
    mixed,
    mse,
    resample_grid,
    smooth_l1,
)
from multiteach.losses.standardize import PhiSStandardizer, RunningStandardizer, hadamard_matrix, mixing_matrix

# ---------------------------------------------------------------- hand-worked values


def test_cosine_identical_orthogonal_opposite() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    assert cosine_distance(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distance(x, -x).item() == pytest.approx(2.0, abs=1e-6)
    # rows: identical (cos 1) and orthogonal (cos 0) -> 1 - 0.5 = 0.5
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    assert cosine_distance(s, t).item() == pytest.approx(0.5)


def test_cosine_on_patch_tokens_averages_over_all_tokens() -> None:
    # (B=1, N=4, D=2): cosines 1, 0, -1, 1 -> mean 0.25 -> distance 0.75
    s = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 2.0]]])
    assert cosine_distance(s, t).item() == pytest.approx(0.75)


def test_smooth_l1_by_hand() -> None:
    s = torch.tensor([[0.0, 0.5, 3.0]])
    t = torch.zeros(1, 3)
    # beta=1: |d|=0 -> 0; |d|=0.5 < 1 -> 0.5*0.25/1 = 0.125; |d|=3 -> 3-0.5 = 2.5; mean = 2.625/3 = 0.875
    assert smooth_l1(s, t).item() == pytest.approx(0.875)
    # beta=2: 0; 0.5*0.25/2 = 0.0625; 3-1 = 2; mean = 2.0625/3 = 0.6875
    assert smooth_l1(s, t, beta=2.0).item() == pytest.approx(0.6875)


def test_mse_by_hand() -> None:
    # (1-0)^2 + (2-0)^2 + (1-1)^2 + (-1-1)^2 = 1 + 4 + 0 + 4 = 9, over 4 elements = 2.25
    s = torch.tensor([[1.0, 2.0], [1.0, -1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert mse(s, t).item() == pytest.approx(2.25)


def test_kl_feature_by_hand() -> None:
    # row 0: p = softmax([0, 0]) = [1/2, 1/2]; q = softmax([0, log 3]) = [1/4, 3/4]
    #   KL(p||q) = 1/2 log(2) + 1/2 log(2/3) = 1/2 log(4/3); row 1 identical -> 0; batchmean = 1/4 log(4/3)
    s = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    assert kl_feature(s, t).item() == pytest.approx(0.25 * math.log(4 / 3), abs=1e-7)
    # T=2: q = softmax([0, log(3)/2]) = [1/(1+r), r/(1+r)] with r = sqrt(3); p unchanged
    #   KL = 1/2 log((1+r)/2) + 1/2 log((1+r)/(2r)); times T^2 = 4, batchmean over 2 rows
    r = math.sqrt(3.0)
    kl_row = 0.5 * math.log((1 + r) / 2) + 0.5 * math.log((1 + r) / (2 * r))
    assert kl_feature(s, t, temperature=2.0).item() == pytest.approx(4 * kl_row / 2, abs=1e-7)
    # 3-D: the same two rows as tokens of one image -> mean over tokens, same value
    assert kl_feature(s[None], t[None]).item() == pytest.approx(0.25 * math.log(4 / 3), abs=1e-7)
    assert kl_feature(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_mixed_default_is_gpfm_patch_loss() -> None:
    # cos([1,0],[0,1]) = 0 -> 1; smooth-L1 of diffs [1,-1] with beta 1: 1-0.5 each -> 0.5
    # 0.9 * 1 + 0.1 * 0.5 = 0.95
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    assert mixed(s, t).item() == pytest.approx(0.95)
    assert mixed(s, t, {"mse": 2.0}).item() == pytest.approx(2.0)  # mse = (1 + 1)/2 = 1
    with pytest.raises(MultiteachError):
        mixed(s, t, {"mixed": 1.0})


def test_distance_registry() -> None:
    assert set(DISTANCES) == {"cosine", "smooth_l1", "mse", "kl", "mixed"}
    assert get_distance("cosine") is cosine_distance
    with pytest.raises(MultiteachError, match="cosine"):
        get_distance("cosin")
    with pytest.raises(MultiteachError, match="same shape"):
        cosine_distance(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- resampling


def test_resample_identity_when_grids_match() -> None:
    x = torch.randn(2, 12, 5)
    assert resample_grid(x, (3, 4), (3, 4)) is x
    assert resample_grid(x[:, :9], 3, 3, mode="bilinear").equal(x[:, :9])


def test_resample_bilinear_2x2_to_4x4() -> None:
    # grid g = [[0, 4], [8, 12]] (row-major tokens 0, 4, 8, 12); align_corners=False samples source
    # coordinates -0.25, 0.25, 0.75, 1.25 -> clamped fractions 0, 1/4, 3/4, 1 along each axis.
    # g is linear (8 * row + 4 * col), so the output is 8 * f(i) + 4 * f(j).
    tokens = torch.tensor([0.0, 4.0, 8.0, 12.0]).view(1, 4, 1)
    tokens = torch.cat([tokens, -tokens], dim=-1)  # a second channel checks the (B, N, D) layout
    expected = torch.tensor(
        [
            [0.0, 1.0, 3.0, 4.0],
            [2.0, 3.0, 5.0, 6.0],
            [6.0, 7.0, 9.0, 10.0],
            [8.0, 9.0, 11.0, 12.0],
        ]
    ).reshape(1, 16)
    out = resample_grid(tokens, 2, 4, mode="bilinear")
    assert out.shape == (1, 16, 2)
    torch.testing.assert_close(out[..., 0], expected)
    torch.testing.assert_close(out[..., 1], -expected)


def test_resample_bicubic_shapes_and_constant() -> None:
    x = torch.full((2, 14 * 14, 3), 2.5)
    out = resample_grid(x, 14, 16)
    assert out.shape == (2, 256, 3)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))
    assert resample_grid(torch.randn(1, 6, 2), (2, 3), (4, 6)).shape == (1, 24, 2)
    with pytest.raises(MultiteachError):
        resample_grid(torch.randn(1, 7, 2), (2, 3), 4)
    with pytest.raises(MultiteachError):
        resample_grid(torch.randn(1, 4, 2), 2, 4, mode="nearest")


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "fn",
    [
        cosine_distance,
        smooth_l1,
        mse,
        kl_feature,
        lambda s, t: kl_feature(s, t, temperature=2.0),
        mixed,
        lambda s, t: mixed(s, t, {"cosine": 0.5, "kl": 0.25, "mse": 0.25}),
    ],
    ids=["cosine", "smooth_l1", "mse", "kl", "kl_T2", "mixed", "mixed_custom"],
)
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4)])
def test_feature_gradcheck(fn, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (s, t))


# ---------------------------------------------------------------- running standardisation


def _anisotropic(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Correlated Gaussian samples with per-direction scales from 0.1 to ~30 and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    scales = torch.logspace(-1, 1.5, dim, dtype=torch.float64)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return (z * scales) @ rot.T + torch.linspace(-5, 5, dim, dtype=torch.float64)


def test_running_cumulative_matches_full_data() -> None:
    x = _anisotropic(1000, 8)
    std = RunningStandardizer(8)
    for chunk in x.split(137):
        std.update(chunk)
    assert int(std.count) == 1000
    torch.testing.assert_close(std.mean.double(), x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.var.double(), x.var(0, unbiased=False), rtol=1e-5, atol=1e-5)
    y = std(x.float())
    torch.testing.assert_close(y.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(std.inverse(y).double(), x, atol=1e-4, rtol=1e-5)


def test_running_patch_tokens_and_eval_mode() -> None:
    x = torch.randn(4, 10, 6) * 3 + 1
    std = RunningStandardizer(6)
    torch.testing.assert_close(std(x), x / math.sqrt(1 + std.eps))  # identity before any update
    std.update(x)
    torch.testing.assert_close(std.mean, x.reshape(-1, 6).mean(0))
    assert std(x).shape == (4, 10, 6)
    std.eval()
    std.update(x + 100)  # ignored outside training
    torch.testing.assert_close(std.mean, x.reshape(-1, 6).mean(0))
    with pytest.raises(MultiteachError):
        std.train().update(torch.randn(3, 5))


def test_running_ema_numbers() -> None:
    std = RunningStandardizer(2, momentum=0.75)
    std.update(torch.tensor([[0.0, 2.0], [2.0, 2.0]]))  # first batch initialises: mean [1, 2], var [1, 0]
    torch.testing.assert_close(std.mean, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(std.var, torch.tensor([1.0, 0.0]))
    std.update(torch.tensor([[5.0, 6.0], [5.0, 10.0]]))  # batch mean [5, 8], var [0, 4]
    # mean = 0.75 * [1, 2] + 0.25 * [5, 8] = [2, 3.5]; var = 0.75 * [1, 0] + 0.25 * [0, 4] = [0.75, 1]
    torch.testing.assert_close(std.mean, torch.tensor([2.0, 3.5]))
    torch.testing.assert_close(std.var, torch.tensor([0.75, 1.0]))


def test_running_state_dict_round_trip() -> None:
    std = RunningStandardizer(5)
    std.update(torch.randn(50, 5) * 2 + 3)
    restored = RunningStandardizer(5)
    restored.load_state_dict(std.state_dict())
    x = torch.randn(7, 5)
    torch.testing.assert_close(restored(x), std(x))
    assert set(std.state_dict()) == {"mean", "var", "count"}


def test_running_distributed_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes holding the same batch: counts double, statistics are unchanged."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda x, op=None: x.mul_(2))
    x = torch.randn(20, 3)
    std = RunningStandardizer(3)
    std.update(x)
    assert int(std.count) == 40
    torch.testing.assert_close(std.mean, x.mean(0))
    torch.testing.assert_close(std.var, x.var(0, unbiased=False))


# ---------------------------------------------------------------- PHI-S


@pytest.mark.parametrize("dim", [1, 2, 4, 12, 20, 28, 36, 44, 384, 768, 1152])
def test_hadamard_is_orthogonal_with_equal_magnitudes(dim: int) -> None:
    h = hadamard_matrix(dim)
    assert h is not None and h.shape == (dim, dim)
    torch.testing.assert_close(h @ h.T, torch.eye(dim, dtype=torch.float64))
    torch.testing.assert_close(h.abs(), torch.full_like(h, dim**-0.5))


def test_no_hadamard_falls_back_to_seeded_rotation() -> None:
    assert hadamard_matrix(6) is None and hadamard_matrix(100) is None
    m, exact = mixing_matrix(6, seed=3)
    assert not exact
    torch.testing.assert_close(m @ m.T, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(mixing_matrix(6, seed=3)[0], m)


@pytest.mark.parametrize("dim", [12, 16])
def test_phis_zero_mean_unit_variance_and_inverse(dim: int) -> None:
    x = _anisotropic(4000, dim, seed=dim)
    var_in = x.var(0, unbiased=False)
    assert var_in.max() / var_in.min() > 10  # the input really is anisotropic
    phis = PhiSStandardizer(dim).fit(x)
    assert phis.exact_hadamard and bool(phis.fitted)
    y = phis(x.float())
    torch.testing.assert_close(y.mean(0), torch.zeros(dim), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(dim), atol=1e-3, rtol=0)
    torch.testing.assert_close(phis.inverse(y).double(), x, atol=1e-4, rtol=1e-4)
    # rotation + one global scale: pairwise distances shrink by exactly `scale`
    d_in = torch.cdist(x[:50], x[:50]) / phis.scale.double()
    torch.testing.assert_close(torch.cdist(y[:50].double(), y[:50].double()), d_in, atol=1e-3, rtol=1e-4)


def test_phis_streaming_equals_fit_and_checkpoints() -> None:
    x = _anisotropic(900, 12, seed=1)
    ref = PhiSStandardizer(12).fit(x)
    streamed = PhiSStandardizer(12)
    for chunk in x.view(3, 300, 12):  # (B, N, D) chunks are flattened to rows
        streamed.update(chunk.view(3, 100, 12))
    streamed.finalize()
    z = torch.randn(5, 7, 12)
    torch.testing.assert_close(streamed(z), ref(z), atol=1e-5, rtol=1e-5)
    restored = PhiSStandardizer(12)
    restored.load_state_dict(ref.state_dict())
    torch.testing.assert_close(restored(z), ref(z))
    assert set(ref.state_dict()) == {"mean", "rotation", "scale", "fitted"}


def test_phis_fallback_dimension() -> None:
    x = _anisotropic(2000, 6, seed=2)
    phis = PhiSStandardizer(6).fit(x)
    assert not phis.exact_hadamard
    y = phis(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    assert y.var(0, unbiased=False).mean().item() == pytest.approx(1.0, abs=1e-4)  # average exact, not each
    torch.testing.assert_close(phis.inverse(y), x, atol=1e-4, rtol=1e-4)


def test_phis_identity_before_fit_and_needs_data() -> None:
    phis = PhiSStandardizer(4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(phis(x), x)
    with pytest.raises(MultiteachError):
        phis.finalize()
