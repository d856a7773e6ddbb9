"""TransformerVAE: exchangeability, subset decoding, library sizes, the adopted additions, training, errors."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import pytest
import torch

from sclatent.nn.likelihoods import Gaussian, NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial
from sclatent.nn.vae import LIKELIHOODS, PRESETS, TransformerVAE, VAEConfig
from sclatent.train_vae import stratified_subset

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


def _plain(**overrides: object) -> TransformerVAE:
    """The tiny sizes without the default's additions (the paper's concat model)."""
    return _tiny(**{"embedding": "concat", "gene_head": False, "count_readout": 0, "readout_dropout": 0.0, **overrides})


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
    return {
        "genes": (order + 1) * mask,
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


def _without(extended: TransformerVAE, **plain: object) -> TransformerVAE:
    """A model without an addition that holds `extended`'s shared weights (the addition's own tables dropped)."""
    base = _tiny(**plain)
    shared = {k: v for k, v in extended.state_dict().items() if k in base.state_dict()}
    base.load_state_dict(shared)
    return base


@pytest.mark.parametrize(
    "overrides", [{}, {"embedding": "multiplicative"}, {"embedding": "concat"}, {"beta": 0.1}, {"count_readout": 0}]
)
def test_encoder_invariant_to_token_order_and_padding(overrides: dict) -> None:
    model = _tiny(**overrides)
    b = synthetic_batch(8)
    mu, logvar = model.encode(b["genes"], b["counts"], b["mask"])
    assert mu.shape == (8, 4, 4) and (logvar is not None) == model.config.variational
    perm = torch.randperm(G, generator=torch.Generator().manual_seed(1))  # mixes real and PAD tokens
    mu_p, _ = model.encode(b["genes"][:, perm], b["counts"][:, perm], b["mask"][:, perm])
    torch.testing.assert_close(mu_p, mu, atol=1e-5, rtol=1e-5)
    for extra in (1, 25):
        p = _pad(b, extra)
        mu_pad, logvar_pad = model.encode(p["genes"], p["counts"], p["mask"])
        torch.testing.assert_close(mu_pad, mu, atol=1e-5, rtol=1e-5)
        if logvar is not None:
            torch.testing.assert_close(logvar_pad, logvar, atol=1e-5, rtol=1e-5)
    n0 = int(b["mask"][3].sum())  # a cell encoded alone, without padding
    mu_alone, _ = model.encode(b["genes"][3:4, :n0], b["counts"][3:4, :n0], b["mask"][3:4, :n0])
    torch.testing.assert_close(mu_alone, mu[3:4], atol=1e-5, rtol=1e-5)


def test_concat_encoder_sees_counts_multiplicative_does_not() -> None:
    """Characterises the official embedding: LN_K / LN_V cancel the log1p(x) scale of E_g * log1p(x)."""
    b = synthetic_batch(4)
    for embedding, sees_counts in (("concat", True), ("multiplicative", False)):
        model = _plain(embedding=embedding)
        z1, _ = model.encode(b["genes"], b["counts"], b["mask"])
        z2, _ = model.encode(b["genes"], b["counts"] * 50, b["mask"])
        moved = (z1 - z2).abs().max().item()
        assert (moved > 1e-2) if sees_counts else (moved < 1e-4), (embedding, moved)


def test_gene_count_embedding_starts_as_concat_and_learns_per_gene_count_directions() -> None:
    """gene_count = concat + log1p(x_g) U_g, U = 0 at initialisation; with U set, equal counts of two genes differ."""
    b = synthetic_batch(4)
    per_gene = _plain(embedding="gene_count")
    concat = _without(per_gene, embedding="concat", gene_head=False, count_readout=0, readout_dropout=0.0)
    args = (b["genes"], b["counts"], b["mask"])
    torch.testing.assert_close(per_gene.encode(*args)[0], concat.encode(*args)[0], atol=0, rtol=0)
    emb = per_gene.embedding
    with torch.no_grad():
        emb.count_dir.weight.normal_(generator=torch.Generator().manual_seed(5))
    genes, counts = torch.tensor([[3, 9]]), torch.tensor([[4.0, 4.0]])
    shift = emb(genes, counts) - emb(genes, torch.zeros_like(counts))  # (1, 2, d)
    expected = math.log1p(4.0) * (emb.proj.weight[:, :16].sum(1) + emb.count_dir.weight[3])
    torch.testing.assert_close(shift[0, 0], expected)
    assert not torch.allclose(shift[0, 0], shift[0, 1])


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
    """Parameters of a gene depend only on z and its id; count means renormalise over the requested set, and
    `columns` of a full decode is the full decode's slice."""
    model = _tiny(likelihood=likelihood)
    with torch.no_grad():
        model.head.gene_weight.weight.normal_(generator=torch.Generator().manual_seed(3))  # the per-gene head in use
    z = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    all_genes = torch.arange(1, G + 1)
    subset = torch.tensor([17, 3, 40, 8, 22])  # any order
    full, part = model.decode_parameters(z, all_genes), model.decode_parameters(z, subset)
    for key, value in part.items():
        ref = full[key][..., subset - 1]
        torch.testing.assert_close(value.expand_as(ref), ref, atol=1e-5, rtol=1e-5)
    L = torch.tensor([500.0, 1200.0, 80.0])
    lik = model.decode(z, all_genes, L)
    torch.testing.assert_close(lik.columns(subset - 1).mean, lik.mean[:, subset - 1])
    if likelihood != "gaussian":
        mean_full = _count_mean(lik)[:, subset - 1]
        renormalised = mean_full / mean_full.sum(dim=1, keepdim=True) * L[:, None]
        torch.testing.assert_close(_count_mean(model.decode(z, subset, L)), renormalised, atol=1e-3, rtol=1e-5)
    per_cell = model.decode_parameters(z, subset.expand(3, -1))  # per-cell gene lists (B, Q)
    for key, value in per_cell.items():
        torch.testing.assert_close(value, part[key].expand_as(value), atol=1e-5, rtol=1e-5)
    many = torch.randint(1, G + 1, (3, 30), generator=torch.Generator().manual_seed(1))  # B * Q > G + 1: gather path
    for key, value in model.decode_parameters(z, many).items():
        ref = full[key].expand(3, -1).gather(1, many - 1) if full[key].dim() == 2 else full[key][many - 1]
        torch.testing.assert_close(value, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_count_means_sum_to_library_size(likelihood: str) -> None:
    model = _tiny(likelihood=likelihood)
    z = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(0))
    L = torch.tensor([1.0, 250.0, 3e4, 1e5])
    torch.testing.assert_close(
        _count_mean(model.decode(z, torch.arange(1, G + 1), L)).sum(dim=1), L, rtol=1e-5, atol=0.0
    )


def test_likelihood_types_and_log_probs() -> None:
    expected = {"nb": NegativeBinomial, "zinb": ZeroInflatedNegativeBinomial, "poisson": Poisson, "gaussian": Gaussian}
    b = synthetic_batch(6)
    for name, cls in expected.items():
        lik = _tiny(likelihood=name).reconstruct(
            b["genes"], b["counts"], b["mask"], b["target_genes"], b["library_size"]
        )
        assert isinstance(lik, cls)
        lp = lik.log_prob(b["target_counts"])
        assert lp.shape == (6, G) and torch.isfinite(lp).all()
        draws = lik.sample(torch.Generator().manual_seed(0))
        assert draws.shape == (6, G) and torch.equal(draws, draws.round()) and bool((draws >= 0).all())
    nb = _tiny().decode(torch.zeros(1, 4, 4), torch.arange(1, G + 1), torch.ones(1))
    torch.testing.assert_close(nb.theta, torch.full((1, G), torch.e))  # theta starts at e (official initialisation)


def test_loss_is_the_full_decode_nll_and_a_subset_needs_weights() -> None:
    model = _tiny()
    b = synthetic_batch(8)
    out = model.loss(**b)
    assert set(out) == {"loss", "nll", "kl"} and out["kl"].item() == 0.0
    z, _ = model.encode(b["genes"], b["counts"], b["mask"])
    lik = model.decode(z, b["target_genes"], b["library_size"])
    torch.testing.assert_close(out["nll"], -lik.log_prob(b["target_counts"]).sum(1).mean())
    torch.testing.assert_close(out["loss"], out["nll"])
    subset = torch.tensor([5, 1, 33])
    with pytest.raises(ValueError, match="needs target_weights"):
        model.loss(b["genes"], b["counts"], b["mask"], b["library_size"], subset, b["target_counts"][:, subset - 1])


def test_stratified_subset_keeps_expressed_genes_and_weights_estimate_full_sums() -> None:
    """Every expressed gene is drawn when it fits beside ceil(f * Q) zeros; indices are distinct; the weights make
    sum_g w_g [x_g > 0] = n1 and sum_g w_g = G exactly (Horvitz-Thompson); a seed fixes the draw."""
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
    assert int(k1[0]) == 3 and int(k1[1]) == q
    assert bool((w[0, drawn[0]] == 1.0).all()) and bool((w[0, ~drawn[0]] == (G - 3) / (q - 3)).all())
    assert torch.equal(idx, stratified_subset(x, q, f, torch.Generator().manual_seed(3))[0])


def test_weighted_loss_is_the_full_loss_with_unit_weights_and_estimates_it_from_a_stratified_sample() -> None:
    model = _tiny()
    b = synthetic_batch(8)
    full = model.loss(**b)["nll"]
    torch.testing.assert_close(model.loss(**b, target_weights=torch.ones_like(b["target_counts"]))["nll"], full)

    # the weighted sum of log-probabilities is unbiased, the log of the estimated normaliser is not (Jensen): the
    # mean estimate is close and closes in as more genes are drawn
    def mean_estimate(q: int) -> float:
        g = torch.Generator().manual_seed(0)
        draws = []
        for _ in range(200):
            idx, w = stratified_subset(b["target_counts"], q, 0.25, g)
            draws.append(
                model.loss(
                    b["genes"],
                    b["counts"],
                    b["mask"],
                    b["library_size"],
                    idx + 1,
                    b["target_counts"].gather(1, idx),
                    target_weights=w,
                )["nll"]
            )
        return (torch.stack(draws).mean() / full).item()

    r16, r32 = mean_estimate(16), mean_estimate(32)
    assert abs(r16 - 1) < 0.05 and abs(r32 - 1) < 0.02 and abs(r32 - 1) < abs(r16 - 1), (r16, r32)
    with pytest.raises(ValueError, match="target_weights must have the shape"):
        model.loss(**b, target_weights=torch.ones(8, 3))


def test_deterministic_and_variational_modes() -> None:
    b = synthetic_batch(8)
    det = _tiny()
    assert det.encoder.to_logvar is None
    z, logvar = det.encode(b["genes"], b["counts"], b["mask"])
    assert logvar is None
    # every latent token is standardised over its features (the official LayerNorm without affine parameters)
    torch.testing.assert_close(z.mean(-1), torch.zeros(8, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(8, 4), atol=1e-3, rtol=0)

    var = _plain(beta=0.5)
    with pytest.raises(ValueError, match="generator"):
        var.loss(**b)
    s1, s2, s3 = (var.loss(**b, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    torch.testing.assert_close(s1["loss"], s2["loss"])
    assert s1["nll"].item() != s3["nll"].item() and s1["kl"].item() > 0
    torch.testing.assert_close(s1["loss"], s1["nll"] + 0.5 * s1["kl"])
    mu, logvar = var.encode(b["genes"], b["counts"], b["mask"])
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum((1, 2)).mean()
    torch.testing.assert_close(var.loss(**b, sample_posterior=False)["kl"], kl)
    s1["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in var.parameters() if p.requires_grad)


def test_all_padding_cell_is_finite() -> None:
    b = synthetic_batch(4)
    for k in ("genes", "counts", "target_counts"):
        b[k][2] = 0
    b["mask"][2] = False
    b["library_size"][2] = 0
    for overrides in ({}, {"beta": 0.1}, {"likelihood": "gaussian"}, {"likelihood": "zinb"}):
        model = _tiny(**overrides).train()
        assert torch.isfinite(model.encode(b["genes"], b["counts"], b["mask"])[0]).all()
        out = model.loss(**b, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out["loss"]), overrides
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), overrides


@pytest.mark.usefixtures("one_thread")
def test_tiny_model_fits_a_synthetic_batch() -> None:
    b = synthetic_batch(64)
    model = TransformerVAE(VAEConfig.preset("tiny", G), seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    first = model.loss(**b, generator=g)["loss"].item()
    for _ in range(300):
        out = model.loss(**b, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    final = model.eval().loss(**b)["loss"].item()
    assert final < 0.5 * first, (first, final)


def test_state_dict_round_trip_and_seeded_init() -> None:
    cfg = VAEConfig.preset("tiny", G, likelihood="zinb", beta=0.01)
    model = TransformerVAE(cfg, seed=3).eval()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    clone = TransformerVAE(VAEConfig.from_dict(ckpt["config"]), seed=99).eval()
    clone.load_state_dict(ckpt["model"])
    b = synthetic_batch(5)
    assert torch.equal(model.loss(**b, sample_posterior=False)["loss"], clone.loss(**b, sample_posterior=False)["loss"])
    torch.manual_seed(123)  # same seed -> same weights whatever the global RNG; another seed -> other weights
    sd, same, other = (
        model.state_dict(),
        TransformerVAE(cfg, seed=3).state_dict(),
        TransformerVAE(cfg, seed=4).state_dict(),
    )
    assert all(torch.equal(sd[k], same[k]) for k in sd)
    assert not all(torch.equal(sd[k], other[k]) for k in sd)


def test_presets_paper_defaults_and_config_errors() -> None:
    default, scldm = VAEConfig.preset("default", 2000), VAEConfig.preset("scldm", 2000)
    for cfg in (default, scldm):  # the authors' sizes (reference/scldm_official.md §3)
        assert (cfg.d_model, cfg.n_latent_tokens, cfg.d_latent, cfg.n_enc_blocks, cfg.n_dec_blocks) == (
            32,
            16,
            16,
            8,
            8,
        )
        assert (cfg.n_heads, cfg.n_cross_heads, cfg.beta, cfg.likelihood) == (8, 4, 0.0, "nb")
    # scldm: the released model exactly, E_g * log1p(x) tokens and no per-gene addition
    assert (scldm.embedding, scldm.gene_head, scldm.count_readout, scldm.readout_dropout) == (
        "multiplicative",
        False,
        0,
        0.0,
    )
    assert (default.embedding, default.gene_head, default.count_readout, default.readout_dropout) == (
        "gene_count",
        True,
        64,
        0.2,
    )
    paper = VAEConfig(n_genes=2000)  # the dataclass defaults: the paper's eq. 9 model
    assert (paper.embedding, paper.gene_head, paper.count_readout) == ("concat", False, 0)
    # the authors' model has no per-gene tables beyond E and the dispersions: exactly 2 tables of G + 1 rows
    tables = [m for m in TransformerVAE(scldm).modules() if isinstance(m, torch.nn.Embedding)]
    assert [t.num_embeddings for t in tables] == [2001, 2001] and set(PRESETS) == {"default", "scldm", "tiny"}
    assert VAEConfig.from_dict(default.to_dict()) == default
    for bad, match in (
        ({"likelihood": "negbin"}, "'negbin'"),
        ({"embedding": "additive"}, "'additive'"),
        ({"n_heads": 3}, "n_heads=3"),
        ({"n_genes": 0}, "n_genes"),
        ({"beta": -1.0}, "beta"),
        ({"count_readout": -1}, "count_readout"),
        ({"readout_dropout": 1.0}, "readout_dropout"),
    ):
        with pytest.raises(ValueError, match=match):
            VAEConfig(**{"n_genes": 10, **bad})
    with pytest.raises(ValueError, match="'huge'"):
        VAEConfig.preset("huge", 10)
    with pytest.raises(ValueError, match="bogus"):
        VAEConfig.from_dict({**default.to_dict(), "bogus": 1})


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


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_gene_head_starts_as_the_shared_head_and_reaches_only_the_decoded_genes(likelihood: str) -> None:
    """w_g . o_g with w = 0 at initialisation: the same decoder as without it; set, it changes the decode, each
    gene still depends only on z and its id, and its gradient reaches the decoded genes' rows only."""
    extended = _plain(likelihood=likelihood, gene_head=True)
    base = _without(
        extended, likelihood=likelihood, embedding="concat", gene_head=False, count_readout=0, readout_dropout=0.0
    )
    first = "m" if likelihood == "gaussian" else "logits"
    z = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    all_genes = torch.arange(1, G + 1)
    torch.testing.assert_close(
        extended.decode_parameters(z, all_genes)[first], base.decode_parameters(z, all_genes)[first], atol=0, rtol=0
    )
    table = extended.head.gene_weight
    with torch.no_grad():
        table.weight.normal_(generator=torch.Generator().manual_seed(3))
    full = extended.decode_parameters(z, all_genes)[first]  # (3, G)
    assert not torch.allclose(full, base.decode_parameters(z, all_genes)[first])
    subset = torch.tensor([17, 3, 40, 8, 22])
    torch.testing.assert_close(extended.decode_parameters(z, subset)[first], full[:, subset - 1], atol=1e-5, rtol=1e-5)
    perm = torch.tensor([2, 0, 3, 1])  # permuting the latent tokens leaves a full decode unchanged
    torch.testing.assert_close(extended.decode_parameters(z[:, perm], all_genes)[first], full, atol=1e-5, rtol=1e-5)
    extended.train()
    extended.decode_parameters(z, subset)[first].sum().backward()
    grad = table.weight.grad
    assert bool((grad[subset].abs().sum(dim=1) > 0).all()) and float(grad[1].abs().sum()) == 0.0


def test_count_readout_starts_at_zero_sums_real_tokens_and_sees_depth() -> None:
    """count_readout k adds P s to the pooled latent tokens, s = sum of log1p(x_g) R_g over the real tokens: P = 0
    at initialisation (the same latents as without it); with P set, the latent follows the cell's depth (counts x
    50) far more than the MCAB pooling alone, and stays invariant to token order and padding (test above)."""
    b = synthetic_batch(8)
    ro = _plain(count_readout=5)
    base = _without(ro, embedding="concat", gene_head=False, count_readout=0, readout_dropout=0.0)
    args = (b["genes"], b["counts"], b["mask"])
    readout = ro.encoder.readout
    assert tuple(readout.table.weight.shape) == (G + 1, 5) and tuple(readout.proj.weight.shape) == (4 * 16, 5)
    torch.testing.assert_close(ro.encode(*args)[0], base.encode(*args)[0], atol=0, rtol=0)
    seen = []
    hook = readout.proj.register_forward_hook(lambda mod, a, out: seen.append(a[0].detach()))
    ro.encode(*args)
    hook.remove()
    expected = torch.einsum("bs,bsk->bk", torch.log1p(b["counts"]) * b["mask"], readout.table.weight[b["genes"]])
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        readout.proj.weight.normal_(generator=torch.Generator().manual_seed(2))
    deeper = b["counts"] * 50
    moved = (ro.encode(b["genes"], deeper, b["mask"])[0] - ro.encode(*args)[0]).abs().mean()
    moved_base = (base.encode(b["genes"], deeper, b["mask"])[0] - base.encode(*args)[0]).abs().mean()
    assert moved > 1.5 * moved_base


def test_readout_dropout_acts_in_training_only_and_keeps_the_sum_unbiased() -> None:
    """In eval mode the latents equal the model's without dropout; in training the readout's input changes between
    calls, each kept token scaled by 1/(1-p), unbiased on average; the caller's generator makes the draws."""
    b = synthetic_batch(8)
    drop = _plain(count_readout=3, readout_dropout=0.5)
    plain = _plain(count_readout=3)
    plain.load_state_dict(drop.state_dict())
    with torch.no_grad():
        for m in (plain, drop):
            m.encoder.readout.proj.weight.normal_(generator=torch.Generator().manual_seed(5))
    args = (b["genes"], b["counts"], b["mask"])
    torch.testing.assert_close(drop.encode(*args)[0], plain.encode(*args)[0], atol=0, rtol=0)
    seen: list[torch.Tensor] = []
    hook = drop.encoder.readout.proj.register_forward_hook(lambda mod, a, out: seen.append(a[0].detach()))
    drop.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(400):
            drop.encode(*args, generator=g)
    hook.remove()
    full = torch.einsum(
        "bs,bsk->bk", torch.log1p(b["counts"]) * b["mask"], drop.encoder.readout.table.weight[b["genes"]]
    )  # (8, 3)
    assert not torch.equal(seen[0], seen[1]) and not torch.allclose(seen[0], full)
    assert (torch.stack(seen).mean(0) - full).abs().max() < 0.15 * full.abs().max()
    runs = [drop.encode(*args, generator=torch.Generator().manual_seed(s))[0] for s in (1, 1, 2)]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert not torch.equal(runs[0], runs[2])
