"""Devices and arithmetic: one choice for every step, so that a preset is the same model wherever it runs."""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> the first CUDA GPU if there is one, else the CPU; otherwise the named device.

    On CUDA, float32 matrix products use TF32 tensor cores, as the authors' training runs do.
    """
    try:
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r} ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU visible to torch")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def check_precision(precision: str) -> bool:
    """Whether `precision` ("fp32" or "bf16") asks for bf16 autocast of the networks' matrix products."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16"
