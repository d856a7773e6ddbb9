"""How the VAE's cost grows: training-step time and memory against the number of genes and tokens per cell.

    python python/benchmarks/bench_scaling.py --genes 1000 2000 5000 10000 20000 --tokens 128 256 512 1024 2048

Each point runs in a fresh child process (so that its peak RSS is its own): a VAE of the given preset over G
genes, a synthetic batch of B cells with exactly S expressed genes each (distinct random genes, counts
1 + Poisson(1.5)), then `steps` timed optimiser steps of the TRAIN_VAE loss (`train_vae.VAELoss`: encode the S
tokens, decode a random subset of `decode_genes` genes per cell, NB NLL, backward, AdamW) after one warm-up
step, and one full decode over all G genes of 16 cells (what ENCODE and SAMPLE do per cell). Reported: ms per
training step, cells/s, ms per cell of the full decode, peak RSS of the child and its RSS right after imports.
Gene scaling holds S fixed; token scaling holds G fixed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

DECODE_CELLS = 16  # cells of the timed full decode (bounds its cost at 20k genes)


def _rss_mb() -> float:
    """Current resident set size of this process (MB), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_point(
    n_genes: int, n_tokens: int, *, preset: str, batch: int, steps: int, decode_genes: int, seed: int, device: str
) -> dict[str, Any]:
    """One point, in this process (the child side): see the module docstring."""
    import torch

    from sclatent.allocator import tune_malloc
    from sclatent.nn.vae import TransformerVAE, VAEConfig
    from sclatent.train_vae import VAELoss

    tune_malloc()  # as the `sclatent` command does
    rss_imports = _rss_mb()
    if n_tokens > n_genes:
        raise ValueError(f"tokens per cell ({n_tokens}) cannot exceed the number of genes ({n_genes})")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    genes = torch.rand((batch, n_genes), generator=gen).topk(n_tokens, dim=1).indices + 1  # (B, S) ids 1..G
    counts = 1.0 + torch.poisson(torch.full((batch, n_tokens), 1.5), generator=gen)  # (B, S)
    target = torch.zeros((batch, n_genes))  # (B, G)
    target.scatter_(1, genes - 1, counts)
    data = {
        "genes": genes.to(dev),
        "counts": counts.to(dev),
        "mask": torch.ones((batch, n_tokens), dtype=torch.bool, device=dev),
        "library_size": counts.sum(dim=1).to(dev),
        "target": target.to(dev),
    }
    model = TransformerVAE(VAEConfig.preset(preset, n_genes), seed=seed).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = VAELoss(n_genes, decode_genes)
    step_gen = torch.Generator(device=dev).manual_seed(seed)

    def step() -> None:
        loss, _ = loss_fn(model, data, step_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    nd = min(batch, DECODE_CELLS)
    with torch.no_grad():
        mu, _ = model.encode(data["genes"][:nd], data["counts"][:nd], data["mask"][:nd])  # (nd, m, dl)
        start = time.perf_counter()
        lik = model.decode(mu, torch.arange(1, n_genes + 1, device=dev), data["library_size"][:nd])  # over (nd, G)
        _ = lik.mean.sum().item()
        decode_s = time.perf_counter() - start
    out = {
        "genes": n_genes,
        "tokens": n_tokens,
        "batch": batch,
        "preset": preset,
        "decode_genes": decode_genes,
        "step_ms": step_s * 1e3,
        "cells_per_s": batch / step_s,
        "full_decode_ms_per_cell": decode_s * 1e3 / nd,
        "rss_after_imports_mb": rss_imports,
        "device": str(dev),
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_scaling(
    genes: Sequence[int],
    tokens: Sequence[int],
    *,
    fixed_tokens: int,
    fixed_genes: int,
    preset: str,
    batch: int,
    steps: int,
    decode_genes: int,
    threads: int,
    logdir: Path,
    device: str = "auto",
    deadline_s: float | None = None,
    children: bool = True,
) -> dict[str, Any]:
    """All points: {"genes": rows at S = fixed_tokens, "tokens": rows at G = fixed_genes}.

    Each point runs in a child process (its own peak RSS), or in this process with children=False (no RSS).
    """
    from common import child_env, load_average, run_child

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    out: dict[str, Any] = {
        "genes": [],
        "tokens": [],
        "skipped": [],
        "fixed_tokens": fixed_tokens,
        "fixed_genes": fixed_genes,
        "preset": preset,
        "batch": batch,
        "steps": steps,
        "decode_genes": decode_genes,
        "device": device,
    }
    points = [("genes", g, min(fixed_tokens, g)) for g in genes] + [("tokens", fixed_genes, s) for s in tokens]
    for axis, g, s in points:
        if deadline_s is not None and time.perf_counter() - start > deadline_s:
            out["skipped"].append(f"{axis}: G={g}, S={s} (budget)")
            continue
        if not children:
            before = load_average()
            row = measure_point(
                g, s, preset=preset, batch=batch, steps=steps, decode_genes=decode_genes, seed=0, device=device
            )
            row.update(peak_rss_mb=None, load=f"{before:.1f}→{load_average():.1f}", wall_s=None)
            out[axis].append(row)
            continue
        result = logdir / f"scaling_{axis}_{g}_{s}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "--genes",
            str(g),
            "--tokens",
            str(s),
            "--preset",
            preset,
            "--batch",
            str(batch),
            "--steps",
            str(steps),
            "--decode-genes",
            str(decode_genes),
            "--device",
            device,
            "--json",
            str(result),
        ]
        before = load_average()
        wall, rss, code = run_child(cmd, log_path=logdir / f"scaling_{axis}_{g}_{s}.log", env=child_env(threads))
        if code != 0:
            out["skipped"].append(f"{axis}: G={g}, S={s} failed (exit {code}, log {logdir}/scaling_{axis}_{g}_{s}.log)")
            continue
        row = json.loads(result.read_text())
        row.update(peak_rss_mb=rss, load=f"{before:.1f}→{load_average():.1f}", wall_s=wall)
        out[axis].append(row)
        log.info("scaling G=%d S=%d: %.0f ms/step, %.0f MB", g, s, row["step_ms"], rss)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: all points (default) or one point in this process (--child)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, nargs="+", default=[1_000, 2_000, 5_000, 10_000, 20_000])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 512, 1_024, 2_048])
    ap.add_argument("--fixed-tokens", type=int, default=512, help="tokens per cell of the gene scaling")
    ap.add_argument("--fixed-genes", type=int, default=10_000, help="genes of the token scaling")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--decode-genes", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help="measure one point (--genes G --tokens S) here")
    ap.add_argument("--json", type=Path, default=None, help="write the result(s) here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", args.threads)))
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        row = measure_point(
            args.genes[0],
            args.tokens[0],
            preset=args.preset,
            batch=args.batch,
            steps=args.steps,
            decode_genes=args.decode_genes,
            seed=args.seed,
            device=device,
        )
        text = json.dumps(row)
        if args.json:
            args.json.write_text(text)
        else:
            sys.stdout.write(text + "\n")
        return
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory() as tmp:
        res = run_scaling(
            args.genes,
            args.tokens,
            fixed_tokens=args.fixed_tokens,
            fixed_genes=args.fixed_genes,
            preset=args.preset,
            batch=args.batch,
            steps=args.steps,
            decode_genes=args.decode_genes,
            threads=args.threads,
            logdir=Path(tmp),
            device=args.device,
        )
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
