"""Quality per dataset: sclatent (LDM joint / additive / unconditional, VAE + Gaussian prior) against scVI.

One dataset runs the whole pipeline through the `sclatent` command line — PREPARE (2,000 seurat_v3 HVGs, seeded
80/20 split), TOKENIZE `--genes hvg`, TRAIN_VAE, ENCODE, TRAIN_PRIOR, SAMPLE, GATHER, EVALUATE — with the same
genes, split and seed for every model. The pipeline's own steps run as measured child processes (their wall time
and peak RSS feed the speed table); the extra variants run in this process through the same click commands.

Budgets. Training is budgeted in seconds of training loop on this machine: a short calibration run measures
the throughput, and the epochs are set so that the run takes about that long (recorded). scVI then gets
(a) the same number of epochs as our VAE ("equal epochs") and (b) the wall time our VAE + prior training used
("equal wall time": scVI is given our time, not the reverse).

Rows of the generation table: every model generates one cell per evaluation cell (per replicate); conditional
models take each cell's labels (`sample --like`; scVI with the labels as categorical covariates), unconditional
ones (our LDM with no labels, the Gaussian prior ablation) do not. The real-vs-real floor (EVALUATE: two
stratified halves A, B of the real cells) is compared with each model at the same sizes (|A| generated cells vs
B), because W2 and MMD² shrink as the number of cells grows.

Held-out combinations (sc_mixology: HCC827 x Drop-seq; compositional: three cell type x perturbation pairs) are
kept out of training by PREPARE --holdout. EVALUATE scores them apart (metrics.heldout: each model against half B
of the combination's real cells, next to the real-vs-real floor and the nearest seen combinations' real cells);
the main tables are about the seen combinations. The held-out table of each dataset puts every model and both
references side by side, with counterfactual transfer (the same cell type's training cells carried to the held-out
condition) as one more row.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    Budget,
    DatasetSpec,
    Plan,
    Runner,
    StepRecord,
    child_env,
    load_average,
    run_child,
    training_summary,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
NO_CHECKPOINT = str(10**9)  # --checkpoint-every: only the final checkpoint

# generation rows: key -> (label, conditional)
VARIANTS: dict[str, tuple[str, bool]] = {
    "ldm_joint": ("sclatent LDM, joint guidance", True),
    "ldm_additive": ("sclatent LDM, additive guidance", True),
    "ldm_uncond": ("sclatent LDM, unconditional", False),
    "vae_gaussian": ("sclatent VAE + N(0, I) prior (ablation)", False),
    "scvi_equal_epochs": ("scVI, labels as covariates, equal epochs", True),
    "scvi_equal_time": ("scVI, labels as covariates, equal wall time", True),
}


def _calibrate(runner: Runner, stage: str, args: list[str], outdir: Path, dataset: str) -> float:
    """Throughput (items/s) of a short in-process training run of `stage` ('train-vae' or 'train-prior')."""
    runner.sclatent(
        f"CALIBRATE_{'VAE' if stage == 'train-vae' else 'PRIOR'}",
        dataset,
        [stage, *args, "--outdir", outdir],
        child=False,
    )
    return training_summary(outdir, steady=True)["items_per_s"]


def _epochs_for(seconds: float, items_per_s: float, n_items: int, bounds: tuple[float, float]) -> float:
    """Epochs that take about `seconds` at `items_per_s`, clipped to bounds, rounded to 2 decimals."""
    epochs = seconds * items_per_s / max(n_items, 1)
    return round(min(max(epochs, bounds[0]), bounds[1]), 2)


def _n_seen(test_path: Path, keys: list[str]) -> int:
    """Test cells of the combinations training saw (all of them without held-out combinations)."""
    import anndata as ad

    from sclatent.metrics.heldout import seen_only, unseen_combinations

    test = ad.read_h5ad(test_path, backed="r")
    seen = test.uns.get("sclatent", {}).get("train_combinations")
    obs = test.obs.copy()
    test.file.close()
    unseen = unseen_combinations(obs, keys, None if seen is None else list(seen))
    return len(obs) if not unseen else int(seen_only(ad.AnnData(obs=obs), keys, unseen).n_obs)


def _n_obs(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(len(f["obs"][f["obs"].attrs["_index"]]))


def _uns(path: Path) -> dict[str, Any]:
    import anndata as ad

    return dict(ad.read_h5ad(path, backed="r").uns.get("sclatent", {}))


def _generation_entry(metrics_path: Path, label: str, conditional: bool, extra: dict[str, Any]) -> dict[str, Any]:
    res = json.loads(metrics_path.read_text())
    half = res.get("generated_vs_real_half") or {}
    return {
        "label": label,
        "conditional": conditional,
        "summary": res["generation"],
        "half": half.get("overall"),
        "floor": (res.get("real_vs_real") or {}).get("overall"),
        "held_out": res.get("held_out"),
        "n_real": res["n_real"],
        "n_generated": res["n_generated"],
        **extra,
    }


def run_dataset(spec: DatasetSpec, plan: Plan, runner: Runner, budget: Budget, workdir: Path) -> dict[str, Any]:
    """The quality benchmark of one dataset; returns its results (see run_all.py for the tables)."""
    name, keys, seed, t = spec.name, spec.keys, str(plan.seed), str(plan.threads)
    d = workdir / name
    prep, tok = d / "prepare", d / "tokens"
    result: dict[str, Any] = {"dataset": name, "note": spec.note, "keys": keys, "skipped": [], "generation": {}}

    rec = runner.sclatent(
        "PREPARE",
        name,
        [
            "prepare",
            "--samplesheet",
            spec.samplesheet,
            "--dataset",
            name,
            "--outdir",
            prep,
            "--condition-keys",
            ",".join(keys),
            "--n-hvg",
            spec.n_hvg,
            "--min-cells",
            3,
            "--seed",
            seed,
            *(["--holdout", spec.holdout] if spec.holdout else []),
        ],
        child=True,
    )
    n_train, n_test = _n_obs(prep / "train.h5ad"), _n_obs(prep / "test.h5ad")
    rec.extra.update(cells=n_train + n_test, cells_per_s=(n_train + n_test) / rec.wall_s)
    rec = runner.sclatent(
        "TOKENIZE",
        name,
        [
            "tokenize",
            "--train",
            prep / "train.h5ad",
            "--test",
            prep / "test.h5ad",
            "--outdir",
            tok,
            "--genes",
            "hvg",
            "--seed",
            seed,
            "--no-progress",
        ],
        child=True,
    )
    manifest = json.loads((tok / "manifest.json").read_text())
    rec.extra.update(
        cells=n_train + n_test,
        cells_per_s=(n_train + n_test) / rec.wall_s,
        tokens_per_cell_median=manifest["splits"]["train"]["len_quantiles"]["50"],
    )
    eval_real = prep / "test.h5ad"
    n_eval = _n_seen(eval_real, keys)  # unconditional rows: as many cells as the seen combinations' test cells
    result.update(
        n_train=n_train,
        n_test=n_test,
        n_eval=n_eval,
        n_genes=int(manifest["n_genes"]),
        tokens_per_cell_median=manifest["splits"]["train"]["len_quantiles"]["50"],
    )

    # ---- TRAIN_VAE (time-budgeted) and ENCODE
    vae, enc = d / "vae", d / "encode"
    common_train = ["--seed", seed, "--threads", t, "--no-progress", "--checkpoint-every", NO_CHECKPOINT]
    vae_args = [
        "--tokens",
        tok,
        "--preset",
        plan.vae_preset,
        "--batch-size",
        plan.vae_batch_size,
        "--decode-genes",
        plan.vae_decode_genes,
        *common_train,
    ]
    cps = _calibrate(
        runner, "train-vae", [*vae_args, "--max-steps", str(plan.calibration_steps)], d / "calib_vae", name
    )
    vae_epochs = _epochs_for(plan.vae_seconds, cps, n_train, plan.vae_epochs_range)
    rec = runner.sclatent(
        "TRAIN_VAE",
        name,
        ["train-vae", *vae_args, "--epochs", vae_epochs, "--min-steps", 0, "--outdir", vae],
        child=True,
    )
    vs = training_summary(vae)
    rec.extra.update(preset=plan.vae_preset, epochs=vae_epochs, cells_per_s=vs["items_per_s"], train_s=vs["train_s"])
    rec = runner.sclatent(
        "ENCODE",
        name,
        ["encode", "--model", vae, "--tokens", tok, "--outdir", enc, "--seed", seed, "--threads", t],
        child=True,
    )
    rec.extra.update(cells=n_train + n_test, cells_per_s=(n_train + n_test) / rec.wall_s)
    recon = {"sclatent VAE": json.loads((enc / "reconstruction.json").read_text())["metrics"]}

    # ---- TRAIN_PRIOR (time-budgeted)
    prior = d / "prior"
    prior_args = ["--latents", enc / "latents.npz", "--preset", plan.prior_preset, *common_train]
    sps = _calibrate(
        runner, "train-prior", [*prior_args, "--max-steps", str(plan.calibration_steps)], d / "calib_prior", name
    )
    prior_epochs = _epochs_for(plan.prior_seconds, sps, n_train, plan.prior_epochs_range)
    rec = runner.sclatent(
        "TRAIN_PRIOR",
        name,
        ["train-prior", *prior_args, "--epochs", prior_epochs, "--min-steps", 0, "--outdir", prior],
        child=True,
    )
    ps = training_summary(prior)
    model = d / "model.pt"
    runner.sclatent("BUNDLE", name, ["bundle", "--vae", vae, "--prior", prior, "--out", model], child=False)
    rec.extra.update(
        preset=plan.prior_preset, epochs=prior_epochs, samples_per_s=ps["items_per_s"], train_s=ps["train_s"]
    )
    ours_train_s = vs["train_s"] + ps["train_s"]
    result["budgets"] = {
        "vae": {
            "preset": plan.vae_preset,
            "target_s": plan.vae_seconds,
            "epochs": vae_epochs,
            "steps": vs["steps"],
            "train_s": vs["train_s"],
            "cells_per_s": vs["items_per_s"],
        },
        "prior": {
            "preset": plan.prior_preset,
            "target_s": plan.prior_seconds,
            "epochs": prior_epochs,
            "steps": ps["steps"],
            "train_s": ps["train_s"],
            "samples_per_s": ps["items_per_s"],
        },
        "ours_train_s": ours_train_s,
    }

    # ---- SAMPLE + GATHER + EVALUATE for each sclatent variant
    variants = ["ldm_joint"] + (["ldm_additive"] if len(keys) > 1 else []) + ["ldm_uncond", "vae_gaussian"]
    if len(keys) <= 1:
        result["skipped"].append(
            "additive guidance: with one attribute it is the same velocity as joint guidance "
            "(v_null + w (v_y - v_null)), so the row would repeat the joint row"
        )
    per_cell_s = None
    for variant in variants:
        label, conditional = VARIANTS[variant]
        reps = plan.replicates if variant != "ldm_uncond" else plan.uncond_replicates
        n_cells = n_eval * reps
        if per_cell_s is not None and variant != "vae_gaussian":
            factor = 3.0 if variant == "ldm_additive" else 1.0
            if not budget.allows(per_cell_s * n_cells * factor + 30):
                result["skipped"].append(f"{label}: not enough budget left ({budget.left():.0f} s)")
                continue
        gdir = d / "generated" / variant
        files = []
        for r in range(reps):
            args = [
                "sample",
                "--model",
                vae if variant == "vae_gaussian" else model,
                "--out",
                gdir / f"rep{r}.h5ad",
                "--seed",
                seed,
                "--replicate",
                r,
                "--threads",
                t,
            ]
            if variant == "ldm_additive":
                args += ["--guidance", "additive"]
            if variant == "vae_gaussian":
                args += ["--prior-kind", "gaussian"]
            args += ["--like", eval_real] if conditional or variant == "vae_gaussian" else ["--n-cells", n_eval]
            measured = variant == "ldm_joint" and r == 0
            rec = runner.sclatent("SAMPLE", name, args, child=measured)
            uns = _uns(gdir / f"rep{r}.h5ad")
            rec.extra.update(
                variant=variant,
                cells=n_eval,
                cells_per_s=n_eval / rec.wall_s,
                nfe_per_batch=uns.get("nfe_per_batch"),
                method=uns.get("method"),
                in_step_cells_per_s=n_eval / max(float(uns.get("seconds", 0)), 1e-9),
            )
            if measured:
                per_cell_s = rec.wall_s / n_eval
            files.append(gdir / f"rep{r}.h5ad")
        gathered = gdir / "generated.h5ad"
        runner.sclatent("GATHER", name, ["gather", *files, "--out", gathered], child=False)
        evdir = gdir / "evaluate"
        ev_args = [
            "evaluate",
            "--real",
            eval_real,
            "--generated",
            gathered,
            "--outdir",
            evdir,
            "--condition-keys",
            ",".join(keys),
            "--dataset",
            name,
            "--seed",
            seed,
        ]
        if variant == "ldm_joint":
            ev_args += ["--reconstruction", enc / "reconstruction.json"]
        rec = runner.sclatent("EVALUATE", name, ev_args, child=variant == "ldm_joint", variant=variant)
        uns = _uns(gathered)
        result["generation"][variant] = _generation_entry(
            evdir / "metrics.json",
            label,
            conditional,
            {"replicates": reps, "nfe_per_batch": uns.get("nfe_per_batch"), "method": uns.get("method")},
        )
    joint = result["generation"]["ldm_joint"]
    result["floor"] = joint["floor"]

    # ---- scVI: equal epochs, equal wall time
    if plan.scvi:
        result["scvi"] = run_scvi(
            spec, plan, runner, budget, d, prep, tok, eval_real, n_eval, vae_epochs, ours_train_s, result
        )
        for budget_name, info in result["scvi"].items():
            recon[f"scVI, {budget_name.replace('_', ' ')}"] = json.loads(
                (d / "scvi" / budget_name / "reconstruction.json").read_text()
            )["metrics"]
    else:
        result["skipped"].append("scVI: disabled for this run")
    result["reconstruction"] = recon

    # ---- held-out combinations: every model's EVALUATE section, and counterfactual transfer
    if spec.holdout:
        if budget.allows(60 + (per_cell_s or 0.05) * 8 * n_train / max(len(keys), 1)):
            result["held_out"] = run_held_out(spec, plan, runner, d, model, prep, result)
        else:
            result["skipped"].append(f"held-out combinations: not enough budget left ({budget.left():.0f} s)")
    result["paths"] = {
        "vae": str(vae),
        "prior": str(prior),
        "model": str(model),
        "eval_real": str(eval_real),
        "tokens": str(tok),
    }
    return result


def run_scvi(
    spec: DatasetSpec,
    plan: Plan,
    runner: Runner,
    budget: Budget,
    d: Path,
    prep: Path,
    tok: Path,
    eval_real: Path,
    n_eval: int,
    vae_epochs: float,
    ours_train_s: float,
    result: dict[str, Any],
) -> dict[str, Any]:
    """Train scVI at both budgets in one measured child process, then EVALUATE its generated cells."""
    budgets = [f"equal_epochs:epochs={max(1, math.ceil(vae_epochs))}"]
    if budget.allows(ours_train_s + 120):
        budgets.append(f"equal_time:seconds={ours_train_s:.1f}")
    else:
        result["skipped"].append(
            f"scVI at equal wall time ({ours_train_s:.0f} s): not enough budget left ({budget.left():.0f} s)"
        )
    out = d / "scvi"
    cmd = [
        sys.executable,
        str(HERE / "scvi_baseline.py"),
        "--train",
        str(prep / "train.h5ad"),
        "--test",
        str(prep / "test.h5ad"),
        "--tokens",
        str(tok),
        "--outdir",
        str(out),
        "--keys",
        ",".join(spec.keys),
        "--replicates",
        str(plan.replicates),
        "--n-generate",
        str(n_eval),
        "--seed",
        str(plan.seed),
        "--threads",
        str(plan.threads),
        *(["--covariates"] if spec.keys else []),
    ]
    for b in budgets:
        cmd += ["--budget", b]
    before = load_average()
    log_path = runner.logdir / f"scvi_{spec.name}.log"
    wall, rss, code = run_child(cmd, log_path=log_path, env=child_env(plan.threads))
    if code != 0:
        raise BenchError(
            f"scVI baseline on {spec.name} failed (exit {code}); log {log_path}:\n{log_path.read_text()[-1500:]}"
        )
    infos = {b.split(":")[0]: json.loads((out / b.split(":")[0] / "scvi.json").read_text()) for b in budgets}
    first = next(iter(infos.values()))
    runner.add(
        StepRecord(
            "SCVI",
            spec.name,
            wall,
            rss,
            before,
            load_average(),
            " ".join(cmd[1:]),
            True,
            {"budgets": list(infos), "cells_per_s": first["cells_per_s"], "epochs": first["epochs"]},
        )
    )
    for budget_name, info in infos.items():
        gathered = out / budget_name / "generated.h5ad"
        evdir = out / budget_name / "evaluate"
        runner.sclatent(
            "EVALUATE",
            spec.name,
            [
                "evaluate",
                "--real",
                eval_real,
                "--generated",
                gathered,
                "--outdir",
                evdir,
                "--condition-keys",
                ",".join(spec.keys),
                "--dataset",
                spec.name,
                "--seed",
                str(plan.seed),
            ],
            child=False,
            variant=f"scvi_{budget_name}",
        )
        label, conditional = VARIANTS[f"scvi_{budget_name}"]
        result["generation"][f"scvi_{budget_name}"] = _generation_entry(
            evdir / "metrics.json",
            label,
            conditional,
            {"replicates": plan.replicates, "nfe_per_batch": None, "method": "prior N(0, I)"},
        )
    return infos


def run_held_out(
    spec: DatasetSpec, plan: Plan, runner: Runner, d: Path, model: Path, prep: Path, result: dict[str, Any]
) -> dict[str, Any]:
    """The held-out table's data: each conditional row's EVALUATE held-out section, plus counterfactual transfer:
    the training cells of each held-out combination's first-key value (e.g. its cell type under the other
    conditions) carried to the held-out labels, scored by the same function."""
    import anndata as ad

    from sclatent.holdout import parse_holdout
    from sclatent.metrics.heldout import score_held_out

    sections = {
        entry["label"]: entry["held_out"]
        for entry in result["generation"].values()
        if entry.get("conditional") and entry.get("held_out")
    }
    first, others = spec.keys[0], spec.keys[1:]
    out = d / "transfer"
    files = []
    for i, combo in enumerate(parse_holdout(spec.holdout)):
        if first not in combo or not all(k in combo for k in others):
            continue
        sets = ",".join(f"{k}={combo[k]}" for k in others)
        runner.sclatent(
            "TRANSFER",
            spec.name,
            ["transfer", "--model", model, "--h5ad", prep / "train.h5ad", "--where", f"{first}={combo[first]}"]
            + ["--set", sets, "--out", out / f"combo{i}.h5ad", "--seed", plan.seed, "--threads", plan.threads],
            child=False,
            variant="held_out_transfer",
        )
        files.append(out / f"combo{i}.h5ad")
    if files:
        test = ad.read_h5ad(prep / "test.h5ad")
        gen = ad.concat([ad.read_h5ad(f) for f in files])
        seen = list(test.uns["sclatent"]["train_combinations"])
        sections["sclatent transfer (same cell type, other condition)"] = score_held_out(
            test, gen, spec.keys, seen, model_genes=list(gen.var_names), seed=plan.seed
        )
    return {"holdout": spec.holdout, "sections": sections}
