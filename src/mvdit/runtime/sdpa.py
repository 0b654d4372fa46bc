"""Which fused kernel `scaled_dot_product_attention` runs: torch's own choice ("auto") or one backend forced by the
experiment (`infer.sdpa_backend`), checked on the device before any model loads and reported in the sidecar. "fa4"
replaces SDPA in every attention by FlashAttention-4's kernels (mvdit.runtime.fa4, the fa4 extra); "auto" does too
where they can run (the extra installed, bf16/fp16 on Hopper or later, the probe passes), else it is torch's pick.

On an H100 with torch 2.11, torch picks cuDNN for the 7B self-attention, the fastest of its backends there (598
TFLOP/s forward against 360 for flash and 182 for memory-efficient; BENCHMARKS.md §1); FlashAttention-4 ran it at 684
(BENCHMARKS.md "FlashAttention-4"). Forcing a backend is for other GPUs and torch versions, or to compare.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# the numbers torch._fused_sdp_choice returns
_CHOICES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def backend(name: str) -> contextlib.AbstractContextManager:
    """A context in which SDPA runs only `name` ("auto": torch's own choice, nothing forced)."""
    if name in ("auto", "fa4"):  # fa4: SDPA is not called by the attention (mvdit.runtime.fa4)
        return contextlib.nullcontext()
    if name not in BACKENDS:
        raise ValueError(f"unknown SDPA backend {name!r}: choose auto or one of {', '.join(BACKENDS)}")
    return sdpa_kernel([BACKENDS[name]])


def kernel_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel SDPA picks for these inputs under the current settings; 'none' where no enabled backend can run."""
    try:
        i = int(torch._fused_sdp_choice(q, k, v))
    except RuntimeError:  # raised when the enabled backends cannot run these inputs
        return "none"
    return _CHOICES.get(i, "none")


def resolve(
    name: str,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    source: str = "experiment",
    context_len: int = 512,
) -> str:
    """The kernel torch picks under `name` for self-attention with these heads on `device` (a 4096-token probe). The
    per-view cross-attention (`context_len` keys) is probed too: a forced backend that cannot run either is an
    ExperimentError naming the file (`source`), the setting and the fix.

    Set the backend before the first compiled call: torch.compile fixes the kernel when it traces. "fa4" is checked
    by mvdit.runtime.fa4 (its probe runs FA4 once) and answers its kernel's description ("fa4 (flash-attn-4 ...)"),
    which "auto" answers too where FA4 can run (mvdit.runtime.fa4.preferred)."""
    from mvdit.workflow.experiment import (
        ExperimentError,  # here, so the benchmarks can use this module without jsonschema
    )

    if name == "fa4":
        from mvdit.runtime import fa4

        try:
            return fa4.check(device, head_dim, dtype)
        except fa4.Fa4Unavailable as e:
            raise ExperimentError(f"{source}: infer.sdpa_backend: fa4 {e} (or set infer.sdpa_backend: auto)") from e
    if name == "auto":
        from mvdit.runtime import fa4

        if chosen := fa4.preferred(device, head_dim, dtype):
            return chosen

    q = torch.zeros(1, num_heads, 4096, head_dim, dtype=dtype, device=device)  # a long sequence, as in the DiT
    kv = torch.zeros(1, num_heads, context_len, head_dim, dtype=dtype, device=device)
    with backend(name):
        chosen, cross = kernel_name(q, q, q), kernel_name(q, kv, kv)
    if name != "auto" and (chosen, cross) != (name, name):
        raise ExperimentError(
            f"{source}: infer.sdpa_backend: {name} cannot run {str(dtype).removeprefix('torch.')} attention on "
            f"{torch.device(device).type} with this torch; set it to auto (torch picks) or another backend"
        )
    if "none" in (chosen, cross):
        raise ExperimentError(f"{source}: no attention kernel runs {dtype} on {device}; set infer.precision: fp32")
    return chosen
