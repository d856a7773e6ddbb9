"""Latent refinement (sclatent.refine, `encode --refine-steps`): never worse than the encoder per cell,
independent of the other cells in a chunk, deterministic, on the encoder's scale; ENCODE records both metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sclatent.refine import refine_latents
from test_generate import MIXOLOGY, _cli, _ok
from test_vae import G, _tiny, one_thread, synthetic_batch  # noqa: F401 (one_thread: a fixture)


def _encoded(model, B: int = 16):
    b = synthetic_batch(B)
    with torch.no_grad():
        z, _ = model.encode(b["genes"], b["counts"], b["mask"])  # (B, m, d_latent)
    return z, b["library_size"], b["target_counts"]


def _nll(model, z, lib, x) -> torch.Tensor:
    with torch.no_grad():
        return -model.decode(z, torch.arange(1, G + 1), lib).log_prob(x).sum(dim=1)  # (B,)


def test_refinement_lowers_every_cells_nll_and_keeps_the_encoder_scale(one_thread) -> None:
    model = _tiny()
    z0, lib, x = _encoded(model)
    z, n0, n1 = refine_latents(model, z0, lib, x, steps=15, lr=0.1)
    assert z.shape == z0.shape and not torch.equal(z, z0)
    torch.testing.assert_close(n0, _nll(model, z0, lib, x))
    torch.testing.assert_close(n1, _nll(model, z, lib, x), rtol=1e-4, atol=1e-3)  # the returned z decode to n1
    assert bool((n1 <= n0).all()) and float((n0 - n1).mean()) > 1.0
    # deterministic encoder with latent_norm: per-token standardised, like the encoder's own output
    torch.testing.assert_close(z, F.layer_norm(z, (z.shape[-1],)), atol=1e-5, rtol=0)
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_refinement_is_per_cell_and_deterministic(one_thread) -> None:
    model = _tiny()
    z0, lib, x = _encoded(model)
    z_all, _, n_all = refine_latents(model, z0, lib, x, steps=8, lr=0.1)
    z_half, _, n_half = refine_latents(model, z0[:8], lib[:8], x[:8], steps=8, lr=0.1)
    torch.testing.assert_close(z_half, z_all[:8], atol=1e-5, rtol=1e-4)  # other cells in the chunk do not matter
    torch.testing.assert_close(n_half, n_all[:8], atol=1e-3, rtol=1e-5)
    again, _, _ = refine_latents(model, z0, lib, x, steps=8, lr=0.1)
    assert torch.equal(again, z_all)
    same, m0, m1 = refine_latents(model, z0, lib, x, steps=0, lr=0.1)
    assert torch.equal(same, z0) and torch.equal(m0, m1)


def test_refinement_of_a_variational_encoder_keeps_its_mean_scale(one_thread) -> None:
    model = _tiny(variational=True, beta=1.0)
    z0, lib, x = _encoded(model)
    z, n0, n1 = refine_latents(model, z0, lib, x, steps=10, lr=0.1)
    assert not torch.allclose(z, F.layer_norm(z, (z.shape[-1],)))  # no standardisation of a posterior mean
    # the objective (NLL + beta/2 |z|^2) never rises; the NLL alone may trade against the penalty
    obj0 = n0 + 0.5 * z0.pow(2).sum(dim=(1, 2))
    obj1 = n1 + 0.5 * z.pow(2).sum(dim=(1, 2))
    assert bool((obj1 <= obj0 + 1e-3).all())


def test_refinement_rejects_bad_settings() -> None:
    model = _tiny()
    z0, lib, x = _encoded(model, B=2)
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        refine_latents(model, z0, lib, x, steps=-1, lr=0.1)
    with pytest.raises(ValueError, match="learning rate must be > 0, got 0"):
        refine_latents(model, z0, lib, x, steps=3, lr=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny VAE trained 20 steps on the bundled sc_mixology subset (300 HVGs, half the cells held out)."""
    d = tmp_path_factory.mktemp("refine")
    sheet = d / "s.csv"
    sheet.write_text(f"dataset,h5ad,split,batch,condition_keys\nmix,{MIXOLOGY},all,,cell_line;protocol\n")
    _ok("prepare", "--samplesheet", sheet, "--outdir", d / "p", "--n-hvg", 300, "--min-cells", 3, "--test-fraction", 0.5)
    _ok("tokenize", "--train", d / "p/train.h5ad", "--test", d / "p/test.h5ad", "--outdir", d / "tok", "--max-tokens", 512, "--no-progress")
    _ok("train-vae", "--tokens", d / "tok", "--outdir", d / "vae", "--preset", "tiny", "--batch-size", 32, "--decode-genes", 128,
        "--max-steps", 20, "--no-progress", "--device", "cpu", "--threads", 1)
    return d


def test_encode_refine_steps_end_to_end(tiny_run: Path) -> None:
    d = tiny_run
    common = ("--vae", d / "vae", "--tokens", d / "tok", "--device", "cpu", "--threads", 1)
    _ok("encode", *common, "--outdir", d / "plain")
    _ok("encode", *common, "--outdir", d / "refined", "--refine-steps", 4, "--no-progress")
    plain = json.loads((d / "plain/reconstruction.json").read_text())
    doc = json.loads((d / "refined/reconstruction.json").read_text())
    assert plain["latents"] == "encoder" and "metrics_amortised" not in plain
    assert doc["latents"] == "refined" and doc["refinement"]["steps"] == 4 and doc["refinement"]["lr"] == 0.1
    # the encoder's metrics are kept, identical to a plain ENCODE's; the refined ones are better
    assert doc["metrics_amortised"] == plain["metrics"]
    re = "re_nll_gene_sum_cell_mean"
    assert doc["metrics"][re] < plain["metrics"][re]
    for split in ("train", "test"):
        assert doc["refinement"][split]["nll_refined"] < doc["refinement"][split]["nll_encoder"]
    assert doc["metrics"][re] == pytest.approx(doc["refinement"]["test"]["nll_refined"], rel=1e-4)
    assert doc["provenance"]["config"]["refine_steps"] == 4
    a, b = np.load(d / "plain/latents.npz"), np.load(d / "refined/latents.npz")
    for split in ("train", "test"):
        assert a[f"{split}_z"].shape == b[f"{split}_z"].shape and not np.allclose(a[f"{split}_z"], b[f"{split}_z"])
        assert np.array_equal(a[f"{split}_labels"], b[f"{split}_labels"])
        assert np.array_equal(a[f"{split}_cell_index"], b[f"{split}_cell_index"])


@pytest.mark.parametrize("args, message", [
    (("--refine-steps", -1), "Invalid value for '--refine-steps': -1 is not in the range x>=0"),
    (("--refine-steps", 3, "--refine-lr", 0), "Invalid value for '--refine-lr': 0.0 is not in the range x>0"),
])
def test_encode_rejects_bad_refinement_options(tiny_run: Path, args: tuple, message: str) -> None:
    out = tiny_run / "bad"
    result = _cli("encode", "--vae", tiny_run / "vae", "--tokens", tiny_run / "tok", "--outdir", out, "--device", "cpu", *args)
    assert result.exit_code != 0 and message in result.output
    assert not out.exists()
