"""One training loop for both stages: the VAE (stage 1) and the DiT prior (stage 2).

The loop knows nothing about either model. It trains any ``nn.Module`` through a loss callback
``loss_fn(model, batch, generator) -> (loss, {name: float})`` over a batch source ``data`` that yields the
batches of an epoch in a deterministic order (``data.iter_epoch(epoch, start_batch)``).

It owns: AdamW, the warmup-stable-decay learning-rate schedule (:func:`lr_factor`), gradient-norm clipping,
an optional EMA of the weights, optional bf16 autocast, checkpoint/resume and the history CSV.

Files written to ``out_dir``:

- ``checkpoint.pt``: plain state dicts and numbers only (loads with ``torch.load(..., weights_only=True)``),
  written atomically every ``checkpoint_every`` steps and at the end;
- ``config.json``: model config, training config, package version and caller metadata (input checksums);
- ``history.csv``: one row per log step (step, epoch, loss, each named loss term, lr, grad_norm,
  cells_per_s, elapsed_s).

Resume is exact: model, optimiser, EMA, schedule position, the loss generator, the global torch RNG (dropout)
and the data position (epoch, batch) are all restored, so a resumed run continues the loss curve of an
uninterrupted one bit for bit on CPU.

Several processes (DDP). Launched by ``torchrun`` (WORLD_SIZE > 1), every process joins the process group (nccl
on CUDA, each rank on GPU ``LOCAL_RANK``; gloo on CPU) and trains the same run as one process would:

- ``cfg.batch_size`` stays the *global* batch. Every rank plans the same global batches and reads and collates
  only its contiguous share of their cells (:func:`shard_rows`; ``data.iter_shares``, or ``split_batch`` for a
  source without it);
- the loss is weighted by ``world_size * n_rank / n_global`` before DDP averages the gradients, so the applied
  gradient is that of the global-batch mean (also when the cells do not split evenly);
- the random numbers of the loss are those of the global batch (:class:`GlobalBatchDraws`), so every cell
  gets the numbers it gets in one process and the generators of all ranks stay in step (draws from the global
  torch RNG, e.g. F.dropout, are not split: neither model makes any; the VAE's count-readout dropout draws
  from the loss generator);
- the learning rate is *not* scaled with the number of processes: the global batch, and hence the run, is
  the same whatever the number of GPUs;
- rank 0 alone writes ``checkpoint.pt``, ``config.json`` and ``history.csv`` (the loss in the history is the
  global-batch loss); every rank reads the checkpoint on resume, and a checkpoint written by N processes
  resumes with any number of them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import __version__
from .checkpoint import CHECKPOINT_NAME, CONFIG_NAME, HISTORY_NAME, atomic_torch_save, load_checkpoint
from .device import PRECISIONS, check_precision, resolve_device
from .distributed import (
    Distributed,
    GlobalBatchDraws,
    LossFn,
    LossForward,
    distributed_job,
    global_mean,
    join_process_group,
    rank_device,
    rank_share,
)
from .errors import NonFiniteLossError
from .io import atomic_path, write_json

logger = logging.getLogger(__name__)

DECAY_SHAPES = ("sqrt", "cosine", "linear")
# The warmup starts at lr / WARMUP_INIT_DIV (the authors' wsd_schedule uses 100).
WARMUP_INIT_DIV = 100.0
# History columns around the loss terms; the terms returned by loss_fn go between "loss" and "lr".
HISTORY_HEAD = ("step", "epoch", "loss")
HISTORY_TAIL = ("lr", "grad_norm", "cells_per_s", "elapsed_s")


# --------------------------------------------------------------------------------------------------------
# configuration and schedule


@dataclass
class TrainConfig:
    """Optimiser, schedule and bookkeeping settings of one training run.

    ``batch_size`` is recorded for provenance; the batch source built by the caller applies it. It is the
    global batch: under torchrun each process trains on its share of it.
    """

    max_steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_frac: float = 0.1  # linear warmup from lr / 100
    decay_frac: float = 0.1  # warmup-stable-decay: the last fraction of the steps decays
    decay_shape: str = "sqrt"  # "sqrt" | "cosine" | "linear"
    final_lr_factor: float = 0.1
    grad_clip: float | None = 10.0  # max global grad norm; None = no clipping
    ema_decay: float | None = None  # e.g. 0.999; None = no EMA
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1 + n) / (10 + n)) after n updates (EMA.decay_at)
    checkpoint_every: int = 1000  # steps; and always at the end
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto -> cuda if available else cpu
    precision: str = "fp32"  # "fp32" (TF32 products on CUDA) or "bf16" (autocast), the same on every device
    # Learning-rate multipliers by parameter name (the module path, e.g. "log_theta" for log_theta.weight); the
    # schedule scales every group alike. A name that matches no parameter is refused when training starts.
    lr_scales: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas  # type: ignore[assignment]
        for name in ("warmup_frac", "decay_frac"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1], got {value!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"TrainConfig.decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        if not 0.0 <= self.final_lr_factor <= 1.0:
            raise ValueError(f"TrainConfig.final_lr_factor must be in [0, 1], got {self.final_lr_factor!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"TrainConfig.device must be 'auto' or a torch device string, got {self.device!r}")
        for name, scale in dict(self.lr_scales).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"TrainConfig.lr_scales keys must be parameter names, got {name!r}")
            if (
                isinstance(scale, bool)
                or not isinstance(scale, (int, float))
                or not (math.isfinite(scale) and scale > 0)
            ):
                raise ValueError(f"TrainConfig.lr_scales[{name!r}] must be a finite number > 0, got {scale!r}")
        self.lr_scales = {k: float(v) for k, v in dict(self.lr_scales).items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (betas as a list)."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused with their names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {', '.join(unknown)}")
        kwargs = dict(d)
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        kwargs.setdefault("ema_warmup", False)  # configs written before the warm-up existed ran without it
        return cls(**kwargs)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay multiplier of ``cfg.lr`` for the optimiser step with 0-based index ``step``.

    With N = max_steps, W = int(warmup_frac * N) and decay start D = max(W, N - int(decay_frac * N)):

    - s < W: linear ramp from 1/100 to 1: f = s/W + (1 - s/W)/100;
    - W <= s < D: f = 1;
    - D <= s < N: f = r + (1 - r) * shape(p), p = (s - D)/(N - D) in [0, 1), r = final_lr_factor, with
      shape(p) = 1 - sqrt(p) ("sqrt"), (1 + cos(pi p))/2 ("cosine") or 1 - p ("linear");
    - s >= N: f = r.

    With decay_frac = 1 the decay starts right after the warmup (the authors' prior schedule).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    n = cfg.max_steps
    r = cfg.final_lr_factor
    if step >= n:
        return r
    n_warmup = int(cfg.warmup_frac * n)
    if step < n_warmup:
        frac = step / n_warmup
        return frac + (1.0 - frac) / WARMUP_INIT_DIV
    decay_start = max(n_warmup, n - int(cfg.decay_frac * n))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / (n - decay_start)
    if cfg.decay_shape == "sqrt":
        shape = 1.0 - math.sqrt(progress)
    elif cfg.decay_shape == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # "linear"
        shape = 1.0 - progress
    return r + (1.0 - r) * shape


# --------------------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a module's state: ``ema <- d_n * ema + (1 - d_n) * theta``.

    Starts as a copy of the module and is updated after every optimiser step. Floating-point entries of the
    state dict (parameters and float buffers) are averaged; integer buffers are copied. Hand-written rather
    than torch.optim.swa_utils.AveragedModel because we want a plain state dict that checkpoints with
    weights_only=True, not a second module.

    With ``warmup`` the decay of update n (n = optimiser steps before it, from 0) is
    ``min(decay, (1 + n) / (10 + n))``, the num_updates rule of TensorFlow's ExponentialMovingAverage: the
    average then covers roughly the last tenth of training until that reaches 1 / (1 - decay) steps. Without it
    a 0.999 EMA still holds 0.999^n of the random initial weights after n steps (docs/decisions/0006).
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.warmup = warmup
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, n_updates: int) -> float:
        """The decay used by the update after ``n_updates`` earlier ones."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + n_updates) / (10.0 + n_updates))

    @torch.no_grad()
    def update(self, model: nn.Module, n_updates: int) -> None:
        """One EMA step towards the current weights of ``model``; ``n_updates`` = optimiser steps before this one."""
        decay = self.decay_at(n_updates)
        for name, value in model.state_dict().items():
            avg = self._state[name]
            if avg.is_floating_point():
                avg.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                avg.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, loadable into the model with ``model.load_state_dict``."""
        return dict(self._state)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the averaged weights (same keys as the model's state dict)."""
        missing = sorted(set(self._state) - set(state))
        extra = sorted(set(state) - set(self._state))
        if missing or extra:
            raise ValueError(f"EMA state keys do not match the model: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, avg in self._state.items():
                avg.copy_(state[name])


# --------------------------------------------------------------------------------------------------------
# files


def _scales_text(scales: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {float(v):g}" for k, v in sorted(scales.items())) + "}" if scales else "none"


def param_groups(model: nn.Module, lr_scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per learning-rate multiplier, each with its "lr_scale".

    A parameter takes the scale of `lr_scales`' longest name that is its own name or a module path above it
    ("log_theta" covers "log_theta.weight"); the others keep 1. Group order is fixed (scale 1 first, then the
    names in sorted order), so a resumed run rebuilds the optimiser's groups exactly.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameters with requires_grad=True")

    def scale_of(name: str) -> str | None:
        hits = [k for k in lr_scales if name == k or name.startswith(k + ".")]
        return max(hits, key=len) if hits else None

    owner = {n: scale_of(n) for n, _ in named}
    unused = sorted(set(lr_scales) - set(owner.values()))
    if unused:
        raise ValueError(f"lr_scales names no trainable parameter of the model: {', '.join(unused)}")
    groups = [{"params": [p for n, p in named if owner[n] is None], "lr_scale": 1.0}]
    for key in sorted(lr_scales):
        groups.append({"params": [p for n, p in named if owner[n] == key], "lr_scale": float(lr_scales[key])})
    return [g for g in groups if g["params"]]


def training_steps(epochs: float, batches_per_epoch: int, min_steps: int = 0, max_steps: int | None = None) -> int:
    """Optimiser steps of a run: `max_steps` when given, else ceil(epochs x batches), raised to `min_steps`.

    The floor exists because an epoch budget alone gives a small dataset very few steps (800 cells at batch
    128 are 7 steps an epoch), far too few for a Transformer to learn more than the mean profile.
    """
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * batches_per_epoch), min_steps)


def _flat_items(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value} so that differing keys can be named."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_items(value, f"{name}."))
        else:
            out[name] = value
    return out


def _differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys (dotted for nested dicts) whose values differ or that only one side has."""
    a, b = _flat_items(old), _flat_items(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


class _History:
    """history.csv: header fixed by the first row, appended and flushed per log step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] | None = None
        self.n_rows = 0

    def start_fresh(self) -> None:
        if self.path.exists():
            self.path.unlink()

    def truncate(self, n_rows: int, last_step: int) -> None:
        """Keep the header and the first ``n_rows`` rows (those written up to the checkpoint)."""
        if not self.path.exists():
            if n_rows:
                raise ValueError(f"{self.path}: missing, but the checkpoint expects {n_rows} history rows")
            return
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            if n_rows:
                raise ValueError(f"{self.path}: empty, but the checkpoint expects {n_rows} history rows")
            return
        header, body = rows[0], rows[1:]
        if len(body) < n_rows:
            raise ValueError(f"{self.path}: has {len(body)} rows, but the checkpoint expects {n_rows}")
        kept = body[:n_rows]
        if kept and int(kept[-1][0]) > last_step:
            raise ValueError(f"{self.path}: row {n_rows} is step {kept[-1][0]}, after the checkpoint step {last_step}")
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(kept)
        self.columns = header
        self.n_rows = n_rows

    def append(self, row: Mapping[str, float | int]) -> None:
        if self.columns is None:
            self.columns = list(row)
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.columns)
        if list(row) != self.columns:
            raise ValueError(f"history columns changed: {list(row)} vs {self.columns} in {self.path}")
        with open(self.path, "a", newline="") as fh:
            # str(float) is the shortest repr that round-trips, so logged losses compare exactly.
            csv.writer(fh).writerow([row[c] for c in self.columns])
        self.n_rows += 1


# --------------------------------------------------------------------------------------------------------
# batches


class BatchSource(Protocol):
    """What :func:`train` needs from the data: deterministic epochs, resumable at a batch index.

    ``n_batches(epoch)`` may be replaced by ``__len__`` when every epoch has the same number of batches. A source
    may also offer ``iter_shares(epoch, start_batch, share)`` yielding ``(cells in the batch, the batch's cells
    share(cells))``: under torchrun each process then reads and collates only its own cells of every batch.
    """

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterable[Any]: ...


class Prefetcher:
    """The items of an iterator, prepared `depth` items ahead by a background thread (same order).

    Used for the training batches: the thread reads, collates and stages the next batches while the model runs.
    An exception of the iterator is raised where the item would have been; `close()` stops the thread.
    """

    _DONE = object()

    def __init__(self, items: Iterable[Any], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items),), daemon=True, name="sclatent-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer
            self._put((None, exc))
            return
        self._put((self._DONE, None))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        item, exc = self._queue.get()
        if exc is not None:
            self.close()
            raise exc
        if item is self._DONE:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def _pinned(batch: Any) -> Any:
    """Tensors of a (nested) batch in page-locked memory, so that the copy to the GPU can overlap compute."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_pinned(b) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_pinned(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _pinned(v) for k, v in batch.items()}
    return batch


def _epoch_batches(
    data: Any,
    epoch: int,
    start_batch: int,
    job: Distributed | None,
    cells_in_batch: Callable[[Any], int],
    split_batch: Callable[[Any, slice], Any],
    stage_batch: Callable[[Any], Any],
    pin: bool,
) -> Iterator[tuple[int, slice | None, float, Any]]:
    """(cells in the global batch, this rank's rows, its weight, its staged batch) for each batch of the epoch."""
    if job is None:
        for batch in data.iter_epoch(epoch, start_batch):
            staged = stage_batch(batch)
            yield cells_in_batch(batch), None, 1.0, _pinned(staged) if pin else staged
    elif hasattr(data, "iter_shares"):
        for n, part in data.iter_shares(epoch, start_batch, lambda n: rank_share(n, job)[0]):
            rows, weight = rank_share(n, job)
            staged = stage_batch(part)
            yield n, rows, weight, _pinned(staged) if pin else staged
    else:
        for batch in data.iter_epoch(epoch, start_batch):
            n = cells_in_batch(batch)
            rows, weight = rank_share(n, job)
            staged = stage_batch(split_batch(batch, rows))
            yield n, rows, weight, _pinned(staged) if pin else staged


def _n_batches(data: Any, epoch: int) -> int:
    if hasattr(data, "n_batches"):
        n = int(data.n_batches(epoch))
    elif hasattr(data, "__len__"):
        n = len(data)
    else:
        raise TypeError(f"{type(data).__name__} has neither n_batches(epoch) nor __len__")
    if n < 1:
        raise ValueError(f"data has {n} batches in epoch {epoch}; need at least one")
    return n


def _close(items: Any) -> None:
    if isinstance(items, Prefetcher):
        items.close()


def default_cells_in_batch(batch: Any) -> int:
    """Cells in a batch: dim 0 of a tensor, of the first entry of a tuple/list/dict, else ``len(batch)``."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return default_cells_in_batch(batch[0])
    if isinstance(batch, Mapping) and batch:
        return default_cells_in_batch(next(iter(batch.values())))
    if hasattr(batch, "__len__"):
        return len(batch)
    raise TypeError(f"cannot count the cells of a {type(batch).__name__}; pass cells_in_batch=")


def default_move_batch(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``; anything else passes unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(default_move_batch(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(default_move_batch(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: default_move_batch(v, device) for k, v in batch.items()}
    return batch


def default_split_batch(batch: Any, rows: slice) -> Any:
    """The cells ``rows`` of a batch: dim 0 of every tensor (also inside tuples, lists and dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(default_split_batch(b, rows) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(default_split_batch(b, rows) for b in batch)
    if isinstance(batch, dict):
        return {k: default_split_batch(v, rows) for k, v in batch.items()}
    raise TypeError(f"cannot split a {type(batch).__name__} between processes; pass split_batch=")


# --------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    """The trained module (in place, on the training device), its EMA and where the files are."""

    model: nn.Module
    ema: EMA | None
    step: int
    out_dir: Path

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def history_path(self) -> Path:
        return self.out_dir / HISTORY_NAME

    @property
    def config_path(self) -> Path:
        return self.out_dir / CONFIG_NAME

    def model_state(self, which: str = "model") -> dict[str, torch.Tensor]:
        """State dict of the trained weights (``which="model"``) or of their EMA (``which="ema"``)."""
        if which == "model":
            return self.model.state_dict()
        if which == "ema":
            if self.ema is None:
                raise ValueError("which='ema' but training ran without EMA (ema_decay=None)")
            return self.ema.state_dict()
        raise ValueError(f"which must be 'model' or 'ema', got {which!r}")


class _LogWindow:
    """Sums over the steps since the last history row (checkpointed so that resume is exact)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n_steps = 0
        self.n_cells = 0
        self.loss = 0.0
        self.grad_norm = 0.0
        self.terms: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def add(self, loss: float, terms: Mapping[str, float], grad_norm: float, n_cells: int) -> None:
        if self.n_steps and list(terms) != list(self.terms):
            raise ValueError(f"loss_fn returned terms {list(terms)}, earlier {list(self.terms)}")
        clash = sorted(set(terms) & set(HISTORY_HEAD + HISTORY_TAIL))
        if clash:
            raise ValueError(f"loss term names {clash} clash with history columns")
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.n_steps += 1
        self.n_cells += n_cells
        self.loss += loss
        self.grad_norm += grad_norm

    def state(self) -> dict[str, Any]:
        return {
            "n_steps": self.n_steps,
            "n_cells": self.n_cells,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "terms": dict(self.terms),
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.n_steps = int(state["n_steps"])
        self.n_cells = int(state["n_cells"])
        self.loss = float(state["loss"])
        self.grad_norm = float(state["grad_norm"])
        self.terms = {k: float(v) for k, v in state["terms"].items()}


def _json_roundtrip(obj: Any) -> Any:
    """What ``obj`` looks like after writing to and reading from config.json (tuples become lists)."""
    return json.loads(json.dumps(obj))


def train(
    model: nn.Module,
    loss_fn: LossFn,
    data: BatchSource,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    model_config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    cells_in_batch: Callable[[Any], int] = default_cells_in_batch,
    move_batch: Callable[[Any, torch.device], Any] = default_move_batch,
    split_batch: Callable[[Any, slice], Any] = default_split_batch,
    stage_batch: Callable[[Any], Any] | None = None,
    prefetch: int = 2,
) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimiser steps; see the module docstring for the files.

    ``loss_fn(model, batch, generator)`` returns the scalar loss and a dict of named floats for the history;
    all its randomness must come from ``generator`` (a ``torch.Generator`` on the training device, seeded
    from ``cfg.seed``; draw with ``device=generator.device``). ``move_batch`` puts a batch on the device
    before ``loss_fn`` sees it; ``cells_in_batch`` counts its cells for cells/s.

    The batches are read ``prefetch`` batches ahead by a background thread (:class:`Prefetcher`; 0 = in the
    loop), which also applies ``stage_batch`` (CPU work such as building tensors; on CUDA the result is pinned),
    so that the data is ready when the model is. The order, and hence the run, does not depend on it.

    Under torchrun (see the module docstring) a source with ``iter_shares`` collates only the rank's cells of
    each global batch; otherwise ``split_batch(batch, rows)`` cuts them out of the global batch (before
    ``stage_batch``). The loss and the terms must then be means over the cells of the batch, and a random draw
    with the cells as first dimension one row per cell (:class:`GlobalBatchDraws`).


    ``resume=True`` continues from ``out_dir/checkpoint.pt`` exactly where it stopped; a different
    ``model_config`` is refused. Without ``resume`` an existing checkpoint in ``out_dir`` is refused.
    Raises :class:`NonFiniteLossError` on a NaN/inf loss or gradient norm.
    """
    job = distributed_job()
    device = resolve_device(cfg.device)
    args = (model, loss_fn, data, cfg, Path(out_dir))
    kwargs = dict(
        resume=resume,
        model_config=model_config,
        metadata=metadata,
        progress=progress,
        cells_in_batch=cells_in_batch,
        move_batch=move_batch,
        split_batch=split_batch,
        stage_batch=stage_batch or (lambda b: b),
        prefetch=prefetch,
    )
    if job is None:
        return _train(*args, device=device, job=None, **kwargs)
    device = rank_device(device, job)
    owns_group = join_process_group(device)
    try:
        return _train(*args, device=device, job=job, **kwargs)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(
    model: nn.Module,
    loss_fn: LossFn,
    data: BatchSource,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    device: torch.device,
    job: Distributed | None,
    resume: bool,
    model_config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    progress: bool,
    cells_in_batch: Callable[[Any], int],
    move_batch: Callable[[Any, torch.device], Any],
    split_batch: Callable[[Any, slice], Any],
    stage_batch: Callable[[Any], Any],
    prefetch: int,
) -> TrainResult:
    """The loop of :func:`train` on ``device``; ``job`` is None for one process, else this rank's place."""
    is_main = job is None or job.rank == 0  # the process that writes files
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME
    config_path = out_dir / CONFIG_NAME
    use_bf16 = check_precision(cfg.precision)
    model_config = _json_roundtrip(dict(model_config))
    metadata = _json_roundtrip(dict(metadata or {}))
    info = logger.info if is_main else logger.debug

    model.to(device)
    model.train()
    groups = param_groups(model, cfg.lr_scales)
    params = [p for g in groups for p in g["params"]]
    # fused AdamW: one kernel over all parameters instead of one per tensor
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay is not None else None
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    history = _History(out_dir / HISTORY_NAME)
    window = _LogWindow()

    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"resume=True but {ckpt_path} does not exist")
        if not config_path.is_file():
            raise FileNotFoundError(f"resume=True but {config_path} does not exist")
        old_config = json.loads(config_path.read_text())
        differing = _differing_keys(old_config.get("model_config", {}), model_config)
        if differing:
            raise ValueError(f"cannot resume {ckpt_path}: model_config differs in {', '.join(differing)}")
        old_scales = old_config.get("train_config", {}).get("lr_scales", {})
        if old_scales != cfg.lr_scales:
            # The checkpoint's optimiser holds one parameter group per scale, with the scale stored in it: a
            # different set would fail to load, and different values would be silently overwritten by the old.
            raise ValueError(
                f"cannot resume {ckpt_path}: its per-parameter learning-rate scales were "
                f"{_scales_text(old_scales)}, now {_scales_text(cfg.lr_scales)}; resume with the "
                f"options it was started with"
            )
        changed_train = _differing_keys(old_config.get("train_config", {}), _json_roundtrip(cfg.to_dict()))
        if changed_train and is_main:
            logger.warning(
                "resuming with a different train config (%s); the run is no longer the same as an uninterrupted one",
                ", ".join(changed_train),
            )
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        step, epoch, batch_in_epoch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        if step > cfg.max_steps:
            raise ValueError(f"checkpoint is at step {step}, beyond max_steps={cfg.max_steps}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            if ckpt["ema"] is None:
                raise ValueError(f"ema_decay={cfg.ema_decay} but {ckpt_path} holds no EMA state")
            ema.load_state_dict(ckpt["ema"])
        if ckpt["generator_device"] != device.type:
            raise ValueError(
                f"{ckpt_path} was written on {ckpt['generator_device']}; resume it on the same "
                f"device type, not {device.type}"
            )
        generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        window.load(ckpt["log_window"])
        elapsed_before = float(ckpt["elapsed_s"])
        if is_main:
            history.truncate(int(ckpt["history_len"]), step)
        info("resuming from %s at step %d (epoch %d, batch %d)", ckpt_path, step, epoch, batch_in_epoch)
    else:
        if ckpt_path.exists():
            raise ValueError(f"{ckpt_path} already exists; pass resume=True or use an empty out_dir")
        # Dropout and other module-internal randomness use the global RNG; seed it for reproducibility.
        torch.manual_seed(cfg.seed)
        if is_main:
            history.start_fresh()

    ddp: DistributedDataParallel | None = None
    if job is not None:
        dist.barrier()  # every rank has read config.json and checkpoint.pt before rank 0 rewrites them
        # All parameters of both stages' models take part in every loss (find_unused_parameters=False, the
        # fast path); DDP broadcasts rank 0's weights here, so all ranks start from the same state.
        ddp = DistributedDataParallel(
            LossForward(model, loss_fn), device_ids=[device.index] if device.type == "cuda" else None
        )
    if is_main:
        write_json(
            {
                "sclatent_version": __version__,
                "model_config": model_config,
                "train_config": cfg.to_dict(),
                "metadata": metadata,
                "world_size": 1 if job is None else job.world_size,
                "precision_used": "bf16" if use_bf16 else "fp32",
            },
            config_path,
        )
    info(
        "training %d parameters on %s (%s)%s for %d steps -> %s",
        sum(p.numel() for p in params),
        device,
        "bf16 autocast" if use_bf16 else "fp32",
        "" if job is None else f", {job.world_size} processes",
        cfg.max_steps,
        out_dir,
    )

    def save_checkpoint() -> None:
        atomic_torch_save(
            ckpt_path,
            {
                "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "generator": generator.get_state(),
                "generator_device": device.type,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                "history_len": history.n_rows,
                "log_window": window.state(),
                "elapsed_s": elapsed_before + (time.perf_counter() - t_start),
            },
        )
        logger.info("checkpoint at step %d -> %s", step, ckpt_path)

    t_start = time.perf_counter()
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
    data_iter = None
    n_in_epoch = 0
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (progress and is_main),
        file=sys.stderr,
        desc="train",
        dynamic_ncols=True,
    )
    try:
        while step < cfg.max_steps:
            if data_iter is None:
                n_in_epoch = _n_batches(data, epoch)
                if not 0 <= batch_in_epoch < n_in_epoch:
                    raise ValueError(f"batch {batch_in_epoch} is outside epoch {epoch} ({n_in_epoch} batches)")
                batches = _epoch_batches(
                    data, epoch, batch_in_epoch, job, cells_in_batch, split_batch, stage_batch, device.type == "cuda"
                )
                data_iter = Prefetcher(batches, prefetch) if prefetch > 0 else batches
            try:
                n_cells, rows, weight, batch = next(data_iter)
            except StopIteration:
                raise RuntimeError(
                    f"data.iter_epoch({epoch}) stopped after {batch_in_epoch} batches, but the "
                    f"data reports {n_in_epoch} batches for that epoch"
                ) from None
            batch_epoch = epoch

            # The schedule is a pure function of the step (set by hand instead of LambdaLR: nothing to
            # checkpoint, and resume cannot get it out of sync).
            lr = cfg.lr * lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints from before lr_scales have none

            if ddp is None:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, terms = loss_fn(model, move_batch(batch, device), generator)
                loss_value = float(loss.detach())
                term_values = {k: float(v) for k, v in terms.items()}
            else:
                local_batch = move_batch(batch, device)
                with (
                    torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16),
                    GlobalBatchDraws(generator, n_cells, rows),
                ):
                    loss, terms = ddp(local_batch, generator)
                loss_value, term_values = global_mean(loss, terms, weight, device)
                # DDP averages the ranks' gradients: weighting rank r by W * n_r / n makes that average the
                # gradient of the mean over the whole global batch.
                loss = loss * (job.world_size * weight)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(step + 1, "loss", loss_value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # norm before clipping
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(step + 1, f"gradient norm (loss {loss_value!r})", grad_norm)
            optimizer.step()
            if ema is not None:
                ema.update(model, step)  # step = optimiser steps before this one

            step += 1
            batch_in_epoch += 1
            if batch_in_epoch == n_in_epoch:
                _close(data_iter)
                epoch, batch_in_epoch, data_iter = epoch + 1, 0, None
            window.add(loss_value, term_values, grad_norm, n_cells)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                dt = time.perf_counter() - window.t0
                row: dict[str, float | int] = {"step": step, "epoch": batch_epoch, "loss": window.loss / window.n_steps}
                for name, total in window.terms.items():
                    row[name] = total / window.n_steps
                row.update(
                    {
                        "lr": lr,
                        "grad_norm": window.grad_norm / window.n_steps,
                        "cells_per_s": window.n_cells / dt if dt > 0 else math.nan,
                        "elapsed_s": elapsed_before + (time.perf_counter() - t_start),
                    }
                )
                if is_main:
                    history.append(row)
                window.reset()
                bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.3g}")
                logger.debug("step %d loss %.6g lr %.3g grad_norm %.3g", step, row["loss"], lr, row["grad_norm"])
            if is_main and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
                save_checkpoint()
            bar.update(1)
    finally:
        _close(data_iter)
        bar.close()

    if job is not None:
        dist.barrier()  # the final checkpoint is on disk when train() returns on any rank
    info("finished at step %d", step)
    return TrainResult(model=model, ema=ema, step=step, out_dir=out_dir)
