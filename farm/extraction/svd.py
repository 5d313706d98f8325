"""Factor one weight delta dW (m × n) as B·A with a certificate on how close it is to the best rank-r factorization.

Quality is ``rho = ||dW − B·A||_F / ||dW − [dW]_r||_F``, where ``[dW]_r`` is the truncated SVD (Eckart–Young):
1.0 is optimal. The exact method runs ``torch.linalg.svd`` (rho = 1 by construction). The randomized method
(Halko, Martinsson & Tropp 2011, "HMT") finds a k-dimensional subspace Q (k = r + oversampling) that holds most
of dW's range, factors the small ``Q^T·dW`` exactly, and bounds rho from quantities it has already computed, so
no exact SVD is ever needed to know how good the result is.

Why the bound is sound (notation: θ_i = squared singular values of Q^T·dW, descending; σ_i those of dW):

1. B·A = Q·U_r·U_r^T·Q^T·dW is an orthogonal projection of dW onto an r-dimensional subspace, so its error is
   ``err² = ||R||_F² + Σ_{r<i≤k} θ_i`` with ``R = (I − QQ^T)·dW`` the residual outside Q. Both terms are sums
   of non-negative numbers: no cancellation, exact to float32 rounding.
2. The optimum is ``opt² = ||dW||_F² − Σ_{i≤r} σ_i² = err² − D`` with ``D = Σ_{i≤r} (σ_i² − θ_i) ≥ 0``
   (θ_i ≤ σ_i² by Cauchy interlacing). Any upper bound on D gives ``rho ≤ err / sqrt(err² − D)``.
3. Write M = dW·dW^T in the basis (Q, Q⊥): ``[[H, C^T], [C, G]]`` with eig(H) = θ, ``C = R·(Q^T·dW)^T`` and
   ``||G||_2 = ||R||_2² =: τ²``. For each i ≤ r, with γ ≥ τ²:
   - Weyl (dW^T·dW = A1 + A2, A2 = R^T·R ⪯ τ²·I):        ``σ_i² − θ_i ≤ γ``;
   - Li & Li (2005) quadratic residual bound, when θ_i > γ (gap η_i = θ_i − γ):
     ``σ_i² − θ_i ≤ 2||C||² / (η_i + sqrt(η_i² + 4||C||²))``;
   - Ky Fan on the sum (trace(A2) = ||R||_F²):          ``D ≤ ||R||_F²``.
   - ordering: σ_i² ≤ σ_j² for j < i, and σ_i² ≤ ||dW||_2² ≤ γ_1 (needed when the spectrum is flat, where
     neither of the above is tight);
   so u_i = min(θ_i + Weyl_i, θ_i + LiLi_i, u_{i−1}, γ_1) bounds σ_i², and
   D ≤ min(Σ_{i≤r} (u_i − θ_i), ||R||_F²). ||C||_2 is a k-column spectral norm: exact and cheap.
4. γ ≥ τ² = ||R||_2² (and γ_1 ≥ ||dW||_2²) come from Dixon's lemma (HMT Lemma 4.1) applied to (R·R^T)^q·R with
   s fresh Gaussian probes: ``||R||^(2q+1) ≤ α·sqrt(2/π)·max_j ||(R·R^T)^q·R·ω_j||`` except with probability
   α^-s (α = 4, s = 10: 1e-6). Power steps make the factor (α·sqrt(2/π))^(1/(2q+1)) close to 1. γ is also
   capped by the deterministic ||R||_F².

So the reported rho is an upper bound that holds with probability ≥ 1 − 2e-6 per layer (the only random steps
are the probe draws in 4, independent of Q). When the bound exceeds the target (1.01), the subspace is widened and
more power iterations are run, then checked again; after a few rounds the layer falls back to the exact SVD.

In energy mode the same per-index bounds bracket the cumulative energy Σ_{i≤j} σ_i², so the randomized method
picks the rank the exact SVD would pick whenever the brackets agree, and tightens (or falls back) otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RHO_TARGET = 1.01
# Dixon's lemma: the bound on ||R||_2 fails with probability ALPHA ** -PROBES (1e-6).
DIXON_ALPHA = 4.0
DIXON_PROBES = 10
RESIDUAL_POWER_STEPS = 10
# Range finder schedule: a round widens the sketch by the oversampling and runs POWER_STEP more power iterations.
FIRST_POWER_ITERS = 2
POWER_STEP = 2
MAX_ROUNDS = 5
# A relative error below this is float32 round-off: the factorization is exact and rho counts as 1.
EXACT_RELATIVE_ERROR = 1e-6


@dataclass
class LowRank:
    """B (m × r) and A (r × n) with B·A ≈ dW, and how good that is."""

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    total_energy: float
    """||dW||_F², accumulated in float64."""
    error: float
    """||dW − B·A||_F."""
    rho: float
    """error / optimal rank-r error: exact for the exact method, a certified upper bound for the randomized one."""
    method: str
    """randomized | exact | exact-fallback."""
    sketch: int = 0
    power_iters: int = 0

    @property
    def relative_error(self) -> float:
        return self.error / math.sqrt(self.total_energy) if self.total_energy > 0 else 0.0

    @property
    def retained_energy(self) -> float:
        if self.total_energy <= 0:
            return 1.0
        return max(0.0, 1.0 - self.error**2 / self.total_energy)


def frobenius_sq(x: torch.Tensor) -> float:
    """||x||_F² accumulated in float64 (the reduction upcasts on the fly: no float64 copy of the matrix)."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def energy_rank(cumulative: torch.Tensor, total: float, energy: float, max_rank: int) -> int:
    """Smallest r whose cumulative energy reaches `energy * total`, capped by max_rank (and the available length)."""
    target = energy * total
    reached = torch.nonzero(cumulative >= target)
    r = int(reached[0]) + 1 if len(reached) else len(cumulative)
    return max(1, min(r, max_rank, len(cumulative)))


def _split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.clamp_min(0).sqrt()
    return (u * root).float().contiguous(), (root[:, None] * vh).float().contiguous()


def factor_exact(x: torch.Tensor, *, rank: int | None = None, energy: float | None = None, max_rank: int = 128,
                 total: float | None = None, method: str = "exact") -> LowRank:
    """Truncated SVD by torch.linalg.svd: optimal by definition."""
    total = frobenius_sq(x) if total is None else total
    u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
    s2 = s.double() ** 2
    r = min(rank, len(s)) if rank is not None else energy_rank(torch.cumsum(s2, 0), total, energy, max_rank)
    b, a = _split_factors(u[:, :r].double(), s[:r].double(), vh[:r].double())
    tail = float(s2[r:].sum())
    error = math.sqrt(tail)  # the factors are the optimum: their error is the tail
    return LowRank(B=b, A=a, rank=r, total_energy=total, error=error, rho=1.0, method=method)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _power(x: torch.Tensor, q: torch.Tensor, iters: int) -> torch.Tensor:
    # Re-orthonormalize after every product: without it the columns collapse onto the top singular vector.
    for _ in range(iters):
        q = _orthonormal(x @ _orthonormal(x.T @ q))
    return q


def residual_norm_bound(r: torch.Tensor, generator: torch.Generator, steps: int = RESIDUAL_POWER_STEPS) -> float:
    """A bound on ||r||_2² (r: the residual, or dW itself) that holds with probability 1 − DIXON_ALPHA**-DIXON_PROBES (Dixon's lemma, see above)."""
    omega = torch.randn(r.shape[1], DIXON_PROBES, generator=generator, dtype=r.dtype)
    v = r @ omega
    log_norm = torch.zeros(DIXON_PROBES, dtype=torch.float64)
    for _ in range(steps):
        n = v.norm(dim=0).clamp_min(torch.finfo(r.dtype).tiny)
        log_norm += n.double().log()
        v = r @ (r.T @ (v / n))
    log_norm += v.norm(dim=0).clamp_min(torch.finfo(r.dtype).tiny).double().log()
    log_bound = (math.log(DIXON_ALPHA * math.sqrt(2 / math.pi)) + float(log_norm.max())) / (2 * steps + 1)
    return math.exp(2 * log_bound)


def _li_li(gap: torch.Tensor, c2: float) -> torch.Tensor:
    return 2 * c2 / (gap + torch.sqrt(gap**2 + 4 * c2))


@dataclass
class _Sketch:
    theta: torch.Tensor  # squared Ritz values, float64, descending
    u: torch.Tensor  # k × k
    vh: torch.Tensor  # k × n
    excess: torch.Tensor  # per index: upper bound on σ_i² − θ_i
    residual_sq: float  # ||R||_F²


def _measure(x: torch.Tensor, q: torch.Tensor, generator: torch.Generator, top_bound: float) -> _Sketch:
    small = q.T @ x  # k × n
    residual = x - q @ small
    residual_sq = frobenius_sq(residual)
    c = residual @ small.T  # (I − QQ^T)·dW·dW^T·Q
    c2 = float(torch.linalg.matrix_norm(c.double(), ord=2)) ** 2 if c.numel() else 0.0
    gamma = min(residual_norm_bound(residual, generator), residual_sq)
    del residual, c
    # the SVD of the tall transpose: LAPACK is far slower on the wide k × n matrix itself
    p, s, qh = torch.linalg.svd(small.double().T, full_matrices=False)
    u, vh = qh.T, p.T
    theta = s**2
    excess = torch.full_like(theta, gamma)
    gap = theta - gamma
    above = gap > 0
    excess[above] = torch.minimum(excess[above], _li_li(gap[above], c2))
    upper = torch.cummin(torch.clamp(theta + excess, max=top_bound), 0).values
    excess = (upper - theta).clamp_min(0)
    return _Sketch(theta=theta, u=u, vh=vh, excess=excess, residual_sq=residual_sq)


def _rho_bound(sk: _Sketch, r: int, total: float) -> tuple[float, float]:
    """(error, certified upper bound on rho) of the rank-r factorization from this sketch."""
    err_sq = sk.residual_sq + float(sk.theta[r:].sum())
    if err_sq <= (EXACT_RELATIVE_ERROR**2) * total:
        return math.sqrt(err_sq), 1.0
    d = min(float(sk.excess[:r].sum()), sk.residual_sq)
    opt_sq = err_sq - d
    return math.sqrt(err_sq), (math.sqrt(err_sq / opt_sq) if opt_sq > 0 else math.inf)


def _energy_choice(sk: _Sketch, total: float, energy: float, max_rank: int) -> int | None:
    """The rank the exact SVD would pick, when the sketch's bounds decide it; None when they do not (yet)."""
    target = energy * total
    k = len(sk.theta)
    low = torch.cumsum(sk.theta, 0)
    high = torch.minimum(torch.cumsum(sk.theta + sk.excess, 0), low + sk.residual_sq)
    first = lambda cum: int(torch.nonzero(cum >= target)[0]) + 1 if bool((cum >= target).any()) else None  # noqa: E731
    r_low, r_high = first(high), first(low)  # r_low ≤ r_exact ≤ r_high
    if r_low is None:  # even the upper bounds do not reach the target within k: r_exact > k
        return max_rank if k >= max_rank else None
    if r_low >= max_rank:
        return max_rank
    if r_high is not None and min(r_high, max_rank) == r_low:
        return r_low
    return None


def factor_randomized(x: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                      max_rank: int = 128, total: float | None = None, rho_target: float = RHO_TARGET,
                      seed: int = 0) -> LowRank:
    """Randomized truncated SVD with a certified rho ≤ rho_target; falls back to the exact SVD when it cannot."""
    x = x.float()
    total = frobenius_sq(x) if total is None else total
    m, n = x.shape
    full = min(m, n)
    want = min(rank if rank is not None else max_rank, full)
    oversample = max(8, want // 4)
    # energy mode starts small and widens: most layers need far fewer than max_rank directions
    k = min(want if rank is not None else min(want, 32), full) + oversample
    if 2 * k >= full:  # a sketch this wide costs as much as the exact SVD
        return factor_exact(x, rank=rank, energy=energy, max_rank=max_rank, total=total)
    gen = torch.Generator().manual_seed(seed)
    q = _orthonormal(x @ torch.randn(n, k, generator=gen))
    q = _power(x, q, FIRST_POWER_ITERS)
    iters = FIRST_POWER_ITERS
    top_bound = math.inf  # a bound on ||dW||_2², computed only when a flat spectrum needs it
    for round_ in range(MAX_ROUNDS):
        if round_ == 1:
            top_bound = residual_norm_bound(x, gen)
        sk = _measure(x, q, gen, top_bound)
        r = min(rank, full) if rank is not None else _energy_choice(sk, total, energy, max_rank)
        if r is not None and r + oversample // 2 <= len(sk.theta):
            error, rho = _rho_bound(sk, r, total)
            if rho <= rho_target:
                b, a = _split_factors(q.double() @ sk.u[:, :r], sk.theta[:r].sqrt(), sk.vh[:r])
                return LowRank(B=b, A=a, rank=r, total_energy=total, error=error, rho=rho, method="randomized",
                               sketch=len(sk.theta), power_iters=iters)
        grow = oversample if rank is not None or r is not None else len(sk.theta)
        if 2 * (q.shape[1] + grow) >= full:
            break
        q = _orthonormal(torch.cat([q, x @ torch.randn(n, grow, generator=gen)], dim=1))
        q = _power(x, q, POWER_STEP)
        iters += POWER_STEP
    return factor_exact(x, rank=rank, energy=energy, max_rank=max_rank, total=total, method="exact-fallback")
