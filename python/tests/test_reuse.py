"""A trained model reused on new data: embedding any gene panel (`sclatent embed`, the API), tokenizing against a
model's vocabulary, fine-tuning with --init-from (new genes and labels), and the one-line errors of each.

The model is a tiny VAE and DiT trained for 20 steps each on the bundled pbmc3k_a subset (~15 s)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner

from sclatent.cli import main

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "assets" / "test_data"
PBMC_A, PBMC_B, MIXOLOGY = DATA / "pbmc3k_a.h5ad", DATA / "pbmc3k_b.h5ad", DATA / "mixology.h5ad"
SHORT = ("--max-steps", 20, "--no-progress", "--device", "cpu", "--threads", 1)


def _cli(*args: Any):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def _ok(*args: Any) -> None:
    result = _cli(*args)
    assert result.exit_code == 0, (args[0], result.output, result.exception)


def _fails(*args: Any) -> str:
    result = _cli(*args)
    assert result.exit_code == 2, (args[0], result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    """A tiny VAE + prior trained on pbmc3k_a (every gene, conditioned on cell_type), bundled."""
    d = tmp_path_factory.mktemp("reuse")
    _ok("tokenize", "--train", PBMC_A, "--outdir", d / "tok", "--genes", "all", "--condition-keys", "cell_type",
        "--no-progress")  # fmt: skip
    _ok("train-vae", "--tokens", d / "tok", "--outdir", d / "vae", "--preset", "tiny", "--batch-size", 32,
        "--decode-genes", 128, *SHORT)  # fmt: skip
    _ok("encode", "--model", d / "vae", "--tokens", d / "tok", "--outdir", d / "enc", "--device", "cpu")
    _ok("train-prior", "--latents", d / "enc/latents.npz", "--outdir", d / "prior", "--preset", "tiny",
        "--batch-size", 64, *SHORT)  # fmt: skip
    _ok("bundle", "--vae", d / "vae", "--prior", d / "prior", "--out", d / "model.pt")
    return {"model": d / "model.pt", "vae": d / "vae", "tokens": d / "tok", "dir": d}


# ------------------------------------------------------------------------------------------------ embedding


def test_embed_writes_the_input_with_obsm_and_provenance(model, tmp_path) -> None:
    import sclatent

    before = _md5(PBMC_B)
    out = tmp_path / "b.h5ad"
    _ok("embed", "--model", model["model"], "--h5ad", PBMC_B, "--out", out, "--chunk-size", 128, "--device", "cpu")
    assert _md5(PBMC_B) == before  # the input is never modified
    src, emb = ad.read_h5ad(PBMC_B), ad.read_h5ad(out)
    # the output is the input plus the embedding: same cells, genes, counts and annotations
    assert emb.shape == src.shape and (emb.X != src.X).nnz == 0
    assert list(emb.obs_names) == list(src.obs_names) and emb.obs.equals(src.obs) and emb.var.equals(src.var)
    z = emb.obsm["X_sclatent"]
    assert z.shape == (500, 16) and z.dtype == np.float32 and np.isfinite(z).all()  # tiny: 4 tokens x 4
    uns = emb.uns["X_sclatent"]
    assert uns["sclatent_version"] == sclatent.__version__ and list(uns["latent_shape"]) == [4, 4]
    assert uns["model"] == str(model["model"]) and uns["model_created"]
    # pbmc3k_b lacks 50 of the 2,500 vocabulary genes: they are simply absent from its cells' tokens
    assert uns["panel"]["matched"] == 2450 and uns["panel"]["ignored"] == 0 and uns["panel"]["vocabulary"] == 2500
    # the API gives the same numbers in memory, and chunking does not change them
    m = sclatent.Model.load(model["model"], device="cpu")
    adata = ad.read_h5ad(PBMC_B)
    np.testing.assert_allclose(m.embed(adata), z, rtol=1e-5, atol=1e-6)
    assert adata.uns["X_sclatent"]["panel"]["matched"] == 2450
    again = m.embed_file(PBMC_B, tmp_path / "c.h5ad", chunk_size=10_000)
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "c.h5ad").obsm["X_sclatent"], z, rtol=1e-5, atol=1e-6)
    assert again["panel"]["matched"] == 2450


def test_embed_matches_genes_by_a_var_column_and_reads_a_layer(model, tmp_path) -> None:
    """Genes matched by another var column and counts in a layer give the embedding of the plain file."""
    plain = tmp_path / "plain.h5ad"
    _ok("embed", "--model", model["model"], "--h5ad", PBMC_B, "--out", plain, "--device", "cpu")
    src = ad.read_h5ad(PBMC_B)
    other = ad.AnnData(
        X=sp.csr_matrix(np.log1p(src.X.toarray())),  # not counts: the counts are in a layer
        obs=src.obs.copy(),
        var=src.var.assign(symbol=list(src.var_names)).set_index("gene_ids"),
        layers={"counts": src.X.copy()},
    )
    other.write_h5ad(tmp_path / "ens.h5ad")
    out = tmp_path / "ens_out.h5ad"
    _ok("embed", "--model", model["model"], "--h5ad", tmp_path / "ens.h5ad", "--out", out, "--gene-key", "symbol",
        "--layer", "counts", "--key", "X_ref", "--device", "cpu")  # fmt: skip
    got = ad.read_h5ad(out)
    np.testing.assert_allclose(got.obsm["X_ref"], ad.read_h5ad(plain).obsm["X_sclatent"], rtol=1e-5, atol=1e-6)
    assert json.loads(got.uns["X_ref"]["config_json"])["gene_key"] == "symbol"
    # by the file's own var_names (Ensembl ids) nothing matches the model's gene symbols: a one-line error
    line = _fails("embed", "--model", model["model"], "--h5ad", tmp_path / "ens.h5ad", "--out", tmp_path / "x.h5ad",
                  "--layer", "counts")  # fmt: skip
    assert "none of its 2450 genes is in the model's vocabulary of 2500 genes" in line and "gene_key" in line
    assert not (tmp_path / "x.h5ad").exists()
    line = _fails("embed", "--model", model["model"], "--h5ad", PBMC_B, "--out", tmp_path / "y.h5ad", "--gene-key",
                  "ensembl")  # fmt: skip
    assert "--gene-key 'ensembl' is not a var column (var has: gene_ids)" in line
    assert not (tmp_path / "y.h5ad").exists()


def test_embed_a_small_panel_warns_and_bad_counts_leave_no_output(model, tmp_path, caplog) -> None:
    src = ad.read_h5ad(PBMC_B)
    small = src[:, :300].copy()
    small.write_h5ad(tmp_path / "small.h5ad")
    import sclatent

    m = sclatent.Model.load(model["model"], device="cpu")
    with caplog.at_level(logging.WARNING, logger="sclatent"):
        uns = m.embed_file(tmp_path / "small.h5ad", tmp_path / "small_out.h5ad")
    assert uns["panel"]["matched"] == 300 and "only 300 of the model's 2500 genes (12%)" in caplog.text
    bad = src.copy()
    X = bad.X.astype(np.float32).tolil()
    X[3, 5] = 0.5
    bad.X = X.tocsr()
    bad.write_h5ad(tmp_path / "bad.h5ad")
    line = _fails("embed", "--model", model["model"], "--h5ad", tmp_path / "bad.h5ad", "--out", tmp_path / "o.h5ad",
                  "--chunk-size", 64)  # fmt: skip
    assert "bad.h5ad" in line and "0.5" in line and not (tmp_path / "o.h5ad").exists()
    assert not list(tmp_path.glob(".o*"))  # no temporary copy left behind


# ------------------------------------------------------------------------------------------------ the bundle


def test_truncated_foreign_and_newer_bundles_are_one_line_errors(model, tmp_path) -> None:
    data = model["model"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    line = _fails("embed", "--model", tmp_path / "cut.pt", "--h5ad", PBMC_B, "--out", tmp_path / "o.h5ad")
    assert "cut.pt: not a readable sclatent checkpoint (truncated or not written by torch.save" in line
    line = _fails("embed", "--model", model["vae"] / "checkpoint.pt", "--h5ad", PBMC_B, "--out", tmp_path / "o.h5ad")
    assert "not a sclatent model bundle (a training checkpoint?" in line
    payload = torch.load(model["model"], weights_only=True)
    payload["format_version"], payload["sclatent_version"] = 99, "9.0.0"
    torch.save(payload, tmp_path / "new.pt")
    line = _fails("sample", "--model", tmp_path / "new.pt", "--out", tmp_path / "o.h5ad", "--n-cells", 2)
    assert "new.pt: bundle format 99 was written by sclatent 9.0.0" in line and "upgrade sclatent" in line
    assert not (tmp_path / "o.h5ad").exists()


def test_unknown_label_values_and_keys_list_the_known_ones(model, tmp_path) -> None:
    import sclatent

    m = sclatent.Model.load(model["model"], device="cpu")
    with pytest.raises(sclatent.api.InputError, match=r"condition key 'donor' is not one the model was trained on"):
        m.sample(n=2, conditions={"donor": "x"})
    with pytest.raises(sclatent.api.InputError, match=r"cell_type=Plasma was never seen in training; known values"):
        m.sample(n=2, conditions={"cell_type": "Plasma"})
    ref = ad.read_h5ad(PBMC_B)[:20].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str)
    ref.obs.iloc[0, 0] = "Plasma"
    ref.write_h5ad(tmp_path / "ref.h5ad")
    line = _fails("sample", "--model", model["model"], "--like", tmp_path / "ref.h5ad", "--out", tmp_path / "g.h5ad")
    known = ", ".join(m.labels["cell_type"])
    assert f"cell_type=Plasma was never seen in training; known values of 'cell_type': {known}" in line
    # a reference without the model's key is generated marginally over it
    plain = ad.AnnData(X=ref.X, var=ref.var)
    plain.write_h5ad(tmp_path / "nolabels.h5ad")
    _ok("sample", "--model", model["model"], "--like", tmp_path / "nolabels.h5ad", "--out", tmp_path / "g.h5ad",
        "--device", "cpu")  # fmt: skip
    assert set(ad.read_h5ad(tmp_path / "g.h5ad").obs["cell_type"]) == {"none"}
    line = _fails("tokenize", "--train", PBMC_B, "--outdir", tmp_path / "t", "--model", model["model"],
                  "--condition-keys", "cell_type,donor")  # fmt: skip
    assert "condition key 'donor' is not one the model knows (known: cell_type)" in line


# ------------------------------------------------------------------------------------------------ tokenize + encode


def test_tokenize_against_the_model_vocabulary_then_encode(model, tmp_path) -> None:
    tok = tmp_path / "tok"
    _ok("tokenize", "--train", PBMC_B, "--test", PBMC_B, "--outdir", tok, "--model", model["model"], "--no-progress")
    manifest = json.loads((tok / "manifest.json").read_text())
    vocab = json.loads((model["vae"] / "config.json").read_text())["metadata"]["genes"]
    assert manifest["genes"] == vocab and manifest["condition_keys"] == ["cell_type"]
    assert manifest["gene_selection"] == "model" and manifest["splits"]["train"]["panel"]["matched"] == 2450
    src = ad.read_h5ad(PBMC_B)
    absent = {vocab.index(g) + 1 for g in vocab if g not in set(src.var_names)}
    with np.load(tok / manifest["splits"]["train"]["shards"][0]["file"]) as z:
        assert len(absent) == 50 and not absent & set(z["genes"].tolist())
        assert np.allclose(z["library_size"], np.asarray(src.X.sum(axis=1)).ravel())  # every gene is in the model
    _ok("encode", "--model", model["model"], "--tokens", tok, "--outdir", tmp_path / "enc", "--device", "cpu")
    with np.load(tmp_path / "enc" / "latents.npz") as z:
        emb = tmp_path / "emb.h5ad"
        _ok("embed", "--model", model["model"], "--h5ad", PBMC_B, "--out", emb, "--device", "cpu")
        # ENCODE reads the same tokens (no cell above max_tokens here): the same latents as embed
        np.testing.assert_allclose(z["train_z"].reshape(500, -1), ad.read_h5ad(emb).obsm["X_sclatent"], atol=1e-5)


# ------------------------------------------------------------------------------------------------ fine-tuning


def _new_data(tmp_path: Path) -> Path:
    """pbmc3k_b with 20 genes the model has never seen, a new cell type and a new condition key, and without its
    Megakaryocytes."""
    src = ad.read_h5ad(PBMC_B)
    src = src[src.obs["cell_type"] != "Megakaryocytes"].copy()
    names = list(src.var_names)
    names[:20] = [f"NEW{i}" for i in range(20)]
    src.var_names = names
    src.obs["cell_type"] = src.obs["cell_type"].astype(str)
    src.obs.loc[src.obs_names[:30], "cell_type"] = "Plasma"
    src.obs["donor"] = np.where(np.arange(src.n_obs) % 2 == 0, "d1", "d2")
    src.write_h5ad(tmp_path / "new.h5ad")
    return tmp_path / "new.h5ad"


def test_extended_vocabulary_and_labels_keep_the_old_outputs_before_fine_tuning(model, tmp_path) -> None:
    """New genes and labels get new rows; the model's outputs on its old genes and labels are unchanged."""
    from sclatent.checkpoint import load_bundle
    from sclatent.finetune import transfer_prior, transfer_vae
    from sclatent.nn.dit import DiT, DiTConfig
    from sclatent.nn.vae import TransformerVAE, VAEConfig

    new = _new_data(tmp_path)
    tok = tmp_path / "tok"
    _ok("tokenize", "--train", new, "--outdir", tok, "--model", model["model"], "--extend", "--genes", "all",
        "--condition-keys", "cell_type,donor", "--no-progress")  # fmt: skip
    manifest = json.loads((tok / "manifest.json").read_text())
    old = load_bundle(model["model"])
    assert manifest["genes"] == old.genes + [f"NEW{i}" for i in range(20)]
    assert manifest["labels"]["cell_type"] == old.labels["cell_type"] + ["Plasma"]
    assert manifest["labels"]["donor"] == ["d1", "d2"] and manifest["condition_keys"] == ["cell_type", "donor"]
    # cell types the new cells lack keep the model's library-size statistics
    assert set(manifest["library_size"]["per_key"]["cell_type"]) == set(manifest["labels"]["cell_type"])

    # VAE: shuffled new vocabulary (order must not matter), a few old genes left out
    genes = list(reversed(manifest["genes"][5:]))
    vae = TransformerVAE(VAEConfig.from_dict({**old.vae.config.to_dict(), "n_genes": len(genes)}), seed=7)
    counts = transfer_vae(old.vae, old.genes, vae, genes)
    assert counts == {"genes_kept": 2495, "genes_added": 20, "genes_left_out": 5}
    vae.eval()
    rng = np.random.default_rng(0)
    old_ids = torch.as_tensor(rng.choice(np.arange(6, 2501), size=(8, 50), replace=False), dtype=torch.long)
    new_ids = torch.as_tensor([[genes.index(old.genes[i - 1]) + 1 for i in row] for row in old_ids.tolist()])
    x = torch.as_tensor(rng.poisson(2.0, size=(8, 50)).astype(np.float32))
    mask = torch.ones(8, 50, dtype=torch.bool)
    z_old, _ = old.vae.encode(old_ids, x, mask)
    z_new, _ = vae.encode(new_ids, x, mask)
    torch.testing.assert_close(z_new, z_old)  # same cells, same latents
    p_old = old.vae.decode_parameters(z_old, old_ids[0])
    p_new = vae.decode_parameters(z_old, new_ids[0])
    for name in p_old:  # same decoder parameters of every old gene
        torch.testing.assert_close(p_new[name], p_old[name])
    added = torch.tensor([genes.index(f"NEW{i}") + 1 for i in range(20)])
    assert torch.isfinite(vae.decode_parameters(z_old, added)["logits"]).all()

    # prior: a new value of cell_type, a new key (donor); and a model key left out
    labels = {"cell_type": manifest["labels"]["cell_type"], "donor": ["d1", "d2"]}
    cfg = DiTConfig.from_dict({**old.prior.config.to_dict(), "n_classes": [len(labels["cell_type"]), 2]})
    dit = DiT(cfg)
    info = transfer_prior(old.prior, old.labels, old.condition_keys, dit, labels, ["cell_type", "donor"])
    assert info == {"labels_added": {"cell_type": ["Plasma"], "donor": ["(new key)"]}, "keys_left_out": []}
    xt, t = torch.randn(6, 4, 4), torch.rand(6)
    codes_old = torch.tensor([[0], [1], [2], [3], [len(old.labels["cell_type"])], [1]])  # the last but one: null
    null_new = len(labels["cell_type"])
    codes_new = torch.tensor([[c, 2 if i % 2 else 0] for i, c in enumerate([0, 1, 2, 3, null_new, 1])])
    torch.testing.assert_close(dit(xt, t, codes_new), old.prior(xt, t, codes_old))
    plasma = torch.tensor([[labels["cell_type"].index("Plasma"), 2]] * 6)
    null = torch.tensor([[null_new, 2]] * 6)
    torch.testing.assert_close(dit(xt, t, plasma), dit(xt, t, null))  # a new value starts as the null row
    # a model whose data lack the model's key: that key is folded in as its null (marginal) row
    dit0 = DiT(DiTConfig.from_dict({**old.prior.config.to_dict(), "n_classes": []}))
    transfer_prior(old.prior, old.labels, old.condition_keys, dit0, {}, [])
    nulls = torch.full((6, 1), len(old.labels["cell_type"]))
    torch.testing.assert_close(dit0(xt, t, torch.zeros(6, 0, dtype=torch.long)), old.prior(xt, t, nulls))


def test_fine_tune_both_stages_then_sample_the_new_label(model, tmp_path) -> None:
    d = tmp_path
    new = _new_data(tmp_path)
    _ok("tokenize", "--train", new, "--outdir", d / "tok", "--model", model["model"], "--extend", "--genes", "all",
        "--condition-keys", "cell_type,donor", "--no-progress")  # fmt: skip
    _ok("train-vae", "--tokens", d / "tok", "--outdir", d / "vae", "--init-from", model["model"], "--batch-size", 32,
        "--decode-genes", 128, *SHORT)  # fmt: skip
    cfg = json.loads((d / "vae" / "config.json").read_text())
    tiny = json.loads((model["vae"] / "config.json").read_text())["model_config"]
    assert cfg["model_config"] == {**tiny, "n_genes": 2520}
    assert cfg["metadata"]["init_from"]["path"] == str(model["model"])
    assert cfg["metadata"]["init_from"]["genes_added"] == 20 and cfg["metadata"]["init_from"]["genes_kept"] == 2500
    _ok("encode", "--model", d / "vae", "--tokens", d / "tok", "--outdir", d / "enc", "--device", "cpu")
    _ok("train-prior", "--latents", d / "enc/latents.npz", "--outdir", d / "prior", "--init-from", model["model"],
        "--batch-size", 64, *SHORT)  # fmt: skip
    pcfg = json.loads((d / "prior" / "config.json").read_text())
    assert pcfg["model_config"]["n_classes"] == [9, 2]  # 8 cell types + Plasma; donor d1, d2
    assert pcfg["metadata"]["init_from"]["labels_added"] == {"cell_type": ["Plasma"], "donor": ["(new key)"]}
    _ok("bundle", "--vae", d / "vae", "--prior", d / "prior", "--out", d / "model.pt")
    _ok("sample", "--model", d / "model.pt", "--out", d / "g.h5ad", "--n-cells", 5, "--condition", "cell_type=Plasma",
        "--condition", "donor=d2", "--device", "cpu")  # fmt: skip
    gen = ad.read_h5ad(d / "g.h5ad")
    assert gen.shape == (5, 2520) and set(gen.obs["cell_type"]) == {"Plasma"} and "NEW0" in gen.var_names
    # an old cell type the fine-tuning cells lack is still known, with the model's library-size statistics
    assert "Megakaryocytes" not in set(ad.read_h5ad(new).obs["cell_type"])
    _ok("sample", "--model", d / "model.pt", "--out", d / "r.h5ad", "--n-cells", 3, "--condition",
        "cell_type=Megakaryocytes", "--device", "cpu")  # fmt: skip


def test_a_fine_tune_that_changes_the_architecture_is_refused(model, tmp_path) -> None:
    tok = model["tokens"]
    for extra, changed in (
        (("--preset", "default"), "d_model 16 -> 32"),
        (("--likelihood", "zinb"), "likelihood 'nb' -> 'zinb'"),
        (("--beta", 0.1), "beta 0.0 -> 0.1"),
    ):
        out = tmp_path / f"vae_{extra[0].strip('-')}"
        line = _fails("train-vae", "--tokens", tok, "--outdir", out, "--init-from", model["model"], *extra, *SHORT)
        assert f"--init-from {model['model']}: a fine-tune keeps the model's vae architecture" in line
        assert changed in line, line
        assert not (out / "checkpoint.pt").exists()
    # the same preset as the model's is accepted
    _ok("train-vae", "--tokens", tok, "--outdir", tmp_path / "same", "--init-from", model["model"], "--preset", "tiny",
        "--batch-size", 32, "--decode-genes", 64, "--max-steps", 2, "--no-progress", "--device", "cpu")  # fmt: skip
    line = _fails("train-prior", "--latents", model["dir"] / "enc/latents.npz", "--outdir", tmp_path / "p",
                  "--init-from", model["model"], "--preset", "default", *SHORT)  # fmt: skip
    assert "a fine-tune keeps the model's prior architecture, but the options change d_model 64 -> 256" in line
    assert not (tmp_path / "p" / "checkpoint.pt").exists()


def test_the_api_fine_tunes_a_loaded_model(model, tmp_path) -> None:
    import sclatent
    from sclatent.train_prior import PriorTraining
    from sclatent.train_vae import VAETraining

    base = sclatent.Model.load(model["model"], device="cpu")
    new = ad.read_h5ad(_new_data(tmp_path))
    tuned = sclatent.Model.train(
        new,
        condition_keys=["cell_type", "donor"],
        init_from=base,
        vae=VAETraining(preset=None, max_steps=3, decode_genes=64),
        prior=PriorTraining(preset=None, max_steps=3),
        vae_batch_size=32,
        device="cpu",
        progress=False,
    )
    assert tuned.genes == base.genes + [f"NEW{i}" for i in range(20)]
    assert tuned.labels["cell_type"] == base.labels["cell_type"] + ["Plasma"] and tuned.condition_keys[1] == "donor"
    assert tuned.bundle.vae.config.to_dict() == {**base.bundle.vae.config.to_dict(), "n_genes": 2520}
    assert tuned.bundle.info["vae"]["run"]["init_from"]
    assert tuned.sample(n=3, conditions={"cell_type": "Plasma"}).n_obs == 3
