"""TransformerVAE: exchangeability, subset decoding, library sizes, training, (de)serialisation, errors."""

from __future__ import annotations

import math

import io
from collections.abc import Iterator

import pytest
import torch

from sclatent.nn.likelihoods import Gaussian, NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial
from sclatent.nn.vae import LIKELIHOODS, TransformerVAE, VAEConfig

G = 40


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run small models on one intra-op thread: far faster than 2 contended OpenMP threads for tiny ops."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(**overrides: object) -> TransformerVAE:
    return TransformerVAE(VAEConfig.preset("tiny", G, **overrides), seed=0).eval()


def synthetic_batch(B: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """NB counts of B cells from 4 cell types; tokens = expressed genes first, then PAD (id 0, count 0)."""
    g = torch.Generator().manual_seed(seed)
    types = torch.randint(0, 4, (B,), generator=g)
    profiles = torch.softmax(2.0 * torch.randn(4, G, generator=g), dim=-1)  # (4, G)
    L = torch.exp(torch.empty(B).uniform_(6.0, 7.5, generator=g))  # (B,)
    x = NegativeBinomial(profiles[types] * L[:, None], torch.full((G,), 20.0)).sample(g)  # (B, G)
    order = torch.argsort((x == 0).float(), dim=1, stable=True)  # expressed genes first
    counts = x.gather(1, order)  # (B, G)
    mask = counts > 0
    genes = (order + 1) * mask  # PAD id 0 where not expressed
    return {
        "genes": genes,
        "counts": counts,
        "mask": mask,
        "library_size": x.sum(dim=1),
        "target_genes": torch.arange(1, G + 1),
        "target_counts": x,
    }


def _pad(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """Append `extra` PAD tokens to every cell."""
    B = batch["genes"].shape[0]
    out = dict(batch)
    out["genes"] = torch.cat([batch["genes"], torch.zeros(B, extra, dtype=torch.long)], dim=1)
    out["counts"] = torch.cat([batch["counts"], torch.zeros(B, extra)], dim=1)
    out["mask"] = torch.cat([batch["mask"], torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"embedding": "multiplicative"},
        {"embedding": "gene_count"},
        {"variational": True},
        {"latent_norm": False},
        {"count_encoding": "fourier"},
        {"embedding": "concat", "count_encoding": "fourier"},
        {"depth_features": True},
        {"count_readout": 3},
    ],
)
def test_encoder_invariant_to_token_order_and_padding(overrides: dict) -> None:
    model = _tiny(**overrides)
    b = synthetic_batch(8)
    mu, logvar = model.encode(b["genes"], b["counts"], b["mask"])
    assert mu.shape == (8, 4, 4)
    assert (logvar is not None) == model.config.variational
    perm = torch.randperm(G, generator=torch.Generator().manual_seed(1))  # mixes real and PAD tokens
    mu_p, _ = model.encode(b["genes"][:, perm], b["counts"][:, perm], b["mask"][:, perm])
    torch.testing.assert_close(mu_p, mu, atol=1e-5, rtol=1e-5)
    for extra in (1, 25):
        p = _pad(b, extra)
        mu_pad, logvar_pad = model.encode(p["genes"], p["counts"], p["mask"])
        torch.testing.assert_close(mu_pad, mu, atol=1e-5, rtol=1e-5)
        if logvar is not None:
            torch.testing.assert_close(logvar_pad, logvar, atol=1e-5, rtol=1e-5)
    # a cell encoded alone, without any padding, gives the same latent
    n0 = int(b["mask"][3].sum())
    mu_alone, _ = model.encode(b["genes"][3:4, :n0], b["counts"][3:4, :n0], b["mask"][3:4, :n0])
    torch.testing.assert_close(mu_alone, mu[3:4], atol=1e-5, rtol=1e-5)


def test_concat_encoder_sees_counts_multiplicative_does_not() -> None:
    """Characterises the official embedding: LN_K / LN_V cancel the log1p(x) scale of E_g * log1p(x)."""
    b = synthetic_batch(4)
    for embedding, sees_counts in (("concat", True), ("multiplicative", False)):
        model = _tiny(embedding=embedding)
        z1, _ = model.encode(b["genes"], b["counts"], b["mask"])
        z2, _ = model.encode(b["genes"], b["counts"] * 50, b["mask"])
        moved = (z1 - z2).abs().max().item()
        assert (moved > 1e-2) if sees_counts else (moved < 1e-4), (embedding, moved)


def test_gene_count_embedding_starts_as_concat_and_learns_per_gene_count_directions() -> None:
    """"gene_count" is the paper's concat embedding plus log1p(x_g) * U_g with U = 0 at initialisation: the same
    latents as "concat" at step 0; with U set, two genes with the same count move differently."""
    b = synthetic_batch(4)
    concat, per_gene = _tiny(embedding="concat"), _tiny(embedding="gene_count")
    torch.testing.assert_close(per_gene.encode(b["genes"], b["counts"], b["mask"])[0],
                               concat.encode(b["genes"], b["counts"], b["mask"])[0], atol=0, rtol=0)
    with torch.no_grad():
        per_gene.count_embedding.weight.normal_(generator=torch.Generator().manual_seed(5))
    genes, counts = torch.tensor([[3, 9]]), torch.tensor([[4.0, 4.0]])
    shift = per_gene.embed(genes, counts) - per_gene.embed(genes, torch.zeros_like(counts))  # (1, 2, d)
    torch.testing.assert_close(shift[0, 0], math.log1p(4.0) * (concat.concat_proj.weight[:, :16].sum(1) + per_gene.count_embedding.weight[3]))
    assert not torch.allclose(shift[0, 0], shift[0, 1])
    z1, _ = per_gene.encode(b["genes"], b["counts"], b["mask"])
    z2, _ = per_gene.encode(b["genes"], b["counts"] * 50, b["mask"])
    assert (z1 - z2).abs().max().item() > 1e-2  # it sees counts, like concat


def test_decoder_equivariant_to_query_permutation() -> None:
    model = _tiny()
    z = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(0))
    genes = torch.arange(1, G + 1)
    perm = torch.randperm(G, generator=torch.Generator().manual_seed(1))
    L = torch.full((5,), 1000.0)
    full, permuted = model.decode(z, genes, L), model.decode(z, genes[perm], L)
    torch.testing.assert_close(permuted.mean, full.mean[:, perm], atol=1e-4, rtol=1e-5)
    x = torch.randint(0, 30, (5, G), generator=torch.Generator().manual_seed(2)).float()
    torch.testing.assert_close(permuted.log_prob(x[:, perm]), full.log_prob(x)[:, perm], atol=1e-4, rtol=1e-5)


def _count_mean(lik: object) -> torch.Tensor:
    """The softmax * L mean: of the NB component for ZINB (its mixture mean is (1 - pi) mu)."""
    return lik.nb.mean if isinstance(lik, ZeroInflatedNegativeBinomial) else lik.mean


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_subset_decode_equals_subset_of_full_decode(likelihood: str) -> None:
    """Parameters of a gene depend only on z and its id; count means renormalise over the requested set."""
    model = _tiny(likelihood=likelihood)
    z = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    all_genes = torch.arange(1, G + 1)
    subset = torch.tensor([17, 3, 40, 8, 22])  # any order
    full = model.decode_parameters(z, all_genes)
    part = model.decode_parameters(z, subset)
    for key, value in part.items():
        ref = full[key][..., subset - 1]
        torch.testing.assert_close(value.expand_as(ref), ref, atol=1e-6, rtol=1e-6)
    if likelihood != "gaussian":
        L = torch.tensor([500.0, 1200.0, 80.0])
        mean_full = _count_mean(model.decode(z, all_genes, L))[:, subset - 1]
        renormalised = mean_full / mean_full.sum(dim=1, keepdim=True) * L[:, None]
        torch.testing.assert_close(_count_mean(model.decode(z, subset, L)), renormalised, atol=1e-3, rtol=1e-5)
    # per-cell gene lists (B, Q) give the same parameters as the shared list
    per_cell = model.decode_parameters(z, subset.expand(3, -1))
    for key, value in per_cell.items():
        torch.testing.assert_close(value, part[key].expand_as(value), atol=1e-6, rtol=1e-6)
    # per-cell lists longer in total than the gene table (B * Q > G + 1) take the project-then-gather path
    many = torch.randint(1, G + 1, (3, 30), generator=torch.Generator().manual_seed(1))  # (B, Q), 90 > 41
    gathered = model.decode_parameters(z, many)
    for key, value in gathered.items():
        ref = full[key].expand(3, -1).gather(1, many - 1) if full[key].dim() == 2 else full[key][many - 1]
        torch.testing.assert_close(value, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("likelihood", ["nb", "nb_cell", "zinb", "poisson"])
def test_count_means_sum_to_library_size(likelihood: str) -> None:
    model = _tiny(likelihood=likelihood)
    z = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(0))
    L = torch.tensor([1.0, 250.0, 3e4, 1e5])
    lik = model.decode(z, torch.arange(1, G + 1), L)
    torch.testing.assert_close(_count_mean(lik).sum(dim=1), L, rtol=1e-5, atol=0.0)


def test_likelihood_types_and_log_probs() -> None:
    expected = {
        "nb": NegativeBinomial,
        "nb_cell": NegativeBinomial,
        "zinb": ZeroInflatedNegativeBinomial,
        "poisson": Poisson,
        "gaussian": Gaussian,
    }
    b = synthetic_batch(6)
    for name, cls in expected.items():
        model = _tiny(likelihood=name)
        lik = model.reconstruct(b["genes"], b["counts"], b["mask"], b["target_genes"], b["library_size"])
        assert isinstance(lik, cls)
        lp = lik.log_prob(b["target_counts"])
        assert lp.shape == (6, G) and torch.isfinite(lp).all()
        draws = lik.sample(torch.Generator().manual_seed(0))
        assert draws.shape == (6, G) and torch.equal(draws, draws.round()) and bool((draws >= 0).all())
    # per-gene theta starts at e (official initialisation)
    nb = _tiny().decode(torch.zeros(1, 4, 4), torch.arange(1, G + 1), torch.ones(1))
    torch.testing.assert_close(nb.theta, torch.full((1, G), torch.e))


def test_loss_terms_and_subset_scaling() -> None:
    model = _tiny()
    b = synthetic_batch(8)
    out = model.loss(**b)
    assert set(out) == {"loss", "nll", "kl"} and out["kl"].item() == 0.0
    z, _ = model.encode(b["genes"], b["counts"], b["mask"])
    lik = model.decode(z, b["target_genes"], b["library_size"])
    torch.testing.assert_close(out["nll"], -lik.log_prob(b["target_counts"]).sum(1).mean())
    torch.testing.assert_close(out["loss"], out["nll"])
    # a gene subset: NB means are normalised to the subset's observed total, NLL scaled by G / Q
    subset = torch.tensor([5, 1, 33, 20, 12, 7, 28, 39])
    tc = b["target_counts"][:, subset - 1]
    sub = model.loss(b["genes"], b["counts"], b["mask"], b["library_size"], subset, tc)
    lik_sub = model.decode(z, subset, tc.sum(1))
    torch.testing.assert_close(lik_sub.mean.sum(1), tc.sum(1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(sub["nll"], -(G / len(subset)) * lik_sub.log_prob(tc).sum(1).mean())


def test_stratified_subset_keeps_expressed_genes_and_weights_estimate_full_sums() -> None:
    """Every expressed gene of a cell is drawn when it fits beside ceil(f * Q) zeros; indices are distinct; the
    weights make sum_g w_g [x_g > 0] = n1 and sum_g w_g = G exactly (Horvitz-Thompson); a seed fixes the draw."""
    from sclatent.train_vae import stratified_subset

    x = synthetic_batch(16)["target_counts"]  # (16, G)
    x[0] = 0.0
    x[0, :3] = 5.0  # few expressed genes
    x[1] = 1.0  # every gene expressed: no zeros to draw
    n1 = (x > 0).sum(1)
    q, f = 12, 0.25
    idx, w = stratified_subset(x, q, f, torch.Generator().manual_seed(3))
    assert idx.shape == w.shape == (16, q)
    assert all(len(set(row.tolist())) == q for row in idx)
    drawn = x.gather(1, idx) > 0
    torch.testing.assert_close((w * drawn).sum(1), n1.float())
    torch.testing.assert_close(w.sum(1), torch.full((16,), float(G)))
    k1 = drawn.sum(1)
    room = q - math.ceil(f * q)
    assert bool((k1 == torch.clamp(n1, max=room).maximum(q - (G - n1))).all())
    assert int(k1[0]) == 3 and int(k1[1]) == q  # all 3 expressed genes kept; a cell without zeros
    assert bool((w[0, drawn[0]] == 1.0).all()) and bool((w[0, ~drawn[0]] == (G - 3) / (q - 3)).all())
    again, _ = stratified_subset(x, q, f, torch.Generator().manual_seed(3))
    assert torch.equal(idx, again)


def test_weighted_loss_is_the_full_loss_with_unit_weights_and_estimates_it_from_a_stratified_sample() -> None:
    from sclatent.train_vae import stratified_subset

    model = _tiny()
    b = synthetic_batch(8)
    full = model.loss(**b)["nll"]
    ones = model.loss(**b, target_weights=torch.ones_like(b["target_counts"]))["nll"]
    torch.testing.assert_close(ones, full)
    # mean over many stratified draws: close to the full-gene NLL. The weighted sum of log-probabilities is
    # unbiased, the log of the estimated softmax normaliser is not (Jensen), so the estimate sits a little low
    # and closes in as more genes are drawn (measured 0.968 at 16, 0.989 at 32 of these 40 genes).
    def mean_estimate(q: int) -> float:
        g = torch.Generator().manual_seed(0)
        draws = []
        for _ in range(200):
            idx, w = stratified_subset(b["target_counts"], q, 0.25, g)
            draws.append(model.loss(b["genes"], b["counts"], b["mask"], b["library_size"], idx + 1,
                                    b["target_counts"].gather(1, idx), target_weights=w)["nll"])
        return (torch.stack(draws).mean() / full).item()

    r16, r32 = mean_estimate(16), mean_estimate(32)
    assert 0.95 < r16 <= 1.0 and 0.98 < r32 <= 1.0 and r32 > r16, (r16, r32)
    with pytest.raises(ValueError, match="target_weights must have the shape"):
        model.loss(**b, target_weights=torch.ones(8, 3))


def test_deterministic_and_variational_modes() -> None:
    b = synthetic_batch(8)
    det = _tiny()
    assert det.to_logvar is None
    z, logvar = det.encode(b["genes"], b["counts"], b["mask"])
    assert logvar is None
    # latent_norm: every latent token has zero mean and unit variance over its features
    torch.testing.assert_close(z.mean(-1), torch.zeros(8, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(8, 4), atol=1e-3, rtol=0)
    a = det.loss(**b, generator=torch.Generator().manual_seed(0))
    c = det.loss(**b, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["loss"], c["loss"])  # nothing random in deterministic mode

    var = _tiny(variational=True, beta=0.5)
    with pytest.raises(ValueError, match="generator"):
        var.loss(**b)
    s1 = var.loss(**b, generator=torch.Generator().manual_seed(0))
    s2 = var.loss(**b, generator=torch.Generator().manual_seed(0))
    s3 = var.loss(**b, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s1["loss"], s2["loss"])
    assert s1["nll"].item() != s3["nll"].item()
    assert s1["kl"].item() > 0
    torch.testing.assert_close(s1["loss"], s1["nll"] + 0.5 * s1["kl"])
    mean_only = var.loss(**b, sample_posterior=False)
    mu, logvar = var.encode(b["genes"], b["counts"], b["mask"])
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum((1, 2)).mean()
    torch.testing.assert_close(mean_only["kl"], kl)
    s1["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in var.parameters() if p.requires_grad)


def test_all_padding_cell_is_finite() -> None:
    b = synthetic_batch(4)
    b["genes"][2] = 0
    b["counts"][2] = 0
    b["mask"][2] = False
    b["target_counts"][2] = 0
    b["library_size"][2] = 0
    for overrides in ({}, {"variational": True}, {"likelihood": "gaussian"}, {"likelihood": "zinb"}):
        model = _tiny(**overrides).train()
        mu, _ = model.encode(b["genes"], b["counts"], b["mask"])
        assert torch.isfinite(mu).all()
        out = model.loss(**b, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out["loss"]), overrides
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), overrides


@pytest.mark.usefixtures("one_thread")
def test_tiny_model_overfits_a_synthetic_batch() -> None:
    b = synthetic_batch(64)
    model = TransformerVAE(VAEConfig.preset("tiny", G), seed=0).train()
    # train-vae's learning rate and clipping; at lr 3e-3 without clipping the per-gene tables of the preset
    # (gene_count, gene_head) make this tiny model's loss spike on the way down
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(300):
        out = model.loss(**b, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        first = out["loss"].item() if first is None else first
    final = model.loss(**b)["loss"].item()
    assert final < 0.5 * first, (first, final)


def test_state_dict_round_trip_and_seeded_init() -> None:
    cfg = VAEConfig.preset("tiny", G, likelihood="zinb", variational=True)
    model = TransformerVAE(cfg, seed=3).eval()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    clone = TransformerVAE(VAEConfig.from_dict(ckpt["config"]), seed=99).eval()
    clone.load_state_dict(ckpt["model"])
    b = synthetic_batch(5)
    out_a = model.loss(**b, sample_posterior=False)
    out_b = clone.loss(**b, sample_posterior=False)
    assert torch.equal(out_a["loss"], out_b["loss"])
    # same seed -> same weights regardless of the global RNG; other seed -> different weights
    torch.manual_seed(123)
    same = TransformerVAE(cfg, seed=3)
    other = TransformerVAE(cfg, seed=4)
    sd, sd_same, sd_other = model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_same[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd_other[k]) for k in sd)


def test_config_round_trip_presets_and_errors() -> None:
    cfg = VAEConfig.preset("default", 2000)
    assert (cfg.d_model, cfg.n_latent_tokens, cfg.d_latent, cfg.n_enc_blocks, cfg.n_dec_blocks) == (32, 16, 16, 8, 8)
    assert (cfg.n_heads, cfg.n_cross_heads) == (8, 4)
    # the presets add the two per-gene tables measured better; the dataclass keeps the paper's architecture
    for name in ("default", "tiny"):
        p = VAEConfig.preset(name, 2000)
        assert (p.embedding, p.gene_head, p.gene_bias, p.pooled_head) == ("gene_count", True, False, 0)
    # ... and the linear count readout beside the encoder's pooling, with token dropout (k = 64; 4 in the tiny model)
    default, tiny = VAEConfig.preset("default", 2000), VAEConfig.preset("tiny", 2000)
    assert (default.count_readout, default.readout_dropout, tiny.count_readout, tiny.readout_dropout) == (64, 0.2, 4, 0.2)
    paper = VAEConfig(n_genes=2000)
    assert (paper.embedding, paper.gene_head, paper.gene_bias, paper.pooled_head, paper.count_readout) == (
        "concat", False, False, 0, 0)
    assert VAEConfig.preset("default", 2000, gene_bias=True).gene_bias is True
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    tiny = VAEConfig.preset("tiny", 10, likelihood="poisson")
    assert VAEConfig.from_dict(tiny.to_dict()) == tiny and tiny.likelihood == "poisson"
    with pytest.raises(ValueError, match="'negbin'"):
        VAEConfig(n_genes=10, likelihood="negbin")
    with pytest.raises(ValueError, match="'additive'"):
        VAEConfig(n_genes=10, embedding="additive")
    with pytest.raises(ValueError, match="'huge'"):
        VAEConfig.preset("huge", 10)
    with pytest.raises(ValueError, match="bogus"):
        VAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="n_heads=3"):
        VAEConfig(n_genes=10, n_heads=3)
    with pytest.raises(ValueError, match="n_genes"):
        VAEConfig(n_genes=0)


def test_bad_model_inputs_raise_value_errors() -> None:
    model = _tiny()
    b = synthetic_batch(2)
    with pytest.raises(ValueError, match=r"outside \[0, 40\]"):
        model.encode(b["genes"] + 5, b["counts"], b["mask"])
    with pytest.raises(ValueError, match="mask must be bool"):
        model.encode(b["genes"], b["counts"], b["mask"].float())
    with pytest.raises(ValueError, match="share a"):
        model.encode(b["genes"][:, :3], b["counts"], b["mask"])
    z = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match=r"outside \[1, 40\]"):
        model.decode(z, torch.tensor([0, 1, 2]), torch.ones(2))
    with pytest.raises(ValueError, match="z must have shape"):
        model.decode(torch.zeros(2, 3, 4), torch.tensor([1, 2]), torch.ones(2))
    with pytest.raises(ValueError, match="library_size"):
        model.decode(z, torch.tensor([1, 2]), torch.ones(3))
    with pytest.raises(ValueError, match="target_counts"):
        model.loss(b["genes"], b["counts"], b["mask"], b["library_size"], torch.tensor([1, 2]), torch.ones(2, 3))


def test_gene_bias_init_is_the_data_mean_profile_and_keeps_subset_decoding(tmp_path) -> None:
    """TRAIN_VAE's initial per-gene offsets are log mean fractions (gaussian: mean log1p CP10k) of the train
    cells, across shards; with them set, a subset decode is still the subset of the full decode."""
    import numpy as np

    from sclatent.synthetic import synthetic_counts
    from sclatent.tokens import TokenLoader, tokenize
    from sclatent.train_vae import gene_bias_init

    adata = synthetic_counts(n_cells=50, n_genes=G, seed=4)
    adata.var["highly_variable"] = True
    adata.write_h5ad(tmp_path / "train.h5ad")
    tokenize(tmp_path / "train.h5ad", tmp_path / "tok", condition_keys=["cell_type"], shard_size=20, progress=False)
    loader = TokenLoader(tmp_path / "tok", "train", batch_size=8, shuffle=False)
    assert len(loader.shards) == 3
    X = np.asarray(adata.X.todense(), dtype=np.float64)  # (50, G)
    frac = X / X.sum(axis=1, keepdims=True)
    expected = np.log(np.maximum(frac.mean(axis=0), 1e-9))
    np.testing.assert_allclose(gene_bias_init(loader, "nb").numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gene_bias_init(loader, "gaussian").numpy(), np.log1p(1e4 * frac).mean(axis=0), rtol=1e-5)

    model = _tiny(gene_bias=True)
    model.init_gene_bias(gene_bias_init(loader, "nb"))
    assert model.gene_bias.weight[0, 0] == 0.0
    z = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    full = model.decode_parameters(z, torch.arange(1, G + 1))["logits"]  # (3, G)
    subset = torch.tensor([5, 33, 2])
    torch.testing.assert_close(model.decode_parameters(z, subset)["logits"], full[:, subset - 1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        model.init_gene_bias(torch.full((G,), float("nan")))
    with pytest.raises(ValueError, match="no per-gene bias"):
        _tiny(gene_bias=False).init_gene_bias(torch.zeros(G))


def _check_per_gene_readout(base: TransformerVAE, extended: TransformerVAE, table: torch.nn.Embedding, first: str) -> None:
    """A zero-initialised per-gene table on top of `base`: `extended` decodes exactly as `base` at first; with
    random values in `table` it differs, each gene still depends only on z and its id (subsets, orders and
    per-cell lists decode as slices of the full decode), permuting z's latent tokens leaves a full decode
    unchanged, and the table's gradient reaches the decoded genes only."""
    z = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    all_genes = torch.arange(1, G + 1)
    torch.testing.assert_close(extended.decode_parameters(z, all_genes)[first],
                               base.decode_parameters(z, all_genes)[first], atol=0, rtol=0)
    with torch.no_grad():
        table.weight.normal_(generator=torch.Generator().manual_seed(3))
    full = extended.decode_parameters(z, all_genes)[first]  # (3, G)
    assert not torch.allclose(full, base.decode_parameters(z, all_genes)[first])
    subset = torch.tensor([17, 3, 40, 8, 22])
    torch.testing.assert_close(extended.decode_parameters(z, subset)[first], full[:, subset - 1], atol=1e-5, rtol=1e-5)
    many = torch.randint(1, G + 1, (3, 30), generator=torch.Generator().manual_seed(1))  # gather path
    torch.testing.assert_close(extended.decode_parameters(z, many)[first], full.gather(1, many - 1), atol=1e-5, rtol=1e-5)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(extended.decode_parameters(z[:, perm], all_genes)[first], full, atol=1e-5, rtol=1e-5)
    extended.train()
    extended.decode_parameters(z, subset)[first].sum().backward()
    grad = table.weight.grad
    assert grad is not None and bool((grad[subset].abs().sum(dim=1) > 0).all()) and float(grad[1].abs().sum()) == 0.0


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_gene_head_starts_as_the_shared_head_and_keeps_subset_decoding(likelihood: str) -> None:
    """The per-gene readout w_g . o_g (see _check_per_gene_readout for what is checked)."""
    per_gene = _tiny(likelihood=likelihood, gene_head=True)
    _check_per_gene_readout(_tiny(likelihood=likelihood), per_gene, per_gene.gene_head_weight,
                            "m" if likelihood == "gaussian" else "logits")


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_pooled_head_starts_as_the_model_without_it_and_keeps_subset_decoding(likelihood: str) -> None:
    """The pooled per-gene readout W_g . LN(MCAB_k(H)): W = 0 at initialisation and its own generator, so every
    other weight is as without it (see _check_per_gene_readout); a negative k is refused."""
    pooled = _tiny(likelihood=likelihood, pooled_head=2)
    _check_per_gene_readout(_tiny(likelihood=likelihood), pooled, pooled.pooled_head_weight,
                            "m" if likelihood == "gaussian" else "logits")
    with pytest.raises(ValueError, match="pooled_head must be a non-negative integer"):
        VAEConfig(n_genes=G, pooled_head=-1)


def test_depth_features_start_at_zero_stay_invariant_and_see_the_cell_depth() -> None:
    """depth_features adds W f(depth) to every pooled latent token, W = 0 at initialisation and drawn from no
    generator, so the model starts exactly as without it; with W set, the latent still ignores token order and
    padding, and it moves with the cell's depth (all counts x 50) more than without; bad stats are refused."""
    b = synthetic_batch(8)
    base, depth = _tiny(), _tiny(depth_features=True)
    for name, value in base.state_dict().items():
        torch.testing.assert_close(depth.state_dict()[name], value, atol=0, rtol=0)
    torch.testing.assert_close(depth.encode(b["genes"], b["counts"], b["mask"])[0],
                               base.encode(b["genes"], b["counts"], b["mask"])[0], atol=0, rtol=0)
    feats = TransformerVAE.depth_of(b["counts"], b["mask"])  # (8, 2)
    torch.testing.assert_close(feats[:, 0], torch.log1p(b["library_size"]))
    torch.testing.assert_close(feats[:, 1], torch.log1p(b["mask"].sum(dim=1).float()))
    depth.set_depth_stats(feats.mean(0).tolist(), feats.std(0).tolist())
    with torch.no_grad():
        depth.depth_proj.weight.normal_(generator=torch.Generator().manual_seed(2))
    mu, _ = depth.encode(b["genes"], b["counts"], b["mask"])
    perm = torch.randperm(G, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(depth.encode(b["genes"][:, perm], b["counts"][:, perm], b["mask"][:, perm])[0], mu,
                               atol=1e-5, rtol=1e-5)
    p = _pad(b, 25)
    torch.testing.assert_close(depth.encode(p["genes"], p["counts"], p["mask"])[0], mu, atol=1e-5, rtol=1e-5)
    deeper = b["counts"] * 50
    moved = (depth.encode(b["genes"], deeper, b["mask"])[0] - mu).abs().mean()
    moved_base = (base.encode(b["genes"], deeper, b["mask"])[0] - base.encode(b["genes"], b["counts"], b["mask"])[0]).abs().mean()
    assert moved > 1.5 * moved_base
    with pytest.raises(ValueError, match="positive sds"):
        depth.set_depth_stats([0.0, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="no depth features"):
        base.set_depth_stats([0.0, 0.0], [1.0, 1.0])


def test_count_readout_starts_at_zero_sums_real_tokens_and_sees_depth(tmp_path) -> None:
    """count_readout k adds P s to the pooled latent tokens, s = sum of log1p(x_g) R_g over the real tokens: P = 0
    at initialisation and R drawn from its own generator, so every shared weight and the latents equal the model's
    without it; with P set, the latent follows the cell's depth (counts x 50) far more than the MCAB pooling alone,
    stays invariant to token order and padding (the parametrised test above), and the CLI stores k."""
    import json

    from click.testing import CliRunner

    from sclatent.cli import main
    from sclatent.synthetic import synthetic_counts
    from sclatent.tokens import tokenize

    b = synthetic_batch(8)
    base, ro = _tiny(count_readout=0), _tiny(count_readout=5)
    for name, value in base.state_dict().items():
        torch.testing.assert_close(ro.state_dict()[name], value, atol=0, rtol=0)
    assert tuple(ro.readout_table.weight.shape) == (G + 1, 5) and tuple(ro.readout_proj.weight.shape) == (4 * 16, 5)
    torch.testing.assert_close(ro.encode(b["genes"], b["counts"], b["mask"])[0],
                               base.encode(b["genes"], b["counts"], b["mask"])[0], atol=0, rtol=0)
    # s itself: the readout map's input is the masked sum, checked through a one-token-per-row identity map
    w = torch.log1p(b["counts"]) * b["mask"]  # (8, S)
    expected = torch.einsum("bs,bsk->bk", w, ro.readout_table.weight[b["genes"]])  # (8, 5)
    seen = []
    hook = ro.readout_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    ro.encode(b["genes"], b["counts"], b["mask"])
    hook.remove()
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ro.readout_proj.weight.normal_(generator=torch.Generator().manual_seed(2))
    deeper = b["counts"] * 50
    mu = ro.encode(b["genes"], b["counts"], b["mask"])[0]
    moved = (ro.encode(b["genes"], deeper, b["mask"])[0] - mu).abs().mean()
    moved_base = (base.encode(b["genes"], deeper, b["mask"])[0] - base.encode(b["genes"], b["counts"], b["mask"])[0]).abs().mean()
    assert moved > 1.5 * moved_base
    with pytest.raises(ValueError, match="count_readout must be a non-negative integer"):
        VAEConfig(n_genes=G, count_readout=-1)

    adata = synthetic_counts(n_cells=30, n_genes=G, seed=4)
    adata.var["highly_variable"] = True
    adata.write_h5ad(tmp_path / "train.h5ad")
    tokenize(tmp_path / "train.h5ad", tmp_path / "tok", condition_keys=["cell_type"], progress=False)
    res = CliRunner().invoke(main, ["-q", "train-vae", "--tokens", str(tmp_path / "tok"), "--outdir", str(tmp_path / "run"),
                                    "--preset", "tiny", "--max-steps", "2", "--device", "cpu", "--no-progress",
                                    "--batch-size", "10", "--count-readout", "4", "--readout-dropout", "0.25"])
    assert res.exit_code == 0, res.output
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["model_config"]
    assert (stored["count_readout"], stored["readout_dropout"]) == (4, 0.25)
    res = CliRunner().invoke(main, ["-q", "train-vae", "--tokens", str(tmp_path / "tok"), "--outdir", str(tmp_path / "bad"),
                                    "--preset", "tiny", "--max-steps", "2", "--device", "cpu", "--count-readout", "-2"])
    assert res.exit_code != 0 and "--count-readout" in res.output and not (tmp_path / "bad").exists()
    res = CliRunner().invoke(main, ["-q", "train-vae", "--tokens", str(tmp_path / "tok"), "--outdir", str(tmp_path / "bad"),
                                    "--preset", "tiny", "--max-steps", "2", "--device", "cpu", "--readout-dropout", "1"])
    assert res.exit_code != 0 and "--readout-dropout" in res.output and not (tmp_path / "bad").exists()


def test_readout_dropout_acts_in_training_only_and_keeps_the_sum_unbiased() -> None:
    """readout_dropout p: in eval mode the latents equal the model's without it (same weights); in training mode
    the readout's input differs between two calls (tokens left out at random), each kept token scaled by 1/(1-p)
    so the sum is unbiased (its mean over many draws matches the full sum); out-of-range values are refused."""
    b = synthetic_batch(8)
    plain, drop = _tiny(count_readout=3), _tiny(count_readout=3, readout_dropout=0.5)
    with torch.no_grad():
        for m in (plain, drop):
            m.readout_proj.weight.normal_(generator=torch.Generator().manual_seed(5))
    args = (b["genes"], b["counts"], b["mask"])
    torch.testing.assert_close(drop.encode(*args)[0], plain.encode(*args)[0], atol=0, rtol=0)
    seen: list[torch.Tensor] = []
    hook = drop.readout_proj.register_forward_hook(lambda mod, a, out: seen.append(a[0].detach()))
    drop.train()
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(400):
            drop.encode(*args)
    hook.remove()
    drop.eval()
    full = torch.einsum("bs,bsk->bk", torch.log1p(b["counts"]) * b["mask"], drop.readout_table.weight[b["genes"]])  # (8, 3)
    assert not torch.equal(seen[0], seen[1]) and not torch.allclose(seen[0], full)
    mean = torch.stack(seen).mean(0)  # (8, 3)
    assert (mean - full).abs().max() < 0.15 * full.abs().max()
    # the training loop's generator drives the draws: the same seed gives the same latents, another seed others
    drop.train()
    runs = [drop.encode(*args, generator=torch.Generator().manual_seed(s))[0] for s in (1, 1, 2)]
    drop.eval()
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert not torch.equal(runs[0], runs[2])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="readout_dropout must be in"):
            VAEConfig(n_genes=G, count_readout=2, readout_dropout=bad)


def test_depth_stats_are_the_training_cells_feature_moments(tmp_path) -> None:
    """TRAIN_VAE standardises the depth features with their mean and sd over the training cells, across shards;
    above max_tokens a cell counts as max_tokens tokens holding its total scaled by max_tokens / n. The CLI flag
    stores them in the checkpoint and the config."""
    import json

    import numpy as np
    from click.testing import CliRunner

    from sclatent.cli import main
    from sclatent.synthetic import synthetic_counts
    from sclatent.tokens import TokenLoader, tokenize
    from sclatent.train_vae import depth_stats_init, load_vae

    adata = synthetic_counts(n_cells=50, n_genes=G, seed=4)
    adata.var["highly_variable"] = True
    adata.write_h5ad(tmp_path / "train.h5ad")
    tokenize(tmp_path / "train.h5ad", tmp_path / "tok", condition_keys=["cell_type"], shard_size=20, progress=False)
    X = np.asarray(adata.X.todense(), dtype=np.float64)  # (50, G)
    total, n = X.sum(axis=1), (X > 0).sum(axis=1).astype(np.float64)
    for cap in (None, int(np.median(n))):  # the median cap truncates about half of the cells
        loader = TokenLoader(tmp_path / "tok", "train", batch_size=8, shuffle=False, max_tokens=cap)
        assert len(loader.shards) == 3
        kept = n if cap is None else np.minimum(n, cap)
        f = np.stack([np.log1p(total * kept / n), np.log1p(kept)], axis=1)
        mean, sd = depth_stats_init(loader)
        np.testing.assert_allclose(mean, f.mean(axis=0), rtol=1e-6)
        assert 0 < (kept < n).sum() < len(n) if cap else True
        np.testing.assert_allclose(sd, f.std(axis=0), rtol=1e-6)
    res = CliRunner().invoke(main, ["-q", "train-vae", "--tokens", str(tmp_path / "tok"), "--outdir", str(tmp_path / "run"),
                                    "--preset", "tiny", "--max-steps", "2", "--device", "cpu", "--no-progress",
                                    "--batch-size", "10", "--depth-features"])
    assert res.exit_code == 0, res.output
    model, cfg = load_vae(tmp_path / "run")
    assert cfg["model_config"]["depth_features"] is True
    mean, sd = depth_stats_init(TokenLoader(tmp_path / "tok", "train", batch_size=8, shuffle=False))
    torch.testing.assert_close(model.depth_stats, torch.tensor([mean, sd], dtype=torch.float32))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_config"]["depth_features"] is True


def test_fourier_count_encoding_keeps_large_counts_apart_after_layer_norm() -> None:
    """The "linear" count term c u swamps the gene's embedding as c grows, so after MCAB's token LayerNorm 400 and
    1,600 counts of a gene are nearly the same key (cosine > 0.99); the bounded "fourier" features keep them
    apart, and for "gene_count" each gene scales them by (1 + U_g), 1 at initialisation."""
    genes = torch.tensor([[7, 7]])
    counts = torch.tensor([[400.0, 1600.0]])
    ln = lambda x: torch.nn.functional.layer_norm(x, (x.shape[-1],))  # noqa: E731
    cosine = {}
    for enc in ("linear", "fourier"):
        model = _tiny(count_encoding=enc)
        with torch.no_grad():
            e = ln(model.embed(genes, counts))[0]  # (2, d)
        cosine[enc] = torch.nn.functional.cosine_similarity(e[0], e[1], dim=0).item()
    assert cosine["linear"] > 0.99 and cosine["fourier"] < 0.95, cosine
    concat = _tiny(embedding="concat", count_encoding="fourier")
    per_gene = _tiny(embedding="gene_count", count_encoding="fourier")
    with torch.no_grad():
        per_gene.count_fourier.weight.copy_(concat.count_fourier.weight)
        per_gene.concat_proj.weight.copy_(concat.concat_proj.weight)
        per_gene.gene_embedding.weight.copy_(concat.gene_embedding.weight)
    torch.testing.assert_close(per_gene.embed(genes, counts), concat.embed(genes, counts), atol=0, rtol=0)
    with torch.no_grad():
        per_gene.count_embedding.weight[7] = 1.0  # gene 7's count features doubled
    ones = torch.ones_like(counts)  # differences between two count levels cancel the gene's own part
    torch.testing.assert_close(per_gene.embed(genes, counts) - per_gene.embed(genes, ones),
                               2 * (concat.embed(genes, counts) - concat.embed(genes, ones)))
    with pytest.raises(ValueError, match="count_encoding"):
        VAEConfig(n_genes=G, count_encoding="binned")
