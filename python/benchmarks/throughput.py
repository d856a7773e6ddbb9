"""Step throughput of the models on synthetic batches (no data loading): VAE training, DiT training, sampling.

    python python/benchmarks/throughput.py [--device cpu|cuda] [--genes 2000] [--tokens 800] [--json out.json]

Rows:
- vae_train: cells/s of one optimiser step (forward + backward + AdamW) of the VAE at a preset, G genes,
  ~`tokens` expressed genes per cell, decoding Q genes per cell (Q = all or a subset), fp32 or bf16 autocast;
- prior_train: samples/s of one DiT optimiser step (flow-matching loss);
- sample: cells/s end to end (ODE with guidance at a given NFE + decoding all genes + NB draws).
Each is the median of `--repeats` timed steps after warm-up; CUDA timings are synchronised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def token_batch(B: int, G: int, S: int, device, gen: torch.Generator):
    """B cells with S expressed genes each (distinct ids), counts 1 + Poisson(1.5), dense (B, G) target."""
    keys = torch.rand((B, G), generator=gen)
    genes = keys.topk(S, dim=1).indices + 1  # (B, S)
    counts = 1 + torch.poisson(torch.full((B, S), 1.5), generator=gen)
    target = torch.zeros((B, G))
    target.scatter_(1, genes - 1, counts)
    mask = torch.ones((B, S), dtype=torch.bool)
    return {
        k: v.to(device)
        for k, v in dict(genes=genes, counts=counts, mask=mask, library_size=target.sum(1), target=target).items()
    }


def bench_vae(preset: str, G: int, S: int, Q: int, B: int, device, bf16: bool, repeats: int) -> dict:
    from sclatent.nn.vae import TransformerVAE, VAEConfig
    from sclatent.train_vae import VAELoss

    model = TransformerVAE(VAEConfig.preset(preset, G)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batch = token_batch(B, G, S, device, gen)
    lgen = torch.Generator(device=device).manual_seed(0)
    loss_fn = VAELoss(G, Q)

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(model, batch, lgen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec = _time(step, device, repeats)
    return {
        "bench": "vae_train",
        "preset": preset,
        "genes": G,
        "tokens": S,
        "decode_genes": Q if 0 < Q < G else G,
        "batch": B,
        "bf16": bf16,
        "step_s": round(sec, 4),
        "cells_per_s": round(B / sec, 1),
    }


def bench_prior(preset: str, B: int, device, bf16: bool, repeats: int, m: int = 16, dl: int = 16) -> dict:
    from sclatent.flow import flow_matching_loss
    from sclatent.nn.dit import DiT, DiTConfig

    model = DiT(DiTConfig.preset(preset, dl, m, [10])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn((B, m, dl), device=device)
    labels = torch.randint(0, 10, (B, 1), device=device)

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(model, z, labels, gen, 0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec = _time(step, device, repeats)
    return {
        "bench": "prior_train",
        "preset": preset,
        "batch": B,
        "bf16": bf16,
        "step_s": round(sec, 4),
        "samples_per_s": round(B / sec, 1),
    }


@torch.no_grad()
def bench_sample(
    vae_preset: str,
    prior_preset: str,
    G: int,
    B: int,
    device,
    method: str,
    n_steps: int,
    w: float,
    repeats: int,
    bf16: bool = False,
) -> dict:
    from sclatent.flow import guided_velocity, sample
    from sclatent.inference import decode_chunks
    from sclatent.nn.dit import DiT, DiTConfig
    from sclatent.nn.vae import TransformerVAE, VAEConfig

    vae = TransformerVAE(VAEConfig.preset(vae_preset, G)).to(device).eval()
    c = vae.config
    prior = DiT(DiTConfig.preset(prior_preset, c.d_latent, c.n_latent_tokens, [10])).to(device).eval()
    # a trained prior is not needed for timing fixed-step samplers; dopri5's NFE depends on the model
    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, 10, (B, 1), device=device)
    genes = torch.arange(1, G + 1, device=device)
    info = {}

    def run():
        x0 = torch.randn((B, c.n_latent_tokens, c.d_latent), generator=gen, device=device)
        v = guided_velocity(prior, labels, guidance="joint", w=w, autocast=bf16)
        z, nfe = sample(v, x0, method=method, n_steps=n_steps)
        info["nfe"] = nfe
        lib = torch.full((B,), 2000.0, device=device)
        for rows in decode_chunks(B, device):  # as SAMPLE (generate.Sampler.decode) does
            vae.decode(z[rows], genes, lib[rows]).sample(gen)  # fp32, as SAMPLE

    sec = _time(run, device, repeats, warmup=1)
    return {
        "bench": "sample",
        "vae": vae_preset,
        "prior": prior_preset,
        "genes": G,
        "batch": B,
        "method": method,
        "n_steps": n_steps,
        "cfg_scale": w,
        "bf16": bf16,
        "nfe": info["nfe"],
        "batch_s": round(sec, 4),
        "cells_per_s": round(B / sec, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a few rows only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from sclatent.allocator import tune_malloc

    tune_malloc()  # as the `sclatent` command does, so these rows time what the pipeline runs
    device = torch.device(args.device)
    G, S = args.genes, args.tokens
    bf16s = [False, True]
    rows = []
    vae_cases = (
        [("tiny", 512), ("default", 512), ("default", 0)]
        if args.quick
        else [("tiny", 512), ("tiny", 0), ("default", 128), ("default", 256), ("default", 512), ("default", 0)]
    )
    batches = [128] if device.type == "cpu" else [128, 512]
    for (preset, Q), bf16, B in ((c, b, bb) for c in vae_cases for b in bf16s for bb in batches):
        rows.append(bench_vae(preset, G, S, Q, B, device, bf16, args.repeats))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for preset, bf16 in ((p, b) for p in ("tiny", "default") for b in bf16s):
        rows.append(bench_prior(preset, 256, device, bf16, args.repeats))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    sample_cases = [("heun", 2), ("heun", 4)] if args.quick else [("euler", 4), ("heun", 2), ("heun", 4), ("heun", 8)]
    for (method, n), bf16 in ((c, b) for c in sample_cases for b in bf16s):
        for w in (1.0, 2.0):
            rows.append(
                bench_sample(
                    "default",
                    "default",
                    G,
                    512 if device.type == "cpu" else 4096,
                    device,
                    method,
                    n,
                    w,
                    max(2, args.repeats // 2),
                    bf16=bf16,
                )
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    meta = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
    }
    out = {"meta": meta, "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
