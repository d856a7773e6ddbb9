"""Reading and validating samplesheets and AnnData files; writing outputs atomically.

This module knows nothing about torch. Every user-facing problem is raised as :class:`InputError` with a
one-line message that names the file, row, column, gene or value at fault; the CLI prints it and exits
non-zero.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import anndata as ad
import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

SAMPLESHEET_COLUMNS = ("dataset", "h5ad", "split", "batch", "condition_keys")
SPLITS = ("train", "test", "all")


# --------------------------------------------------------------------------------------------------------
# samplesheet
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRow:
    """One validated samplesheet row. `h5ad` is an absolute local path or a URI (s3://, gs://, https://)."""

    row: int  # 1-based data row number (the header is row 0)
    dataset: str
    h5ad: str
    split: str
    batch: str | None
    condition_keys: tuple[str, ...] | None = None  # per-dataset override of --condition_keys
    local: str | None = None  # a staged copy of h5ad to read instead (the pipeline's tasks); messages name h5ad


def samplesheet_schema() -> dict[str, Any]:
    """The JSON Schema of the samplesheet (also shipped as assets/schema_input.json)."""
    text = resources.files("sclatent").joinpath("data/schema_input.json").read_text()
    return json.loads(text)


def is_uri(path: str) -> bool:
    """True for remote locations Nextflow stages itself (s3://, gs://, az://, http(s)://, ftp://)."""
    return "://" in path and not path.startswith("file://")


def _resolve_path(value: str, base_dir: str | None) -> str:
    if value.startswith("file://"):
        value = value[len("file://") :]
    if is_uri(value) or os.path.isabs(value) or base_dir is None:
        return value
    if is_uri(base_dir):
        return base_dir.rstrip("/") + "/" + value
    return os.path.normpath(os.path.join(base_dir, value))


def read_samplesheet(
    path: str | os.PathLike, *, base_dir: str | None = None, check_exists: bool = True
) -> list[SampleRow]:
    """Read and validate a samplesheet CSV against the JSON schema.

    Relative `h5ad` paths are resolved against `base_dir` (default: the samplesheet's own folder). With
    `check_exists`, local paths must exist (URIs are left to Nextflow to stage).
    """
    import jsonschema

    path = Path(path)
    name = str(path)
    if not path.exists():
        raise InputError(f"samplesheet {name}: file does not exist")
    if base_dir is None:
        base_dir = str(path.resolve().parent)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(
                f"samplesheet {name}: the file is empty (expected a header line: "
                "dataset,h5ad[,split][,batch][,condition_keys])"
            ) from None
        header = [h.strip() for h in header]
        rows = [r for r in reader if any(cell.strip() for cell in r)]

    for col in header:
        if col not in SAMPLESHEET_COLUMNS:
            close = difflib.get_close_matches(col, SAMPLESHEET_COLUMNS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(
                f"samplesheet {name}: unknown column '{col}'{hint}; allowed columns: {', '.join(SAMPLESHEET_COLUMNS)}"
            )
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise InputError(f"samplesheet {name}: column '{dupes[0]}' appears more than once in the header")
    for col in ("dataset", "h5ad"):
        if col not in header:
            raise InputError(f"samplesheet {name}: missing required column '{col}' (header is: {','.join(header)})")
    if not rows:
        raise InputError(f"samplesheet {name}: no data rows below the header")

    schema = samplesheet_schema()
    item_schema = schema["items"]
    validator = jsonschema.Draft202012Validator(item_schema)
    out: list[SampleRow] = []
    seen: dict[tuple[str, str], int] = {}
    for i, values in enumerate(rows, start=1):
        if len(values) != len(header):
            raise InputError(f"samplesheet {name} row {i}: has {len(values)} fields but the header has {len(header)}")
        record = {col: v.strip() for col, v in zip(header, values)}
        # empty optional cells mean "not given"
        obj = {k: v for k, v in record.items() if v != "" or k in ("dataset", "h5ad")}
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            err = errors[0]
            col = err.path[0] if err.path else None
            if col is None and err.validator == "required":
                col = err.message.split("'")[1]
            value = obj.get(col, "") if col else ""
            msg = item_schema["properties"].get(col, {}).get("errorMessage", err.message) if col else err.message
            raise InputError(f"samplesheet {name} row {i}, column '{col}': invalid value '{value}': {msg}")
        h5ad = _resolve_path(obj["h5ad"], base_dir)
        if check_exists and not is_uri(h5ad) and not os.path.exists(h5ad):
            raise InputError(f"samplesheet {name} row {i}, column 'h5ad': file does not exist: {h5ad}")
        key = (obj["dataset"], h5ad)
        if key in seen:
            raise InputError(
                f"samplesheet {name} row {i}, column 'h5ad': {h5ad} is listed twice for dataset '{obj['dataset']}' "
                f"(also row {seen[key]})"
            )
        seen[key] = i
        keys = None
        if obj.get("condition_keys"):
            keys = tuple(k.strip() for k in obj["condition_keys"].split(";") if k.strip())
        out.append(SampleRow(i, obj["dataset"], h5ad, obj.get("split", "all"), obj.get("batch") or None, keys))
    # condition_keys, when given, must agree across the rows of a dataset
    first: dict[str, SampleRow] = {}
    for r in out:
        f = first.setdefault(r.dataset, r)
        if r.condition_keys != f.condition_keys:
            raise InputError(
                f"samplesheet {name} row {r.row}, column 'condition_keys': '{';'.join(r.condition_keys or ())}' "
                "differs from "
                f"row {f.row} ('{';'.join(f.condition_keys or ())}') of dataset '{r.dataset}'"
            )
    return out


def name_staged_copies(rows: list[SampleRow], sources: list[str], samplesheet: str | os.PathLike) -> list[SampleRow]:
    """Rows whose file is a staged copy, given as `STAGED=ORIGINAL` (STAGED as written in the samplesheet): they
    read STAGED but name ORIGINAL, the path the user gave, in messages and records."""
    base = Path(samplesheet).resolve().parent
    by_path = {str(Path(r.h5ad).resolve()): i for i, r in enumerate(rows) if not is_uri(r.h5ad)}
    out = list(rows)
    for item in sources:
        staged, sep, original = item.partition("=")
        if not sep or not staged.strip() or not original.strip():
            raise InputError(f"--source {item!r}: expected STAGED=ORIGINAL")
        i = by_path.get(str((base / staged.strip()).resolve()))
        if i is None:
            raise InputError(f"--source {item!r}: samplesheet {samplesheet} has no file {staged.strip()}")
        out[i] = replace(out[i], h5ad=original.strip(), local=out[i].h5ad)
    return out


def write_samplesheet(rows: list[SampleRow], path: str | os.PathLike) -> None:
    """Write validated rows back as a normalised samplesheet (absolute paths, split filled in)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SAMPLESHEET_COLUMNS)
        for r in rows:
            w.writerow([r.dataset, r.h5ad, r.split, r.batch or "", ";".join(r.condition_keys or ())])


# --------------------------------------------------------------------------------------------------------
# AnnData
# --------------------------------------------------------------------------------------------------------


def read_h5ad(path: str | os.PathLike, *, name: str | None = None) -> ad.AnnData:
    """Read an h5ad file into memory (sparse matrices stay sparse), with a clear error if it is not one.
    `name`: how messages call the file (default: `path`), e.g. the user's path of a staged copy."""
    path = str(path)
    name = name or path
    if not os.path.exists(path):
        raise InputError(f"{name}: file does not exist")
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # anndata/h5py raise many types for non-h5ad input
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{name}: not a readable .h5ad file ({reason})") from None


def check_unique_genes(var_names, *, source: str) -> None:
    """Duplicate gene names are an error: a gene must mean one column (rule documented in docs/usage.md)."""
    import pandas as pd

    idx = pd.Index(var_names)
    if idx.is_unique:
        return
    dup = idx[idx.duplicated()].unique()
    raise InputError(
        f"{source}: duplicate gene name '{dup[0]}' ({len(dup)} duplicated names in total); make var_names unique "
        f"(e.g. use Ensembl ids, or anndata's var_names_make_unique()) before running"
    )


JOINT_SEPARATOR = "|"  # joint class name: labels of the keys joined by this, in key order ("HCC827|Drop-seq")


def joint_labels(obs: Any, keys: Sequence[str], sep: str = JOINT_SEPARATOR) -> np.ndarray:
    """Each cell's labels of `keys` (obs columns) joined by `sep`: (n,) str, vectorised over the cells."""
    joint = obs[keys[0]].astype(str).to_numpy().astype(object)
    for key in keys[1:]:
        joint = joint + sep + obs[key].astype(str).to_numpy().astype(object)
    return joint.astype(str)


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> None:
    """Write an AnnData atomically (temp file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def dump_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON to `path` directly (use inside an atomic block)."""
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default, allow_nan=True)
        fh.write("\n")


# --------------------------------------------------------------------------------------------------------
# atomic writes, checksums, provenance
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error remove it.

    A killed task therefore never leaves a half-written artefact under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    if is_dir:
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
    try:
        yield tmp
        # mkstemp/mkdtemp create private (0600/0700) entries: give the result the usual umask permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike) -> Iterator[list[str]]:
    """Like :func:`atomic_path` for several files that must appear together or not at all.

    Yields temporary paths (same order); only when the block succeeds are they all renamed onto the final
    names, so a failure leaves none of the outputs behind.
    """
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        yield tmps


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically, pretty-printed, with numpy scalars converted."""
    with atomic_path(path) as tmp:
        dump_json(obj, tmp)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def provenance(step: str, config: dict[str, Any], inputs: dict[str, str | os.PathLike] | None = None) -> dict[str, Any]:
    """The sidecar every artefact carries: package version, the step's configuration, input checksums."""
    import platform
    import sys

    from . import __version__

    out: dict[str, Any] = {
        "sclatent_version": __version__,
        "step": step,
        "config": config,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if inputs:
        out["inputs"] = {
            k: {"path": str(v), "sha256": sha256(v)} for k, v in inputs.items() if v is not None and os.path.isfile(v)
        }
    return out
