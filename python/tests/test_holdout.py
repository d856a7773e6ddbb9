"""Held-out combinations (sclatent.holdout and `prepare --holdout`): parsing, the mask, the split and the errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from sclatent.cli import main
from sclatent.errors import InputError
from sclatent.holdout import combinations_of, holdout_mask, joint_classes, parse_holdout
from sclatent.synthetic import CompositionalTruth, synthetic_counts


def _obs() -> pd.DataFrame:
    return pd.DataFrame(
        {"cell_type": ["T", "T", "B", "B", "NK", "T"], "condition": ["ctrl", "stim", "ctrl", "stim", "stim", "stim"]}
    )


def test_parse_holdout() -> None:
    assert parse_holdout("cell_type=T,condition=stim;cell_type=NK") == [
        {"cell_type": "T", "condition": "stim"},
        {"cell_type": "NK"},
    ]
    assert parse_holdout(" cell_type = T ; ") == [{"cell_type": "T"}]
    assert parse_holdout("") == [] and parse_holdout(None) == []
    for bad, message in [
        ("cell_type", "expected key=value"),
        ("cell_type=", "expected key=value"),
        ("cell_type=T,cell_type=B", "key 'cell_type' given twice"),
        ("cell_type=T;cell_type=T", "listed twice"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_holdout(bad)


def test_holdout_mask_selects_every_cell_of_each_combination() -> None:
    obs = _obs()
    keys = ["cell_type", "condition"]
    mask = holdout_mask(obs, parse_holdout("cell_type=T,condition=stim;cell_type=NK"), keys)
    assert mask.tolist() == [False, True, False, False, True, True]
    assert not holdout_mask(obs, [], keys).any()
    assert list(joint_classes(obs, keys)[:2]) == ["T|ctrl", "T|stim"]
    assert combinations_of(obs, keys) == ["B|ctrl", "B|stim", "NK|stim", "T|ctrl", "T|stim"]
    assert combinations_of(obs, ["cell_type"]) == []  # one key: no combinations


@pytest.mark.parametrize(
    "spec, message",
    [
        ("donor=1", "--holdout donor=1: 'donor' is not a condition key (cell_type, condition)"),
        ("cell_type=DC", "--holdout cell_type=DC: no cell has cell_type=DC (values of 'cell_type': B, NK, T)"),
        ("cell_type=NK,condition=ctrl", "--holdout cell_type=NK,condition=ctrl: no cell has this combination"),
    ],
)
def test_holdout_mask_errors_name_the_key_or_value(spec: str, message: str) -> None:
    with pytest.raises(InputError) as err:
        holdout_mask(_obs(), parse_holdout(spec), ["cell_type", "condition"])
    assert message in str(err.value)


def _dataset(tmp_path):
    adata = synthetic_counts(n_cells=400, n_genes=60, n_types=3, n_batches=2, seed=4)
    adata.obs = adata.obs.rename(columns={"batch": "condition"})
    adata.write_h5ad(tmp_path / "a.h5ad")
    sheet = tmp_path / "s.csv"
    sheet.write_text(f"dataset,h5ad,split\nds,{tmp_path / 'a.h5ad'},all\n")
    return adata, sheet


def _prepare(sheet, out, *extra):
    args = [
        "prepare",
        "--samplesheet",
        sheet,
        "--outdir",
        out,
        "--n-hvg",
        30,
        "--condition-keys",
        "cell_type,condition",
    ]
    return CliRunner().invoke(main, ["-q", *map(str, args), *map(str, extra)])


def test_prepare_holdout_sends_the_combinations_to_test_only(tmp_path) -> None:
    adata, sheet = _dataset(tmp_path)
    spec = "cell_type=type_0,condition=batch_1;cell_type=type_2,condition=batch_0"
    r = _prepare(sheet, tmp_path / "out", "--holdout", spec)
    assert r.exit_code == 0, r.output
    train, test = ad.read_h5ad(tmp_path / "out/train.h5ad"), ad.read_h5ad(tmp_path / "out/test.h5ad")
    held = holdout_mask(adata.obs, parse_holdout(spec), ["cell_type", "condition"])
    assert set(test.obs_names) >= set(adata.obs_names[held]) and not set(train.obs_names) & set(adata.obs_names[held])
    # the other combinations are split as before: ~20% of each in test
    rest = adata.obs_names[~held]
    assert abs(len(set(test.obs_names) & set(rest)) - 0.2 * len(rest)) <= 4
    seen = ["type_0|batch_0", "type_1|batch_0", "type_1|batch_1", "type_2|batch_1"]
    for part in (train, test):
        uns = part.uns["sclatent"]
        assert list(uns["holdout"]) == ["cell_type=type_0,condition=batch_1", "cell_type=type_2,condition=batch_0"]
        assert list(uns["train_combinations"]) == seen
    report = json.loads((tmp_path / "out/prepare.json").read_text())
    assert report["holdout"] == {"combinations": list(test.uns["sclatent"]["holdout"]), "test_cells": int(held.sum())}
    # same seed, same split; held-out cells never depend on it
    r = _prepare(sheet, tmp_path / "again", "--holdout", spec)
    assert list(ad.read_h5ad(tmp_path / "again/test.h5ad").obs_names) == list(test.obs_names)
    r = _prepare(sheet, tmp_path / "other", "--holdout", spec, "--seed", 1)
    other = ad.read_h5ad(tmp_path / "other/test.h5ad")
    assert set(other.obs_names) >= set(adata.obs_names[held]) and set(other.obs_names) != set(test.obs_names)


def test_prepare_without_holdout_records_every_combination_as_seen(tmp_path) -> None:
    _, sheet = _dataset(tmp_path)
    assert _prepare(sheet, tmp_path / "out").exit_code == 0
    uns = ad.read_h5ad(tmp_path / "out/test.h5ad").uns["sclatent"]
    assert len(uns["holdout"]) == 0 and len(uns["train_combinations"]) == 6


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tissue=lung", "--holdout tissue=lung: 'tissue' is not a condition key (cell_type, condition)"),
        ("cell_type=type_9", "--holdout cell_type=type_9: no cell has cell_type=type_9"),
        ("cell_type", "--holdout 'cell_type': expected key=value"),
    ],
)
def test_prepare_bad_holdout_is_one_line_and_writes_nothing(tmp_path, spec: str, message: str) -> None:
    _, sheet = _dataset(tmp_path)
    r = _prepare(sheet, tmp_path / "out", "--holdout", spec)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and message in lines[0], r.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_holding_out_every_cell_leaves_no_training_split(tmp_path) -> None:
    _, sheet = _dataset(tmp_path)
    spec = ";".join(f"cell_type=type_{t}" for t in range(3))
    r = _prepare(sheet, tmp_path / "out", "--holdout", spec)
    assert r.exit_code == 2 and "the training split is empty" in r.output


def test_evaluate_scores_never_seen_combinations_apart(tmp_path, caplog) -> None:
    """EVALUATE on a perfect generator (fresh draws from the synthetic truth): the held-out combination is reported
    on its own, next to its real-vs-real floor and the nearest seen combinations' real cells, which it beats; every
    other number is about the seen combinations."""
    truth = CompositionalTruth(n_types=3, n_perturbations=3, n_genes=200, seed=0)
    truth.sample(None, 80, seed=1).write_h5ad(tmp_path / "cells.h5ad")
    sheet = tmp_path / "s.csv"
    sheet.write_text(f"dataset,h5ad,split\nds,{tmp_path / 'cells.h5ad'},all\n")
    args = ["prepare", "--samplesheet", sheet, "--outdir", tmp_path / "p", "--n-hvg", 100]
    args += ["--condition-keys", "cell_type,perturbation", "--holdout", "cell_type=type_0,perturbation=pert_1"]
    assert CliRunner().invoke(main, ["-q", *map(str, args)]).exit_code == 0
    test = ad.read_h5ad(tmp_path / "p/test.h5ad")
    generated = truth.sample(None, 60, seed=2)
    generated.obs["replicate"] = 0
    generated.write_h5ad(tmp_path / "gen.h5ad")
    r = CliRunner().invoke(
        main,
        ["evaluate", "--real", str(tmp_path / "p/test.h5ad"), "--generated", str(tmp_path / "gen.h5ad")]
        + ["--outdir", str(tmp_path / "ev"), "--n-pcs", "10", "--min-cells-per-class", "10"],
    )
    assert r.exit_code == 0, r.output
    assert "type_0|pert_1 was never seen in training: W2" in caplog.text  # the log names it
    metrics = json.loads((tmp_path / "ev/metrics.json").read_text())
    held = metrics["held_out"]
    assert held["combinations"] == ["type_0|pert_1"] and not held["skipped"]
    entry = held["per_combination"]["type_0|pert_1"]
    assert entry["n_real"] == 80 and entry["n_half"] == 40 and entry["model"]["n_generated"] == 40
    assert entry["nearest"]["perturbation"]["combination"] in ("type_0|control", "type_0|pert_2")
    assert entry["nearest"]["cell_type"]["combination"] in ("type_1|pert_1", "type_2|pert_1")
    for near in entry["nearest"].values():  # the truth beats the real cells of every neighbour, at the same size
        assert near["model"]["w2"] < near["real"]["w2"] and near["model"]["mmd2_rbf"] < near["real"]["mmd2_rbf"]
    assert entry["model"]["w2"] < 1.3 * entry["floor"]["w2"] and entry["model"]["coverage"] > 0.5
    # the rest is about the seen combinations: the held-out cells are not among the real cells scored there
    assert metrics["generation_scope"].startswith("seen combinations")
    scored = metrics["cells_used"]["scored"]
    assert scored["real"] == test.n_obs - 80 and scored["generated"] == {"0": 9 * 60 - 60}
    assert metrics["n_real"] == test.n_obs and metrics["n_generated"] == 9 * 60  # the files' cells
    seen_classes = metrics["generation"]["per_class"]["cell_type|perturbation"]["n_classes"]
    assert seen_classes == [8]
    # the report says which combination was never seen, with its table
    r = CliRunner().invoke(
        main, ["report", "--metrics", str(tmp_path / "ev/metrics.json"), "--out", str(tmp_path / "r.html")]
    )
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    section = page[page.index('<section id="held-out">') :]
    section = section[: section.index("</section>")]
    assert "Never seen in training: type_0|pert_1." in section and "real half A (floor)" in section
    assert section.count("<tr>") == 1 + 2 + 2 * 2  # header, model and floor, two neighbours and the model at their n


def test_compositional_truth_is_seeded_and_composes() -> None:
    """The synthetic benchmark's truth: the same seeds give the same cells, and a pair's expected log profile is
    the sum of its type's and its perturbation's parts plus the rank-1 interaction (what a held-out pair's truth is)."""
    a, b = CompositionalTruth(seed=3), CompositionalTruth(seed=3)
    x, y = a.sample([(0, 1), (2, 0)], 20, seed=5), b.sample([(0, 1), (2, 0)], 20, seed=5)
    assert (x.X != y.X).nnz == 0 and list(x.obs["perturbation"][:1]) == ["pert_1"]
    assert (a.sample([(0, 1)], 20, seed=6).X != x.X[:20]).nnz > 0
    zero = np.zeros(1)
    for t, p in [(1, 2), (3, 3)]:
        expected = a.base + a.type_effect[t] + a.shared[p] + a.sensitivity[t] * a.specific[p]
        np.testing.assert_allclose(a.log_profile(t, p, zero)[0], expected)
    assert not a.shared[0].any() and not a.specific[0].any()  # the control moves nothing
