"""Unseen combinations: which prior, guidance and generation route reaches the held-out cells (decision 0020).

    python python/benchmarks/bench_heldout.py --dataset sc_mixology --seed 0 --workdir /tmp/heldout

For one dataset with held-out combinations (PREPARE --holdout) and one seed: PREPARE, TOKENIZE, TRAIN_VAE and
ENCODE once; then every prior variant of `--priors` (label-dropout scheme and rate, training steps) is trained on
the same latents; every generation route of `--routes` is run with every prior (generation from noise like the
test cells, with joint or additive guidance and weight w; or counterfactual transfer of the training cells of the
same first-key value, e.g. the same cell line under the other protocol); and scVI with the keys as categorical
covariates gets our training wall time. Each result is scored by EVALUATE's functions: the held-out section
(`metrics.heldout.score_held_out`: the model against half B of each held-out combination's real cells, the
real-vs-real floor, the nearest seen combinations' real cells) and the seen combinations (`metrics.evaluate`).
Two reference rows need no prior: the VAE's own reconstruction of half A ("VAE ceiling": what a perfect prior could
reach through this decoder) and scVI.

Writes workdir/<dataset>/seed<seed>/results.json and prints one table. Everything runs in this process, one
thread by default (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Runner, fmt, make_dataset_inputs, markdown_table, training_summary  # noqa: E402

log = logging.getLogger("bench_heldout")

METRICS = ("w2", "mmd2_rbf", "fd", "coverage")


def parse_prior(text: str) -> dict[str, Any]:
    """'independent:0.2:400' -> {'dropout': 'independent', 'rho': 0.2, 'steps': 400}."""
    scheme, rho, steps = text.split(":")
    return {"name": text, "dropout": scheme, "rho": float(rho), "steps": int(steps)}


def parse_route(text: str) -> dict[str, Any]:
    """'noise:joint:1' or 'transfer:additive:1' -> route, guidance, w."""
    route, guidance, w = text.split(":")
    return {"name": text, "route": route, "guidance": guidance, "w": float(w)}


def _held_combos(test: Any, keys: list[str], seen: list[str]) -> list[dict[str, str]]:
    from sclatent.metrics.heldout import unseen_combinations

    return [dict(zip(keys, c.split("|"))) for c in unseen_combinations(test.obs, keys, seen)]


def score(test: Any, gen: Any, keys: list[str], seen: list[str], genes: list[str], seed: int) -> dict[str, Any]:
    """Held-out section and (when the generated cells cover them) the seen combinations' metrics."""
    from sclatent.metrics import evaluate as evaluate_metrics
    from sclatent.metrics.heldout import score_held_out, seen_only

    held = score_held_out(test, gen, keys, seen, model_genes=genes, seed=seed)
    out: dict[str, Any] = {"held_out": held}
    seen_gen = seen_only(gen, keys, held["combinations"])
    if seen_gen.n_obs:
        seen_test = seen_only(test, keys, held["combinations"])
        res = evaluate_metrics(seen_test, seen_gen, keys, model_genes=genes, seed=seed, min_cells_per_class=10)
        out["seen"] = {
            "overall": {m: res["overall"][m] for m in ("w2", "mmd2_rbf", "fd", "one_nn_accuracy", "coverage")},
            "per_class": res["per_class"]["|".join(keys)]["summary"],
        }
    return out


def vae_ceiling(model_path: Path, test: Any, keys: list[str], seen: list[str], seed: int) -> dict[str, Any]:
    """The VAE's reconstruction of the real test cells (one NB draw each, with its own library size) scored like
    generated cells: for a held-out combination, the best a prior could do through this decoder."""
    import anndata as ad
    import torch

    from sclatent.checkpoint import load_model
    from sclatent.counts import counts_matrix
    from sclatent.inference import reconstruct_batches
    from sclatent.tokens import gene_index, memory_batches, tokens_of

    bundle = load_model(model_path)
    ids, _ = gene_index(test.var_names, bundle.genes, source="test")
    shard = tokens_of(counts_matrix(test, "X", source="test"), ids)
    keep = np.ones(test.n_obs, dtype=bool)
    rec = reconstruct_batches(bundle.vae, memory_batches(shard, 256, None), keep, torch.device("cpu"), seed)
    gen = ad.AnnData(X=rec["sample"], obs=test.obs[keys].copy())
    gen.var_names = list(bundle.genes)
    gen.obs["replicate"] = 0
    return score(test, gen, keys, seen, list(bundle.genes), seed)


# ---------------------------------------------------------------------------------------------------------------
# candidate: composition through seen combinations (the parallelogram a x b = a x b' + c x b - c x b')
# ---------------------------------------------------------------------------------------------------------------
def parallelograms(target: tuple[int, int], seen: set[tuple[int, int]], base_value: int | None = None) -> list:
    """(base, plus, minus) code pairs with base = (a, b'), plus = (c, b), minus = (c, b') all seen, for the target
    (a, b) of two keys; `base_value` fixes b' (a transferred cell's own second label)."""
    a, b = target
    out = []
    for a2, b2 in sorted(seen):
        if a2 != a or b2 == b or (base_value is not None and b2 != base_value):
            continue
        for c, d in sorted(seen):
            if c != a and d == b and (c, b2) in seen:
                out.append(((a, b2), (c, b), (c, b2)))
    return out


class ComposedVelocity:
    """v = v_null + w (v_comp - v_null), v_comp = mean over parallelograms of v(base) + v(plus) - v(minus), per row
    (rows without a parallelogram use their own label, i.e. joint guidance)."""

    def __init__(self, model: Any, codes: Any, seen: set, w: float, base_values: Any = None) -> None:
        import torch

        self.model = model
        b, k = codes.shape
        null = torch.tensor(model.config.null_codes, dtype=torch.long)
        rows: list[list[tuple[tuple[int, ...], float]]] = []
        for i in range(b):
            target = tuple(int(x) for x in codes[i])
            bv = None if base_values is None else int(base_values[i])
            grams = parallelograms(target, seen, bv) if target not in seen else []
            terms: dict[tuple[int, ...], float] = {}
            if grams:
                for base, plus, minus in grams:
                    for lab, c in ((base, 1.0), (plus, 1.0), (minus, -1.0)):
                        terms[lab] = terms.get(lab, 0.0) + w * c / len(grams)
            else:
                terms[target] = w
            nk = tuple(int(x) for x in null)
            terms[nk] = terms.get(nk, 0.0) + (1.0 - w)
            rows.append(list(terms.items()))
        n_terms = max(len(r) for r in rows)
        self.labels = torch.zeros((n_terms, b, k), dtype=torch.long)
        self.coef = torch.zeros((n_terms, b))
        for i, r in enumerate(rows):
            for j in range(n_terms):
                lab, c = r[j] if j < len(r) else (tuple(int(x) for x in null), 0.0)
                self.labels[j, i] = torch.tensor(lab)
                self.coef[j, i] = c
        self.n_terms, self.b = n_terms, b

    def __call__(self, x: Any, t: Any) -> Any:
        import torch

        out = self.model(
            torch.cat([x] * self.n_terms), torch.cat([t] * self.n_terms), self.labels.reshape(-1, self.labels.shape[-1])
        )
        out = out.view(self.n_terms, self.b, *x.shape[1:])
        return (self.coef.view(self.n_terms, self.b, 1, 1) * out).sum(0)


def composed_generation(model: Any, test: Any, keys: list[str], held: list, w: float, seed: int, reps: int) -> Any:
    """Cells of the held-out combinations (as many as their test cells) from noise through the composed field."""
    import anndata as ad
    import torch

    from sclatent.flow import sample as ode_sample
    from sclatent.generate import SampleConfig, Sampler, generated_anndata, label_codes, lognormal_params

    sampler = Sampler(model.bundle, SampleConfig(), torch.device("cpu"))
    seen = {
        tuple(sampler.labels[k].index(v) for k, v in zip(keys, name.split("|")))
        for name in sampler.library_stats["joint"]
    }
    mask = np.zeros(test.n_obs, dtype=bool)
    for combo in held:
        m = np.ones(test.n_obs, dtype=bool)
        for k, v in combo.items():
            m &= test.obs[k].astype(str).to_numpy() == v
        mask |= m
    obs = test.obs[mask]
    codes = label_codes(obs, keys, sampler.labels, source="test")
    parts = []
    for r in range(reps):
        g = torch.Generator().manual_seed(1000 * seed + r)
        x0 = torch.randn((len(codes), *sampler.latent_shape), generator=g)
        field = ComposedVelocity(sampler.prior, codes, seen, w)
        with torch.no_grad():
            z, _ = ode_sample(field, x0, "heun", 2)
        z = z * sampler.bundle.latent_std + sampler.bundle.latent_mean
        mu, sd = lognormal_params(codes, keys, sampler.labels, sampler.library_stats)
        lib = torch.exp(
            torch.as_tensor(mu + sd * np.asarray(torch.randn(len(codes), generator=g)), dtype=torch.float32)
        )
        X = sampler.decode(z, lib.clamp_min(1.0), None, g)
        out = generated_anndata(X, codes, sampler, sampler.genes)
        out.obs["replicate"] = r
        parts.append(out)
    return ad.concat(parts)


def composed_transfer(model: Any, train: Any, keys: list[str], held: list, w: float, seed: int) -> Any:
    """Training cells of each held-out combination's first-key value (other second-key values), inverted under their
    own labels and carried forward through the composed field anchored at their own second label."""
    import anndata as ad
    import torch

    from sclatent.counts import counts_matrix
    from sclatent.flow import invert
    from sclatent.flow import sample as ode_sample
    from sclatent.generate import SampleConfig, Sampler, label_codes
    from sclatent.tokens import gene_index, memory_batches, tokens_of
    from sclatent.transfer import transferred_anndata

    sampler = Sampler(model.bundle, SampleConfig(method="heun", n_steps=8), torch.device("cpu"))
    seen = {
        tuple(sampler.labels[k].index(v) for k, v in zip(keys, name.split("|")))
        for name in sampler.library_stats["joint"]
    }
    parts = []
    for combo in held:
        mask = train.obs[keys[0]].astype(str).to_numpy() == combo[keys[0]]
        mask &= train.obs[keys[1]].astype(str).to_numpy() != combo[keys[1]]
        cells = train[mask].copy()
        src = label_codes(cells.obs, keys, sampler.labels, source="train")
        tgt = src.copy()
        tgt[:, 1] = sampler.labels[keys[1]].index(combo[keys[1]])
        ids, _ = gene_index(cells.var_names, sampler.genes, source="train")
        shard = tokens_of(counts_matrix(cells, "X", source="train"), ids)
        batch = next(memory_batches(shard, 100000, None))
        t = batch.to_torch("cpu")
        with torch.no_grad():
            z, _ = sampler.vae.encode(t["genes"], t["counts"], t["mask"])
            zs = (z - sampler.bundle.latent_mean) / sampler.bundle.latent_std
            from sclatent.flow import guided_velocity

            noise, _ = invert(guided_velocity(sampler.prior, torch.as_tensor(src), "joint", w), zs, "heun", 8)
            field = ComposedVelocity(sampler.prior, tgt, seen, w, base_values=src[:, 1])
            x1, _ = ode_sample(field, noise, "heun", 8)
            z_new = x1 * sampler.bundle.latent_std + sampler.bundle.latent_mean
        g = torch.Generator().manual_seed(seed)
        X = sampler.decode(z_new, t["library_size"].float().clamp_min(1.0), None, g)
        out = transferred_anndata(X, src, tgt, sampler, sampler.genes, cells.obs_names)
        out.obs["replicate"] = 0
        parts.append(out)
    return ad.concat(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, choices=["sc_mixology", "compositional", "synthetic"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--vae-preset", default="default")
    ap.add_argument("--vae-steps", type=int, default=2400)
    ap.add_argument("--prior-preset", default="tiny")
    ap.add_argument("--priors", default="independent:0.2:400", help="comma list of scheme:rho:steps")
    ap.add_argument(
        "--routes", default="noise:joint:1,noise:additive:1,transfer:joint:1", help="route:guidance:w, comma list"
    )
    ap.add_argument("--replicates", type=int, default=2)
    ap.add_argument("--scvi", action="store_true", help="scVI with the keys as covariates, at our training time")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[heldout %(asctime)s] %(message)s", stream=sys.stderr)
    import anndata as ad
    import torch

    from sclatent.api import Model

    torch.set_num_threads(args.threads)
    spec = make_dataset_inputs(args.dataset, args.workdir)
    d = args.workdir / args.dataset / f"seed{args.seed}"
    runner = Runner(d / "logs", args.threads, children=False)
    keys, seed = spec.keys, str(args.seed)
    prep, tok, vae, enc = d / "prepare", d / "tokens", d / "vae", d / "encode"
    results_path = d / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update({"dataset": spec.name, "seed": args.seed, "holdout": spec.holdout, "keys": keys})
    results.setdefault("rows", {})

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1))

    common_train = ["--seed", seed, "--threads", args.threads, "--no-progress", "--checkpoint-every", 10**9]
    if not (prep / "test.h5ad").exists():
        runner.sclatent(
            "PREPARE",
            spec.name,
            ["prepare", "--samplesheet", spec.samplesheet, "--dataset", spec.name, "--outdir", prep]
            + ["--condition-keys", ",".join(keys), "--n-hvg", spec.n_hvg, "--min-cells", 3, "--seed", seed]
            + ["--holdout", spec.holdout],
            child=False,
        )
    if not (tok / "manifest.json").exists():
        runner.sclatent(
            "TOKENIZE",
            spec.name,
            ["tokenize", "--train", prep / "train.h5ad", "--test", prep / "test.h5ad", "--outdir", tok]
            + ["--genes", "hvg", "--seed", seed, "--no-progress"],
            child=False,
        )
    if not (vae / "checkpoint.pt").exists():
        vae_args = ["--tokens", tok, "--preset", args.vae_preset, "--batch-size", 64, "--decode-genes", 256]
        runner.sclatent(
            "TRAIN_VAE",
            spec.name,
            ["train-vae", *vae_args, "--max-steps", args.vae_steps, "--outdir", vae, *common_train],
            child=False,
        )
    if not (enc / "latents.npz").exists():
        runner.sclatent("ENCODE", spec.name, ["encode", "--model", vae, "--tokens", tok, "--outdir", enc], child=False)
    vae_s = training_summary(vae)["train_s"]
    results["vae"] = {"preset": args.vae_preset, "steps": args.vae_steps, "train_s": vae_s}
    test = ad.read_h5ad(prep / "test.h5ad")
    train = ad.read_h5ad(prep / "train.h5ad")
    seen = list(test.uns["sclatent"]["train_combinations"])
    held = _held_combos(test, keys, seen)
    log.info("held-out combinations: %s", held)

    if "vae_ceiling" not in results["rows"]:
        runner.sclatent("BUNDLE", spec.name, ["bundle", "--vae", vae, "--out", d / "vae_only.pt"], child=False)
        results["rows"]["vae_ceiling"] = {"scores": vae_ceiling(d / "vae_only.pt", test, keys, seen, args.seed)}
        save()

    for prior_text in args.priors.split(","):
        pv = parse_prior(prior_text)
        pdir = d / "priors" / pv["name"].replace(":", "_")
        model_path = pdir / "model.pt"
        if not model_path.exists():
            runner.sclatent(
                "TRAIN_PRIOR",
                spec.name,
                ["train-prior", "--latents", enc / "latents.npz", "--preset", args.prior_preset, "--outdir", pdir]
                + ["--max-steps", pv["steps"], "--rho", pv["rho"], "--label-dropout", pv["dropout"], *common_train],
                child=False,
            )
            runner.sclatent(
                "BUNDLE", spec.name, ["bundle", "--vae", vae, "--prior", pdir, "--out", model_path], child=False
            )
        prior_s = training_summary(pdir)["train_s"]
        model = Model.load(model_path, device="cpu")
        for route_text in args.routes.split(","):
            rv = parse_route(route_text)
            name = f"{pv['name']} | {rv['name']}"
            if name in results["rows"]:
                continue
            t0 = time.perf_counter()
            w = rv["w"]
            if rv["route"] == "compose":
                gen = composed_generation(model, test, keys, held, w, args.seed, args.replicates)
            elif rv["route"] == "transfer-compose":
                gen = composed_transfer(model, train, keys, held, w, args.seed)
            elif rv["route"] == "noise":
                parts = []
                for r in range(args.replicates):
                    g = model.sample(
                        like=test,
                        guidance=rv["guidance"],
                        cfg_scale=w,
                        seed=1000 * args.seed + r,
                        method="heun",
                        n_steps=2,
                    )
                    g.obs["replicate"] = r
                    parts.append(g)
                gen = ad.concat(parts)
            else:  # transfer: the training cells of the same first-key value, carried to each held-out combination
                parts = []
                for combo in held:
                    first = keys[0]
                    mask = train.obs[first].astype(str).to_numpy() == combo[first]
                    for key in keys[1:]:
                        mask &= train.obs[key].astype(str).to_numpy() != combo[key]
                    source = train[mask].copy()
                    sets = {k: v for k, v in combo.items() if k != first}
                    g = model.transfer(source, set=sets, guidance=rv["guidance"], cfg_scale=w, seed=args.seed)
                    g.obs["replicate"] = 0
                    parts.append(g)
                gen = ad.concat(parts)
            gen_s = time.perf_counter() - t0
            scores = score(test, gen, keys, seen, model.genes, args.seed)
            results["rows"][name] = {
                "prior": pv,
                "route": rv,
                "prior_train_s": prior_s,
                "train_s": vae_s + prior_s,
                "generate_s": gen_s,
                "scores": scores,
            }
            save()
            log.info("%s: %s", name, _summary(scores))

    if args.scvi and "scvi_covariates" not in results["rows"]:
        from scvi_baseline import generate_like, load_counts, train_scvi

        manifest = json.loads((tok / "manifest.json").read_text())
        genes = list(manifest["genes"])
        budget = max(r.get("train_s", 0.0) for r in results["rows"].values() if "train_s" in r)
        tr = load_counts(prep / "train.h5ad", genes)
        label = tr.obs[keys].astype(str).agg("|".join, axis=1).to_numpy()
        scvi_model, info = train_scvi(tr, label, "seconds", budget, args.seed, covariates=keys)
        parts = []
        for r in range(args.replicates):
            X = generate_like(scvi_model, test.obs, keys, manifest, args.seed, r)
            g = ad.AnnData(X=X, obs=test.obs[keys].copy())
            g.var_names = genes
            g.obs["replicate"] = r
            parts.append(g)
        gen = ad.concat(parts)
        results["rows"]["scvi_covariates"] = {
            "scvi": info,
            "train_s": info["train_s"],
            "scores": score(test, gen, keys, seen, genes, args.seed),
        }
        save()
    print(render(results))


def _summary(scores: dict[str, Any]) -> str:
    parts = []
    for combo, e in scores["held_out"]["per_combination"].items():
        m = e["model"]
        parts.append(f"{combo} W2 {m.get('w2', float('nan')):.3g} cov {m.get('coverage', float('nan')):.2f}")
    return "; ".join(parts)


def render(results: dict[str, Any]) -> str:
    """One row per variant: for each held-out combination the model's W2, MMD², FD, coverage; then the seen mean."""
    rows_out = []
    combos: list[str] = []
    for row in results["rows"].values():
        combos = list(row["scores"]["held_out"].get("per_combination", {}))
        if combos:
            break
    first = next(iter(results["rows"].values()))["scores"]["held_out"]["per_combination"]
    refs = []
    for combo in combos:
        e = first[combo]
        refs.append(["floor (real A vs B)", combo, *[fmt(e["floor"].get(m)) for m in METRICS]])
        for key, near in e["nearest"].items():
            if near and "real" in near:
                refs.append(
                    [f"nearest seen, other {key}: {near['combination']} (n={near['n']})", combo]
                    + [fmt(near["real"].get(m)) for m in METRICS]
                )
    for name, row in results["rows"].items():
        per = row["scores"]["held_out"].get("per_combination", {})
        for combo in combos:
            m = per.get(combo, {}).get("model", {})
            seen = row["scores"].get("seen", {}).get("overall", {})
            rows_out.append(
                [
                    name,
                    combo,
                    *[fmt(m.get(k)) for k in METRICS],
                    fmt(seen.get("w2")),
                    fmt(seen.get("fd")),
                    fmt(row.get("train_s")),
                ]
            )
    head = markdown_table(["reference", "combination", "W2", "MMD²", "FD", "coverage"], refs)
    body = markdown_table(
        ["variant", "combination", "W2", "MMD²", "FD", "coverage", "seen W2", "seen FD", "train s"], rows_out
    )
    return head + "\n\n" + body


if __name__ == "__main__":
    main()
