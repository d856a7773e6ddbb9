"""Several training processes (torchrun, DDP): which process trains which cells, and the random numbers they share.

Under torchrun (WORLD_SIZE > 1) every process trains the same run as one process would: the global batch is cut
into contiguous per-rank shares (`shard_rows`), the loss is weighted by each share's size, and the draws of the
loss are made at the global batch size and split by rows (`GlobalBatchDraws`), so that every cell gets the numbers
it gets in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

LossFn = Callable[[nn.Module, Any, torch.Generator], tuple[torch.Tensor, Mapping[str, float]]]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a multi-process (torchrun) job."""

    rank: int
    world_size: int
    local_rank: int  # the GPU of this process on its node


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def distributed_job() -> Distributed | None:
    """The multi-process job this process belongs to, or None when it trains alone.

    An initialised ``torch.distributed`` process group decides; otherwise torchrun's environment variables
    ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. A world of one process is not a job (the plain path runs).
    """
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world_size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1:
        return None
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, {world_size}), got {rank}")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


def shard_rows(n_rows: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n_rows`` cells: ``[n*r // W, n*(r+1) // W)`` (sizes differ by <= 1).

    The shares of ranks 0..W-1 tile ``range(n_rows)`` in order; a rank's share is empty when n_rows < W.
    """
    if n_rows < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_rows needs n_rows >= 0 and 0 <= rank < world_size, got {n_rows}, {rank}, {world_size}")
    return slice(n_rows * rank // world_size, n_rows * (rank + 1) // world_size)


def rank_share(n_rows: int, job: Distributed) -> tuple[slice, float]:
    """This rank's cells of a global batch and its weight n_rank / n_global.

    With fewer cells than ranks an idle rank computes the loss of cell 0 with weight 0: it must still take
    part in the gradient all-reduce, and contributes nothing to it.
    """
    rows = shard_rows(n_rows, job.rank, job.world_size)
    if rows.stop > rows.start:
        return rows, (rows.stop - rows.start) / n_rows
    return slice(0, 1), 0.0


class GlobalBatchDraws(TorchFunctionMode):
    """While active, draws from ``generator`` give this rank's rows of the draws for the whole global batch.

    Under DDP every rank holds the same generator state and the loss sees only the rank's cells
    (``rows`` of ``global_rows``). A ``torch.rand`` / ``torch.randn`` call on ``generator`` whose first
    dimension is the rank's number of cells is made at the global batch size instead, and the rank's rows are
    returned. ``torch.randperm`` (e.g. a gene subset shared by the batch) and draws of any other first
    dimension run unchanged: they are the same on every rank. So every rank makes exactly the draws one
    process makes for the global batch: each cell gets the numbers it gets in a single-process run, and the
    generators of all ranks stay in step. Any other random function called with ``generator`` is refused,
    since it could not be split this way. Contract for loss functions: a draw with the cells as its first
    dimension is one row per cell.

    Hand-written as a torch function mode because the draws happen inside the models (the VAE's posterior
    noise, the flow-matching time and noise, the label dropout), whose code knows nothing about ranks.
    """

    def __init__(self, generator: torch.Generator, global_rows: int, rows: slice) -> None:
        super().__init__()
        if not 0 <= rows.start < rows.stop <= global_rows:
            raise ValueError(f"rows {rows} are not a non-empty part of a batch of {global_rows} cells")
        self.generator = generator
        self.global_rows = global_rows
        self.rows = rows
        self.local_rows = rows.stop - rows.start

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is not self.generator or func is torch.randperm:
            return func(*args, **kwargs)
        if func not in (torch.rand, torch.randn) or "out" in kwargs:
            raise RuntimeError(
                f"{getattr(func, '__name__', func)} draws from the training generator, which cannot be split "
                "between DDP processes; draw with torch.rand / torch.randn (cells first) or torch.randperm"
            )
        if "size" in kwargs:
            size = tuple(kwargs.pop("size"))
        elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
            size = tuple(args[0])
        else:
            size = tuple(args)
        if not size or int(size[0]) != self.local_rows:
            return func(size, **kwargs)
        full = func((self.global_rows, *size[1:]), **kwargs)  # (B_global, ...)
        return full[self.rows]  # (B_rank, ...)


class LossForward(nn.Module):
    """The loss callback as a module's forward, so that DDP sees the forward pass it must synchronise."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, Mapping[str, float]]:
        return self.loss_fn(self.model, batch, generator)


def rank_device(device: torch.device, job: Distributed) -> torch.device:
    """The device of this rank: GPU ``LOCAL_RANK`` for CUDA, the CPU otherwise."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(
            f"under torchrun each process uses GPU LOCAL_RANK; give device 'cuda' or 'auto', not '{device}'"
        )
    if job.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {job.local_rank} but only {torch.cuda.device_count()} GPUs are visible")
    return torch.device("cuda", job.local_rank)


def join_process_group(device: torch.device) -> bool:
    """Initialise the process group from torchrun's environment (nccl on CUDA, gloo on CPU).

    Returns whether this call created it (and so must destroy it); a group the caller initialised is used as
    it is (gloo also reduces CUDA tensors, more slowly).
    """
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch several processes with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device)
    else:
        dist.init_process_group(backend=backend)
    return True


def global_mean(
    loss: torch.Tensor, terms: Mapping[str, float], weight: float, device: torch.device
) -> tuple[float, dict[str, float]]:
    """The global-batch loss and terms: the ranks' values (means over their cells) weighted by their share."""
    values = (
        torch.tensor([float(loss.detach()), *(float(v) for v in terms.values())], dtype=torch.float64, device=device)
        * weight
    )  # (1 + n_terms,)
    dist.all_reduce(values)
    loss_value, *term_values = values.tolist()
    return loss_value, dict(zip(terms, term_values))
