"""How embeddings degrade as the gene panel shrinks: one model per (dataset, seed), its test cells embedded with
100%, 50% and 20% of the model's vocabulary, the genes kept at random or by expression.

For each dataset a seeded, label-stratified 80/20 train/test split; the vocabulary is the train cells' 2,000 HVGs
(seurat_v3); a VAE (`--preset`, `--steps` steps) is trained on the train cells with `sclatent.Model.train`. The
train cells are embedded with the full panel (the reference); the test cells with each reduced panel (the query).
Each trained model is saved in --workdir and reused by a later run. Per panel (mean over seeds, [range]):

- kNN map: accuracy of the query cells' labels predicted by their 15 nearest reference cells (mapping a query
  measured on another panel onto a reference); beside it the same with the reference cells embedded from the
  same panel as the query;
- kNN LOO: leave-one-out 15-NN label accuracy among the query cells themselves (the structure of the embedding);
- NLL/gene present: the NB negative log-likelihood of the genes present, per cell and gene, each cell decoded
  over its present genes with its observed total over them (reconstruction of the genes present); beside it the
  same genes decoded from the full panel's latents of the same cells (what the smaller panel costs);
- PCC present: per-gene Pearson r of the NB means against the counts (log1p 1e4 x / total) across the query
  cells, mean over the present genes; beside it, again, from the full panel's latents;
- PCC absent: the same for the vocabulary genes the panel lacks, decoded with each cell's total over the whole
  vocabulary (what the embedding says about the genes it never saw; "—" at 100%).

    python python/benchmarks/bench_panel.py --datasets pbmc3k,mixology --seeds 0,1 --steps 1500 \\
        --workdir /tmp/bench_panel
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
import scipy.sparse as sp
import torch
from common import SHARED_DATASETS, machine_info, markdown_table

DATASETS = {  # name: (file, label, cell filter)
    "pbmc3k": ("pbmc3k_counts_celltype.h5ad", "cell_type", None),
    "mixology": ("sc_mixology_celllines_counts.h5ad", "cell_line", ("demuxlet_call", "SNG")),
}
FRACTIONS = (1.0, 0.5, 0.2)
K = 15

log = logging.getLogger("bench_panel")


def load_split(name: str, seed: int, n_hvg: int) -> tuple[ad.AnnData, ad.AnnData, str]:
    """(train, test, label): raw counts, a seeded stratified 80/20 split, var['highly_variable'] from train."""
    import scanpy as sc

    file, label, keep = DATASETS[name]
    adata = ad.read_h5ad(SHARED_DATASETS / file)
    if keep is not None:
        adata = adata[adata.obs[keep[0]].astype(str) == keep[1]].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.obs[label] = adata.obs[label].astype(str)
    rng = np.random.default_rng(seed)
    test = np.zeros(adata.n_obs, dtype=bool)
    for value in np.unique(adata.obs[label]):
        idx = np.flatnonzero(adata.obs[label].to_numpy() == value)
        test[rng.choice(idx, size=int(round(0.2 * len(idx))), replace=False)] = True
    train, test_cells = adata[~test].copy(), adata[test].copy()
    sc.pp.filter_genes(train, min_cells=3)
    sc.pp.highly_variable_genes(train, n_top_genes=n_hvg, flavor="seurat_v3")
    return train, test_cells, label


def knn_accuracy(ref: np.ndarray, ref_y: np.ndarray, query: np.ndarray, query_y: np.ndarray) -> tuple[float, float]:
    """(reference -> query accuracy, leave-one-out accuracy within the query) of a K-NN majority vote."""
    from sklearn.neighbors import KNeighborsClassifier

    mapped = KNeighborsClassifier(n_neighbors=K).fit(ref, ref_y).score(query, query_y)
    own = KNeighborsClassifier(n_neighbors=K + 1).fit(query, query_y)
    idx = own.kneighbors(query, return_distance=False)[:, 1:]  # drop each cell itself
    votes = query_y[idx]
    pred = np.array([max(set(row), key=list(row).count) for row in votes])
    return float(mapped), float((pred == query_y).mean())


def _log_norm(x: np.ndarray) -> np.ndarray:
    total = x.sum(axis=1, keepdims=True)
    return np.log1p(1e4 * x / np.maximum(total, 1e-12))


def _gene_pcc(a: np.ndarray, b: np.ndarray) -> float:
    ac, bc = a - a.mean(axis=0), b - b.mean(axis=0)
    denom = np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))
    ok = denom > 0
    return float(((ac * bc).sum(axis=0)[ok] / denom[ok]).mean()) if ok.any() else float("nan")


@torch.no_grad()
def decode_present(model: Any, z: np.ndarray, truth: np.ndarray, present: np.ndarray) -> tuple[float, float]:
    """(NB NLL per cell and gene, per-gene PCC) of the genes `present`, decoded over them alone from latents z, each
    cell with its observed total over them."""
    vae = model.bundle.vae
    c = vae.config
    zt = torch.as_tensor(z.reshape(len(z), c.n_latent_tokens, c.d_latent))
    q = torch.as_tensor(present + 1)
    nll, means = [], []
    for a in range(0, len(z), 64):
        tb = torch.as_tensor(truth[a : a + 64][:, present])
        lik = vae.decode(zt[a : a + 64], q, tb.sum(dim=1).clamp_min(1.0))
        nll.append((-lik.log_prob(tb)).mean(dim=1).numpy())
        means.append(lik.mean.numpy())
    return float(np.concatenate(nll).mean()), _gene_pcc(_log_norm(np.concatenate(means)), _log_norm(truth[:, present]))


@torch.no_grad()
def reconstruction(
    model: Any, z: np.ndarray, z_full: np.ndarray, truth: np.ndarray, present: np.ndarray
) -> dict[str, float]:
    """The present genes' reconstruction from the panel's latents and from the full panel's (the same genes), and
    the absent vocabulary genes' PCC, decoded over the whole vocabulary with each cell's total over it."""
    nll, pcc = decode_present(model, z, truth, present)
    nll_full, pcc_full = decode_present(model, z_full, truth, present)
    out = {"nll_per_gene": nll, "pcc_present": pcc, "nll_full": nll_full, "pcc_full": pcc_full}
    absent = np.setdiff1d(np.arange(truth.shape[1]), present)
    out["pcc_absent"] = float("nan")
    if len(absent):
        vae = model.bundle.vae
        c = vae.config
        zt = torch.as_tensor(z.reshape(len(z), c.n_latent_tokens, c.d_latent))
        genes = torch.arange(1, truth.shape[1] + 1)
        means = []
        for a in range(0, len(z), 64):
            tb = torch.as_tensor(truth[a : a + 64])
            means.append(vae.decode(zt[a : a + 64], genes, tb.sum(dim=1).clamp_min(1.0)).mean.numpy())
        norm_mean, norm_true = _log_norm(np.concatenate(means)), _log_norm(truth)
        out["pcc_absent"] = _gene_pcc(norm_mean[:, absent], norm_true[:, absent])
    return out


def panels(genes: list[str], mean_expr: np.ndarray, seed: int) -> list[tuple[str, float, np.ndarray]]:
    """(selection, fraction, vocabulary columns kept) for every panel of the benchmark."""
    G = len(genes)
    out = [("full", 1.0, np.arange(G))]
    rng = np.random.default_rng([seed, 7])
    for f in FRACTIONS[1:]:
        n = int(round(f * G))
        out.append(("random", f, np.sort(rng.choice(G, size=n, replace=False))))
        out.append(("expression", f, np.sort(np.argsort(-mean_expr, kind="stable")[:n])))
    return out


def run_one(name: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    import sclatent
    from sclatent.train_prior import PriorTraining
    from sclatent.train_vae import VAETraining

    train, test, label = load_split(name, seed, args.n_hvg)
    saved = args.workdir / f"{name}_seed{seed}.pt"
    t0 = time.time()
    if saved.exists():  # a model of an earlier run with the same settings (delete the file to retrain)
        model, train_s = sclatent.Model.load(saved, device="cpu"), float("nan")
    else:
        vae = VAETraining(preset=args.preset, max_steps=args.steps, decode_genes=args.decode_genes)
        prior = PriorTraining(preset="tiny", max_steps=10)  # not used here
        model = sclatent.Model.train(
            train, condition_keys=[label], genes="hvg", vae=vae, prior=prior, vae_batch_size=args.batch_size,
            seed=seed, device="cpu", progress=False,
        )  # fmt: skip
        train_s = time.time() - t0
        model.save(saved)
    genes = model.genes
    cols = {g: i for i, g in enumerate(test.var_names)}
    ref = model.embed(train[:, genes].copy())
    truth = np.asarray(test[:, [cols[g] for g in genes]].X.toarray(), dtype=np.float32)  # (n, G) vocabulary order
    mean_expr = np.asarray(train[:, genes].X.mean(axis=0)).ravel()
    rows = []
    z_full = model.embed(test[:, [cols[g] for g in genes]].copy())
    for selection, frac, keep in panels(genes, mean_expr, seed):
        query = test[:, [cols[genes[j]] for j in keep]].copy()
        z = model.embed(query)
        mapped, loo = knn_accuracy(ref, train.obs[label].to_numpy(), z, test.obs[label].to_numpy())
        ref_panel = model.embed(train[:, [genes[j] for j in keep]].copy()) if len(keep) < len(genes) else ref
        same, _ = knn_accuracy(ref_panel, train.obs[label].to_numpy(), z, test.obs[label].to_numpy())
        row = {
            "dataset": name, "seed": seed, "selection": selection, "fraction": frac, "n_genes": len(keep),
            "knn_map": mapped, "knn_same": same, "knn_loo": loo, **reconstruction(model, z, z_full, truth, keep),
            "train_s": round(train_s, 1),
        }  # fmt: skip
        log.info("%s", row)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def agg(values: list[float]) -> str:
        v = [x for x in values if x == x]
        if not v:
            return "—"
        m = float(np.mean(v))
        return f"{m:.3f}" if len(v) == 1 else f"{m:.3f} [{min(v):.3f}, {max(v):.3f}]"

    out = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for selection, frac in dict.fromkeys((r["selection"], r["fraction"]) for r in rows if r["dataset"] == name):
            group = [r for r in rows if r["dataset"] == name and r["selection"] == selection and r["fraction"] == frac]
            metrics = (
                "knn_map",
                "knn_same",
                "knn_loo",
                "nll_per_gene",
                "nll_full",
                "pcc_present",
                "pcc_full",
                "pcc_absent",
            )
            out.append(
                [name, f"{selection} {int(frac * 100)}%", group[0]["n_genes"], len(group)]
                + [agg([r[k] for r in group]) for k in metrics]
            )
    headers = [
        "dataset", "panel", "genes", "seeds", "kNN map", "(reference on the panel)", "kNN LOO",
        "NLL/gene present", "(full-panel input)",
        "PCC present", "(full-panel input)", "PCC absent",
    ]  # fmt: skip
    return markdown_table(headers, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="pbmc3k,mixology")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--preset", default="default")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--decode-genes", type=int, default=256)
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("bench_panel"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(message)s")
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += run_one(name, seed, args)
            record = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
            (args.workdir / "results.json").write_text(json.dumps(record, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
