"""EMBED: the latent representation of every cell of a user's AnnData, on any gene panel, written into a copy of it.

The cells' genes are matched to the model's vocabulary by var_names or by a var column (`tokens.gene_index`):
genes outside it are ignored and counted, vocabulary genes the panel lacks are simply absent from the cells'
tokens (the exchangeable encoder takes any set of genes). Each cell's embedding is the encoder's posterior mean,
flattened to (m * d_latent,), stored in `obsm[key]` with the model's provenance in `uns[key]`.

The file is processed in row chunks: the input is copied beside the output, the counts are read chunk by chunk
from the input (backed), and each chunk's embeddings are written into the copy's `obsm` with h5py, so memory is
bounded by the chunk, not the file. The copy is renamed onto the output at the end; the input is only read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import scipy.sparse as sp
import torch

from . import __version__
from .checkpoint import Bundle, load_model
from .counts import check_counts
from .device import resolve_device
from .errors import InputError
from .inference import encode_batches
from .io import atomic_path
from .tokens import gene_index, memory_batches, tokens_of

log = logging.getLogger(__name__)

EMBEDDING_KEY = "X_sclatent"


def model_summary(bundle: Bundle) -> dict[str, Any]:
    """What an embedding records about the model that made it (h5ad-safe: no None values)."""
    info = bundle.info
    c = bundle.vae.config
    return {
        "model": str(info.get("path", "")),
        "model_sclatent_version": str(info.get("sclatent_version") or ""),
        "model_created": str(info.get("created") or ""),
        "n_genes": len(bundle.genes),
        "latent_shape": [c.n_latent_tokens, c.d_latent],
        "model_provenance_json": json.dumps(info.get("provenance", {}), default=str),
    }


def embedding_uns(bundle: Bundle, panel: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """uns[key] of an embedded AnnData: versions, the model, how the panel covered its vocabulary, the settings."""
    return {
        "sclatent_version": __version__,
        **model_summary(bundle),
        "panel": {k: v for k, v in panel.items()},
        "config_json": json.dumps(config, default=str),
    }


@torch.no_grad()
def embed_counts(
    bundle: Bundle, X: sp.csr_matrix, col_to_id: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    """Embeddings (n, m * d_latent) float32 of the cells of X (n, n_vars) raw counts; col_to_id from gene_index."""
    shard = tokens_of(X, col_to_id)
    z = encode_batches(bundle.vae, memory_batches(shard, batch_size, None), device)["z"]  # (n, m, d_latent)
    return z.reshape(len(z), -1)


def _read_elem(group: h5py.Group | h5py.Dataset) -> Any:
    from anndata.io import read_elem

    return read_elem(group)


def _counts_element(f: h5py.File, layer: str, path: str) -> tuple[Any, tuple[int, int]]:
    """The counts matrix of an open h5ad (X or a layer) as a row-sliceable object and its shape."""
    if layer == "X":
        if "X" not in f:
            raise InputError(f"{path}: no X matrix")
        elem = f["X"]
    else:
        layers = f.get("layers")
        if layers is None or layer not in layers:
            avail = ", ".join(["X", *(layers.keys() if layers is not None else [])])
            raise InputError(f"{path}: counts layer '{layer}' not found (available: {avail})")
        elem = layers[layer]
    if isinstance(elem, h5py.Group):  # csr_matrix / csc_matrix encoding
        from anndata.io import sparse_dataset

        backed = sparse_dataset(elem)
        return backed, tuple(backed.shape)
    return elem, tuple(elem.shape)


def row_chunks(elem: Any, n: int, chunk_size: int) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """(start, stop, CSR counts) of consecutive row chunks of a backed matrix."""
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = elem[start:stop]
        yield start, stop, (block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block)))


def embed_h5ad(
    model: str | os.PathLike | Bundle,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layer: str = "X",
    gene_key: str | None = None,
    key: str = EMBEDDING_KEY,
    batch_size: int = 256,
    chunk_size: int = 8192,
    device: str = "auto",
) -> dict[str, Any]:
    """`sclatent embed`: write `out` = the AnnData `src` with obsm[key] and uns[key]; returns uns[key]."""
    t0 = time.time()
    src, out = str(src), Path(out)
    if batch_size < 1 or chunk_size < 1:
        raise InputError(f"--batch-size and --chunk-size must be >= 1, got {batch_size}, {chunk_size}")
    if not key or "/" in key:
        raise InputError(f"--key '{key}': expected a name without '/'")
    if not os.path.isfile(src):
        raise InputError(f"{src}: file does not exist")
    if out.exists() and out.resolve() == Path(src).resolve():
        raise InputError(f"--out {out} is the input file: the input is never modified, choose another path")
    dev = resolve_device(device)
    bundle = model if isinstance(model, Bundle) else load_model(model, map_location="cpu")
    bundle.to(dev)
    try:
        fin = h5py.File(src, "r")
    except OSError as exc:
        raise InputError(f"{src}: not a readable .h5ad file ({str(exc).splitlines()[0]})") from None
    with fin:
        try:
            var, obs = _read_elem(fin["var"]), _read_elem(fin["obs"])
        except KeyError as exc:
            raise InputError(f"{src}: not an .h5ad file (no {exc.args[0]} group)") from None
        if gene_key is not None and gene_key not in var.columns:
            raise InputError(
                f"{src}: --gene-key '{gene_key}' is not a var column (var has: {', '.join(map(str, var.columns))})"
            )
        names = var.index if gene_key is None else var[gene_key]
        col_to_id, panel = gene_index(names, bundle.genes, source=src)
        elem, (n, n_vars) = _counts_element(fin, layer, src)
        if n_vars != len(var) or n != len(obs):
            raise InputError(f"{src}: counts of shape {(n, n_vars)} but {len(obs)} cells and {len(var)} genes")
        c = bundle.vae.config
        width = c.n_latent_tokens * c.d_latent
        config = {"layer": layer, "gene_key": gene_key, "key": key, "batch_size": batch_size, "input": src}
        uns = embedding_uns(bundle, panel, config)
        with atomic_path(out) as tmp:
            shutil.copyfile(src, tmp)
            with h5py.File(tmp, "r+") as fout:
                obsm = fout.require_group("obsm")
                if not obsm.attrs.get("encoding-type"):
                    obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
                if key in obsm:
                    log.warning("%s: obsm['%s'] exists and is replaced in the output", src, key)
                    del obsm[key]
                dset = obsm.create_dataset(key, shape=(n, width), dtype="float32")
                dset.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                for start, stop, X in row_chunks(elem, n, chunk_size):
                    check_counts(X, obs.index[start:stop], names, source=src)
                    dset[start:stop] = embed_counts(bundle, X, col_to_id, dev, batch_size)
                    log.info("embedded %d / %d cells", stop, n)
                from anndata.io import write_elem

                uns_group = fout.require_group("uns")
                if not uns_group.attrs.get("encoding-type"):
                    uns_group.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
                if key in uns_group:
                    del uns_group[key]
                write_elem(uns_group, key, uns)
    log.info(
        "embedded %d cells of %s (%d of the model's %d genes in the panel, %d panel genes ignored) into "
        "%s obsm['%s'] in %.1fs",
        n,
        src,
        panel["matched"],
        panel["vocabulary"],
        panel["ignored"],
        out,
        key,
        time.time() - t0,
    )
    return uns
