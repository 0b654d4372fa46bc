"""Whether a device has what an optional GPU kernel needs: the one-line reason it cannot run it, for the checks that
run before any model loads (mvdit.runtime.fp8, mvdit.runtime.fa4)."""

from __future__ import annotations

import torch


def missing(device: torch.device, minimum: tuple[int, int], need: str) -> str | None:
    """None where `device` is a CUDA GPU of compute capability `minimum` or later; else why not, as "needs ..." with
    `need` naming the requirement (e.g. "FP8 tensor cores (compute capability 8.9+)")."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA GPU with {need}, not {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < minimum:
        return f"needs {need}; {torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}"
    return None
