"""GATHER streams shards into the output and gives what concatenating them in memory gives."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sclatent import ondisk
from sclatent.generate import gather
from sclatent.io import InputError


def _shard(start: int, stop: int, replicate: int, labels: list[str], seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n = stop - start
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(labels, size=n)),
            "generated": True,
            "replicate": replicate,
            "cell_index": np.arange(start, stop),
            "reference_cell": [f"ref{i}" for i in range(start, stop)],
        },
        index=[f"gen{replicate}_{i}" for i in range(start, stop)],
    )
    X = sp.random(n, 40, density=0.3, format="csr", dtype=np.float32, random_state=seed)
    X.data = np.ceil(X.data * 9)
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(40)]))
    a.obsm["X_latent"] = rng.normal(size=(n, 6)).astype(np.float32)
    a.uns["sclatent"] = {"step": "sample", "seconds": 1.5, "condition_keys": ["cell_type"]}
    return a


def test_gather_equals_in_memory_concatenation(tmp_path, monkeypatch):
    monkeypatch.setattr(ondisk, "CHUNK_NNZ", 50)  # many chunks per shard
    spec = [(30, 60, 0, ["B", "T"]), (0, 30, 0, ["NK", "T"]), (0, 45, 1, ["B"]), (60, 70, 0, ["T", "DC"])]
    shards, paths = [], []
    for i, (a, b, r, labels) in enumerate(spec):
        shards.append(_shard(a, b, r, labels, seed=i))
        if i == 2:  # a shard whose rows are out of order on disk
            shards[-1] = shards[-1][::-1].copy()
        paths.append(tmp_path / f"s{i}.h5ad")
        shards[-1].write_h5ad(paths[-1])
    got = gather(paths, tmp_path / "out.h5ad")
    out = ad.read_h5ad(tmp_path / "out.h5ad")

    ref = ad.concat(shards, join="outer", merge="first", uns_merge="first")
    ref = ref[np.lexsort((ref.obs["cell_index"].to_numpy(), ref.obs["replicate"].to_numpy()))].copy()
    assert list(out.obs_names) == list(ref.obs_names) == list(got.obs_names)
    pd.testing.assert_frame_equal(out.obs, ref.obs, check_categorical=True)
    assert (out.X != ref.X).nnz == 0 and out.X.dtype == np.float32
    np.testing.assert_array_equal(out.obsm["X_latent"], ref.obsm["X_latent"])
    assert out.uns["sclatent"]["seconds"] == 6.0
    assert list(out.uns["sclatent"]["gathered_from"]) == [p.name for p in paths]


def test_gather_refuses_interleaved_shards(tmp_path):
    a, b = _shard(0, 10, 0, ["T"], 0), _shard(10, 20, 0, ["T"], 1)
    a.obs["cell_index"] = np.arange(0, 20, 2)
    b.obs["cell_index"] = np.arange(1, 20, 2)
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(InputError, match="interleave"):
        gather([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "out.h5ad")
    assert not (tmp_path / "out.h5ad").exists()
