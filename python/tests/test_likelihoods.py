"""Count likelihoods: log-probabilities against scipy, sampling moments, determinism, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from sclatent.nn.likelihoods import (
    Gaussian,
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    sample_log_standard_gamma,
)

THETAS = [1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6]
COUNTS = [0, 1, 2, 7, 30, 100, 1_000, 10_000, 100_000]
MEANS = [1e-3, 0.5, 10.0, 1e3, 1e5]


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (x, mu, theta) combinations as flat float64 arrays."""
    x, mu, theta = np.meshgrid(COUNTS, MEANS, THETAS, indexing="ij")
    return x.reshape(1, -1).astype(np.float64), mu.reshape(1, -1), theta.reshape(1, -1)


def _nb_scipy(x: np.ndarray, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_nb_log_prob_matches_scipy_float64() -> None:
    x, mu, theta = _grid()
    ours = NegativeBinomial(torch.from_numpy(mu), torch.from_numpy(theta)).log_prob(torch.from_numpy(x)).numpy()
    ref = _nb_scipy(x, mu, theta)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-12)


def test_nb_from_log_equals_direct_and_broadcasts_theta() -> None:
    mu = torch.tensor([[0.3, 4.0, 250.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    theta = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64)  # per gene, broadcast over cells
    x = torch.tensor([[0.0, 5.0, 300.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    direct = NegativeBinomial(mu, theta).log_prob(x)
    from_log = NegativeBinomial.from_log(mu.log(), theta.log()).log_prob(x)
    torch.testing.assert_close(direct, from_log, rtol=1e-12, atol=1e-12)
    ref = _nb_scipy(x.numpy(), mu.numpy(), np.broadcast_to(theta.numpy(), mu.shape))
    np.testing.assert_allclose(direct.numpy(), ref, rtol=1e-10)


def test_nb_float32_close_to_float64_and_finite() -> None:
    """float32 inputs: lgamma terms are evaluated in float64, so no nat-sized error at large theta."""
    x, mu, theta = _grid()
    keep = x <= 100  # the count values where an lgamma cancellation would dominate the error
    x, mu, theta = x[keep][None], mu[keep][None], theta[keep][None]
    ref = NegativeBinomial(torch.from_numpy(mu), torch.from_numpy(theta)).log_prob(torch.from_numpy(x))
    f32 = NegativeBinomial(torch.from_numpy(mu).float(), torch.from_numpy(theta).float()).log_prob(
        torch.from_numpy(x).float()
    )
    assert f32.dtype == torch.float32 and torch.isfinite(f32).all()
    err = (f32.double() - ref).abs()
    bound = 1e-4 * (1.0 + torch.from_numpy(x) + ref.abs())
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def test_nb_zero_mean_is_point_mass_with_finite_gradient() -> None:
    log_mu = torch.tensor([[float("-inf"), 0.0]], dtype=torch.float64, requires_grad=True)
    log_theta = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    nb = NegativeBinomial.from_log(log_mu, log_theta)
    lp = nb.log_prob(torch.tensor([[0.0, 0.0]], dtype=torch.float64))
    assert lp[0, 0].item() == 0.0
    lp.sum().backward()
    assert torch.isfinite(log_mu.grad).all() and torch.isfinite(log_theta.grad).all()
    assert nb.log_prob(torch.tensor([[1.0, 0.0]], dtype=torch.float64))[0, 0].item() == float("-inf")


def test_poisson_log_prob_matches_scipy() -> None:
    rate = np.array([[1e-3, 0.5, 10.0, 1e3, 1e5]], dtype=np.float64).repeat(len(COUNTS), 0)
    x = np.array(COUNTS, dtype=np.float64)[:, None].repeat(rate.shape[1], 1)
    ours = Poisson(torch.from_numpy(rate)).log_prob(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, stats.poisson.logpmf(x, rate), rtol=1e-5)
    zero = Poisson(torch.zeros(1, 2, dtype=torch.float64)).log_prob(torch.tensor([[0.0, 3.0]], dtype=torch.float64))
    assert zero[0, 0].item() == 0.0 and zero[0, 1].item() == float("-inf")


def test_zinb_log_prob_matches_hand_mixture() -> None:
    x, mu, theta = _grid()
    rng = np.random.default_rng(0)
    zi_logits = rng.normal(0.0, 2.0, size=x.shape)
    pi = 1.0 / (1.0 + np.exp(-zi_logits))
    nb = np.exp(_nb_scipy(x, mu, theta))
    with np.errstate(divide="ignore"):
        ref = np.log(np.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
    ours = ZeroInflatedNegativeBinomial(
        torch.from_numpy(mu), torch.from_numpy(theta), torch.from_numpy(zi_logits)
    ).log_prob(torch.from_numpy(x))
    finite = np.isfinite(ref)  # exp() of very negative log-pmfs underflows in the hand reference
    np.testing.assert_allclose(ours.numpy()[finite], ref[finite], rtol=1e-5)
    # where the hand reference underflows, compare in log space
    ref_log = np.log1p(-pi) + _nb_scipy(x, mu, theta)
    np.testing.assert_allclose(ours.numpy()[~finite & (x > 0)], ref_log[~finite & (x > 0)], rtol=1e-5)
    mean = ZeroInflatedNegativeBinomial(torch.from_numpy(mu), torch.from_numpy(theta), torch.from_numpy(zi_logits)).mean
    np.testing.assert_allclose(mean.numpy(), (1 - pi) * mu, rtol=1e-12)


def test_gaussian_log_prob_mean_and_sample() -> None:
    x = torch.tensor([[0.0, 3.0, 50.0], [10.0, 0.0, 1.0]], dtype=torch.float64)
    L = x.sum(-1)
    m = torch.tensor([[0.1, 5.0, 8.0], [7.5, 0.0, 6.0]], dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    gauss = Gaussian(m, sigma, L)
    y = np.log1p(1e4 * x.numpy() / L.numpy()[:, None])
    np.testing.assert_allclose(gauss.log_prob(x).numpy(), stats.norm.logpdf(y, m.numpy(), sigma.numpy()), rtol=1e-10)
    np.testing.assert_allclose(gauss.mean.numpy(), np.expm1(m.numpy()) * L.numpy()[:, None] / 1e4, rtol=1e-12)
    tight = Gaussian(m, torch.full((3,), 1e-9, dtype=torch.float64), L)
    draws = tight.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws, torch.round(tight.mean.clamp_min(0)))
    wide = Gaussian(m, sigma, L).sample(torch.Generator().manual_seed(1))
    assert bool((wide >= 0).all()) and torch.equal(wide, wide.round())


def test_standard_gamma_moments_and_determinism() -> None:
    n = 100_000
    for a in [0.05, 0.5, 1.0, 3.7, 100.0]:
        alpha = torch.full((n,), a, dtype=torch.float64)
        g = torch.exp(sample_log_standard_gamma(alpha, torch.Generator().manual_seed(3)))
        se = (a / n) ** 0.5
        assert abs(g.mean().item() - a) < 5 * se, (a, g.mean().item())
        assert abs(g.var().item() / a - 1.0) < 0.05 + 10 / (n * a) ** 0.5, (a, g.var().item())
    alpha = torch.full((1000,), 0.7)
    a1 = sample_log_standard_gamma(alpha, torch.Generator().manual_seed(5))
    a2 = sample_log_standard_gamma(alpha, torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2)
    # theta = 1e-4: the log stays finite where Gamma(1e-4) underflows to 0 in float64 for most draws
    tiny = sample_log_standard_gamma(torch.full((1000,), 1e-4, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert bool((tiny < 0).all()) and bool(torch.isfinite(tiny).any())


@pytest.mark.parametrize("mu,theta", [(5.0, 0.5), (5.0, 2.0), (20.0, 50.0), (0.3, 1e4)])
def test_nb_sample_moments(mu: float, theta: float) -> None:
    n = 200_000
    nb = NegativeBinomial(torch.full((1, n), mu, dtype=torch.float64), torch.full((1, n), theta, dtype=torch.float64))
    draws = nb.sample(torch.Generator().manual_seed(11))
    assert torch.equal(draws, draws.round()) and bool((draws >= 0).all())
    var = mu + mu * mu / theta
    assert abs(draws.mean().item() - mu) < 5 * (var / n) ** 0.5
    assert abs(draws.var().item() / var - 1.0) < 0.05
    p0 = stats.nbinom.pmf(0, theta, theta / (theta + mu))
    assert abs((draws == 0).double().mean().item() - p0) < 5 * (p0 * (1 - p0) / n) ** 0.5 + 1e-4


def test_nb_sample_tiny_theta_zero_fraction() -> None:
    n = 50_000
    mu, theta = 10.0, 1e-2
    draws = NegativeBinomial(torch.full((1, n), mu), torch.full((1, n), theta)).sample(torch.Generator().manual_seed(2))
    p0 = stats.nbinom.pmf(0, theta, theta / (theta + mu))
    assert abs((draws == 0).float().mean().item() - p0) < 0.01


def test_poisson_and_zinb_sample_moments() -> None:
    n = 200_000
    draws = Poisson(torch.full((1, n), 7.0, dtype=torch.float64)).sample(torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 7.0) < 5 * (7.0 / n) ** 0.5 and abs(draws.var().item() / 7.0 - 1) < 0.03
    zi = torch.full((1, n), 0.4, dtype=torch.float64)  # logit
    pi = torch.sigmoid(zi[0, 0]).item()
    full = lambda v: torch.full((1, n), v, dtype=torch.float64)  # noqa: E731
    zinb = ZeroInflatedNegativeBinomial(full(6.0), full(3.0), zi)
    z_draws = zinb.sample(torch.Generator().manual_seed(1))
    p0 = pi + (1 - pi) * stats.nbinom.pmf(0, 3.0, 3.0 / 9.0)
    assert abs((z_draws == 0).double().mean().item() - p0) < 0.005
    assert abs(z_draws.mean().item() - (1 - pi) * 6.0) < 0.03


def test_sampling_is_deterministic_under_generator() -> None:
    mu = torch.rand(8, 30, generator=torch.Generator().manual_seed(0)) * 20
    theta = torch.rand(30, generator=torch.Generator().manual_seed(1)) * 5 + 0.1
    zi = torch.randn(8, 30, generator=torch.Generator().manual_seed(2))
    L = mu.sum(-1)
    liks = [
        NegativeBinomial(mu, theta),
        ZeroInflatedNegativeBinomial(mu, theta, zi),
        Poisson(mu),
        Gaussian(mu.log1p(), theta, L),
    ]
    for lik in liks:
        a = lik.sample(torch.Generator().manual_seed(42))
        b = lik.sample(torch.Generator().manual_seed(42))
        c = lik.sample(torch.Generator().manual_seed(43))
        assert torch.equal(a, b), type(lik).__name__
        assert not torch.equal(a, c), type(lik).__name__


def test_bad_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="theta"):
        NegativeBinomial(torch.ones(2, 3), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="mu"):
        NegativeBinomial(-torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="theta"):
        NegativeBinomial(torch.ones(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        NegativeBinomial(torch.ones(2, 3), torch.ones(3)).log_prob(torch.ones(3, 2))
    with pytest.raises(ValueError, match="generator"):
        NegativeBinomial(torch.ones(2, 3), torch.ones(3)).sample(None)
    with pytest.raises(ValueError, match="library_size"):
        Gaussian(torch.ones(2, 3), torch.ones(3), torch.ones(3))
