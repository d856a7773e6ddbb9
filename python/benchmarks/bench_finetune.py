"""When fine-tuning pays: a VAE pre-trained on one dataset and fine-tuned (`train-vae --init-from`) on a small part
of another, against a VAE trained from scratch on the same part, at equal steps and at equal wall time.

Per direction (source -> target; genes are Ensembl ids in both, pbmc3k's `gene_ids` column):
- the source model: `--preset`, `--pretrain-steps` steps on the source's train cells (80%), vocabulary its HVGs;
- the target's small part: `--fraction` of its train cells (a seeded, label-stratified draw per seed); its HVGs
  (seurat_v3 on the small part) are the target genes;
- fine-tuned: TOKENIZE the small part over the source model's vocabulary extended by the target genes
  (`tokenize --model --extend`), then N steps from the source model's weights;
- scratch: TOKENIZE the small part over the target genes, N steps from a fresh model (same preset and schedule);
- scratch, equal time: a fresh model trained for as many steps as fit in the fine-tune's own wall time plus the
  source model's pre-training time (the cost when the source model is not already there).
Every model reads only the target genes of the target's held-out test cells (encoder input) and decodes them with
each cell's total over them: RE = NB NLL summed over the target genes (mean over cells), PCC = per-gene Pearson r
of the NB means (log1p 1e4 x / total) across the test cells; kNN = 15-NN label accuracy of the test cells against
the small part's own embeddings (its labelled reference). Mean over seeds [range].

    python python/benchmarks/bench_finetune.py --directions pbmc3k:mixology,mixology:pbmc3k --seeds 0,1 \\
        --steps 100,500 --pretrain-steps 1000 --workdir /tmp/bench_finetune
"""

from __future__ import annotations

import argparse
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
from common import SHARED_DATASETS, machine_info, markdown_table

DATASETS = {  # name: (file, label, cell filter, var column holding Ensembl ids or None for var_names)
    "pbmc3k": ("pbmc3k_counts_celltype.h5ad", "cell_type", None, "gene_ids"),
    "mixology": ("sc_mixology_celllines_counts.h5ad", "cell_line", ("demuxlet_call", "SNG"), None),
}
K = 15

log = logging.getLogger("bench_finetune")


def load(name: str, seed: int) -> tuple[ad.AnnData, ad.AnnData, str]:
    """(train, test, label) of a dataset: raw counts, Ensembl ids as var_names, seeded stratified 80/20 split."""
    file, label, keep, id_column = DATASETS[name]
    adata = ad.read_h5ad(SHARED_DATASETS / file)
    if keep is not None:
        adata = adata[adata.obs[keep[0]].astype(str) == keep[1]].copy()
    if id_column is not None:
        adata.var_names = adata.var[id_column].astype(str).to_numpy()
        adata = adata[:, ~adata.var_names.duplicated()].copy()
    adata = ad.AnnData(
        X=sp.csr_matrix(adata.X, dtype=np.float32),
        obs=pd.DataFrame({label: adata.obs[label].astype(str).to_numpy()}, index=adata.obs_names),
        var=pd.DataFrame(index=adata.var_names),
    )
    test = stratified(adata.obs[label].to_numpy(), 0.2, seed)
    return adata[~test].copy(), adata[test].copy(), label


def stratified(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded boolean mask with `fraction` of each label's cells (at least one)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        mask[rng.choice(idx, size=max(1, int(round(fraction * len(idx)))), replace=False)] = True
    return mask


def flag_hvg(adata: ad.AnnData, n: int) -> ad.AnnData:
    import scanpy as sc

    adata = adata[:, np.asarray((adata.X > 0).sum(axis=0)).ravel() >= 3].copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=min(n, adata.n_vars - 1), flavor="seurat_v3")
    return adata


def train_run(tokens: Path, out: Path, steps: int, seed: int, args: argparse.Namespace, init: Path | None) -> float:
    """Train a VAE run folder; returns its training seconds (history's elapsed_s)."""
    from sclatent.train import TrainConfig
    from sclatent.train_vae import VAETraining, train_vae

    run = VAETraining(
        preset=None if init else args.preset, max_steps=steps, decode_genes=args.decode_genes,
        init_from=str(init) if init else None,
    )  # fmt: skip
    tcfg = TrainConfig(max_steps=1, batch_size=args.batch_size, seed=seed, device="cpu", betas=(0.9, 0.95))
    train_vae(tokens, out, run, tcfg, progress=False)
    return float(pd.read_csv(out / "history.csv")["elapsed_s"].iloc[-1])


@torch.no_grad()
def score(model_dir: Path, ref: ad.AnnData, test: ad.AnnData, genes: list[str], label: str) -> dict[str, float]:
    """RE, PCC and kNN of a VAE run on the target genes of the test cells (see the module docstring)."""
    from sklearn.neighbors import KNeighborsClassifier

    from sclatent.checkpoint import load_model
    from sclatent.embed import embed_counts
    from sclatent.tokens import gene_index

    bundle = load_model(model_dir)
    vae = bundle.vae
    ids, _ = gene_index(genes, bundle.genes, source="target genes")
    X_test = sp.csr_matrix(test[:, genes].X)
    z_ref = embed_counts(bundle, sp.csr_matrix(ref[:, genes].X), ids, torch.device("cpu"), 256)
    z = embed_counts(bundle, X_test, ids, torch.device("cpu"), 256)
    truth = X_test.toarray()
    q = torch.as_tensor(ids.astype(np.int64))
    zt = torch.as_tensor(z.reshape(len(z), vae.config.n_latent_tokens, vae.config.d_latent))
    nll, means = [], []
    for a in range(0, len(z), 64):
        t = torch.as_tensor(truth[a : a + 64])
        lik = vae.decode(zt[a : a + 64], q, t.sum(dim=1).clamp_min(1.0))
        nll.append((-lik.log_prob(t)).sum(dim=1).numpy())
        means.append(lik.mean.numpy())
    mean = np.concatenate(means)

    def lognorm(x: np.ndarray) -> np.ndarray:
        return np.log1p(1e4 * x / np.maximum(x.sum(axis=1, keepdims=True), 1e-12))

    a, b = lognorm(mean), lognorm(truth)
    ac, bc = a - a.mean(0), b - b.mean(0)
    denom = np.sqrt((ac * ac).sum(0) * (bc * bc).sum(0))
    ok = denom > 0
    knn = KNeighborsClassifier(n_neighbors=min(K, len(ref))).fit(z_ref, ref.obs[label].to_numpy())
    return {
        "re": float(np.concatenate(nll).mean()),
        "pcc": float(((ac * bc).sum(0)[ok] / denom[ok]).mean()),
        "knn": float(knn.score(z, test.obs[label].to_numpy())),
    }


def run_direction(source: str, target: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from sclatent.checkpoint import bundle_from_runs, load_model
    from sclatent.tokens import tokenize

    work = args.workdir / f"{source}-{target}"
    work.mkdir(parents=True, exist_ok=True)
    src_train, _, _ = load(source, 0)
    src_train = flag_hvg(src_train, args.n_hvg)
    src_train.write_h5ad(work / "source.h5ad")
    tokenize(work / "source.h5ad", work / "source_tokens", genes="hvg", condition_keys=[], progress=False)
    pre_s = train_run(work / "source_tokens", work / "source_vae", args.pretrain_steps, 0, args, None)
    bundle_from_runs(work / "source_vae").save(work / "source.pt")
    source_genes = set(load_model(work / "source.pt").genes)
    log.info("%s: pre-trained %d steps in %.0f s", source, args.pretrain_steps, pre_s)

    rows = []
    for seed in args.seeds:
        tgt_train, tgt_test, label = load(target, seed)
        small = tgt_train[stratified(tgt_train.obs[label].to_numpy(), args.fraction, seed)].copy()
        small = flag_hvg(small, args.n_hvg)
        genes = list(small.var_names[small.var["highly_variable"].to_numpy()])
        d = work / f"seed{seed}"
        d.mkdir(exist_ok=True)
        small[:, genes].copy().write_h5ad(d / "small.h5ad")  # the target genes only: both models read the same
        tokenize(d / "small.h5ad", d / "ft_tokens", genes="all", model=work / "source.pt", extend=True, progress=False)
        tokenize(d / "small.h5ad", d / "sc_tokens", genes="all", condition_keys=[], progress=False)
        shared = len(set(genes) & source_genes)
        per_step = None
        for steps in args.steps:
            arms = (("fine-tuned", d / f"ft{steps}", d / "ft_tokens", work / "source.pt"),
                    ("scratch", d / f"sc{steps}", d / "sc_tokens", None))  # fmt: skip
            for arm, out, tokens, init in arms:
                secs = train_run(tokens, out, steps, seed, args, init)
                if arm == "scratch":
                    per_step = secs / steps
                row = {"direction": f"{source} -> {target}", "seed": seed, "arm": arm, "steps": steps,
                       "train_s": secs, "n_small": small.n_obs, "target_genes": len(genes), "shared_genes": shared,
                       **score(out, small, tgt_test, genes, label)}  # fmt: skip
                log.info("%s", row)
                rows.append(row)
        # equal wall time: scratch for the pre-training plus the longest fine-tune's time
        longest = max(args.steps)
        ft_s = next(
            r["train_s"] for r in rows if r["seed"] == seed and r["arm"] == "fine-tuned" and r["steps"] == longest
        )
        steps = max(1, int(round((pre_s + ft_s) / per_step)))
        out = d / "sc_equal_time"
        secs = train_run(d / "sc_tokens", out, steps, seed, args, None)
        row = {"direction": f"{source} -> {target}", "seed": seed, "arm": "scratch, time of pre-train + fine-tune",
               "steps": steps, "train_s": secs, "n_small": small.n_obs, "target_genes": len(genes),
               "shared_genes": shared, **score(out, small, tgt_test, genes, label)}  # fmt: skip
        log.info("%s", row)
        rows.append(row)
    for r in rows:
        r["pretrain_s"] = pre_s
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def agg(values: list[float], digits: int = 3) -> str:
        m = float(np.mean(values))
        if len(values) == 1:
            return f"{m:.{digits}g}"
        return f"{m:.{digits}g} [{min(values):.{digits}g}, {max(values):.{digits}g}]"

    out = []

    def key(r: dict[str, Any]) -> tuple[str, str, int | None]:
        return r["direction"], r["arm"], None if r["arm"].startswith("scratch, time") else r["steps"]

    for direction, arm, steps in dict.fromkeys(key(r) for r in rows):
        group = [r for r in rows if key(r) == (direction, arm, steps)]
        out.append([
            direction, arm, agg([r["steps"] for r in group], 4), agg([r["train_s"] for r in group]), len(group),
            agg([r["re"] for r in group], 4), agg([r["pcc"] for r in group]), agg([r["knn"] for r in group]),
        ])  # fmt: skip
    headers = ["direction", "model", "steps", "train s", "seeds", "RE (test)", "PCC (test)", "kNN (test)"]
    return markdown_table(headers, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--directions", default="pbmc3k:mixology,mixology:pbmc3k")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", default="100,500", help="fine-tune / scratch lengths (comma list)")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.1, help="share of the target's train cells fine-tuned on")
    p.add_argument("--preset", default="default")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--decode-genes", type=int, default=256)
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path("bench_finetune"))
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.steps = [int(s) for s in args.steps.split(",")]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(message)s")
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for direction in args.directions.split(","):
        source, target = direction.split(":")
        rows += run_direction(source, target, args)
        record = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        (args.workdir / "results.json").write_text(json.dumps(record, indent=1))
    log.info("done in %.0f s", time.time() - t0)
    print(table(rows))


if __name__ == "__main__":
    main()
