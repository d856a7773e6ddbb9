"""TOKENIZE and the streaming loader: lossless shards, consistent manifest, reproducible bucketed batches."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

from sclatent.cli import main
from sclatent.io import InputError
from sclatent.synthetic import synthetic_counts
from sclatent.tokens import TokenLoader, read_manifest, tokenize


@pytest.fixture
def prepared(tmp_path):
    """train/test h5ad as PREPARE writes them (HVG flags, two condition keys)."""
    a = synthetic_counts(n_cells=400, n_genes=150, n_types=3, seed=4, n_batches=2, mean_library=800)
    a.var["highly_variable"] = np.arange(a.n_vars) % 3 != 0
    train, test = a[:320].copy(), a[320:].copy()
    train.uns["sclatent"] = {"condition_keys": ["cell_type", "batch"]}
    train.write_h5ad(tmp_path / "train.h5ad")
    test.write_h5ad(tmp_path / "test.h5ad")
    return tmp_path, train, test


def dense_from_shards(tokens_dir, split, n_genes):
    loader = TokenLoader(tokens_dir, split, batch_size=64, shuffle=False)
    rows = []
    for batch in loader.iter_epoch(0):
        rows.append(batch.dense_counts(n_genes))
    return np.concatenate(rows)


def test_shards_are_lossless_and_manifest_consistent(prepared):
    tmp, train, test = prepared
    m = tokenize(tmp / "train.h5ad", tmp / "tokens", test_path=tmp / "test.h5ad", shard_size=100, progress=False)
    vocab = list(train.var_names[train.var["highly_variable"].to_numpy()])
    assert m["genes"] == vocab and m["n_genes"] == len(vocab) == 100
    assert m["condition_keys"] == ["cell_type", "batch"]  # recorded by PREPARE
    assert m["labels"]["cell_type"] == sorted(set(train.obs["cell_type"].astype(str)))
    for split, adata in (("train", train), ("test", test)):
        info = m["splits"][split]
        assert info["n_cells"] == adata.n_obs == sum(s["n_cells"] for s in info["shards"])
        expected = adata[:, vocab].X.toarray()
        assert info["nnz"] == int((expected > 0).sum()) == sum(s["nnz"] for s in info["shards"])
        np.testing.assert_array_equal(dense_from_shards(tmp / "tokens", split, len(vocab)), expected)
    assert len(m["splits"]["train"]["shards"]) == 4  # 320 cells / 100 per shard
    # library size over the vocabulary; log-normal stats per class
    loader = TokenLoader(tmp / "tokens", "train", batch_size=320, shuffle=False)
    lib = np.concatenate([b.library_size for b in loader.iter_epoch(0)])  # a batch never spans two shards
    np.testing.assert_allclose(lib, train[:, vocab].X.sum(axis=1).A1, rtol=1e-6)
    stats = m["library_size"]["per_key"]["cell_type"]
    ct = train.obs["cell_type"].astype(str).to_numpy()
    for name, s in stats.items():
        ll = np.log(train[:, vocab].X.sum(axis=1).A1[ct == name])
        assert s["n"] == len(ll) and s["mean"] == pytest.approx(ll.mean()) and s["sd"] == pytest.approx(ll.std(ddof=1))
    assert set(m["library_size"]["joint"]) == {f"{c}|{b}" for c, b in zip(ct, train.obs["batch"].astype(str))}


def test_genes_all_and_cli(prepared):
    tmp, train, _ = prepared
    r = CliRunner().invoke(
        main,
        [
            "-q",
            "tokenize",
            "--train",
            str(tmp / "train.h5ad"),
            "--outdir",
            str(tmp / "tok"),
            "--genes",
            "all",
            "--condition-keys",
            "cell_type",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp / "tok")
    assert m["n_genes"] == train.n_vars and m["condition_keys"] == ["cell_type"] and "test" not in m["splits"]


def test_no_condition_keys(tmp_path):
    a = synthetic_counts(n_cells=50, n_genes=30, seed=3)
    a.var["highly_variable"] = True
    a.write_h5ad(tmp_path / "train.h5ad")
    m = tokenize(tmp_path / "train.h5ad", tmp_path / "t", condition_keys=[], shard_size=20, progress=False)
    assert m["condition_keys"] == [] and m["labels"] == {} and "per_key" in m["library_size"]
    batch = next(TokenLoader(tmp_path / "t", "train", batch_size=8).iter_epoch(0))
    assert batch.labels.shape == (len(batch), 0)


def test_loader_epoch_covers_every_cell_once_and_is_seeded(prepared):
    tmp, train, _ = prepared
    tokenize(tmp / "train.h5ad", tmp / "tokens", shard_size=100, progress=False)
    loader = TokenLoader(tmp / "tokens", "train", batch_size=16, seed=7)
    order0 = np.concatenate([b.cell_index for b in loader.iter_epoch(0)])
    assert sorted(order0.tolist()) == list(range(320))
    assert loader.n_batches() == sum(-(-s["n_cells"] // 16) for s in loader.shards) == len(list(loader.iter_epoch(1)))
    again = np.concatenate(
        [b.cell_index for b in TokenLoader(tmp / "tokens", "train", batch_size=16, seed=7).iter_epoch(0)]
    )
    np.testing.assert_array_equal(order0, again)
    order1 = np.concatenate([b.cell_index for b in loader.iter_epoch(1)])
    assert not np.array_equal(order0, order1)
    # resuming mid-epoch yields exactly the remaining batches
    full = list(loader.iter_epoch(2))
    tail = list(loader.iter_epoch(2, start_batch=9))
    assert len(tail) == len(full) - 9
    for x, y in zip(full[9:], tail):
        np.testing.assert_array_equal(x.cell_index, y.cell_index)
        np.testing.assert_array_equal(x.genes, y.genes)


def test_batches_are_padded_masked_and_bucketed(prepared):
    tmp, _, _ = prepared
    tokenize(tmp / "train.h5ad", tmp / "tokens", progress=False)
    bucketed = TokenLoader(tmp / "tokens", "train", batch_size=16, seed=1, bucket_batches=8)
    plain = TokenLoader(tmp / "tokens", "train", batch_size=16, seed=1, bucket_batches=1)
    pads = []
    for loader in (bucketed, plain):
        n_pad = 0
        for b in loader.iter_epoch(0):
            assert b.genes.shape == b.counts.shape == b.mask.shape
            assert np.all(b.genes[~b.mask] == 0) and np.all(b.counts[~b.mask] == 0)
            assert np.all(b.genes[b.mask] > 0) and np.all(b.counts[b.mask] > 0)
            assert b.mask.sum() == len(b.target_genes)  # no truncation here
            n_pad += int((~b.mask).sum())
        pads.append(n_pad)
    assert pads[0] < pads[1]


def test_max_tokens_truncates_encoder_input_only(prepared):
    tmp, _, _ = prepared
    tokenize(tmp / "train.h5ad", tmp / "tokens", max_tokens=20, progress=False)
    m = read_manifest(tmp / "tokens")
    assert m["splits"]["train"]["n_cells_over_max_tokens"] > 0
    loader = TokenLoader(tmp / "tokens", "train", batch_size=32, seed=0)
    subsets = {}
    for epoch in (0, 1):
        for b in loader.iter_epoch(epoch):
            assert b.mask.sum(axis=1).max() <= 20
            for i in range(len(b)):
                full = set(b.target_genes[b.target_indptr[i] : b.target_indptr[i + 1]].tolist())
                enc = set(b.genes[i][b.mask[i]].tolist())
                assert enc <= full and len(enc) == min(20, len(full))
                subsets.setdefault(int(b.cell_index[i]), []).append(frozenset(enc))
    # a new random subset each epoch for truncated cells
    changed = [v[0] != v[1] for v in subsets.values() if len(v[0]) == 20]
    assert changed and any(changed)


def test_unseen_test_labels_are_counted(tmp_path):
    a = synthetic_counts(n_cells=120, n_genes=60, n_types=3, seed=2)
    a.var["highly_variable"] = True
    train = a[a.obs["cell_type"] != "type_2"].copy()
    test = a.copy()
    train.write_h5ad(tmp_path / "train.h5ad")
    test.write_h5ad(tmp_path / "test.h5ad")
    m = tokenize(
        tmp_path / "train.h5ad",
        tmp_path / "t",
        test_path=tmp_path / "test.h5ad",
        condition_keys=["cell_type"],
        progress=False,
    )
    n2 = int((a.obs["cell_type"] == "type_2").sum())
    assert m["splits"]["test"]["n_cells_unseen_labels"] == n2 and "type_2" not in m["labels"]["cell_type"]
    labels = np.concatenate([b.labels for b in TokenLoader(tmp_path / "t", "test", shuffle=False).iter_epoch(0)])
    assert int((labels[:, 0] == -1).sum()) == n2


def test_errors(tmp_path, prepared):
    tmp, train, _ = prepared
    plain = synthetic_counts(n_cells=30, n_genes=20)
    plain.write_h5ad(tmp_path / "nohvg.h5ad")
    with pytest.raises(InputError, match=r"nohvg.h5ad: --genes hvg needs var\['highly_variable'\]"):
        tokenize(tmp_path / "nohvg.h5ad", tmp_path / "x", progress=False)
    with pytest.raises(InputError, match=r"condition key 'donor' is not an obs column"):
        tokenize(tmp / "train.h5ad", tmp_path / "y", condition_keys=["donor"], progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(InputError, match=r"no manifest.json"):
        TokenLoader(tmp_path, "train")
    # an empty shard is a clear error
    tokenize(tmp / "train.h5ad", tmp / "tokens", progress=False)
    shard = tmp / "tokens" / "train" / "shard-00000.npz"
    np.savez(
        shard,
        indptr=np.zeros(1, np.int64),
        genes=np.zeros(0, np.int32),
        counts=np.zeros(0, np.float32),
        library_size=np.zeros(0, np.float32),
        labels=np.zeros((0, 2), np.int32),
        cell_index=np.zeros(0, np.int64),
        obs_names=np.zeros(0, str),
    )
    with pytest.raises(InputError, match=r"shard-00000.npz: the token shard is empty"):
        next(TokenLoader(tmp / "tokens", "train").iter_epoch(0))


def test_real_pbmc_tokens(tmp_path, shared_datasets):
    from sclatent.io import SampleRow
    from sclatent.prepare import PrepareConfig, prepare

    rows = [SampleRow(1, "pbmc", str(shared_datasets / "pbmc3k_counts_celltype.h5ad"), "all", None)]
    prepare(rows, PrepareConfig(dataset="pbmc", condition_keys=["cell_type"], min_cells=3), tmp_path / "p")
    m = tokenize(
        tmp_path / "p" / "train.h5ad",
        tmp_path / "tok",
        test_path=tmp_path / "p" / "test.h5ad",
        genes="all",
        progress=False,
    )
    assert m["splits"]["train"]["n_cells"] == 2160 and m["splits"]["test"]["n_cells"] == 540
    train = ad.read_h5ad(tmp_path / "p" / "train.h5ad")
    assert m["splits"]["train"]["nnz"] == train.X.nnz
    assert json.loads((tmp_path / "tok" / "manifest.json").read_text())["n_genes"] == train.n_vars
