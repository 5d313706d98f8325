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
   - ordering: σ_i² ≤ σ_j² for j < i, and σ_i² ≤ ||dW||_2² ≤ γ_1 (needed when the top of the spectrum is flat,
     where neither of the above is tight);
   so u_i = min(θ_i + Weyl_i, θ_i + LiLi_i, u_{i−1}, γ_1) bounds σ_i², and, by Ky Fan (trace(A2) = ||R||_F²),
   D ≤ min(Σ_{i≤r} (u_i − θ_i), ||R||_F²). ||C||_2 is a k-column spectral norm: exact and cheap.
4. γ ≥ τ² = ||R||_2² (and γ_1 ≥ ||dW||_2²) come from Dixon's lemma (HMT Lemma 4.1) applied to (R·R^T)^q·R with
   s fresh Gaussian probes: ``||R||^(2q+1) ≤ α·sqrt(2/π)·max_j ||(R·R^T)^q·R·ω_j||`` except with probability
   α^-s (α = 2.41, s = 16: 8e-7). Power steps shrink the slack (α·sqrt(2/π)·max_j|g_j|)^(1/(2q+1)) towards 1.
   γ is also capped by the deterministic ||R||_F².

The probes are drawn independently of Q, and the bound is evaluated at a few step counts q (2, 4, 8, 16): by
the union bound the reported rho holds with probability ≥ 1 − 2e-5 per layer (at most 4 rounds × 4 step counts
for τ, one bound on ||dW||_2).
When it exceeds the target (1.01), the probe steps are continued if a perfect γ would pass, otherwise the subspace
is widened and power-iterated again; after a few rounds the layer falls back to the exact SVD.

In energy mode the same per-index bounds bracket the cumulative energy Σ_{i≤j} σ_i², so the randomized method
picks the rank the exact SVD would pick whenever the brackets agree, and tightens (or falls back) otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RHO_TARGET = 1.01
# Dixon's lemma: the bound on ||R||_2 fails with probability ALPHA ** -PROBES (8e-7). 16 probes with a small alpha
# give a tighter bound than a few probes with a large one, at a cost of the same passes over the matrix.
DIXON_ALPHA = 2.41
DIXON_PROBES = 16
PROBE_STEPS = (2, 4, 8, 16)
# Range finder: the first sketch gets FIRST_POWER_ITERS power iterations; each further round widens it by the
# oversampling and runs POWER_STEP more.
FIRST_POWER_ITERS = 3
POWER_STEP = 2
OVERSAMPLE_MIN = 8
OVERSAMPLE_FRACTION = 0.5
MAX_ROUNDS = 4
# A sketch wider than this share of min(m, n) costs about as much as the exact SVD: use that instead.
MAX_SKETCH_SHARE = 0.3
ENERGY_FIRST_RANK = 32
# θ_r / θ_1 above this counts as a flat top of the spectrum (then a bound on ||dW||_2 is worth its passes).
FLAT = 0.5
# A relative error below this is float32 round-off (B·A alone rounds at ~1e-6): the factorization is exact and rho
# counts as 1.
EXACT_RELATIVE_ERROR = 1e-5


@dataclass
class LowRank:
    """B (m × r) and A (r × n) with B·A ≈ dW, and how good that is."""

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    total_energy: float
    """||dW||_F²."""
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
    """||x||_F² (float32 cascade summation: relative error ~1e-7, the precision of the data and of any SVD of it)."""
    return float(torch.linalg.vector_norm(x)) ** 2


def energy_rank(cumulative: torch.Tensor, total: float, energy: float, max_rank: int) -> int:
    """Smallest r whose cumulative energy reaches `energy * total`, capped by max_rank (and the available length)."""
    reached = torch.nonzero(cumulative >= energy * total)
    r = int(reached[0]) + 1 if len(reached) else len(cumulative)
    return max(1, min(r, max_rank, len(cumulative)))


def _split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.clamp_min(0).sqrt()
    return (u * root).float().contiguous(), (root[:, None] * vh).float().contiguous()


def factor_exact(x: torch.Tensor, *, rank: int | None = None, energy: float | None = None, max_rank: int = 128,
                 total: float | None = None, method: str = "exact") -> LowRank:
    """Truncated SVD by torch.linalg.svd: optimal by definition."""
    x = x.float()
    total = frobenius_sq(x) if total is None else total
    if x.shape[0] < x.shape[1]:  # LAPACK is about twice as fast on the tall orientation
        v, s, uh = torch.linalg.svd(x.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    s2 = s.double() ** 2
    r = min(rank, len(s)) if rank is not None else energy_rank(torch.cumsum(s2, 0), total, energy, max_rank)
    b, a = _split_factors(u[:, :r].double(), s[:r].double(), vh[:r].double())
    error = math.sqrt(float(s2[r:].sum()))  # the factors are the optimum: their error is the tail
    return LowRank(B=b, A=a, rank=r, total_energy=total, error=error, rho=1.0, method=method)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _power(x: torch.Tensor, q: torch.Tensor, iters: int) -> torch.Tensor:
    # Re-orthonormalize after every product: without it the columns collapse onto the top singular vector.
    for _ in range(iters):
        q = _orthonormal(x @ _orthonormal(x.T @ q))
    return q


class _Operator:
    """x, or the residual (I − QQ^T)·x without forming it (no m × n copy): products with a block of vectors."""

    def __init__(self, x: torch.Tensor, q: torch.Tensor | None = None):
        self.x, self.q = x, q

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        y = self.x @ v
        return y if self.q is None else y - self.q @ (self.q.T @ y)

    def rmatmul(self, w: torch.Tensor) -> torch.Tensor:
        if self.q is not None:
            w = w - self.q @ (self.q.T @ w)
        return self.x.T @ w


class SpectralNormBound:
    """Probabilistic bounds on ||r||_2² by Dixon's lemma on (r·r^T)^q·r (see the module docstring, point 4).

    `advance(q)` continues the same probes to q steps; `upper` then holds with probability 1 − α^-s, and `lower`
    (the best Rayleigh quotient seen) is a certain lower bound.
    """

    def __init__(self, r: _Operator, generator: torch.Generator):
        self.r = r
        self.v = r @ torch.randn(r.x.shape[1], DIXON_PROBES, generator=generator, dtype=r.x.dtype)
        self.log_norm = torch.zeros(DIXON_PROBES, dtype=torch.float64)
        self.steps = 0
        self.lower = 0.0
        self.upper = math.inf

    def advance(self, steps: int) -> SpectralNormBound:
        tiny = torch.finfo(self.v.dtype).tiny
        while self.steps < steps:
            n = self.v.norm(dim=0).clamp_min(tiny)
            self.log_norm += n.double().log()
            w = self.r.rmatmul(self.v / n)
            self.lower = max(self.lower, float((w.norm(dim=0) ** 2).max()))  # ||r^T v||² with ||v|| = 1
            self.v = self.r @ w
            self.steps += 1
        final = self.log_norm + self.v.norm(dim=0).clamp_min(tiny).double().log()
        log_bound = (math.log(DIXON_ALPHA * math.sqrt(2 / math.pi)) + float(final.max())) / (2 * self.steps + 1)
        self.upper = math.exp(2 * log_bound)
        return self


def _li_li(gap: torch.Tensor, c2: float) -> torch.Tensor:
    return 2 * c2 / (gap + torch.sqrt(gap**2 + 4 * c2))


@dataclass
class _Sketch:
    """Rayleigh–Ritz of dW on span(Q), and what the bounds need."""

    theta: torch.Tensor  # squared Ritz values, float64, descending
    u: torch.Tensor  # k × k
    vh: torch.Tensor  # k × n
    residual_sq: float  # ||R||_F², R = (I − QQ^T)·dW
    c2: float  # ||C||_2²

    def excess(self, gamma: float, top_bound: float) -> torch.Tensor:
        """Per index i, an upper bound on σ_i² − θ_i given γ ≥ ||R||_2² and top_bound ≥ ||dW||_2²."""
        gamma = min(gamma, self.residual_sq)
        excess = torch.full_like(self.theta, gamma)
        gap = self.theta - gamma
        above = gap > 0
        excess[above] = torch.minimum(excess[above], _li_li(gap[above], self.c2))
        upper = torch.cummin(torch.clamp(self.theta + excess, max=top_bound), 0).values
        return (upper - self.theta).clamp_min(0)


def _sketch(x: torch.Tensor, q: torch.Tensor, rows: int = 512) -> _Sketch:
    small = q.T @ x  # k × n
    # R = x − Q·small, a block of rows at a time: ||R||_F² without cancellation and C = R·small^T, with no m × n
    # temporary
    residual_sq, c = 0.0, torch.empty(x.shape[0], q.shape[1], dtype=x.dtype)
    for start in range(0, x.shape[0], rows):
        block = torch.addmm(x[start:start + rows], q[start:start + rows], small, alpha=-1)
        residual_sq += frobenius_sq(block)
        torch.mm(block, small.T, out=c[start:start + rows])
    c2 = float(torch.linalg.matrix_norm(c.double(), ord=2)) ** 2 if c.numel() else 0.0
    # the SVD of the tall transpose: LAPACK is far slower on the wide k × n matrix itself
    p, s, qh = torch.linalg.svd(small.double().T, full_matrices=False)
    return _Sketch(theta=s**2, u=qh.T, vh=p.T, residual_sq=residual_sq, c2=c2)


def _rho_bound(sk: _Sketch, r: int, total: float, excess: torch.Tensor) -> tuple[float, float]:
    """(error, certified upper bound on rho) of the rank-r factorization from this sketch."""
    err_sq = sk.residual_sq + float(sk.theta[r:].sum())
    if err_sq <= (EXACT_RELATIVE_ERROR**2) * total:
        return math.sqrt(err_sq), 1.0
    opt_sq = err_sq - min(float(excess[:r].sum()), sk.residual_sq)
    return math.sqrt(err_sq), (math.sqrt(err_sq / opt_sq) if opt_sq > 0 else math.inf)


def _energy_choice(sk: _Sketch, excess: torch.Tensor, total: float, energy: float, max_rank: int) -> int | None:
    """The rank the exact SVD would pick, when the sketch's bounds decide it; None when they do not (yet)."""
    target = energy * total
    k = len(sk.theta)
    low = torch.cumsum(sk.theta, 0)
    high = torch.minimum(torch.cumsum(sk.theta + excess, 0), low + sk.residual_sq)

    def first(cum: torch.Tensor) -> int | None:
        hit = torch.nonzero(cum >= target)
        return int(hit[0]) + 1 if len(hit) else None

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
    # energy mode starts at rank 32 and widens: most layers need far fewer than max_rank directions
    want = min(rank, full) if rank is not None else min(max_rank, ENERGY_FIRST_RANK, full)
    oversample = max(OVERSAMPLE_MIN, int(want * OVERSAMPLE_FRACTION))
    k = want + oversample
    if k > MAX_SKETCH_SHARE * full:  # a sketch this wide costs about as much as the exact SVD
        return factor_exact(x, rank=rank, energy=energy, max_rank=max_rank, total=total)
    gen = torch.Generator().manual_seed(seed)
    q = _power(x, _orthonormal(x @ torch.randn(n, k, generator=gen)), FIRST_POWER_ITERS)
    iters = FIRST_POWER_ITERS
    top_bound = math.inf  # a bound on ||dW||_2², computed only when a flat spectrum needs it
    for _ in range(MAX_ROUNDS):
        sk = _sketch(x, q)
        probes = SpectralNormBound(_Operator(x, q), gen)

        def settle(excess: torch.Tensor) -> tuple[int | None, float]:
            """(rank, rho bound) with these per-index excesses; rank None when undecided or the sketch too narrow."""
            r = min(rank, full) if rank is not None else _energy_choice(sk, excess, total, energy, max_rank)
            if r is None or r + oversample // 2 > len(sk.theta):
                return None, math.inf
            return r, _rho_bound(sk, r, total, excess)[1]

        r = None
        for steps in PROBE_STEPS:
            probes.advance(steps)
            excess = sk.excess(probes.upper, top_bound)
            r, rho = settle(excess)
            if rho <= rho_target:
                error = _rho_bound(sk, r, total, excess)[0]
                b, a = _split_factors(q.double() @ sk.u[:, :r], sk.theta[:r].sqrt(), sk.vh[:r])
                return LowRank(B=b, A=a, rank=r, total_energy=total, error=error, rho=rho, method="randomized",
                               sketch=len(sk.theta), power_iters=iters)
            # more probe steps only help when even a perfect γ (the certain lower bound) would settle it
            r_ideal, rho_ideal = settle(sk.excess(probes.lower, top_bound))
            if rho_ideal > rho_target:
                r = r if r is not None else r_ideal
                break
        if math.isinf(top_bound) and float(sk.theta[min(r or 1, len(sk.theta)) - 1]) > FLAT * float(sk.theta[0]):
            top_bound = SpectralNormBound(_Operator(x), gen).advance(PROBE_STEPS[-1]).upper  # σ_i ≤ σ_1 ≤ this
        del sk, probes
        grow = oversample if rank is not None or r is not None else q.shape[1]
        if q.shape[1] + grow > MAX_SKETCH_SHARE * full:
            break
        q = _orthonormal(torch.cat([q, x @ torch.randn(n, grow, generator=gen)], dim=1))
        q = _power(x, q, POWER_STEP)
        iters += POWER_STEP
    return factor_exact(x, rank=rank, energy=energy, max_rank=max_rank, total=total, method="exact-fallback")
