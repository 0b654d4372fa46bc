"""FlashAttention-4's forward kernels (`infer.sdpa_backend: fa4`, and `auto` where they run): the attention of every
block runs Tri Dao's CuTe-DSL kernels from the `flash-attn-4` wheel (the `fa4` extra: pure Python, kernels compiled
on first use for the GPU at hand, Hopper and Blackwell) instead of torch's SDPA, in bf16 or fp16. Inference only
(forward, no gradient).

Applied to a loaded model from outside, like mvdit.runtime.fp8: every Attention's `attention_fn` becomes `attention`,
a `torch.library` custom op, so compiled blocks keep it as one opaque call. `check` runs before any model loads and
turns whatever cannot run (no GPU, fp32, the wheel missing, a probe off) into one line naming the key and the fix.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvdit.runtime import capability

log = logging.getLogger(__name__)

DIST = "flash-attn-4"
MODULE = "flash_attn.cute"
FIX = "install the extra: pip install -e '.[fa4-cu13]' (torch built for CUDA 13) or '.[fa4]' (CUDA 12)"
KERNEL = "fa4"  # how resolve() answers start: "fa4 (flash-attn-4 <version>)"
MIN_CAPABILITY = (9, 0)  # the kernels measured here (BENCHMARKS.md) are Hopper's; Ampere's path is FA2-class
DTYPES = (torch.bfloat16, torch.float16)


class Fa4Unavailable(RuntimeError):
    """This device or install cannot run infer.sdpa_backend: fa4; the message says why and what to do."""


def _line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _module():
    try:
        return importlib.import_module(MODULE)
    except Exception as e:  # noqa: BLE001 - not installed, or its CUDA libraries do not load: the same one line
        raise Fa4Unavailable(f"{DIST} does not import ({type(e).__name__}: {_line(e)}); {FIX}") from e


def version() -> str | None:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


@torch.library.custom_op("mvdit::fa4_attention", mutates_args=())
def fa4_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v on [B, N, H, d] heads (FlashAttention's layout), by flash_attn.cute.flash_attn_func."""
    out = _module().flash_attn_func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in the 4.0 betas


@fa4_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Drop-in for F.scaled_dot_product_attention(q, k, v) on [B, H, N, d] heads (Attention.attention_fn)."""
    lay = [t.transpose(1, 2).contiguous() for t in (q, k, v)]  # no copy where q/k/v are [B, N, H, d] in memory
    return fa4_attention(*lay, q.shape[-1] ** -0.5).transpose(1, 2)


def _probe(device: torch.device, head_dim: int, dtype: torch.dtype) -> float:
    """Relative L2 error of one small FA4 call against fp32 attention (compiles the kernel for this GPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, head_dim, device=device, generator=g).to(dtype) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return float((attention(q, k, v).float() - ref).norm() / ref.norm())


def check(device: torch.device | str, head_dim: int, dtype: torch.dtype) -> str:
    """Before any model loads: the kernel's description ("fa4 (flash-attn-4 <version>)"), or Fa4Unavailable saying
    why this device, dtype or install cannot run it. Imports the wheel and, on a GPU, runs one small probe."""
    device = torch.device(device)
    if why := capability.missing(device, MIN_CAPABILITY, "compute capability 9.0+ (Hopper or later)"):
        raise Fa4Unavailable(why)
    if dtype not in DTYPES:
        name = str(dtype).removeprefix("torch.")
        raise Fa4Unavailable(f"runs bf16 or fp16 attention, not {name}; set infer.precision: bf16")
    _module()
    try:
        err = _probe(device, head_dim, dtype)
    except Exception as e:  # noqa: BLE001 - whatever breaks in the kernel's build or launch, the answer is one line
        raise Fa4Unavailable(f"{DIST} {version()} does not run here: {type(e).__name__}: {_line(e)}") from e
    if not err < 2e-2:
        raise Fa4Unavailable(f"{DIST} {version()} is off by {err:.3g} (relative L2) on a probe")
    return f"{KERNEL} ({DIST} {version()})"


def preferred(device: torch.device | str, head_dim: int, dtype: torch.dtype) -> str | None:
    """What infer.sdpa_backend: auto asks: FA4's description where it can run here (the extra installed, bf16/fp16 on
    a GPU of compute capability 9.0+, the probe passes), else None and torch's SDPA keeps the attention. Where the
    extra is installed but does not run, why is logged, not raised: auto was not a request for FA4."""
    device = torch.device(device)
    if dtype not in DTYPES or device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return check(device, head_dim, dtype)
    except Fa4Unavailable as e:
        log.info("attention: FlashAttention-4 not used (%s); torch's SDPA picks the kernel", e)
        return None


def chosen(kernel: str) -> bool:
    """Whether a kernel description from sdpa.resolve is FA4's (the session then applies it)."""
    return kernel.split(" ", 1)[0] == KERNEL


def apply(net: nn.Module) -> int:
    """Every Attention of a loaded network (self- and cross-attention) computes with FA4; the number replaced. Call
    after loading, before fp8.apply (whose FP8 attention then replaces the self-attention's), context parallelism
    (which wraps it) and compile_blocks."""
    from mvdit.model.network import Attention

    n = 0
    for m in net.modules():
        if isinstance(m, Attention):
            m.attention_fn = attention
            n += 1
    return n
