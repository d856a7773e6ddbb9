"""GATHER: SAMPLE's shards joined into one h5ad in (replicate, cell_index) order, streamed shard by shard.

No torch here: GATHER's memory is that of one shard's chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .io import InputError, atomic_path
from .ondisk import H5adCounts, H5adWriter, obsm_shape, read_meta


def gather(paths: Sequence[str | Path], out: str | Path) -> ad.AnnData:
    """Join SAMPLE shards (same genes) into one h5ad ordered by (replicate, cell_index), streamed shard by shard.

    Each shard is read in row chunks and appended to the output, so memory follows one shard, not their sum.
    Returns the output's obs, var and uns (its counts stay on disk)."""
    if not paths:
        raise InputError("gather: no shard files given")
    metas = [read_meta(p) for p in paths]
    genes = list(metas[0].var_names)
    for p, m in zip(paths, metas):
        missing = [c for c in ("cell_index", "replicate") if c not in m.obs.columns]
        if missing:
            raise InputError(f"gather: {p} is not a SAMPLE shard (no obs column {', '.join(repr(c) for c in missing)})")
        if list(m.var_names) != genes:
            raise InputError(f"gather: {p} has different genes than {paths[0]}")
    # each shard's rows in key order, shards by their first key: the output order when the shards do not interleave
    reps = [m.obs["replicate"].to_numpy() for m in metas]
    idxs = [m.obs["cell_index"].to_numpy() for m in metas]
    within = [np.lexsort((idxs[i], reps[i])) for i in range(len(metas))]
    nonempty = [i for i in range(len(metas)) if metas[i].n_obs]
    shard_order = sorted(nonempty, key=lambda i: (reps[i][within[i][0]], idxs[i][within[i][0]]))
    names = pd.Index(np.concatenate([m.obs_names.to_numpy() for m in metas]))
    rep = np.concatenate([reps[i][within[i]] for i in shard_order]) if shard_order else np.zeros(0)
    idx = np.concatenate([idxs[i][within[i]] for i in shard_order]) if shard_order else np.zeros(0)
    same_rep = rep[1:] == rep[:-1]
    if not names.is_unique or np.any(same_rep & (idx[1:] == idx[:-1])):
        raise InputError("gather: the shards overlap (repeated cells)")
    if np.any((rep[1:] < rep[:-1]) | (same_rep & (idx[1:] < idx[:-1]))):
        raise InputError("gather: the shards' cells interleave (SAMPLE writes each shard as one range of cells)")
    obs = pd.concat([metas[i].obs.iloc[within[i]] for i in shard_order] or [metas[0].obs], join="outer")
    for col in obs.columns:
        if any(isinstance(m.obs[col].dtype, pd.CategoricalDtype) for m in metas if col in m.obs.columns):
            obs[col] = pd.Categorical(obs[col].astype(object).where(obs[col].notna(), None))
    has_latent = all(obsm_shape(p, "X_latent") is not None for p in paths)
    first = dict(metas[0].uns.get("sclatent", {}))
    first["seconds"] = float(sum(float(m.uns.get("sclatent", {}).get("seconds", 0.0)) for m in metas))
    first["gathered_from"] = [Path(p).name for p in paths]
    nnz = 0
    for p in paths:
        with H5adCounts(p) as c:
            nnz += int(c.indptr[-1]) if c.indptr is not None else c.n_obs * c.n_vars
    with atomic_path(out) as tmp:
        writer = H5adWriter(tmp, len(genes), max_nnz=nnz)
        try:
            for i in shard_order:
                with H5adCounts(paths[i]) as c:
                    if np.array_equal(within[i], np.arange(c.n_obs)):
                        for a, b in c.chunks():
                            writer.append(c.rows(a, b).astype(np.float32, copy=False))
                    else:  # rows out of order inside the shard: one shard in memory
                        writer.append(c.rows(0, c.n_obs)[within[i]].astype(np.float32, copy=False))
                    if has_latent:
                        writer.append_obsm("X_latent", np.asarray(c.file["obsm"]["X_latent"][...])[within[i]])
            writer.close(obs, metas[0].var, {**dict(metas[0].uns), "sclatent": first})
        except BaseException:
            writer.abort()
            raise
    return read_meta(out)
