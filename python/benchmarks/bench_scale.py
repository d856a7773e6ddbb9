"""`make bench-scale`: every step of the pipeline at 100k, 300k and 1M cells x 20k genes, on a seeded synthetic
count matrix (`sclatent.synthetic.ScaleDataset`: negative-binomial counts, 18 cell types x 90 perturbations).

    python python/benchmarks/bench_scale.py --cells 100000 300000 1000000      # make bench-scale
    python python/benchmarks/bench_scale.py --cells 20000 60000 --genes 5000   # the small version (bench-quick)

Per size N: the input is generated straight to disk (cached in the work folder between runs), then each step runs
as a measured child process (wall time, peak RSS of the child, disk written = size of its outputs):
PREPARE (N cells), TOKENIZE (train + test), SAMPLE (one shard of 2,048 cells like the test cells, with a small model
trained once), GATHER (N generated cells in 10,000-cell shards of 2 replicates, synthetic), EVALUATE (the N input
cells vs the N gathered cells) and REPORT. The slope of log wall time and log peak RSS against log N says how each
step grows (1 = linear, 0 = flat). The training input and the model's step cost are measured once, at the largest
N: the loader alone (batches/s, one process and one rank of 4), the default VAE's and DiT's CPU step time, and the
FLOPs and kernel count of a step (torch's FlopCounterMode), from which the GPU time is projected (labelled so).
Writes results.json into the work folder and the `scale` (or `--section`) section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    REPO,
    child_cpu_seconds,
    child_env,
    dump_json,
    fmt,
    load_average,
    machine_info,
    markdown_table,
    run_child,
)

log = logging.getLogger("bench_scale")

KEYS = "cell_type,perturbation"
STEPS = ("PREPARE", "TOKENIZE", "SAMPLE", "GATHER", "EVALUATE", "REPORT")
SAMPLE_SHARD = 2_048  # cells of the measured SAMPLE shard
GATHER_SHARD = 10_000  # cells per synthetic SAMPLE shard (the pipeline's --sample_shard_size)
# GPU projection: assumptions, not measurements (see the section's text)
H100_BF16_FLOPS = 300e12  # sustained dense bf16 FLOP/s assumed for these small matrices (~30% of the 989 TF peak)
KERNEL_S = 6e-6  # seconds per launched kernel assumed (launch + a short kernel; CUDA graphs would lower it)


def _du_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


class Steps:
    """Runs `sclatent` steps as measured children; keeps one record per step."""

    def __init__(self, logdir: Path, threads: int) -> None:
        self.logdir, self.threads, self.records = logdir, threads, []

    def run(self, step: str, n: int, args: list[Any], outputs: list[Path], **extra: Any) -> dict[str, Any]:
        log_path = self.logdir / f"{step.lower()}_{n}.log"
        before = load_average()
        cmd = [sys.executable, "-m", "sclatent", "-q", *map(str, args)]
        wall, rss, code = run_child(cmd, log_path=log_path, env=child_env(self.threads))
        if code != 0:
            raise RuntimeError(f"{step} at {n} cells failed (exit {code}): {log_path.read_text()[-2000:]}")
        rec = {
            "step": step,
            "n_cells": n,
            "wall_s": round(wall, 2),
            "cpu_s": round(child_cpu_seconds(log_path), 2),
            "peak_rss_mb": round(rss, 1),
            "disk_mb": round(sum(_du_mb(p) for p in outputs if p.exists()), 1),
            "load": f"{before:.1f}→{load_average():.1f}",
            "command": "sclatent " + " ".join(map(str, args)),
            **extra,
        }
        self.records.append(rec)
        log.info(
            "%-9s %9d cells %8.1f s (%.1f CPU s) %8.0f MB RSS %8.0f MB disk  load %s",
            step,
            n,
            wall,
            rec["cpu_s"],
            rss,
            rec["disk_mb"],
            rec["load"],
        )
        return rec


# --------------------------------------------------------------------------------------------------------
# inputs


def make_input(path: Path, n: int, genes: int, genes_per_cell: int, seed: int) -> dict[str, Any]:
    """The synthetic input of N cells (reused when its description matches)."""
    from sclatent.synthetic import ScaleDataset

    meta = path.with_suffix(".json")
    want = {"n_cells": n, "n_genes": genes, "genes_per_cell_target": genes_per_cell, "seed": seed}
    if path.exists() and meta.exists() and {k: json.loads(meta.read_text()).get(k) for k in want} == want:
        return json.loads(meta.read_text())
    t0 = time.perf_counter()
    facts = ScaleDataset(genes, genes_per_cell=genes_per_cell, seed=seed).write(path, n)
    facts.update(want, generate_s=round(time.perf_counter() - t0, 1), file_mb=round(_du_mb(path), 1))
    meta.write_text(json.dumps(facts))
    return facts


def write_generated_shards(folder: Path, real: Path, n: int, replicates: int, seed: int) -> list[Path]:
    """N synthetic generated cells over the real file's flagged genes, as SAMPLE shards (replicates x shards)."""
    import anndata as ad
    import pandas as pd

    from sclatent.ondisk import read_meta
    from sclatent.synthetic import ScaleDataset

    folder.mkdir(parents=True, exist_ok=True)
    meta = read_meta(real)
    genes = list(meta.var_names[meta.var["highly_variable"].to_numpy(bool)])
    ds = ScaleDataset(len(genes), genes_per_cell=min(400, len(genes) // 3), n_flagged=0, seed=seed)
    types = meta.obs["cell_type"].cat.categories
    perts = meta.obs["perturbation"].cat.categories
    if (ds.n_types, ds.n_perturbations) != (len(types), len(perts)):
        raise ValueError(f"{real}: not a ScaleDataset file of {ds.n_types} x {ds.n_perturbations} labels")
    per_rep = n // replicates
    paths = []
    for r in range(replicates):
        rng = np.random.default_rng([seed, r])
        t_codes, p_codes = rng.integers(0, len(types), per_rep), rng.integers(0, len(perts), per_rep)
        for a in range(0, per_rep, GATHER_SHARD):
            b = min(a + GATHER_SHARD, per_rep)
            X = ds.chunk(r * per_rep + a, t_codes[a:b], p_codes[a:b])
            obs = pd.DataFrame(
                {
                    "cell_type": pd.Categorical.from_codes(t_codes[a:b], types),
                    "perturbation": pd.Categorical.from_codes(p_codes[a:b], perts),
                    "generated": True,
                    "replicate": r,
                    "cell_index": np.arange(a, b),
                },
                index=[f"gen{r}_{i}" for i in range(a, b)],
            )
            shard = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
            shard.uns["sclatent"] = {"step": "sample", "seconds": 0.0, "condition_keys": KEYS.split(",")}
            paths.append(folder / f"generated_r{r}_{a}.h5ad")
            shard.write_h5ad(paths[-1])
    return paths


def train_small_model(workdir: Path, genes: int, genes_per_cell: int, steps: Steps) -> Path:
    """A tiny VAE + prior trained for a few steps on 20,000 cells of the same generator: SAMPLE's model."""
    model = workdir / "model.pt"
    if model.exists():
        return model
    small = workdir / "small.h5ad"
    make_input(small, 20_000, genes, genes_per_cell, seed=0)
    sheet = workdir / "small.csv"
    sheet.write_text(f"dataset,h5ad,split,batch,condition_keys\nsmall,{small},all,,cell_type;perturbation\n")
    quiet = [sys.executable, "-m", "sclatent", "-q"]
    for args in (
        ["prepare", "--samplesheet", sheet, "--outdir", workdir / "small_prep"],
        ["tokenize", "--train", workdir / "small_prep/train.h5ad", "--outdir", workdir / "small_tok", "--no-progress"],
        [
            "train-vae",
            "--tokens",
            workdir / "small_tok",
            "--outdir",
            workdir / "small_vae",
            "--preset",
            "tiny",
            "--max-steps",
            "20",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--no-progress",
        ],
        [
            "encode",
            "--model",
            workdir / "small_vae",
            "--tokens",
            workdir / "small_tok",
            "--outdir",
            workdir / "small_enc",
            "--device",
            "cpu",
        ],
        [
            "train-prior",
            "--latents",
            workdir / "small_enc/latents.npz",
            "--outdir",
            workdir / "small_prior",
            "--preset",
            "tiny",
            "--max-steps",
            "20",
            "--device",
            "cpu",
            "--no-progress",
        ],
        ["bundle", "--vae", workdir / "small_vae", "--prior", workdir / "small_prior", "--out", model],
    ):
        subprocess.run(
            [*quiet, *map(str, args)],
            check=True,
            env=child_env(steps.threads),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return model


# --------------------------------------------------------------------------------------------------------
# the steps at one size


def run_size(n: int, args: argparse.Namespace, steps: Steps, model: Path | None) -> dict[str, Any]:
    """The steps `args.steps` at N cells (GATHER runs when EVALUATE or REPORT do: they read its output)."""
    wd, want = args.workdir, set(args.steps)
    data = wd / f"input_{n}.h5ad"
    facts = make_input(data, n, args.genes, args.genes_per_cell, seed=0)
    log.info("input %d cells: %.0f genes per cell, %.0f MB", n, facts["genes_per_cell"], facts["file_mb"])
    sheet = wd / f"sheet_{n}.csv"
    sheet.write_text(f"dataset,h5ad,split,batch,condition_keys\nsyn,{data},all,,cell_type;perturbation\n")
    prep, tok, ev = wd / f"prepare_{n}", wd / f"tokens_{n}", wd / f"evaluate_{n}"
    sample_out, gathered, report = wd / f"sample_{n}.h5ad", wd / f"generated_{n}.h5ad", wd / f"report_{n}.html"
    for p in (prep, tok, ev):
        shutil.rmtree(p, ignore_errors=True)
    try:
        rec = steps.run("PREPARE", n, ["prepare", "--samplesheet", sheet, "--outdir", prep], [prep])
        rec["cells_per_s"] = round(n / rec["wall_s"])
        if want & {"TOKENIZE", "REPORT"}:
            tokenize = ["tokenize", "--train", prep / "train.h5ad", "--test", prep / "test.h5ad", "--outdir", tok]
            rec = steps.run("TOKENIZE", n, [*tokenize, "--no-progress"], [tok])
            rec["cells_per_s"] = round(n / rec["wall_s"])
        if "SAMPLE" in want and model is not None:
            like = ["--like", prep / "test.h5ad", "--shard", f"0:{SAMPLE_SHARD}", "--replicate", "0"]
            cpu = ["--device", "cpu", "--threads", str(args.threads)]
            steps.run(
                "SAMPLE",
                n,
                ["sample", "--model", model, *like, "--out", sample_out, *cpu],
                [sample_out],
                shard_cells=SAMPLE_SHARD,
            )
        if want & {"GATHER", "EVALUATE", "REPORT"}:
            shards = write_generated_shards(wd / f"shards_{n}", data, n, 2, seed=7)
            steps.run("GATHER", n, ["gather", *shards, "--out", gathered], [gathered], shards=len(shards))
            shutil.rmtree(wd / f"shards_{n}")
        if want & {"EVALUATE", "REPORT"}:
            pair = ["--real", data, "--generated", gathered, "--outdir", ev, "--condition-keys", KEYS]
            rec = steps.run("EVALUATE", n, ["evaluate", *pair, "--cells-per-side", str(args.cells_per_side)], [ev])
            rec["cells_used"] = json.loads((ev / "metrics.json").read_text())["cells_used"]
        if "REPORT" in want:
            inputs = ["--real", data, "--generated", gathered, "--metrics", ev / "metrics.json"]
            more = ["--prepare", prep / "prepare.json", "--manifest", tok]
            steps.run("REPORT", n, ["report", "--out", report, *inputs, *more], [report])
    finally:
        if not args.keep:
            for p in (prep, gathered, sample_out, ev, report):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if n != max(args.cells) or args.no_costs:
                shutil.rmtree(tok, ignore_errors=True)
    return {"input_mb": facts["file_mb"], "genes_per_cell": facts["genes_per_cell"], "nnz": facts["nnz"]}


# --------------------------------------------------------------------------------------------------------
# training input and per-step costs (largest size)


def loader_rates(tokens: str, batch: int, n_batches: int) -> dict[str, Any]:
    """Batches/s of the training input alone: collate + tensors with the dense target, one process and one rank of
    4 (its quarter of every batch); and the seconds to load one shard (run in a child)."""
    from sclatent.distributed import shard_rows
    from sclatent.tokens import TokenLoader

    loader = TokenLoader(tokens, "train", batch_size=batch, shuffle=True, seed=0)
    out: dict[str, Any] = {}
    for name, world in (("one process", 1), ("one rank of 4", 4)):
        share = None if world == 1 else (lambda n: shard_rows(n, 0, 4))
        it = loader.iter_shares(0, 0, share)
        next(it)  # the first shard's load
        t, k = time.perf_counter(), 0
        for _, b in it:
            b.to_torch("cpu", dense_target=loader.n_genes)
            k += 1
            if k == n_batches:
                break
        out[name] = k / (time.perf_counter() - t)
    loader._cache = None
    t = time.perf_counter()
    loader.load_shard(0)
    out["shard_load_s"] = time.perf_counter() - t
    out["shard_cells"] = int(loader.shards[0]["n_cells"])
    return out


_VIEWS = {"detach", "view", "_unsafe_view", "t", "expand", "alias", "reshape", "unsqueeze", "squeeze", "permute"}
_VIEWS |= {"transpose", "select", "slice", "split", "split_with_sizes", "as_strided", "empty", "lift_fresh"}


def _measure(fn: Any, repeats: int) -> dict[str, Any]:
    """CPU ms per call, FLOPs (torch's FlopCounterMode) and aten operations that would launch a kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in _VIEWS:
                Ops.n += 1
            return func(*args, **(kwargs or {}))

    fn()
    with FlopCounterMode(display=False) as fc:
        fn()
    with Ops():
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return {"cpu_ms": 1e3 * (time.perf_counter() - t) / repeats, "flops": fc.get_total_flops(), "kernels": Ops.n}


def model_costs(tokens: str, threads: int) -> dict[str, Any]:
    """CPU time, FLOPs and kernels of a default VAE step (batch 128 of these tokens, 512 decoded genes), a default
    DiT step (batch 256) and the sampling of 256 cells (default VAE + DiT, heun 2 steps), untrained (run in a child)."""
    import torch

    from sclatent.flow import flow_matching_loss
    from sclatent.generate import SampleConfig, Sampler
    from sclatent.nn.dit import DiT, DiTConfig
    from sclatent.nn.vae import TransformerVAE, VAEConfig
    from sclatent.tokens import TokenLoader
    from sclatent.train_vae import VAELoss

    torch.set_num_threads(threads)
    loader = TokenLoader(tokens, "train", batch_size=128, shuffle=True, seed=0)
    G = loader.n_genes
    batch = next(loader.iter_epoch(0)).to_torch("cpu", dense_target=G)
    vae = TransformerVAE(VAEConfig.preset("default", G), seed=0)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    loss_fn, gen = VAELoss(G, 512), torch.Generator().manual_seed(0)

    def vae_step() -> None:
        opt.zero_grad()
        loss_fn(vae, batch, gen)[0].backward()
        opt.step()

    out = {"vae_step": _measure(vae_step, 3)}
    out["vae_step"]["tokens_per_cell"] = float(batch["mask"].sum(1).float().mean())
    c = vae.config
    dit = DiT(DiTConfig.preset("default", d_latent=c.d_latent, n_tokens=c.n_latent_tokens, n_classes=[18, 90]))
    opt2 = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    z = torch.randn(256, c.n_latent_tokens, c.d_latent)  # (B, m, dl)
    y = torch.stack([torch.randint(0, 18, (256,)), torch.randint(0, 90, (256,))], 1)  # (B, K)

    def dit_step() -> None:
        opt2.zero_grad()
        flow_matching_loss(dit, z, y, gen, 0.2).backward()
        opt2.step()

    out["dit_step"] = _measure(dit_step, 3)

    class Bundle:  # what Sampler reads of a model bundle
        def to(self, device: Any) -> Bundle:
            return self

    b = Bundle()
    b.vae, b.prior = vae.eval(), dit.eval()
    b.genes, b.condition_keys = [f"g{i}" for i in range(G)], ["cell_type", "perturbation"]
    b.labels = {"cell_type": [str(i) for i in range(18)], "perturbation": [str(i) for i in range(90)]}
    stat = {"mean": 7.0, "sd": 0.4}
    b.library_size = {"marginal": stat, "per_key": {k: {v: stat for v in vs} for k, vs in b.labels.items()}}
    b.latent_mean, b.latent_std = torch.zeros(c.n_latent_tokens, c.d_latent), torch.ones(c.n_latent_tokens, c.d_latent)
    sampler = Sampler(b, SampleConfig(batch_size=256), torch.device("cpu"))
    codes = np.zeros((256, 2), dtype=np.int64)
    out["sample_256_cells"] = _measure(lambda: sampler.generate(codes, None, None), 2)
    return out


def _in_child(call: str, log_path: Path, threads: int) -> tuple[dict[str, Any], float]:
    """Run `call` (an expression over this module's functions) in a measured child; (its result, peak RSS MB)."""
    code = f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import bench_scale as b; print(json.dumps(b.{call}))"
    wall, rss, rc = run_child([sys.executable, "-c", code], log_path=log_path, env=child_env(threads))
    text = log_path.read_text()
    if rc != 0:
        raise RuntimeError(f"child failed (exit {rc}): {text[-2000:]}")
    return json.loads(text.strip().splitlines()[-1]), rss


def step_costs(tokens: Path, args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    loader, rss = _in_child(
        f"loader_rates({str(tokens)!r}, 128, {args.loader_batches})", logdir / "loader.log", args.threads
    )
    cost, _ = _in_child(f"model_costs({str(tokens)!r}, {args.threads})", logdir / "cost.log", args.threads)
    return {"loader": {**loader, "peak_rss_mb": round(rss, 1)}, "cost": cost}


def project(cost: dict[str, Any]) -> dict[str, float]:
    """GPU time of a step from its FLOPs and kernel count (assumptions H100_BF16_FLOPS and KERNEL_S)."""
    return {
        "flop_bound_ms": 1e3 * cost["flops"] / H100_BF16_FLOPS,
        "launch_bound_ms": 1e3 * cost["kernels"] * KERNEL_S,
        "projected_ms": 1e3 * max(cost["flops"] / H100_BF16_FLOPS, cost["kernels"] * KERNEL_S),
    }


# --------------------------------------------------------------------------------------------------------
# report


def _slope(x: list[float], y: list[float]) -> float:
    if len(x) < 2:
        return float("nan")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def render(res: dict[str, Any], level: int = 2) -> str:
    """The markdown of one run (`level`: the heading level of its title)."""
    m = res["machine"]
    out = [
        f"{'#' * level} `{res['title']}`",
        "",
        f"{m.get('date_utc', '')}, {m.get('cpu', '')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM, commit "
        f"{m.get('git_commit', '')[:10]}{' (uncommitted changes)' if m.get('git_dirty') else ''}; "
        f"command `{res['command']}`; children run at `nice -n 10` on a "
        "machine shared with other work (the load average is printed per row): CPU s (user + system of the child) "
        "is the figure to read when the load exceeds the 2 cores.",
        "",
        f"Input: `ScaleDataset` x {res['genes']:,} genes (seed 0), target {res['genes_per_cell']} expressed genes per "
        "median cell; the rows give the measured mean. Disk = size of the step's outputs.",
        "",
    ]
    rows = []
    for r in res["steps"]:
        size = res["sizes"][str(r["n_cells"])]
        extra = f"{fmt(r['cells_per_s'])} cells/s" if r.get("cells_per_s") else ""
        if r["step"] == "EVALUATE":
            cu = r.get("cells_used", {})
            extra = (
                f"{cu.get('real', ['?'])[0]:,} real + {sum(v[0] for v in cu.get('generated', {}).values()):,} gen. read"
            )
        if r["step"] == "GATHER":
            extra = f"{r['shards']} shards"
        if r["step"] == "SAMPLE":
            extra = f"{r['shard_cells']:,}-cell shard"
        rows.append(
            [
                f"{r['n_cells']:,}",
                f"{size['genes_per_cell']:.0f}",
                r["step"],
                f"{r['wall_s']:,.1f}",
                fmt(r.get("cpu_s"), digits=4),
                f"{r['peak_rss_mb']:,.0f}",
                f"{r['disk_mb']:,.0f}",
                extra,
                r["load"],
            ]
        )
    headers = ["cells", "genes/cell", "step", "wall s", "CPU s", "peak RSS MB", "disk MB", "", "load"]
    out += [markdown_table(headers, rows), ""]
    slopes = []
    for step in dict.fromkeys(r["step"] for r in res["steps"]):
        rs = [r for r in res["steps"] if r["step"] == step]
        n = [r["n_cells"] for r in rs]
        slopes.append(
            [
                step,
                fmt(_slope(n, [r["wall_s"] for r in rs]), digits=2),
                fmt(_slope(n, [r.get("cpu_s", float("nan")) for r in rs]), digits=2),
                fmt(_slope(n, [r["peak_rss_mb"] for r in rs]), digits=2),
                fmt(_slope(n, [max(r["disk_mb"], 0.01) for r in rs]), digits=2),
            ]
        )
    out += [
        "Growth with N (log-log slope: 1 = linear, 0 = flat):",
        "",
        markdown_table(["step", "wall time", "CPU time", "peak RSS", "disk"], slopes),
        "",
    ]
    sc = res.get("costs")
    if sc:
        ld, cost = sc["loader"], sc["cost"]
        out += [
            f"Training input and step cost ({res['costs_at']:,}-cell tokens, {res['threads']} thread(s)); the GPU "
            f"columns are **projections**, not measurements: max(FLOPs / {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s, "
            f"kernels x {KERNEL_S * 1e6:.0f} µs), both assumed for an H100 (no GPU was used).",
            "",
        ]
        rows = []
        for name, key, per in (
            ("TRAIN_VAE step (default, batch 128, 512 decoded genes)", "vae_step", None),
            ("TRAIN_PRIOR step (default DiT, batch 256)", "dit_step", None),
            ("SAMPLE 256 cells (default VAE + DiT, heun 2)", "sample_256_cells", 256),
        ):
            c = cost[key]
            p = project(c)
            rows.append(
                [
                    name,
                    f"{c['cpu_ms']:,.0f}",
                    f"{c['flops'] / 1e9:,.1f}",
                    f"{c['kernels']:,}",
                    f"{p['projected_ms']:,.2f}",
                ]
            )
        out += [markdown_table(["step", "CPU ms (measured)", "GFLOP", "kernels", "H100 ms (projected)"], rows), ""]
        vae_ms = project(cost["vae_step"])["projected_ms"]
        s_ms = project(cost["sample_256_cells"])["projected_ms"]
        out += [
            f"Loader alone (measured, batch 128, collate + tensors with the dense target): "
            f"{ld['one process']:,.1f} batches/s in one process, {ld['one rank of 4']:,.1f} batches/s for one rank "
            f"of 4 (its quarter of each batch); a {ld['shard_cells']:,}-cell shard loads in "
            f"{ld['shard_load_s']:.1f} s. "
            f"Against the projected {vae_ms:.1f} ms per VAE step ({1e3 / vae_ms:,.0f} steps/s) the loader of one "
            f"process {'keeps up' if ld['one process'] >= 1e3 / vae_ms else 'does not keep up'} "
            f"({ld['one process'] * vae_ms / 1e3:.2f} batches per step time).",
            f"Projected SAMPLE of 1M cells on one H100: {1e6 / 256 * s_ms / 1e3 / 60:.1f} min (decode and DiT only; "
            "one process).",
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--genes-per-cell", type=int, default=700, help="expressed genes of a median cell")
    ap.add_argument("--cells-per-side", type=int, default=50_000, help="EVALUATE's cap")
    ap.add_argument("--loader-batches", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench-scale")
    ap.add_argument("--keep", action="store_true", help="keep every step's outputs (inputs are always kept)")
    ap.add_argument("--no-costs", action="store_true", help="skip the loader and step-cost measurements")
    ap.add_argument("--section", default="scale", help="the marker section of BENCHMARKS.md to write")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma list of the steps to run")
    ap.add_argument("--render", type=Path, default=None, help="only write the section of a saved results.json")
    args = ap.parse_args(argv)
    if args.render is not None:
        res = json.loads(args.render.read_text())
        if not args.no_write:
            from bench_report import update_benchmarks_md

            update_benchmarks_md(args.out, args.section, render(res))
        return res
    args.steps = [x.strip().upper() for x in args.steps.split(",") if x.strip()]
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown} (known: {', '.join(STEPS)})")
    logging.basicConfig(
        level=logging.INFO, format="[scale %(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    args.cells = sorted(args.cells)
    args.workdir.mkdir(parents=True, exist_ok=True)
    logdir = args.workdir / "logs"
    steps = Steps(logdir, args.threads)
    model = train_small_model(args.workdir, args.genes, args.genes_per_cell, steps) if "SAMPLE" in args.steps else None
    sizes = {str(n): run_size(n, args, steps, model) for n in args.cells}
    costs = None if args.no_costs else step_costs(args.workdir / f"tokens_{args.cells[-1]}", args, logdir)
    if not args.keep:
        shutil.rmtree(args.workdir / f"tokens_{args.cells[-1]}", ignore_errors=True)
    command = "python python/benchmarks/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    title = "make bench-scale" if args.section == "scale" else f"bench_scale.py ({args.section})"
    res = {
        "title": title,
        "command": command,
        "machine": machine_info(),
        "genes": args.genes,
        "genes_per_cell": args.genes_per_cell,
        "threads": args.threads,
        "sizes": sizes,
        "steps": steps.records,
        "costs": costs,
        "costs_at": args.cells[-1],
    }
    dump_json(res, args.workdir / "results.json")
    section = render(res)
    print(section)
    if not args.no_write:
        from bench_report import update_benchmarks_md

        update_benchmarks_md(args.out, args.section, section)
    return res


if __name__ == "__main__":
    main()
