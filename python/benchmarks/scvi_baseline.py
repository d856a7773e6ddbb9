"""The scVI baseline (scvi-tools): trained on the same train cells and genes, scored like sclatent.

    python python/benchmarks/scvi_baseline.py --train train.h5ad --test test.h5ad --tokens tokens/ \
        --outdir out/ --keys cell_type --budget equal_epochs:epochs=20 --budget equal_time:seconds=300

For each `--budget NAME:epochs=E` or `NAME:seconds=S` a fresh `scvi.model.SCVI` is trained (scvi-tools defaults
except `gene_likelihood="nb"`, so that RE is the NB negative log-likelihood of the paper's Table 1 and of our
VAE, and `train_size=1.0`, so that it sees exactly our training cells; no validation split), then:

- reconstruction of the test cells: z = the posterior mean (as ENCODE uses mu), decoded with the observed
  library size; RE = NB NLL summed over genes (mean over cells), PCC/MSE of one NB sample and of the mean,
  all through `sclatent.metrics.reconstruction_metrics` (the exact function ENCODE calls), in file order;
- generation: z ~ N(0, I), log library size ~ the marginal log-normal fitted on the training cells at
  TOKENIZE (the one sclatent uses for unconditional requests), decoded and drawn as NB counts.
  SCVI is not a conditional generator of labels, so its generation is unconditional: every label column of
  the output holds "none", like sclatent's unrequested keys.
- with `--covariates` the condition keys are scVI's categorical covariates (one-hot, injected into every decoder
  layer), and generation is conditional: one cell per test cell with that cell's labels (also a combination
  never seen in training, whose values each were), z ~ N(0, I), the log library size drawn from the log-normal
  sclatent's SAMPLE uses for those labels (`sclatent.generate.lognormal_params`).

Outputs per budget under outdir/NAME/: reconstruction.json (ENCODE's layout), generated.h5ad (one cell per test
cell per replicate, obs["replicate"]) and scvi.json (epochs, training seconds, cells/s, device, versions).
The genes are the token vocabulary (manifest order); the same seed drives scVI, z, library sizes and counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

log = logging.getLogger("scvi_baseline")

NONE_LABEL = "none"  # the label value sclatent writes for keys that were not requested


def parse_budget(text: str) -> tuple[str, str, float]:
    """'equal_epochs:epochs=20' -> ('equal_epochs', 'epochs', 20.0); also 'NAME:seconds=S'."""
    try:
        name, rest = text.split(":", 1)
        kind, value = rest.split("=", 1)
        number = float(value)
    except ValueError:
        raise ValueError(f"--budget '{text}': expected NAME:epochs=E or NAME:seconds=S") from None
    if kind not in ("epochs", "seconds") or not number > 0 or not name:
        raise ValueError(f"--budget '{text}': expected NAME:epochs=E or NAME:seconds=S with a positive number")
    return name, kind, number


def load_counts(path: Path, genes: list[str]) -> ad.AnnData:
    """Cells of `path` restricted to `genes` (in that order), counts as CSR float32."""
    adata = ad.read_h5ad(path)
    missing = [g for g in genes if g not in set(adata.var_names)]
    if missing:
        raise ValueError(f"{path}: {len(missing)} model genes are missing, e.g. '{missing[0]}'")
    adata = adata[:, genes].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def train_scvi(
    train: ad.AnnData, label: np.ndarray, kind: str, amount: float, seed: int, covariates: list[str] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Train SCVI for `amount` epochs or seconds (with the obs columns `covariates` as categorical covariates);
    returns (model, info)."""
    import scvi

    scvi.settings.seed = seed
    adata = train.copy()
    obs = {"bench_label": pd.Categorical(label)}
    for key in covariates or []:
        obs[key] = pd.Categorical(train.obs[key].astype(str))
    adata.obs = pd.DataFrame(obs, index=adata.obs_names)
    scvi.model.SCVI.setup_anndata(adata, labels_key="bench_label", categorical_covariate_keys=covariates or None)
    model = scvi.model.SCVI(adata, gene_likelihood="nb")
    kwargs: dict[str, Any] = {"train_size": 1.0, "enable_progress_bar": False}
    if kind == "epochs":
        kwargs["max_epochs"] = max(1, int(round(amount)))
    else:
        # the time limit binds: Lightning stops at the end of the first step past max_time
        kwargs["max_epochs"] = 1_000_000
        kwargs["max_time"] = dt.timedelta(seconds=amount)
    start = time.perf_counter()
    model.train(**kwargs)
    train_s = time.perf_counter() - start
    epochs = len(model.history["elbo_train"])  # one row per completed epoch
    info = {
        "budget": kind,
        "budget_value": amount,
        "epochs": int(epochs),
        "train_s": train_s,
        "cells_per_s": adata.n_obs * epochs / train_s if train_s > 0 else float("nan"),
        "n_train_cells": int(adata.n_obs),
        "n_parameters": int(sum(p.numel() for p in model.module.parameters())),
        "gene_likelihood": "nb",
        "n_latent": int(model.module.n_latent),
        "covariates": list(covariates or []),
    }
    return model, info


def _dense(X: sp.csr_matrix, a: int, b: int) -> torch.Tensor:
    return torch.from_numpy(X[a:b].toarray().astype(np.float32))


def covariate_codes(model: Any, obs: pd.DataFrame) -> torch.Tensor | None:
    """The categorical covariate codes (n, n_covariates) of cells with labels `obs`, in scVI's category order;
    None for a model without covariates. A value scVI never saw is a ValueError."""
    covariates = model.registry_["setup_args"].get("categorical_covariate_keys") or []
    if not covariates:
        return None
    mappings = model.adata_manager.get_state_registry("extra_categorical_covs")["mappings"]
    codes = np.zeros((len(obs), len(covariates)), dtype=np.int64)
    for j, key in enumerate(covariates):
        index = {str(v): i for i, v in enumerate(mappings[key])}
        values = obs[key].astype(str).to_numpy()
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ValueError(f"scVI covariate {key}={unknown[0]} was never seen in training")
        codes[:, j] = [index[v] for v in values]
    return torch.from_numpy(codes)


@torch.no_grad()
def reconstruct(model: Any, test: ad.AnnData, seed: int, batch_size: int = 256) -> dict[str, Any]:
    """Table 1 metrics of scVI on the test cells (see the module docstring)."""
    from sclatent.metrics import reconstruction_metrics
    from sclatent.nn.likelihoods import NegativeBinomial

    module = model.module.eval()
    gen = torch.Generator().manual_seed(seed)
    X = test.X
    covs = covariate_codes(model, test.obs)
    sampled, means, nll = [], [], []
    for a in range(0, test.n_obs, batch_size):
        x = _dense(X, a, min(a + batch_size, test.n_obs))  # (b, G)
        batch_index = torch.zeros((x.shape[0], 1), dtype=torch.long)
        cat = None if covs is None else covs[a : a + x.shape[0]]
        inf = module.inference(x=x, batch_index=batch_index, cat_covs=cat)
        out = module.generative(z=inf["qz"].loc, library=inf["library"], batch_index=batch_index, cat_covs=cat)
        px = out["px"]
        nb = NegativeBinomial(px.mu.cpu(), px.theta.expand_as(px.mu).cpu())  # (b, G)
        nll.append((-nb.log_prob(x)).sum(dim=1).double().numpy())
        sampled.append(sp.csr_matrix(nb.sample(gen).numpy()))
        means.append(nb.mean.numpy())
    metrics = reconstruction_metrics(X, sp.vstack(sampled).tocsr(), np.concatenate(means), np.concatenate(nll))
    metrics["n_cells_total"] = int(test.n_obs)
    metrics["subsampled"] = False
    return metrics


@torch.no_grad()
def generate(
    model: Any, n_cells: int, log_lib_mean: float, log_lib_sd: float, seed: int, replicate: int, batch_size: int = 512
) -> sp.csr_matrix:
    """Unconditional scVI cells: z ~ N(0, I), log L ~ N(mean, sd), NB counts; (n_cells, G)."""
    from sclatent.nn.likelihoods import NegativeBinomial

    module = model.module.eval()
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, replicate]).generate_state(1)[0]))
    rows = []
    for a in range(0, n_cells, batch_size):
        b = min(a + batch_size, n_cells) - a
        z = torch.randn((b, module.n_latent), generator=gen)  # (b, n_latent)
        log_l = log_lib_mean + log_lib_sd * torch.randn((b, 1), generator=gen)  # (b, 1)
        out = module.generative(z=z, library=log_l, batch_index=torch.zeros((b, 1), dtype=torch.long))
        px = out["px"]
        nb = NegativeBinomial(px.mu.cpu(), px.theta.expand_as(px.mu).cpu())  # (b, G)
        rows.append(sp.csr_matrix(nb.sample(gen).numpy()))
    return sp.vstack(rows).tocsr().astype(np.float32)


@torch.no_grad()
def generate_like(
    model: Any, obs: pd.DataFrame, keys: list[str], manifest: dict[str, Any], seed: int, replicate: int
) -> sp.csr_matrix:
    """Conditional scVI cells, one per row of `obs` with its labels: z ~ N(0, I), log L ~ the log-normal that
    sclatent's SAMPLE draws for those labels, decoded with the labels as covariates; NB counts (n, G)."""
    from sclatent.generate import label_codes, lognormal_params
    from sclatent.nn.likelihoods import NegativeBinomial

    module = model.module.eval()
    labels = {k: list(v) for k, v in manifest["labels"].items()}
    means, sds = lognormal_params(label_codes(obs, keys, labels, source="scVI"), keys, labels, manifest["library_size"])
    covs = covariate_codes(model, obs)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, replicate, 1]).generate_state(1)[0]))
    rows = []
    for a in range(0, len(obs), 512):
        b = min(a + 512, len(obs)) - a
        z = torch.randn((b, module.n_latent), generator=gen)  # (b, n_latent)
        log_l = torch.from_numpy(means[a : a + b] + sds[a : a + b] * np.asarray(torch.randn(b, generator=gen)))
        out = module.generative(
            z=z,
            library=log_l.float()[:, None],
            batch_index=torch.zeros((b, 1), dtype=torch.long),
            cat_covs=None if covs is None else covs[a : a + b],
        )
        px = out["px"]
        nb = NegativeBinomial(px.mu.cpu(), px.theta.expand_as(px.mu).cpu())  # (b, G)
        rows.append(sp.csr_matrix(nb.sample(gen).numpy()))
    return sp.vstack(rows).tocsr().astype(np.float32)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, reconstruct and generate for every budget; returns {budget name: scvi.json content}."""
    import scvi

    torch.set_num_threads(args.threads)
    manifest = json.loads((Path(args.tokens) / "manifest.json").read_text())
    genes = list(manifest["genes"])
    keys = [k for k in args.keys.split(",") if k]
    train = load_counts(Path(args.train), genes)
    test = load_counts(Path(args.test), genes)
    label = train.obs[keys].astype(str).agg("|".join, axis=1).to_numpy() if keys else np.full(train.n_obs, "all")
    marginal = manifest["library_size"]["marginal"]
    n_generate = args.n_generate or test.n_obs
    results = {}
    for text in args.budget:
        name, kind, amount = parse_budget(text)
        out = Path(args.outdir) / name
        out.mkdir(parents=True, exist_ok=True)
        model, info = train_scvi(train, label, kind, amount, args.seed, keys if args.covariates else None)
        log.info(
            "scVI %s: %d epochs in %.1fs (%.0f cells/s)", name, info["epochs"], info["train_s"], info["cells_per_s"]
        )
        t0 = time.perf_counter()
        recon = reconstruct(model, test, args.seed)
        info["reconstruct_s"] = time.perf_counter() - t0
        (out / "reconstruction.json").write_text(
            json.dumps(
                {"metrics": recon, "split": "test", "likelihood": "nb", "model": "scVI (scvi-tools)", "budget": info},
                indent=1,
            )
        )
        t0 = time.perf_counter()
        parts = []
        for r in range(args.replicates):
            if args.covariates:
                X = generate_like(model, test.obs, keys, manifest, args.seed, r)
                obs = pd.DataFrame(index=[f"scvi{r}_{i}" for i in range(test.n_obs)])
                for key in keys:
                    obs[key] = pd.Categorical(test.obs[key].astype(str).to_numpy())
            else:
                X = generate(model, n_generate, marginal["mean"], marginal["sd"], args.seed, r)
                obs = pd.DataFrame(index=[f"scvi{r}_{i}" for i in range(n_generate)])
                for key in keys:
                    obs[key] = pd.Categorical([NONE_LABEL] * n_generate)
            obs["generated"] = True
            obs["replicate"] = r
            parts.append(ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes)))
        info["generate_s"] = time.perf_counter() - t0
        info["generate_cells_per_s"] = n_generate * args.replicates / info["generate_s"]
        adata = ad.concat(parts)
        adata.uns["sclatent"] = {"step": "scvi_baseline", "method": "prior N(0, I)", "nfe_per_batch": 0.0}
        adata.write_h5ad(out / "generated.h5ad")
        info.update({"scvi_tools": scvi.__version__, "device": "cpu", "threads": args.threads, "seed": args.seed})
        (out / "scvi.json").write_text(json.dumps(info, indent=1))
        results[name] = info
    return results


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="PREPARE's train.h5ad")
    ap.add_argument("--test", required=True, help="PREPARE's test.h5ad")
    ap.add_argument("--tokens", required=True, help="TOKENIZE folder (vocabulary and library-size statistics)")
    ap.add_argument("--outdir", required=True)
    ap.add_argument("--keys", default="", help="comma list of condition keys (label columns of the output)")
    ap.add_argument("--budget", action="append", required=True, help="NAME:epochs=E or NAME:seconds=S; repeatable")
    ap.add_argument("--replicates", type=int, default=1)
    ap.add_argument("--n-generate", type=int, default=0, help="cells per replicate [default: one per test cell]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--covariates",
        action="store_true",
        help="the keys as categorical covariates; generation conditional, one cell per test cell with its labels",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[scvi_baseline %(asctime)s] %(message)s", stream=sys.stderr)
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        run(args)
    except ValueError as exc:
        sys.exit(f"scvi_baseline: error: {exc}")


if __name__ == "__main__":
    main()
