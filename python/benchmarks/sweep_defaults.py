"""Evidence for the defaults: full runs (VAE -> ENCODE -> prior -> SAMPLE -> EVALUATE) over a grid of settings.

    python python/benchmarks/sweep_defaults.py --data DIR --out results.jsonl [--workers 6] [--grid vae|prior|sampler|all]

DIR holds one folder per dataset with PREPARE's `train.h5ad` and `test.h5ad` (e.g. from
`sclatent prepare`; `make_inputs` below builds them from ../shared/datasets). Each grid point is one JSON line
with its settings, reconstruction metrics (ENCODE), generation metrics (EVALUATE: mean over replicates, the
real-vs-real floor and the matched-size model row) and timings. Grid points run as parallel processes (each
with its own torch threads), which keeps a GPU busy with these small models.

Grids:
- vae: token embedding (concat / multiplicative), deterministic vs variational (beta), decoded genes per step;
  each followed by the default prior and sampler.
- prior: label-dropout rho, EMA vs raw weights for sampling, latent standardisation, on the default VAE.
- sampler: euler / heun step counts and guidance weights vs dopri5 (atol = rtol = 1e-5), on one trained model.
- steps: VAE training length (optimiser steps) x token embedding.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path


def make_inputs(shared: Path, out: Path, seed: int = 0) -> None:
    """PREPARE pbmc3k (cell_type) and sc_mixology singlets (cell_line x protocol), 2,000 HVGs, restricted to
    the HVGs (the model genes) to keep the files small."""
    import anndata as ad

    from sclatent.io import SampleRow
    from sclatent.prepare import PrepareConfig, prepare

    mix = ad.read_h5ad(shared / "sc_mixology_celllines_counts.h5ad")
    mix = mix[mix.obs["demuxlet_call"] == "SNG"].copy()
    mix.obs = mix.obs[["cell_line", "protocol"]].copy()
    tmp = out / "_mixology_singlets.h5ad"
    out.mkdir(parents=True, exist_ok=True)
    mix.write_h5ad(tmp)
    jobs = {
        "pbmc": (shared / "pbmc3k_counts_celltype.h5ad", ["cell_type"]),
        "mixology": (tmp, ["cell_line", "protocol"]),
    }
    for name, (path, keys) in jobs.items():
        cfg = PrepareConfig(dataset=name, condition_keys=keys, n_hvg=2000, min_cells=3, seed=seed)
        prepare([SampleRow(1, name, str(path), "all", None)], cfg, out / name)
        for split in ("train", "test"):
            a = ad.read_h5ad(out / name / f"{split}.h5ad")
            a = a[:, a.var["highly_variable"].to_numpy()].copy()
            a.write_h5ad(out / name / f"{split}.h5ad", compression="gzip")
    tmp.unlink()


def _run_point(args: tuple[dict, str, str, int]) -> dict:
    point, data_dir, work_dir, threads = args
    import torch

    torch.set_num_threads(threads)
    try:
        return run_point(point, Path(data_dir), Path(work_dir))
    except Exception as exc:  # report, do not stop the sweep
        return {**point, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}


def run_point(p: dict, data_dir: Path, work: Path) -> dict:
    """One grid point; re-uses a trained VAE / prior of an identical earlier point (by folder name)."""
    from sclatent.encode import encode
    from sclatent.evaluate import run_evaluate
    from sclatent.generate import SampleConfig, run_sample
    from sclatent.tokens import tokenize
    from sclatent.train import TrainConfig
    from sclatent.train_prior import PriorRunConfig, train_prior
    from sclatent.train_vae import VAERunConfig, train_vae
    from sclatent.generate import gather

    ds = data_dir / p["dataset"]
    seed = p["seed"]
    dev = p.get("device", "auto")
    t = {}
    tok = work / f"{p['dataset']}_tokens"
    if not (tok / "manifest.json").exists():
        tokenize(ds / "train.h5ad", tok, test_path=ds / "test.h5ad", genes="all", max_tokens=4096, progress=False)
    vae_tag = (f"{p['dataset']}_vae{p.get('vae_preset', 'default')}_{p['embedding']}_{'var' + str(p['beta']) if p['variational'] else 'det'}"
               f"_q{p['decode_genes']}_e{p['vae_epochs']}_n{p.get('vae_steps')}_s{seed}")
    vae_dir = work / vae_tag
    t0 = time.time()
    if not (vae_dir / "done").exists():
        overrides = {"embedding": p["embedding"], "variational": p["variational"], "beta": p["beta"]}
        run = VAERunConfig(preset=p.get("vae_preset", "default"), model_overrides=overrides, epochs=p["vae_epochs"],
                           max_steps=p.get("vae_steps"), decode_genes=p["decode_genes"])
        tc = TrainConfig(max_steps=1, batch_size=128, lr=1e-3, betas=(0.9, 0.95), seed=seed, device=dev, checkpoint_every=10**9)
        train_vae(tok, vae_dir, run, tc, progress=False)
        encode(vae_dir, tok, vae_dir / "enc", seed=seed, device=dev)
        (vae_dir / "done").touch()
    t["vae_s"] = time.time() - t0
    recon = json.loads((vae_dir / "enc" / "reconstruction.json").read_text())["metrics"]
    prior_tag = f"{vae_tag}_prior{p.get('prior_preset', 'default')}_rho{p['rho']}_std{int(p['standardize'])}_e{p['prior_epochs']}_n{p.get('prior_steps')}"
    prior_dir = work / prior_tag
    t0 = time.time()
    if not (prior_dir / "done").exists():
        run = PriorRunConfig(preset=p.get("prior_preset", "default"), epochs=p["prior_epochs"], max_steps=p.get("prior_steps"),
                             rho=p["rho"], standardize=p["standardize"])
        tc = TrainConfig(max_steps=1, batch_size=256, lr=5e-4, betas=(0.9, 0.999), decay_frac=1.0, decay_shape="cosine",
                         ema_decay=0.999, seed=seed, device=dev, checkpoint_every=10**9)
        train_prior(vae_dir / "enc" / "latents.npz", prior_dir, run, tc, progress=False)
        (prior_dir / "done").touch()
    t["prior_s"] = time.time() - t0
    sample_tag = f"{prior_tag}_{p['prior_kind']}_{p['guidance']}{p['cfg_scale']}_{p['method']}{p['n_steps']}_{p['weights']}"
    out = work / sample_tag
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    files = []
    nfe = None
    for r in range(p["replicates"]):
        cfg = SampleConfig(guidance=p["guidance"], cfg_scale=p["cfg_scale"], method=p["method"], n_steps=p["n_steps"],
                           seed=seed, replicate=r, prior=p["prior_kind"], weights=p["weights"], batch_size=1024)
        f = out / f"g{r}.h5ad"
        a = run_sample(vae_dir, prior_dir if p["prior_kind"] == "ldm" else None, f, cfg, like=str(ds / "test.h5ad"), device=dev)
        nfe = float(a.uns["sclatent"]["nfe_per_batch"])
        files.append(f)
    gather(files, out / "gen.h5ad")
    t["sample_s"] = time.time() - t0
    t0 = time.time()
    res = run_evaluate(ds / "test.h5ad", out / "gen.h5ad", out / "eval", seed=seed)
    t["evaluate_s"] = time.time() - t0
    gen = {m: v["mean"] for m, v in res["generation"]["overall"].items()}
    per_class = {g: {m: v["mean"] for m, v in e.items() if isinstance(v, dict)} for g, e in res["generation"]["per_class"].items()}
    labels = {k: {m: v["mean"] for m, v in e.items()} for k, e in res["generation"]["labels"].items()}
    hist = (vae_dir / "history.csv").read_text().splitlines()
    cps = [float(line.split(",")[-2]) for line in hist[2:]]
    return {
        **p,
        "recon": recon,
        "gen": gen,
        "gen_per_class": per_class,
        "gen_labels": labels,
        "floor": res["real_vs_real"]["overall"] if res.get("real_vs_real") else None,
        "gen_half": res["generated_vs_real_half"]["overall"] if res.get("generated_vs_real_half") else None,
        "nfe": nfe,
        "vae_cells_per_s": sum(cps) / len(cps) if cps else None,
        "times": t,
        "device": "cuda" if __import__("torch").cuda.is_available() else "cpu",
    }


BASE = dict(
    embedding="concat", variational=False, beta=0.0, decode_genes=512, vae_epochs=100, rho=0.2, standardize=True,
    prior_epochs=200, prior_kind="ldm", guidance="joint", cfg_scale=1.0, method="dopri5", n_steps=0, weights="auto",
    replicates=2,
)


def grid(name: str, datasets: list[str], seeds: list[int]) -> list[dict]:
    pts = []
    for ds, seed in itertools.product(datasets, seeds):
        b = {**BASE, "dataset": ds, "seed": seed}
        if name == "steps":  # training length x token embedding
            pts += [{**b, "vae_steps": n, "embedding": e} for n in (200, 1500) for e in ("concat", "multiplicative")]
        if name in ("vae", "all"):
            pts += [
                {**b},
                {**b, "embedding": "multiplicative"},
                {**b, "variational": True, "beta": 1e-3},
                {**b, "variational": True, "beta": 1e-2},
                {**b, "decode_genes": 0},
                {**b, "prior_kind": "gaussian"},
            ]
        if name in ("prior", "all"):
            pts += [
                {**b, "rho": 0.5},
                {**b, "rho": 0.1},
                {**b, "weights": "model"},
                {**b, "standardize": False},
            ]
        if name in ("sampler", "all"):
            pts += [{**b, "method": m, "n_steps": n} for m, n in (("euler", 8), ("euler", 16), ("euler", 32), ("heun", 4), ("heun", 8), ("heun", 16))]
            pts += [{**b, "cfg_scale": w} for w in (1.5, 2.0, 3.0)]
            if ds == "mixology":
                pts += [{**b, "guidance": "additive"}, {**b, "guidance": "additive", "cfg_scale": 2.0}]
    # identical points only once
    seen, out = set(), []
    for p in pts:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("sweep_work"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--grid", default="all", choices=["vae", "prior", "sampler", "steps", "all"])
    ap.add_argument("--datasets", default="pbmc,mixology")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--make-inputs", type=Path, default=None, help="build --data from this shared/datasets folder first")
    ap.add_argument("--set", action="append", default=[], help="override a BASE setting, e.g. --set vae_epochs=20")
    args = ap.parse_args()
    if args.make_inputs:
        make_inputs(args.make_inputs, args.data)
    for item in args.set:
        k, v = item.split("=", 1)
        BASE[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") or v.startswith("-") else v
    points = grid(args.grid, args.datasets.split(","), [int(s) for s in args.seeds.split(",")])
    args.work.mkdir(parents=True, exist_ok=True)
    # points sharing a VAE (or a prior) must not train it concurrently: stage 1 trains each VAE once, stage 2
    # each remaining prior once, stage 3 only samples and evaluates
    def vae_key(p):
        return (p["dataset"], p["seed"], p["embedding"], p["variational"], p["beta"], p["decode_genes"], p["vae_epochs"], p.get("vae_steps"))

    def prior_key(p):
        return (*vae_key(p), p["rho"], p["standardize"], p["prior_epochs"], p.get("prior_steps"))

    stages: list[list[dict]] = [[], [], []]
    seen_v, seen_p = set(), set()
    for p in points:
        if vae_key(p) not in seen_v:
            stages[0].append(p)
        elif prior_key(p) not in seen_p:
            stages[1].append(p)
        else:
            stages[2].append(p)
        seen_v.add(vae_key(p))
        seen_p.add(prior_key(p))
    t0 = time.time()
    print(f"{len(points)} points ({len(stages[0])} VAEs) on {args.workers} workers", file=sys.stderr)
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool, open(args.out, "a") as fh:
        for stage in stages:
            for res in pool.imap_unordered(_run_point, [(p, str(args.data), str(args.work), args.threads) for p in stage]):
                fh.write(json.dumps(res) + "\n")
                fh.flush()
                g = res.get("gen", {})
                print(f"[{time.time() - t0:6.0f}s] {res['dataset']} s{res['seed']} {res.get('error', '')[:200]} "
                      f"W2={g.get('w2', float('nan')):.3f} MMD={g.get('mmd2_rbf', float('nan')):.3f} "
                      f"PCC={res.get('recon', {}).get('pcc_gene_batch256_sample', float('nan'))}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
