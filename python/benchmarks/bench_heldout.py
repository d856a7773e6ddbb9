"""Unseen combinations: which prior, guidance and generation route reaches the held-out cells (decision 0020).

    python python/benchmarks/bench_heldout.py --datasets sc_mixology,compositional --seeds 0,1 --scvi \
        --workdir .cache/bench-heldout          # `make bench-heldout`: the study, then BENCHMARKS.md's section
    python python/benchmarks/bench_heldout.py --render --workdir .cache/bench-heldout   # the section only

For one dataset with held-out combinations (PREPARE --holdout) and one seed: PREPARE, TOKENIZE, TRAIN_VAE and ENCODE
once; then every prior variant of `--priors` (label-dropout scheme and rate, training steps) is trained on the same
latents; every generation route of `--routes` is run with every prior (generation from noise like the test cells,
with joint or additive guidance and weight w on every request; or counterfactual transfer of the training cells of
the same first-key value, e.g. the same cell line under the other protocol); and scVI with the keys as categorical
covariates gets the training wall time of the first prior of `--priors` (VAE + prior: the default). Each result is
scored by EVALUATE's functions: the held-out section (`metrics.heldout.score_held_out`: the model against half B of
each held-out combination's real cells, the real-vs-real floor, the nearest seen combinations' real cells) and the
seen combinations (`metrics.evaluate`). Two reference rows need no prior: the VAE's own reconstruction of half A
("VAE ceiling": what a perfect prior could reach through this decoder) and scVI.

Writes workdir/<dataset>/seed<seed>/results.json (a rerun resumes: finished rows are kept) and prints one table
per run; then renders every dataset's seeds into one table per dataset (means over held-out combinations and
seeds, and how often each row meets the goal of decision 0020) into BENCHMARKS.md's `heldout` section. Everything
runs in this process, one thread by default (the machine is shared).
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

from bench_report import held_out_goal, update_benchmarks_md  # noqa: E402
from common import REPO, Runner, fmt, git_state, machine_info, make_dataset_inputs, markdown_table, training_summary  # noqa: E402

log = logging.getLogger("bench_heldout")

METRICS = ("w2", "mmd2_rbf", "fd", "coverage")
GOAL = ("w2", "mmd2_rbf", "fd")
DATASETS = ("sc_mixology", "compositional", "synthetic")
DEFAULT_PRIOR = "independent:0.2:2000,shared:0.8:2000"  # the package's default label dropout first, the authors' second
DEFAULT_ROUTES = "compose:joint:1,compose:joint:2,noise:joint:1,noise:joint:2,noise:additive:2,transfer:joint:1"


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


N_SPLITS = 5  # half splits of each held-out combination's real cells averaged over (one split is noisy)


def _mean_metrics(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [m for m in items if m and "error" not in m]
    if not ok:
        return {"error": "not scored"}
    return {k: float(np.mean([m[k] for m in ok])) for k in ok[0] if isinstance(ok[0][k], (int, float))}


def score(test: Any, gen: Any, keys: list[str], seen: list[str], genes: list[str], seed: int) -> dict[str, Any]:
    """Held-out section averaged over N_SPLITS half splits (seeds 0..N-1, the same for every row), and (when the
    generated cells cover them) the seen combinations' metrics."""
    from sclatent.metrics import evaluate as evaluate_metrics
    from sclatent.metrics.heldout import score_held_out, seen_only

    splits = [score_held_out(test, gen, keys, seen, model_genes=genes, seed=s) for s in range(N_SPLITS)]
    held = dict(splits[0])
    per = {}
    for combo in splits[0]["per_combination"]:
        entries = [sp["per_combination"][combo] for sp in splits if combo in sp["per_combination"]]
        e = dict(entries[0])
        e["model"] = _mean_metrics([x["model"] for x in entries])
        e["floor"] = _mean_metrics([x["floor"] for x in entries])
        nearest = {}
        for key in e["nearest"]:
            near = [x["nearest"][key] for x in entries if x["nearest"].get(key) and "real" in x["nearest"][key]]
            if near:
                nearest[key] = {
                    "combination": near[0]["combination"],
                    "n": near[0]["n"],
                    "real": _mean_metrics([n["real"] for n in near]),
                    "model": _mean_metrics([n["model"] for n in near]),
                }
            else:
                nearest[key] = None
        e["nearest"] = nearest
        per[combo] = e
    held["per_combination"] = per
    held["n_splits"] = N_SPLITS
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="sc_mixology,compositional", help="comma list of " + ", ".join(DATASETS))
    ap.add_argument("--seeds", default="0", help="comma list of seeds (PREPARE's split and every training seed)")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--vae-preset", default="default")
    ap.add_argument("--vae-steps", type=int, default=5000, help="the pipeline's floor (decision 0001)")
    ap.add_argument("--prior-preset", default="tiny")
    ap.add_argument("--priors", default=DEFAULT_PRIOR, help="comma list of scheme:rho:steps; the first is compared")
    ap.add_argument("--routes", default=DEFAULT_ROUTES, help="route:guidance:w, comma list")
    ap.add_argument("--replicates", type=int, default=2)
    ap.add_argument("--scvi", action="store_true", help="scVI with the keys as covariates, at our training time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render", action="store_true", help="only render the saved results of --workdir")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    args.argv = " ".join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[heldout %(asctime)s] %(message)s", stream=sys.stderr)
    datasets = args.datasets.split(",")
    if not args.render:
        for dataset in datasets:
            for seed in (int(x) for x in args.seeds.split(",")):
                print(render(run_one(dataset, seed, args)))
    section = render_study(args.workdir, datasets)
    print(section)
    if not args.no_write:
        update_benchmarks_md(args.out, "heldout", section)


def run_one(dataset: str, seed_value: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every prior and route of `args` (and scVI) on one dataset and seed; returns (and saves) results.json."""
    if dataset not in DATASETS:
        raise SystemExit(f"bench_heldout: unknown dataset '{dataset}' (expected one of {', '.join(DATASETS)})")
    import anndata as ad
    import torch

    from sclatent.api import Model

    torch.set_num_threads(args.threads)
    spec = make_dataset_inputs(dataset, args.workdir)
    d = args.workdir / dataset / f"seed{seed_value}"
    runner = Runner(d / "logs", args.threads, children=False)
    keys, seed = spec.keys, str(seed_value)
    prep, tok, vae, enc = d / "prepare", d / "tokens", d / "vae", d / "encode"
    results_path = d / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update({"dataset": spec.name, "seed": seed_value, "holdout": spec.holdout, "keys": keys})
    results["note"] = spec.note
    results.setdefault("invocations", []).append(
        {
            "argv": args.argv,
            "commit": git_state()["git_commit"],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    )
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
        results["rows"]["vae_ceiling"] = {"scores": vae_ceiling(d / "vae_only.pt", test, keys, seen, seed_value)}
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
            # "noise"/"transfer": the joint request as it is; "compose"/"transfer-compose": a combination never
            # seen in training composed from seen ones (flow.analogies)
            unseen = "analogy" if rv["route"] in ("compose", "transfer-compose") else "joint"
            if rv["route"] in ("noise", "compose"):
                parts = []
                for r in range(args.replicates):
                    g = model.sample(
                        like=test,
                        guidance=rv["guidance"],
                        cfg_scale=w,
                        unseen_cfg_scale=w,  # the route's w guides every request, seen or never seen
                        seed=1000 * seed_value + r,
                        method="heun",
                        n_steps=2,
                        unseen=unseen,
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
                    g = model.transfer(
                        source,
                        set=sets,
                        guidance=rv["guidance"],
                        cfg_scale=w,
                        unseen_cfg_scale=w,
                        seed=seed_value,
                        unseen=unseen,
                    )
                    g.obs["replicate"] = 0
                    parts.append(g)
                gen = ad.concat(parts)
            gen_s = time.perf_counter() - t0
            gen_path = d / "generated" / (name.replace(" | ", "__").replace(":", "_") + ".h5ad")
            gen_path.parent.mkdir(parents=True, exist_ok=True)
            gen.write_h5ad(gen_path)
            scores = score(test, gen, keys, seen, model.genes, seed_value)
            results["rows"][name] = {
                "gen_path": str(gen_path),
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
        # equal wall time with the compared (first) prior: VAE + prior training seconds
        first = parse_prior(args.priors.split(",")[0])["name"]
        budget = max(r["train_s"] for r in results["rows"].values() if r.get("prior", {}).get("name") == first)
        tr = load_counts(prep / "train.h5ad", genes)
        label = tr.obs[keys].astype(str).agg("|".join, axis=1).to_numpy()
        scvi_model, info = train_scvi(tr, label, "seconds", budget, seed_value, covariates=keys)
        parts = []
        for r in range(args.replicates):
            X = generate_like(scvi_model, test.obs, keys, manifest, seed_value, r)
            g = ad.AnnData(X=X, obs=test.obs[keys].copy())
            g.var_names = genes
            g.obs["replicate"] = r
            parts.append(g)
        gen = ad.concat(parts)
        (d / "generated").mkdir(parents=True, exist_ok=True)
        gen.write_h5ad(d / "generated" / "scvi_covariates.h5ad")
        results["rows"]["scvi_covariates"] = {
            "gen_path": str(d / "generated" / "scvi_covariates.h5ad"),
            "scvi": info,
            "budget_s": budget,
            "train_s": info["train_s"],
            "scores": score(test, gen, keys, seen, genes, seed_value),
        }
        save()
    return results


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


def _row_label(name: str) -> str:
    """'independent:0.2:2000 | compose:joint:2' -> a readable label."""
    if name == "vae_ceiling":
        return "VAE ceiling (the held-out cells encoded and decoded)"
    if name == "scvi_covariates":
        return "scVI, keys as covariates, equal time"
    prior, route = (x.strip() for x in name.split("|"))
    scheme, rho, steps = prior.split(":")
    kind, guidance, w = route.split(":")
    what = {
        "compose": "from noise, composed from seen combinations",
        "noise": f"from noise, {guidance} guidance on the unseen labels",
        "transfer": f"transfer of the same first key's cells, {guidance} guidance",
        "transfer-compose": "transfer of the same first key's cells, composed",
    }[kind]
    default = kind == "compose" and guidance == "joint" and float(w) == 2.0 and scheme == "independent"
    default = default and float(rho) == 0.2  # what `sample` does for a never-seen combination
    return f"{what}, w {w} ({scheme} ρ {rho}, {int(steps):,} prior steps)" + (
        " = `sample`'s default" if default else ""
    )


def _combos(run: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """One run's held-out entries of row `name`, one per combination."""
    return list(run["rows"][name]["scores"]["held_out"]["per_combination"].values())


def render_study(workdir: Path, datasets: list[str]) -> str:
    """BENCHMARKS.md's `heldout` section: per dataset one table of every row present in all its seeds, with the
    metrics averaged over held-out combinations and seeds and the goal of decision 0020 counted per
    (combination, seed): below scVI, below the real cells of both nearest seen combinations, coverage ≥ ½ floor."""
    import datetime
    import platform

    m = machine_info()
    out = [
        "## `make bench-heldout`\n",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {m.get('cpu', platform.processor())}, "
        f"{m.get('cores', '?')} cores, CPU only, one torch thread per run (rendered; each dataset lists the commands "
        "and commits that measured it). Each held-out combination's real test cells "
        "are split in halves A and B five times; every row is compared with half B at half A's size (means over the "
        "splits, then over held-out combinations and seeds). *goal* columns count the (combination, seed) pairs "
        "where the row is below scVI, below both nearest seen combinations' real cells (W2, MMD², FD each), and "
        "where its coverage is at least half the real-vs-real floor's. Decision 0020 reads these tables.\n",
    ]
    for dataset in datasets:
        runs = [json.loads(p.read_text()) for p in sorted((workdir / dataset).glob("seed*/results.json"))]
        if not runs:
            continue
        names = [n for n in runs[0]["rows"] if all(n in r["rows"] for r in runs)]
        combos = list(next(iter(runs[0]["rows"].values()))["scores"]["held_out"]["per_combination"])
        seeds = [r["seed"] for r in runs]
        out.append(f"### {dataset}: {runs[0].get('note', '')}\n")
        out.append(
            f"Held out: {', '.join(combos)}; seeds {', '.join(map(str, seeds))}; VAE {runs[0]['vae']['preset']}, "
            f"{runs[0]['vae']['steps']:,} steps ({np.mean([r['vae']['train_s'] for r in runs]):.0f} s on average).\n"
        )

        def entries(name: str) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
            """(entry, scVI entry) per (seed, combination)."""
            got = []
            for r in runs:
                scvi = r["rows"].get("scvi_covariates")
                for combo in combos:
                    e = r["rows"][name]["scores"]["held_out"]["per_combination"].get(combo)
                    if e is not None:
                        s = scvi["scores"]["held_out"]["per_combination"].get(combo) if scvi else None
                        got.append((e, s))
            return got

        def mean_of(items: list[dict[str, Any]], metric: str) -> str:
            vals = [x[metric] for x in items if x and metric in x]
            return fmt(float(np.mean(vals))) if vals else "—"

        first = entries(names[0])
        refs = [["real half A (floor)", *[mean_of([e["floor"] for e, _ in first], k) for k in METRICS]]]
        for key in first[0][0]["nearest"]:
            near = [e["nearest"][key]["real"] for e, _ in first if e["nearest"].get(key)]
            refs.append(
                [f"real cells of the nearest seen combination, other {key}", *[mean_of(near, k) for k in METRICS]]
            )
        rows = []
        for name in names:
            got = entries(name)
            goals = [held_out_goal(e, None if name == "scvi_covariates" else s) for e, s in got]
            n = len(got)

            def count(field: str) -> str:
                marks = [g[field] for g in goals if g[field] not in ("—", "")]
                if not marks:
                    return "—"
                if field == "vs_nearest":  # both neighbours: every metric of every neighbour below
                    return f"{sum('✗' not in m for m in marks)}/{n}"
                return " ".join(f"{sum(m[i] == '✓' for m in marks)}" for i in range(len(GOAL))) + f" of {n}"

            cov = [g["coverage_ok"] for g in goals if g["coverage_ok"] is not None]
            seen = [r["rows"][name]["scores"].get("seen", {}).get("overall", {}) for r in runs]
            rows.append(
                [_row_label(name), *[mean_of([e["model"] for e, _ in got], k) for k in METRICS]]
                + [" / ".join(mean_of([e["model"] for e in _combos(r, name)], "w2") for r in runs)]
                + ["" if name == "scvi_covariates" else count("vs_scvi"), count("vs_nearest")]
                + [f"{sum(cov)}/{len(cov)}" if cov else "—", mean_of(seen, "w2"), mean_of(seen, "fd")]
                + [fmt(float(np.mean([r["rows"][name].get("train_s", float("nan")) for r in runs])))]
            )
        for r in runs:
            for inv in r.get("invocations", []):
                out.append(
                    f"- seed {r['seed']}, {inv['date']}, commit `{inv['commit'][:10]}`: "
                    f"`python python/benchmarks/bench_heldout.py {inv['argv']}`"
                )
        out.append("")
        out.append(markdown_table(["reference (no model)", "W2 ↓", "MMD² ↓", "FD ↓", "coverage ↑"], refs) + "\n")
        out.append(
            markdown_table(
                ["cells", "W2 ↓", "MMD² ↓", "FD ↓", "coverage ↑", "W2 per seed"]
                + ["goal: below scVI (W2 MMD² FD)", "goal: below both nearest", "goal: coverage ≥ ½ floor"]
                + ["seen W2", "seen FD", "train s"],
                rows,
            )
            + "\n"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
