"""The report's inputs: every artefact it reads, checked, as one `ReportInputs`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import InputError, read_json
from ..ondisk import read_meta

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """One training stage: its history (one row per log step) and the config.json beside it (if present)."""

    path: Path
    history: pd.DataFrame
    config: dict[str, Any] | None


@dataclass
class ReportInputs:
    """Everything the report is built from; None marks an input that was not given."""

    dataset: str
    prepare: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    vae: TrainingRun | None = None
    prior: TrainingRun | None = None
    reconstruction: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    real: Any = None  # AnnData: obs, var, uns (X None when read from a file: the counts stay on disk)
    generated: Any = None  # AnnData, as `real`
    trace: pd.DataFrame | None = None
    paths: dict[str, str] = field(default_factory=dict)


def _load_json(path: str | Path, what: str, needs: Sequence[str]) -> dict[str, Any]:
    """Read a JSON object and check that it has the top-level keys `needs` (else a one-line InputError)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a valid {what} (expected a JSON object, got {type(data).__name__})")
    absent = [k for k in needs if k not in data]
    if absent:
        raise InputError(f"{path}: not a valid {what} (no {', '.join(repr(k) for k in absent)} entry)")
    return data


def load_metrics_json(path: str | Path, what: str = "EVALUATE metrics.json") -> dict[str, Any]:
    """Read an EVALUATE metrics.json (or a baseline's), checking the entries the report reads."""
    doc = _load_json(path, what, ("generation",))
    gen = doc["generation"]
    if not isinstance(gen, dict) or not isinstance(gen.get("overall"), dict):
        raise InputError(f"{path}: not a valid {what} ('generation' has no 'overall' metrics)")
    for part in ("labels", "per_class"):
        if not isinstance(gen.get(part, {}), dict):
            raise InputError(f"{path}: not a valid {what} ('generation.{part}' is not an object)")
    if not isinstance(doc.get("generation_per_replicate", []), list):
        raise InputError(f"{path}: not a valid {what} ('generation_per_replicate' is not a list)")
    for part in ("real_vs_real", "generated_vs_real_half"):
        entry = doc.get(part)
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("overall"), dict)):
            raise InputError(f"{path}: not a valid {what} ('{part}' has no 'overall' metrics)")
    return doc


def load_history(path: str | Path) -> TrainingRun:
    """Read a training run's history.csv (or a run folder holding one) and the config.json beside it."""
    path = Path(path)
    if path.is_dir():
        path = path / "history.csv"
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    try:
        history = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a training history CSV ({str(exc).splitlines()[0]})") from None
    if "step" not in history.columns or "loss" not in history.columns:
        raise InputError(
            f"{path}: not a training history CSV (needs columns 'step' and 'loss'; has {list(history.columns)[:8]})"
        )
    for column in history.columns:
        converted = pd.to_numeric(history[column], errors="coerce")
        bad = converted.isna() & history[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: column {column!r} row {row + 1} is not a number ({history[column].iloc[row]!r})")
        history[column] = converted
    config_path = path.parent / "config.json"
    config = _load_json(config_path, "training config.json", ()) if config_path.exists() else None
    return TrainingRun(path=path, history=history, config=config)


def load_trace(path: str | Path) -> pd.DataFrame:
    """Read a Nextflow execution trace (tab-separated, header row) as strings."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    try:
        trace = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a Nextflow execution trace ({str(exc).splitlines()[0]})") from None
    if "name" not in trace.columns and "process" not in trace.columns:
        raise InputError(
            f"{path}: not a Nextflow execution trace (no 'name' or 'process' column; has {list(trace.columns)[:8]})"
        )
    return trace


def parse_baselines(items: Sequence[str]) -> dict[str, Path]:
    """Parse repeated `NAME=metrics.json` options into {name: path}, in the order given."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise InputError(f"--baseline {item!r}: expected NAME=metrics.json")
        if name in out:
            raise InputError(f"--baseline {item!r}: the name {name!r} is given twice")
        out[name] = Path(path)
    return out


def load_inputs(
    *,
    dataset: str | None = None,
    prepare: str | Path | None = None,
    manifest: str | Path | None = None,
    vae_history: str | Path | None = None,
    prior_history: str | Path | None = None,
    reconstruction: str | Path | None = None,
    metrics: str | Path | None = None,
    real: str | Path | None = None,
    generated: str | Path | None = None,
    baselines: Mapping[str, str | Path] | None = None,
    trace: str | Path | None = None,
) -> ReportInputs:
    """Read and check every given input (InputError with one line on a missing or malformed file)."""
    paths = {
        k: str(v)
        for k, v in dict(
            prepare=prepare,
            manifest=manifest,
            vae_history=vae_history,
            prior_history=prior_history,
            reconstruction=reconstruction,
            metrics=metrics,
            real=real,
            generated=generated,
            trace=trace,
        ).items()
        if v is not None
    }
    if manifest is not None and Path(manifest).is_dir():
        manifest = Path(manifest) / "manifest.json"
    inputs = ReportInputs(
        dataset="",
        prepare=_load_json(prepare, "PREPARE prepare.json", ("qc",)) if prepare is not None else None,
        manifest=_load_json(manifest, "TOKENIZE manifest.json", ("genes", "splits")) if manifest is not None else None,
        vae=load_history(vae_history) if vae_history is not None else None,
        prior=load_history(prior_history) if prior_history is not None else None,
        reconstruction=_load_json(reconstruction, "ENCODE reconstruction.json", ("metrics",))
        if reconstruction is not None
        else None,
        metrics=load_metrics_json(metrics) if metrics is not None else None,
        baselines={
            name: load_metrics_json(p, f"EVALUATE metrics.json (baseline {name!r})")
            for name, p in (baselines or {}).items()
        },
        real=read_meta(real) if real is not None else None,  # counts stay on disk: cell_sample reads a subsample
        generated=read_meta(generated) if generated is not None else None,
        trace=load_trace(trace) if trace is not None else None,
        paths=paths,
    )
    for name, p in (baselines or {}).items():
        inputs.paths[f"baseline {name}"] = str(p)
    inputs.dataset = (
        dataset
        or (inputs.metrics or {}).get("dataset")
        or (inputs.prepare or {}).get("dataset")
        or (None if inputs.real is None else inputs.real.uns.get("sclatent", {}).get("dataset"))
        or "dataset"
    )
    return inputs
