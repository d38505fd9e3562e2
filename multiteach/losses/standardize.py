"""Per-teacher feature standardisation: running per-dimension z-scoring and PHI-S.

Teachers emit features on very different scales, so each teacher's targets are standardised before
a distance is taken. Both modules keep their state in buffers (it travels with ``state_dict``), act
on the last dimension of (B, D) or (B, N, D) tensors, and can map standardised features back with
``inverse``. Statistics are accumulated in float64 and, when ``torch.distributed`` is initialised,
summed over all processes so every rank holds the same state.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from multiteach.errors import MultiteachError


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` in place over all processes when torch.distributed is initialised; return it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def _batch_moments(x: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and centred second moment of the rows of ``x`` (over all processes).

    Args:
        x: Samples (M, D), any float dtype; computed in float64.
        full: Return the (D, D) scatter matrix instead of the (D,) sum of squared deviations.

    Returns:
        ``(count, mean, m2)``: a 0-d count, the (D,) mean and the (D,) or (D, D) centred sum of squares.
    """
    x = x.detach().to(torch.float64)
    head = _all_reduce_sum(torch.cat([x.new_tensor([x.shape[0]]), x.sum(0)]))
    count, mean = head[0], head[1:] / head[0].clamp_min(1.0)
    xc = x - mean
    m2 = _all_reduce_sum(xc.T @ xc if full else (xc * xc).sum(0))
    return count, mean, m2


def _merge(
    n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, m: torch.Tensor, bmean: torch.Tensor, bm2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel update: combine (n, mean, m2) with a batch (m, bmean, bm2)."""
    total = n + m
    delta = bmean - mean
    frac = m / total.clamp_min(1.0)
    cross = torch.outer(delta, delta) if m2.dim() == 2 else delta * delta
    return total, mean + delta * frac, m2 + bm2 + cross * n * frac


def _flatten(x: torch.Tensor, dim: int, who: str) -> torch.Tensor:
    """(..., D) -> (M, D) rows, raising a MultiteachError naming ``who`` if the last dimension is not ``dim``."""
    if x.shape[-1] != dim:
        raise MultiteachError(f"{who}: expected features with last dimension {dim}, got {tuple(x.shape)}.")
    return x.reshape(-1, dim)


class RunningStandardizer(nn.Module):
    """Per-dimension standardisation with running statistics of teacher features.

    ``momentum=None`` accumulates the exact mean and (population) variance of everything seen so far
    (Welford/Chan merging of batch moments). A float ``momentum`` keeps an exponential moving average
    with the DINO-centre convention ``stat = momentum * stat + (1 - momentum) * batch_stat`` (so
    ``momentum=0.99`` changes slowly); the first batch initialises the statistics. Before any update
    the module is the identity (mean 0, variance 1).

    Args:
        dim: Feature width D.
        momentum: ``None`` for cumulative averaging, else the EMA weight of the old statistics in [0, 1).
        eps: Added to the variance before the square root.

    Buffers:
        mean (D,), var (D,) and count (0-d int64: number of feature rows seen).
    """

    def __init__(self, dim: int, momentum: float | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise MultiteachError(f"RunningStandardizer: momentum must be None or in [0, 1), got {momentum}.")
        self.dim, self.momentum, self.eps = dim, momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of teacher features into the statistics; does nothing in eval mode.

        Args:
            x: Teacher features (B, D) or (B, N, D); every row of D values is one sample.
        """
        if not self.training:
            return
        m, bmean, bm2 = _batch_moments(_flatten(x, self.dim, "RunningStandardizer.update"), full=False)
        n = self.count.to(torch.float64)
        mean, var = self.mean.to(torch.float64), self.var.to(torch.float64)
        if self.momentum is None:
            total, mean, m2 = _merge(n, mean, var * n, m, bmean, bm2)
            var = m2 / total.clamp_min(1.0)
        else:
            w = torch.where(n > 0, self.momentum, 0.0).to(torch.float64)
            mean = w * mean + (1 - w) * bmean
            var = w * var + (1 - w) * bm2 / m.clamp_min(1.0)
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.count.add_(m.to(torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise features: ``(x - mean) / sqrt(var + eps)``.

        Args:
            x: Features (B, D) or (B, N, D).

        Returns:
            Tensor of the same shape and dtype.
        """
        return (x - self.mean.to(x.dtype)) * torch.rsqrt(self.var + self.eps).to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`forward`: ``y * sqrt(var + eps) + mean``.

        Args:
            y: Standardised features (B, D) or (B, N, D).

        Returns:
            Tensor of the same shape in the teacher's original scale.
        """
        return y * torch.sqrt(self.var + self.eps).to(y.dtype) + self.mean.to(y.dtype)


def _is_prime(n: int) -> bool:
    """Trial-division primality test (orders here are at most a few thousand)."""
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


def _sylvester(n: int) -> torch.Tensor:
    """+-1 Sylvester Hadamard matrix (n, n) in float64, n a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


def _conference(q: int, antisymmetric: bool) -> torch.Tensor:
    """(q+1)x(q+1) Paley conference matrix, q prime: zero corner, top row of ones, left column of ones
    (minus ones if ``antisymmetric``), and the Jacobsthal matrix ``chi(i - j)`` of GF(q) (Legendre symbol).
    """
    residues = torch.zeros(q, dtype=torch.bool)
    residues[torch.arange(1, q) ** 2 % q] = True
    idx = torch.arange(q)
    diff = (idx[:, None] - idx[None, :]) % q
    chi = torch.where(residues[diff], 1.0, -1.0).to(torch.float64).masked_fill(diff == 0, 0.0)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = -1.0 if antisymmetric else 1.0
    c[1:, 1:] = chi
    return c


def _paley_kind(order: int) -> int | None:
    """1 or 2 if Paley's construction I or II gives a Hadamard matrix of ``order`` (prime q only), else None."""
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return 1
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return 2
    return None


def _paley(order: int) -> torch.Tensor:
    """A +-1 Hadamard matrix of ``order`` from Paley's construction I or II (``_paley_kind`` must allow it)."""
    if _paley_kind(order) == 1:  # H = I + S with S skew-symmetric and S S^T = q I
        return torch.eye(order, dtype=torch.float64) + _conference(order - 1, antisymmetric=True)
    q = order // 2 - 1  # double the symmetric conference matrix: 0 -> [[1,-1],[-1,-1]], +-1 -> +-[[1,1],[1,-1]]
    ones = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(_conference(q, antisymmetric=False), ones) + torch.kron(
        torch.eye(q + 1, dtype=torch.float64), zero
    )


def _hadamard_plan(dim: int) -> tuple[int, int] | None:
    """``(2**i, rest)`` with ``dim = 2**i * rest`` and rest 1 or a Paley order, largest power of two first."""
    twos = (dim & -dim).bit_length() - 1
    for i in range(twos, -1, -1):
        rest = dim >> i
        if rest == 1 or _paley_kind(rest) is not None:
            return 1 << i, rest
    return None


def hadamard_matrix(dim: int) -> torch.Tensor | None:
    """Normalised Hadamard matrix (entries +-1/sqrt(dim), orthogonal), or None if no construction is known.

    Builds Sylvester(2**i) kron Paley(dim / 2**i), trying the largest power of two first (the same
    family of constructions RADIO's PHI-S uses). This covers every power of two and all common
    teacher widths (384, 512, 768, 1024, 1152, 1280, 1536, 2560, ...). Paley is used only for prime q.

    Args:
        dim: Matrix order D.

    Returns:
        (D, D) float64 tensor ``H`` with ``H @ H.T = I``, or None.
    """
    plan = _hadamard_plan(dim)
    if plan is None:
        return None
    syl, rest = plan
    core = torch.ones(1, 1, dtype=torch.float64) if rest == 1 else _paley(rest)
    return torch.kron(_sylvester(syl), core) / math.sqrt(dim)


def mixing_matrix(dim: int, seed: int = 0) -> tuple[torch.Tensor, bool]:
    """The orthogonal matrix PHI-S rotates by: Hadamard when one exists, else a seeded random rotation.

    Args:
        dim: Matrix order D.
        seed: Seed of the fallback random orthogonal matrix (QR of a Gaussian, signs fixed).

    Returns:
        ``(M, exact)``: (D, D) float64 orthogonal matrix and whether it is an exact Hadamard matrix.
    """
    h = hadamard_matrix(dim)
    if h is not None:
        return h, True
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0), False


class PhiSStandardizer(nn.Module):
    """PHI-S (PCA-Hadamard isotropic standardisation, RADIO, arXiv 2410.01680).

    With teacher mean mu and covariance ``U diag(lambda) U^T``, the transform is
    ``y = H U^T (x - mu) / sqrt(mean(lambda))``. Rotating the eigenbasis by a normalised Hadamard
    matrix H spreads every eigenvalue evenly over all output dimensions, so each output dimension
    has variance mean(lambda) before the single global scale and exactly 1 after it, with zero mean.
    It is *not* whitening: correlations between output dimensions remain, and because the map is a
    rotation times one scalar, distances between features are preserved up to that scalar.

    Hadamard choice: Sylvester kron Paley, largest power of two first (see :func:`hadamard_matrix`).
    For widths with no such construction (any D > 2 not divisible by 4, and rare others) a seeded
    random orthogonal matrix is used instead (``exact_hadamard`` is then False): the output stays
    zero-mean and invertible, but per-dimension variances are only approximately 1.

    Fit either in one call (:meth:`fit`) or streaming (:meth:`update` per batch, then :meth:`finalize`).
    Until fitted the module is the identity. The streaming accumulators are not checkpointed; the
    fitted transform is.

    Args:
        dim: Feature width D.
        eps: Floor of the global scale sqrt(mean(lambda)).
        seed: Seed of the fallback random rotation.

    Buffers:
        mean (D,), rotation (D, D) = H U^T, scale (0-d) = sqrt(mean eigenvalue), fitted (0-d bool).
    """

    def __init__(self, dim: int, eps: float = 1e-8, seed: int = 0) -> None:
        super().__init__()
        self.dim, self.eps, self.seed = dim, eps, seed
        self.exact_hadamard = _hadamard_plan(dim) is not None
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("rotation", torch.eye(dim))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.reset()

    def reset(self) -> None:
        """Drop the streaming accumulators (the fitted transform is kept until the next finalize)."""
        self._count: torch.Tensor | None = None
        self._acc_mean: torch.Tensor | None = None
        self._acc_m2: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Accumulate the mean and covariance of a batch of teacher features (float64, all processes).

        Args:
            x: Teacher features (B, D) or (B, N, D); every row of D values is one sample.
        """
        m, bmean, bm2 = _batch_moments(_flatten(x, self.dim, "PhiSStandardizer.update"), full=True)
        if self._count is None:
            self._count, self._acc_mean, self._acc_m2 = m, bmean, bm2
        else:
            self._count, self._acc_mean, self._acc_m2 = _merge(self._count, self._acc_mean, self._acc_m2, m, bmean, bm2)

    @torch.no_grad()
    def finalize(self) -> PhiSStandardizer:
        """Eigendecompose the accumulated covariance and set the transform buffers.

        Returns:
            ``self``, fitted.
        """
        if self._count is None or float(self._count) < 2:
            raise MultiteachError("PhiSStandardizer.finalize: call update() with at least 2 feature rows first.")
        cov = self._acc_m2 / self._count
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        evals = evals.clamp_min(0.0)
        mix, _ = mixing_matrix(self.dim, self.seed)
        self.mean.copy_(self._acc_mean)
        self.rotation.copy_(mix.to(evecs.device) @ evecs.T)
        self.scale.copy_(evals.mean().sqrt().clamp_min(self.eps))
        self.fitted.fill_(True)
        self.reset()
        return self

    def fit(self, features: torch.Tensor) -> PhiSStandardizer:
        """Fit from a tensor of teacher feature samples in one go (replaces any streaming state).

        Args:
            features: Samples (M, D) or (B, N, D).

        Returns:
            ``self``, fitted.
        """
        self.reset()
        self.update(features)
        return self.finalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``(x - mean) @ rotation.T / scale``.

        Args:
            x: Features (B, D) or (B, N, D).

        Returns:
            Standardised features, same shape and dtype.
        """
        return ((x - self.mean.to(x.dtype)) @ self.rotation.T.to(x.dtype)) / self.scale.to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`forward`: ``(y * scale) @ rotation + mean``.

        Args:
            y: Standardised features (B, D) or (B, N, D).

        Returns:
            Features in the teacher's original space, same shape and dtype.
        """
        return (y * self.scale.to(y.dtype)) @ self.rotation.to(y.dtype) + self.mean.to(y.dtype)
