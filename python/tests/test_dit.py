"""Tests of the DiT velocity network and of CFG label dropout (sclatent.nn.dit)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from sclatent.nn.dit import DiT, DiTConfig, drop_labels, null_labels


def _randomise(model: DiT, seed: int, std: float = 0.2) -> DiT:
    """Overwrite every parameter with N(0, std^2) so the network is not the all-zero function of its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _inputs(cfg: DiTConfig, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.n_tokens, cfg.d_latent, generator=g)
    t = torch.rand(b, generator=g)
    labels = torch.stack([torch.randint(0, n + 1, (b,), generator=g) for n in cfg.n_classes], dim=1)
    return x, t, labels


def test_output_is_exactly_zero_at_init() -> None:
    cfg = DiTConfig.preset("tiny", d_latent=16, n_tokens=16, n_classes=[3, 5])
    model = DiT(cfg)
    x, t, labels = _inputs(cfg, 8, seed=0)
    out = model(x, t, labels)
    assert out.shape == (8, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))


def test_zero_init_network_still_learns() -> None:
    # adaLN-Zero: the output is 0, but the final projection receives gradient, so training can start
    cfg = DiTConfig.preset("tiny", d_latent=4, n_tokens=3, n_classes=[2])
    model = DiT(cfg)
    x, t, labels = _inputs(cfg, 16, seed=1)
    loss = ((model(x, t, labels) - 1.0) ** 2).mean()
    loss.backward()
    assert model.final.linear.weight.grad is not None
    assert model.final.linear.weight.grad.abs().sum() > 0


def test_default_preset_matches_official_size() -> None:
    # official scLDM DiT for dentate gyrus (14 clusters): 9,741,328 trainable parameters (+4,096 frozen sin-cos)
    cfg = DiTConfig.preset("default", d_latent=16, n_tokens=16, n_classes=[14])
    model = DiT(cfg)
    assert sum(p.numel() for p in model.parameters()) == 9_741_328


def test_config_roundtrip_and_presets() -> None:
    cfg = DiTConfig.preset("tiny", d_latent=16, n_tokens=16, n_classes=[3, 91])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert DiTConfig.from_dict(data) == cfg
    assert cfg.null_codes == [3, 91]
    with pytest.raises(ValueError, match="unknown DiT preset 'huge'"):
        DiTConfig.preset("huge", 16, 16, [])
    with pytest.raises(ValueError, match="unknown DiTConfig keys"):
        DiTConfig.from_dict({**data, "depth": 3})
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        DiTConfig(d_latent=16, n_tokens=16, d_model=100, n_heads=8)
    with pytest.raises(ValueError, match=r"n_classes\[1\]=0"):
        DiTConfig(d_latent=16, n_tokens=16, n_classes=[3, 0])


def test_state_dict_roundtrip_weights_only() -> None:
    cfg = DiTConfig.preset("tiny", d_latent=8, n_tokens=4, n_classes=[3])
    model = _randomise(DiT(cfg), seed=2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "pos_embed" not in state and "null_codes" not in state  # derived from the config, not stored
    clone = DiT(DiTConfig.from_dict(cfg.to_dict()))
    clone.load_state_dict(state)
    x, t, labels = _inputs(cfg, 5, seed=3)
    assert torch.equal(clone(x, t, labels), model(x, t, labels))


def test_rows_are_independent_and_labels_matter() -> None:
    cfg = DiTConfig.preset("tiny", d_latent=6, n_tokens=5, n_classes=[3, 4])
    model = _randomise(DiT(cfg), seed=4)
    x, t, labels = _inputs(cfg, 6, seed=5)
    with torch.no_grad():
        batched = model(x, t, labels)
        one_by_one = torch.cat([model(x[i : i + 1], t[i : i + 1], labels[i : i + 1]) for i in range(6)])
        # float rounding differs between batch sizes (matmul blocking, thread count): ~1e-5 on entries near 0
        torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=5e-5)
        nulls = null_labels(labels, cfg)
        assert nulls.tolist() == [[3, 4]] * 6
        assert not torch.allclose(model(x, t, nulls), batched)
        assert not torch.allclose(model(x, torch.zeros_like(t), labels), batched)


def test_unconditional_model_without_keys() -> None:
    cfg = DiTConfig.preset("tiny", d_latent=4, n_tokens=2, n_classes=[])
    model = _randomise(DiT(cfg), seed=6)
    out = model(torch.randn(3, 2, 4), torch.rand(3), torch.zeros(3, 0, dtype=torch.long))
    assert out.shape == (3, 2, 4) and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors() -> None:
    cfg = DiTConfig.preset("tiny", d_latent=4, n_tokens=2, n_classes=[3, 5])
    model = DiT(cfg)
    x, t = torch.randn(2, 2, 4), torch.rand(2)
    ok = torch.tensor([[0, 5], [3, 1]])
    assert model(x, t, ok).shape == (2, 2, 4)  # null codes (3 and 5) are valid
    with pytest.raises(ValueError, match=r"out of range"):
        model(x, t, torch.tensor([[4, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"out of range"):
        model(x, t, torch.tensor([[-1, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 2\)"):
        model(x, t, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, t, ok.float())
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 2, 4\)"):
        model(torch.randn(2, 3, 4), t, ok)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(x, torch.rand(2, 1), ok)


def test_drop_labels_is_independent_per_attribute() -> None:
    cfg = DiTConfig(d_latent=2, n_tokens=1, d_model=8, n_blocks=1, n_heads=2, n_classes=[2, 5, 7])
    n, rho = 40_000, 0.3
    g = torch.Generator().manual_seed(7)
    labels = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cfg.n_classes], dim=1)  # never null
    dropped = drop_labels(labels, cfg, rho, torch.Generator().manual_seed(8))
    is_null = (dropped == torch.tensor(cfg.null_codes)).numpy()  # (n, K)
    kept = ~is_null
    assert torch.equal(dropped[torch.from_numpy(kept)], labels[torch.from_numpy(kept)])  # kept labels untouched
    sd = np.sqrt(rho * (1 - rho) / n)
    for k in range(3):  # marginal drop frequency of every attribute is rho
        assert abs(is_null[:, k].mean() - rho) < 4 * sd, (k, is_null[:, k].mean())
    for a in range(3):  # drops of different attributes are independent (2x2 chi-square test)
        for b in range(a + 1, 3):
            table = np.histogram2d(is_null[:, a], is_null[:, b], bins=2)[0]
            assert chi2_contingency(table).pvalue > 1e-3, (a, b, table)
    both = (is_null[:, 0] & is_null[:, 1]).mean()
    assert abs(both - rho**2) < 4 * np.sqrt(rho**2 * (1 - rho**2) / n)
    # every subset of attributes appears (here all 2^3 patterns)
    patterns = {tuple(row) for row in is_null[:2000].astype(int)}
    assert len(patterns) == 8


def test_drop_labels_shared_drops_a_cells_labels_together() -> None:
    cfg = DiTConfig(d_latent=2, n_tokens=1, d_model=8, n_blocks=1, n_heads=2, n_classes=[2, 5, 7])
    n, rho = 20_000, 0.8
    g = torch.Generator().manual_seed(7)
    labels = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cfg.n_classes], dim=1)
    dropped = drop_labels(labels, cfg, rho, torch.Generator().manual_seed(8), scheme="shared")
    is_null = (dropped == torch.tensor(cfg.null_codes)).numpy()  # (n, K)
    assert (is_null.all(axis=1) | ~is_null.any(axis=1)).all()  # all or nothing per cell
    assert abs(is_null[:, 0].mean() - rho) < 4 * np.sqrt(rho * (1 - rho) / n)
    with pytest.raises(ValueError, match="unknown label-dropout scheme"):
        drop_labels(labels, cfg, rho, g, scheme="sometimes")


def test_drop_labels_edge_cases_and_determinism() -> None:
    cfg = DiTConfig(d_latent=2, n_tokens=1, d_model=8, n_blocks=1, n_heads=2, n_classes=[2, 5])
    labels = torch.tensor([[0, 1], [1, 4], [2, 5]])  # the last row already holds null codes
    assert torch.equal(drop_labels(labels, cfg, 0.0, torch.Generator().manual_seed(0)), labels)
    assert torch.equal(drop_labels(labels, cfg, 1.0, torch.Generator().manual_seed(0)), null_labels(labels, cfg))
    big = torch.randint(0, 2, (500, 2), generator=torch.Generator().manual_seed(1))
    first = drop_labels(big, cfg, 0.5, torch.Generator().manual_seed(9))
    again = drop_labels(big, cfg, 0.5, torch.Generator().manual_seed(9))
    other = drop_labels(big, cfg, 0.5, torch.Generator().manual_seed(10))
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="rho must be in"):
        drop_labels(labels, cfg, 1.5, torch.Generator())
    with pytest.raises(ValueError, match=r"labels must have shape \(B, 2\)"):
        drop_labels(labels[:, :1], cfg, 0.5, torch.Generator())
