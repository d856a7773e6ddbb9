"""Per-gene conditional likelihoods p(x_i | Z) of the decoder (paper §2.2.2, "Decoder").

Each class holds the parameters of B x Q independent distributions (cells x decoded genes) and offers
`log_prob(x) -> (B, Q)`, `mean -> (B, Q)` and `sample(generator) -> (B, Q)`. Count models return
integer-valued float tensors from `sample`.

Why hand-written rather than `torch.distributions`: (i) its NegativeBinomial is parametrised by
(total_count, logits) and loses precision for large theta / small mean; here everything is computed from
log-parameters with log1p(exp(.)) forms and no epsilon; (ii) its samplers take no `torch.Generator`, and
every random step of this package must be reproducible from an explicit generator.
"""

from __future__ import annotations

import math

import torch

from ..counts import TARGET_SUM, log1p_cp10k

_LOG_2PI = math.log(2.0 * math.pi)


def _log1pexp(z: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)): exact for every z, finite gradients at z = +-inf.

    Hand-written because F.softplus returns z itself above a threshold (20 by default).
    """
    return torch.clamp_min(z, 0.0) + torch.log1p(torch.exp(-torch.abs(z)))


def _broadcast_to(name: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast parameter `t` to `shape`, with a one-line error naming it when impossible."""
    if t.shape == shape:
        return t
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} cannot broadcast to {tuple(shape)}") from None


def _xmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * y with 0 * (+-inf) := 0 (the x log(...) terms of count likelihoods at x = 0)."""
    return torch.where(x == 0, torch.zeros_like(y), x * y)


def _lgamma_ratio(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log Gamma(x + theta) - log Gamma(theta) - log Gamma(x + 1).

    In float32 the difference of two lgamma values of size ~theta log theta cancels catastrophically for
    large theta (theta = 1e6 loses about one nat; its gradient digamma(x+theta) - digamma(theta) is lost
    entirely), so lower precisions are evaluated in float64 and cast back. The cost is a few element-wise
    ops over (B, Q), small next to the decoder. MPS has no float64 and keeps the input precision.
    """
    dtype = torch.promote_types(x.dtype, theta.dtype)
    if dtype == torch.float64 or x.device.type == "mps":
        return torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
    x64, t64 = x.double(), theta.double()
    return (torch.lgamma(x64 + t64) - torch.lgamma(t64) - torch.lgamma(x64 + 1.0)).to(dtype)


def _check_same_shape(**tensors: torch.Tensor) -> torch.Size:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"parameter shapes differ: {shapes}")
    return next(iter(tensors.values())).shape


def _check_positive(name: str, t: torch.Tensor) -> None:
    if not bool((t > 0).all()):
        raise ValueError(f"{name} must be > 0 everywhere, got min {t.min().item()}")


def _check_nonnegative(name: str, t: torch.Tensor) -> None:
    if not bool((t >= 0).all()):
        raise ValueError(f"{name} must be >= 0 everywhere, got min {t.min().item()}")


def _check_x(x: torch.Tensor, shape: torch.Size) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"x has shape {tuple(x.shape)}, expected {tuple(shape)}")


def sample_log_standard_gamma(alpha: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """log of Gamma(alpha, 1) draws (alpha's shape and dtype), deterministic under `generator`.

    Hand-written because `torch._standard_gamma` (and hence torch.distributions.Gamma) takes no generator.
    Marsaglia & Tsang (2000) rejection sampler: for a >= 1, d = a - 1/3, c = 1 / sqrt(9 d); draw
    n ~ N(0, 1), u ~ U(0, 1), v = (1 + c n)^3 and accept d v when v > 0 and
    log u < n^2 / 2 + d - d v + d log v (acceptance > 95 %); rejected entries are redrawn, in a loop over
    the still-pending entries only, so the stream of draws is a function of the generator state alone.
    For a < 1 the boost Gamma(a) = Gamma(a + 1) * U^(1/a) is used, in log space: log U / a would underflow
    U^(1/a) to 0 for tiny a (theta = 1e-4), which is exactly why the log is returned.
    """
    if generator is None:
        raise ValueError("sampling needs an explicit torch.Generator (got generator=None)")
    # float64 for the acceptance test: d - d v + d log v cancels badly in float32 when alpha ~ 1e6
    a = alpha.detach() if alpha.device.type == "mps" else alpha.detach().double()
    boost = a < 1
    a1 = torch.where(boost, a + 1.0, a)
    d = a1 - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    flat_d, flat_c = d.reshape(-1), c.reshape(-1)
    out = torch.empty_like(flat_d)
    pending = torch.arange(flat_d.numel(), device=a.device)
    while pending.numel() > 0:
        dp, cp = flat_d[pending], flat_c[pending]
        n = torch.randn(dp.shape, generator=generator, device=a.device, dtype=a.dtype)
        u = torch.rand(dp.shape, generator=generator, device=a.device, dtype=a.dtype)
        v = (1.0 + cp * n) ** 3
        log_v = torch.log(v.clamp_min(torch.finfo(a.dtype).tiny))
        accept = (v > 0) & (torch.log(u) < 0.5 * n * n + dp - dp * v + dp * log_v)
        out[pending[accept]] = torch.log(dp[accept]) + log_v[accept]
        pending = pending[~accept]
    log_g = out.view_as(a)
    if bool(boost.any()):
        u = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        log_g = torch.where(boost, log_g + torch.log(u) / a, log_g)
    return log_g.to(alpha.dtype)


class NegativeBinomial:
    """NB(mu, theta) with mean mu and inverse dispersion theta: Var = mu + mu^2 / theta.

    log p(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
               + theta log(theta / (theta + mu)) + x log(mu / (theta + mu)),
    evaluated as - theta log1pexp(log mu - log theta) - x log1pexp(log theta - log mu), which is exact for
    any ratio mu / theta (no epsilon, no overflow; mu = 0 gives the point mass at 0).
    """

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor) -> None:
        """mu (B, Q) >= 0 mean, theta (B, Q) > 0 inverse dispersion (broadcast to mu's shape)."""
        theta = _broadcast_to("theta", theta, mu.shape)
        _check_nonnegative("mu", mu)
        _check_positive("theta", theta)
        self.log_mu = torch.log(mu)
        self.log_theta = torch.log(theta)

    @classmethod
    def from_log(cls, log_mu: torch.Tensor, log_theta: torch.Tensor) -> "NegativeBinomial":
        """Build from log-parameters (the decoder's native output; no value checks, no exp/log round trip)."""
        obj = cls.__new__(cls)
        obj.log_mu, obj.log_theta = log_mu, _broadcast_to("log_theta", log_theta, log_mu.shape)
        return obj

    def columns(self, cols: torch.Tensor) -> "NegativeBinomial":
        """The distributions of genes `cols` (Q',) only: (B, Q')."""
        return NegativeBinomial.from_log(self.log_mu[:, cols], self.log_theta[:, cols])

    @property
    def shape(self) -> torch.Size:
        return self.log_mu.shape

    @property
    def mean(self) -> torch.Tensor:
        """(B, Q) mu."""
        return torch.exp(self.log_mu)

    @property
    def theta(self) -> torch.Tensor:
        """(B, Q) inverse dispersion."""
        return torch.exp(self.log_theta)

    @property
    def variance(self) -> torch.Tensor:
        """(B, Q) mu + mu^2 / theta."""
        mu = self.mean
        return mu + mu * torch.exp(self.log_mu - self.log_theta)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q) log p(x) for counts x (B, Q)."""
        _check_x(x, self.shape)
        theta = self.theta
        log_ratio = self.log_mu - self.log_theta  # log(mu / theta)
        return (
            _lgamma_ratio(x, theta)
            - theta * _log1pexp(log_ratio)  # theta log(theta / (theta + mu))
            - _xmul(x, _log1pexp(-log_ratio))  # x log(mu / (theta + mu))
        )

    def sample(self, generator: torch.Generator | None) -> torch.Tensor:
        """(B, Q) integer-valued float draws: lambda ~ Gamma(shape theta, rate theta / mu), x ~ Poisson(lambda)."""
        with torch.no_grad():
            log_g = sample_log_standard_gamma(self.theta, generator)  # log Gamma(theta, 1)
            rate = torch.exp(self.log_mu - self.log_theta + log_g)  # mu / theta * Gamma(theta, 1)
            return torch.poisson(rate, generator=generator)


class ZeroInflatedNegativeBinomial:
    """pi * delta_0 + (1 - pi) * NB(mu, theta), with pi = sigmoid(zi_logits)."""

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor) -> None:
        """mu (B, Q) >= 0, theta (B, Q) > 0 (broadcast), zi_logits (B, Q) logit of the zero-inflation pi."""
        self.nb = NegativeBinomial(mu, theta)
        _check_same_shape(mu=mu, zi_logits=zi_logits)
        self.zi_logits = zi_logits

    @classmethod
    def from_log(
        cls, log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor
    ) -> "ZeroInflatedNegativeBinomial":
        """Build from log-parameters (no value checks)."""
        obj = cls.__new__(cls)
        obj.nb = NegativeBinomial.from_log(log_mu, log_theta)
        _check_same_shape(log_mu=log_mu, zi_logits=zi_logits)
        obj.zi_logits = zi_logits
        return obj

    def columns(self, cols: torch.Tensor) -> "ZeroInflatedNegativeBinomial":
        """The distributions of genes `cols` (Q',) only: (B, Q')."""
        return ZeroInflatedNegativeBinomial.from_log(
            self.nb.log_mu[:, cols], self.nb.log_theta[:, cols], self.zi_logits[:, cols]
        )

    @property
    def shape(self) -> torch.Size:
        return self.nb.shape

    @property
    def mean(self) -> torch.Tensor:
        """(B, Q) (1 - pi) mu."""
        return torch.sigmoid(-self.zi_logits) * self.nb.mean

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q) log p(x): logaddexp(log pi, log(1-pi) + log NB(0)) at 0, log(1-pi) + log NB(x) elsewhere."""
        _check_x(x, self.shape)
        log_pi = -_log1pexp(-self.zi_logits)  # log sigmoid(l)
        log_not_pi = -_log1pexp(self.zi_logits)  # log sigmoid(-l)
        nb = log_not_pi + self.nb.log_prob(x)
        return torch.where(x == 0, torch.logaddexp(log_pi, nb), nb)

    def sample(self, generator: torch.Generator | None) -> torch.Tensor:
        """(B, Q) draws: an NB draw, zeroed with probability pi."""
        with torch.no_grad():
            counts = self.nb.sample(generator)
            u = torch.rand(counts.shape, generator=generator, device=counts.device, dtype=counts.dtype)
            return torch.where(u < torch.sigmoid(self.zi_logits), torch.zeros_like(counts), counts)


class Poisson:
    """Poisson(rate)."""

    def __init__(self, rate: torch.Tensor) -> None:
        """rate (B, Q) >= 0."""
        _check_nonnegative("rate", rate)
        self.log_rate = torch.log(rate)

    @classmethod
    def from_log(cls, log_rate: torch.Tensor) -> "Poisson":
        """Build from the log-rate (no value checks)."""
        obj = cls.__new__(cls)
        obj.log_rate = log_rate
        return obj

    def columns(self, cols: torch.Tensor) -> "Poisson":
        """The distributions of genes `cols` (Q',) only: (B, Q')."""
        return Poisson.from_log(self.log_rate[:, cols])

    @property
    def shape(self) -> torch.Size:
        return self.log_rate.shape

    @property
    def mean(self) -> torch.Tensor:
        """(B, Q) rate."""
        return torch.exp(self.log_rate)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q) x log(rate) - rate - lgamma(x + 1)."""
        _check_x(x, self.shape)
        return _xmul(x, self.log_rate) - self.mean - torch.lgamma(x + 1.0)

    def sample(self, generator: torch.Generator | None) -> torch.Tensor:
        """(B, Q) Poisson draws."""
        if generator is None:
            raise ValueError("sampling needs an explicit torch.Generator (got generator=None)")
        with torch.no_grad():
            return torch.poisson(self.mean, generator=generator)


class Gaussian:
    """N(m, sigma^2) on y = log1p(1e4 * x / L) (the paper's Gaussian ablation; the official code's variant).

    `log_prob(x)` maps counts x to y first and returns the Gaussian log density of y (a density on the
    transformed scale, not a probability mass on counts: its values are not comparable with the count
    models'). `mean` is the count at the mean of y, expm1(m) * L / 1e4 (not E[x], which would add a
    log-normal variance term). `sample` draws y ~ N(m, sigma^2) and maps it back to counts as
    round(max(expm1(y), 0) * L / 1e4): clamping at 0 because expm1(y) < 0 has no count meaning, rounding
    so that every model returns integer counts.
    """

    def __init__(self, m: torch.Tensor, sigma: torch.Tensor, library_size: torch.Tensor) -> None:
        """m (B, Q) mean of y, sigma (B, Q) > 0 (broadcast), library_size (B,) >= 0."""
        sigma = _broadcast_to("sigma", sigma, m.shape)
        _check_positive("sigma", sigma)
        self._init(m, torch.log(sigma), library_size)

    @classmethod
    def from_log(cls, m: torch.Tensor, log_sigma: torch.Tensor, library_size: torch.Tensor) -> "Gaussian":
        """Build from the mean and log standard deviation of y (no value checks)."""
        obj = cls.__new__(cls)
        obj._init(m, _broadcast_to("log_sigma", log_sigma, m.shape), library_size)
        return obj

    def _init(self, m: torch.Tensor, log_sigma: torch.Tensor, library_size: torch.Tensor) -> None:
        if m.dim() != 2 or tuple(library_size.shape) != (m.shape[0],):
            raise ValueError(f"library_size must have shape ({m.shape[0]},), got {tuple(library_size.shape)}")
        self.m, self.log_sigma, self.library_size = m, log_sigma, library_size

    def columns(self, cols: torch.Tensor) -> "Gaussian":
        """The distributions of genes `cols` (Q',) only: (B, Q'); y is still normalised by the full library L."""
        return Gaussian.from_log(self.m[:, cols], self.log_sigma[:, cols], self.library_size)

    @property
    def shape(self) -> torch.Size:
        return self.m.shape

    @property
    def mean(self) -> torch.Tensor:
        """(B, Q) counts at the mean of y: expm1(m) * L / 1e4."""
        return torch.expm1(self.m) * self.library_size[:, None] / TARGET_SUM

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q) Gaussian log density of y = log1p(1e4 x / L)."""
        _check_x(x, self.shape)
        y = log1p_cp10k(x, self.library_size)
        z = (y - self.m) * torch.exp(-self.log_sigma)
        return -0.5 * z * z - self.log_sigma - 0.5 * _LOG_2PI

    def sample(self, generator: torch.Generator | None) -> torch.Tensor:
        """(B, Q) counts round(max(expm1(y), 0) * L / 1e4) with y ~ N(m, sigma^2)."""
        if generator is None:
            raise ValueError("sampling needs an explicit torch.Generator (got generator=None)")
        with torch.no_grad():
            eps = torch.randn(self.shape, generator=generator, device=self.m.device, dtype=self.m.dtype)
            y = self.m + torch.exp(self.log_sigma) * eps
            return torch.round(torch.expm1(y).clamp_min(0.0) * self.library_size[:, None] / TARGET_SUM)


Likelihood = NegativeBinomial | ZeroInflatedNegativeBinomial | Poisson | Gaussian
