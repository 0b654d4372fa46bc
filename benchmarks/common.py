"""Shared helpers of the benchmarks: FLOP counts, random-weight model builds, timers, SDPA backend switches,
ceilings and the speed-up variants (installed through mvdit's seams: Attention.attention_fn / qk_fn, module compile).

Needs only torch + einops (+ triton for torch.compile on CUDA) and the mvdit package (PYTHONPATH=src).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from mvdit.runtime import sdpa

H100_PEAK = 989e12  # dense bf16 peak of an H100 SXM, FLOP/s (perf.md)
DATE = datetime.date.today().isoformat()  # the run's own date (UTC machine clock)


# ----------------------------------------------------------------------------------------------------- FLOPs
def latent_shape(views: int, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """[1, 16, V*T, H/8, W/8] for V views of `frames` pixel frames (causal 8x temporal, 8x spatial tokenizer)."""
    t = 1 + (frames - 1) // 8
    return (1, 16, views * t, height // 8, width // 8)


def dit_flops(cfg, views: int, frames: int, height: int, width: int, text_len: int) -> dict:
    """Model FLOPs of one DiT forward (matrix products only; 2 per multiply-add), as perf.md counts them."""
    _, _, vt, h, w = latent_shape(views, frames, height, width)
    p = cfg.patch_spatial
    n = vt * (h // p) * (w // p)  # tokens
    d = cfg.model_channels
    hidden = int(d * cfg.mlp_ratio)
    dc = cfg.crossattn_emb_channels
    m = views * text_len  # context tokens
    gemm = 2 * n * d * d * 4  # self-attn q, k, v, out
    gemm += 2 * n * d * d * 2 + 2 * m * dc * d * 2  # cross-attn q, out; k, v from text
    gemm += 2 * n * d * hidden * 2  # MLP
    self_attn = 4 * n * n * d  # QK^T and PV over all tokens jointly
    cross_attn = 4 * n * text_len * d  # each view's tokens over its own text
    block = gemm + self_attn + cross_attn
    embed = 2 * n * cfg.input_planes * p * p * d + 2 * n * d * p * p * cfg.out_channels
    total = cfg.num_blocks * block + embed
    return {
        "tokens": n,
        "per_block": {"gemm": gemm, "self_attn": self_attn, "cross_attn": cross_attn, "total": block},
        "forward": total,
        "forward_gemm": cfg.num_blocks * gemm + embed,
        "forward_self_attn": cfg.num_blocks * self_attn,
        "forward_cross_attn": cfg.num_blocks * cross_attn,
    }


# ---------------------------------------------------------------------------------------------------- builds
def init_random_(module: nn.Module, std: float = 0.02) -> None:
    """Cheap random init on the module's device (values don't change speed): N(0, std) weights, ones for norms,
    recomputed position buffers, random Fourier features."""
    from mvdit.model.network import FourierFeatures, RMSNorm
    from mvdit.model.posemb import RopePosition3D

    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
        for m in module.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, RopePosition3D):
                m.reset_buffers()
            elif isinstance(m, FourierFeatures):
                m.freqs.normal_().mul_(2 * torch.pi)
                m.phases.uniform_().mul_(2 * torch.pi)


def build_random(cls, cfg, device: str, dtype: torch.dtype) -> nn.Module:
    """Build `cls(cfg)` on the meta device, materialise it on `device` in `dtype`, randomly initialised."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else old)
    try:
        with torch.device("meta"):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=device).to(dtype)
    init_random_(model)
    return model


# ---------------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, device: str, reps: int = 3, warmup: int = 1) -> list[float]:
    """Wall times in ms of `fn()`: CUDA events on a GPU, perf_counter on the CPU; warm-up calls not counted."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mem_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def mem_peak_gib(device: str) -> dict:
    if not device.startswith("cuda"):
        return {}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


def mem_now_gib(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---------------------------------------------------------------------------------------------------- SDPA
@contextlib.contextmanager
def sdpa_backend(name: str):
    """'default': torch's own choice; 'cudnn-first': cuDNN, then flash, efficient, math (safe everywhere);
    'cudnn' / 'flash' / 'efficient' / 'math': only that backend (as infer.sdpa_backend forces it)."""
    if name == "cudnn-first":
        with sdpa_kernel([sdpa.BACKENDS[b] for b in ("cudnn", "flash", "efficient", "math")], set_priority=True):
            yield
        return
    with sdpa.backend("auto" if name == "default" else name):
        yield


sdpa_choice = sdpa.kernel_name  # the kernel torch picks for (q, k, v) under the current settings


# ---------------------------------------------------------------------------------------------------- ceilings
def ceilings(device: str, dtype: torch.dtype, tokens: int, dim: int, heads: int, backward: bool = False) -> dict:
    """Measured in the same call as the benchmark: a bf16 GEMM tokens x dim x dim and fused SDPA at `tokens`
    tokens x heads x head_dim (forward; with backward=True also forward+backward) for each backend."""
    out: dict = {}
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(tokens, dim, device=device, dtype=dtype, generator=g)
    w = torch.randn(dim, dim, device=device, dtype=dtype, generator=g)
    t = time_ms(functools.partial(F.linear, a, w), device, reps=10 if device.startswith("cuda") else 2, warmup=2)
    flops = 2 * tokens * dim * dim
    out["gemm"] = {"shape": [tokens, dim, dim], "ms": med(t), "tflops": flops / (med(t) * 1e-3) / 1e12}
    del a, w
    hd = dim // heads
    q, k, v = (torch.randn(1, heads, tokens, hd, device=device, dtype=dtype, generator=g) for _ in range(3))
    out["sdpa_default_choice"] = sdpa_choice(q, k, v)
    with sdpa_backend("cudnn-first"):
        out["sdpa_cudnn_first_choice"] = sdpa_choice(q, k, v)
    fl = 4 * tokens * tokens * hd * heads
    names = ["default", "cudnn", "flash"] + (["efficient"] if device.startswith("cuda") else [])
    for name in names:
        try:
            with sdpa_backend(name):
                t = time_ms(functools.partial(F.scaled_dot_product_attention, q, k, v), device, reps=3, warmup=1)
            out[f"sdpa_fwd_{name}"] = {"ms": med(t), "tflops": fl / (med(t) * 1e-3) / 1e12}
        except Exception as e:  # noqa: BLE001 - a backend that can't run here
            out[f"sdpa_fwd_{name}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    if backward:
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)

        def fb():
            o = F.scaled_dot_product_attention(qg, kg, vg)
            o.backward(do)
            qg.grad = kg.grad = vg.grad = None

        for name in ["default", "cudnn", "flash"]:
            try:
                with sdpa_backend(name):
                    t = time_ms(fb, device, reps=3, warmup=1)
                out[f"sdpa_fwdbwd_{name}"] = {
                    "ms": med(t),
                    "tflops_model_3x": 3 * fl / (med(t) * 1e-3) / 1e12,
                    "tflops_executed_3.5x": 3.5 * fl / (med(t) * 1e-3) / 1e12,
                }
            except Exception as e:  # noqa: BLE001
                out[f"sdpa_fwdbwd_{name}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        del qg, kg, vg, do
    out["sdpa_shape"] = [1, heads, tokens, hd]
    out["sdpa_flops_fwd"] = fl
    del q, k, v
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def best_sdpa_tflops(ceil: dict, key: str = "sdpa_fwd_", field: str = "tflops") -> float:
    vals = [v[field] for k, v in ceil.items() if k.startswith(key) and isinstance(v, dict) and field in v]
    return max(vals) if vals else float("nan")


# ------------------------------------------------------------------------------------------- training floors
# perf.md's ceilings (H100, bf16): GEMM 690-805 TFLOP/s (two cards), fused SDPA forward 597, forward+backward 550
# (executed FLOPs: the backward recomputes the scores, 3.5x the forward). Its floors of 21.5 s (no checkpointing)
# and 27.5 s (full checkpointing) per training sample are train_floor_s at the 690 GEMM rate.
PERF_MD_RATES = {
    "gemm": (805e12, 690e12),  # (best, worst): the lower and the upper floor
    "sdpa_fwd": 597e12,
    "sdpa_fwdbwd_3p5": 550e12,
}
CHECKPOINTING = ("none", "full", "selective")


def same_call_rates(ceil: dict) -> dict | None:
    """FLOP/s of the ceilings measured in the same call (best SDPA backend), or None if they were not measured."""
    if not ceil or "gemm" not in ceil:
        return None
    fwd = best_sdpa_tflops(ceil, "sdpa_fwd_", "tflops")
    fwdbwd = best_sdpa_tflops(ceil, "sdpa_fwdbwd_", "tflops_executed_3.5x")
    if fwd != fwd or fwdbwd != fwdbwd:  # NaN: no SDPA ceiling
        return None
    return {"gemm": ceil["gemm"]["tflops"] * 1e12, "sdpa_fwd": fwd * 1e12, "sdpa_fwdbwd_3p5": fwdbwd * 1e12}


def train_floor_s(fl: dict, rates: dict, checkpointing: str, adapter_forward: float | None = None) -> float:
    """Floor of one training sample, in perf.md's terms: every GEMM at the GEMM ceiling, attention at the fused-SDPA
    ceilings. fl is dit_flops' count (G = forward GEMMs, A = self- and X = cross-attention of one forward).

    none:      3 G (forward, input and weight gradients) + (A + X) forward+backward (3.5 x executed)
    full:      none + a recomputed forward: G + (A + X) at the forward rate
    selective: none + a recomputed forward that keeps the self-attention outputs: G + X
    LoRA (adapter_forward = the adapters' forward GEMM FLOPs): the frozen base has no weight gradients (2 G instead
    of 3 G); the adapters cost 3 x their forward, 4 x when recomputed.
    """
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    g, a, x = fl["forward_gemm"], fl["forward_self_attn"], fl["forward_cross_attn"]
    gemm, fwd, fwdbwd = rates["gemm"], rates["sdpa_fwd"], rates["sdpa_fwdbwd_3p5"]
    lora = adapter_forward is not None
    ad = adapter_forward or 0.0
    t = ((2 if lora else 3) * g + 3 * ad) / gemm + 3.5 * (a + x) / fwdbwd
    if checkpointing == "full":
        t += (g + ad) / gemm + (a + x) / fwd
    elif checkpointing == "selective":
        t += (g + ad) / gemm + x / fwd
    return t


def train_floors(fl: dict, ceil: dict | None, checkpointing: str, adapter_forward: float | None = None) -> dict:
    """The floor from the same call's ceilings (None if none were measured) and perf.md's range [best, worst card]."""
    rates = same_call_rates(ceil or {})
    lo, hi = (
        train_floor_s(fl, {**PERF_MD_RATES, "gemm": r}, checkpointing, adapter_forward) for r in PERF_MD_RATES["gemm"]
    )
    return {
        "checkpointing": checkpointing,
        "lora": adapter_forward is not None,
        "same_call_s": None if rates is None else train_floor_s(fl, rates, checkpointing, adapter_forward),
        "perfmd_s": [lo, hi],
    }


def floor_fractions(floors: dict, measured_s: float) -> dict:
    """floor / measured time (1.0: the run reached the floor) for the same-call floor and perf.md's range."""
    same = floors["same_call_s"]
    return {
        "same_call": None if same is None else same / measured_s,
        "perfmd": [f / measured_s for f in floors["perfmd_s"]],
    }


def checkpointing_of(variant: str, ac: bool) -> str:
    """train_step.py's variants: 'sac' in the name = selective, else full when AC is on; train_lora.py's variant
    names are ac / sac / noac."""
    parts = set(variant.split("+"))
    if variant == "noac" or not ac:
        return "none"
    return "selective" if "sac" in parts else "full"


def stored_floor_fractions(res: dict) -> dict[str, dict]:
    """Recompute the per-variant floors and fractions of a stored train_step / train_lora result JSON:
    {"variant/none|full|selective": {"floors": ..., "measured_s": ..., "fractions": ...}}."""
    out = {}
    ceil = res.get("ceilings")
    if res["benchmark"] == "train_step":
        for variant, rv in res["runs"].items():
            for key, s in rv.get("summary", {}).items():
                ck = checkpointing_of(variant, key == "ac")
                floors = train_floors(res["flops"], ceil, ck)
                t = s["full_model_sample_s"]
                out[f"{variant}/{ck}"] = {"floors": floors, "measured_s": t, "fractions": floor_fractions(floors, t)}
    elif res["benchmark"] == "train_lora":
        for variant, r in res["runs"].items():
            if "s_per_iteration" not in r:
                continue
            ck = checkpointing_of(variant, variant != "noac")
            floors = train_floors(res["flops"], ceil, ck, adapter_forward=res["flops"]["adapter_forward"])
            t = r["s_per_iteration"]
            out[f"{variant}/{ck}"] = {"floors": floors, "measured_s": t, "fractions": floor_fractions(floors, t)}
    else:
        raise ValueError(f"not a training benchmark: {res['benchmark']!r}")
    return out


# ------------------------------------------------------------------------------------------ fused QK-norm + RoPE
_compiled_qk = None


def attentions(net: nn.Module):
    """Every mvdit.model.network.Attention of `net` (self- and cross-attention)."""
    from mvdit.model.network import Attention

    return [m for m in net.modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def fused_qk_norm_rope(net: nn.Module):
    """Every Attention's q/k RMSNorm and RoPE as one torch.compile'd (fused) function, through the `qk_fn` seam."""
    from mvdit.model.network import qk_norm_rope

    global _compiled_qk
    if _compiled_qk is None:
        _compiled_qk = torch.compile(qk_norm_rope, dynamic=False, fullgraph=True)
    mods = attentions(net)
    for m in mods:
        m.qk_fn = _compiled_qk
    try:
        yield
    finally:
        for m in mods:
            del m.qk_fn


# ---------------------------------------------------------------------------------------------- regional compile
def uncompile(module: nn.Module) -> None:
    """Undo `module.compile()` (nn.Module.compile has no public inverse)."""
    module._compiled_call_impl = None


@contextlib.contextmanager
def compiled_blocks(net: nn.Module):
    """Every Block compiled as infer.compile does (mvdit.runtime.compile.compile_blocks), undone on exit."""
    import torch._dynamo

    from mvdit.runtime.compile import compile_blocks

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compile_blocks(net)
    try:
        yield
    finally:
        for blk in net.blocks.values():
            uncompile(blk)
        torch._dynamo.reset()  # the next variant compiles afresh (a compiled graph keeps its SDPA kernel)


# ---------------------------------------------------------------------------------------------------- CLI
def add_shape_args(p) -> None:
    """The sample-shape flags every benchmark takes (defaults: the released 7B model's full 6-view sample)."""
    p.add_argument("--preset", default="7b-multiview")
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--frames", type=int, default=57)
    p.add_argument("--text-len", type=int, default=512)


# ---------------------------------------------------------------------------------------------------- output
def env_info(device: str) -> dict:
    info = {
        "date": DATE,
        "run_at_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "hostname": platform.node(),
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        info["device_name"] = platform.processor() or "cpu"
    return info


def save_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, p)


def random_condition(cfg, shape, views: int, text_len: int, dev, dtype):
    """Seeded random inputs of one sample: (cond, gt latent, text, cameras, generator). The caller draws the noisy
    latent from the returned generator next, so every benchmark sees the same numbers for the same seed."""
    from mvdit.constants import CAMERAS
    from mvdit.model.edm import Condition, condition_indicator

    g = torch.Generator(device=dev).manual_seed(0)
    t_lat = shape[2] // views
    gt = (0.5 * torch.randn(shape, device=dev, generator=g)).to(dtype)
    text = torch.randn(1, views * text_len, cfg.crossattn_emb_channels, device=dev, generator=g).to(dtype)
    cameras = list(CAMERAS[:views])
    cond = Condition(
        gt_latent=gt,
        indicator=condition_indicator(views, t_lat, min(2, t_lat), dtype=dtype, device=dev),
        crossattn_emb=text,
        n_views=views,
        fps=torch.tensor([24.0], device=dev, dtype=dtype),
        padding_mask=torch.zeros(1, 1, *shape[-2:], device=dev, dtype=dtype),
        frame_repeat=torch.tensor(
            [[1.0 if c in ("back_left", "back_right") else 0.0 for c in cameras]], device=dev, dtype=dtype
        ),
        augment_noise=torch.randn(shape, device=dev, generator=g).to(dtype),
    )
    return cond, gt, text, cameras, g


def sampling_session(preset: str, views: int, frames: int, height: int, width: int, text_len: int, device: str):
    """The sampling session infer.py and evaluate.py use, for an in-memory experiment of this shape (bf16 on a GPU,
    SDPA's own kernel choice): the benchmarks' samples run the same recipe with the same settings."""
    from mvdit.constants import CAMERAS
    from mvdit.inference.session import SamplingSession
    from mvdit.workflow.experiment import Experiment, validate

    cfg = {
        "name": "benchmark",
        "model": {"preset": preset},
        "data": {"cameras": list(CAMERAS[:views]), "num_frames": frames, "height": height, "width": width}
        | {"text_len": text_len},
        "infer": {"precision": "bf16", "checkpoint": "release"},
    }
    return SamplingSession(Experiment.from_config(validate(cfg, "<benchmark>"), "<benchmark>"), "<benchmark>", device)
