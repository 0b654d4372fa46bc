"""FP8 inference of the DiT (`infer.precision: fp8`), applied to a loaded bf16 model from outside: the token-stream
Linear layers of every block become FP8 GEMMs (torch `_scaled_mm`, E4M3 operands with one fp32 scale per token and
per weight row, fp32 accumulation, bf16 output) and the joint self-attention becomes cuDNN's fused FP8 attention
(E4M3 q/k/v/P/O with per-tensor scales, through the `nvidia-cudnn-frontend` wheel: the `fp8` extra).

Where the cuDNN frontend is missing or cannot run FP8 attention, self-attention stays bf16 SDPA and only the GEMMs
run in FP8 (the log and the sidecar say which). TransformerEngine is detected and reported but not used: it stores
the same operands in E4M3, which alone misses the gates (tests/test_fp8.py; BENCHMARKS.md, FP8 section). Norms,
modulation, embeddings, the per-view cross-attention and the final layer stay bf16. `check` runs before any model
loads, `apply` after.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvdit.runtime import capability

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SOFTMAX_SCALE = 256.0  # P = exp(s - max) <= 1 is stored as P * 256 in E4M3 (headroom below 448; a power of two)
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada and Hopper on
FIX_EXTRA = "pip install 'mvdit[fp8]'"

# The quality gates on an H100 (BENCHMARKS.md, FP8 section: per-forward error <= 3x bf16's against fp32, 35-step
# latent cosine to bf16 >= 0.99): True passed, False missed, None not measured yet. Only a backend that passed is
# offered; benchmarks/infer_fp8.py measures them all (require_gates=False). Measured on an H100 on 2026-12-07: row-wise
# FP8 GEMMs give 4.2x bf16's per-forward error for a 1.05x faster forward (benchmarks/results/infer_fp8_gemm_h100.json),
# cuDNN FP8 attention 26.5x bf16's for a 1.29x faster forward (infer_fp8_attn_h100.json), so neither is offered.
GATED: dict[str, bool | None] = {"gemm:scaled_mm": False, "attention:cudnn": False}


def _gate_word(key: str) -> str:
    return "missed" if GATED[key] is False else "have not yet been measured against"


@dataclass(frozen=True)
class Fp8Plan:
    """What `apply` installs. gemm: "scaled_mm" (torch._scaled_mm, CUDA) or "emulated" (fp32 math on the FP8-rounded
    operands: the CPU tests), row-wise scales; "scaled_mm_tensorwise" / "emulated_tensorwise": one scale per tensor
    (measured by benchmarks/infer_fp8.py as variant fp8-gemm-tw, never offered by plan_for). attention: "cudnn"
    (cuDNN FP8 fused attention), "emulated", or "sdpa" (bf16, unchanged).
    """

    gemm: str = "scaled_mm"
    attention: str = "cudnn"
    info: dict = field(default_factory=dict, compare=False)

    def describe(self) -> dict:
        """For the sidecar and the log: which kernels run in FP8 and the versions behind them."""
        gemm = {
            "scaled_mm": "torch._scaled_mm, E4M3, row-wise scales (per token x per output channel), bf16 out",
            "emulated": "emulated (fp32 math on E4M3-rounded operands)",
            "scaled_mm_tensorwise": "torch._scaled_mm, E4M3, one scale per tensor (activation, weight), bf16 out",
            "emulated_tensorwise": "emulated (fp32 math on E4M3-rounded operands), one scale per tensor",
        }[self.gemm]
        attn = {
            "cudnn": "cuDNN fused FP8 attention (E4M3 q/k/v/P/O, per-tensor scales) via nvidia-cudnn-frontend",
            "emulated": "emulated (fp32 attention on E4M3-rounded q/k/v/O)",
            "sdpa": "bf16 SDPA (FP8 attention unavailable)",
        }[self.attention]
        return {"setting": "fp8", "gemm": gemm, "self_attention": attn} | self.info


class Fp8Unavailable(RuntimeError):
    """This device or install cannot run infer.precision: fp8; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ quantization
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (E4M3 [M, K], fp32 dequantization scale [M, 1]): each row scaled so its amax maps to 448."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_whole(x: Tensor) -> tuple[Tensor, Tensor]:
    """x -> (E4M3, fp32 0-dim dequantization scale): the whole tensor's amax maps to 448 (tensor-wise GEMM scaling)."""
    scale = x.abs().amax().float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    """x -> (E4M3, fp32 [1, 1, 1, 1] dequantization scale), one power-of-two scale for the whole tensor."""
    amax = x.abs().amax().float().clamp_min(1e-12)
    mult = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))
    return (x.float() * mult).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), mult.reciprocal().reshape(1, 1, 1, 1)


# ------------------------------------------------------------------------------------------------ GEMMs
class Fp8Linear(nn.Module):
    """A bias-free Linear computing (x_q s_x)(W_q s_w)^T: W stored in E4M3 with one fp32 scale per output row, x
    quantized per token at run time, fp32 accumulation, output in x's dtype. Replaces an nn.Linear (its bf16 weight
    is dropped). The *_tensorwise GEMMs use one scale for all of W and one for all of x instead."""

    def __init__(self, linear: nn.Linear, gemm: str = "scaled_mm"):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Fp8Linear takes bias-free Linear layers")
        if gemm not in ("scaled_mm", "emulated", "scaled_mm_tensorwise", "emulated_tensorwise"):
            raise ValueError(f"unknown FP8 GEMM {gemm!r}")
        self.in_features, self.out_features, self.gemm = linear.in_features, linear.out_features, gemm
        self.rowwise = not gemm.endswith("_tensorwise")
        if self.rowwise:
            w_q, w_scale = quantize_rows(linear.weight.detach())
            w_scale = w_scale.reshape(1, -1).contiguous()  # [1, N]
        else:
            w_q, w_scale = quantize_whole(linear.weight.detach())  # 0-dim
        self.register_buffer("weight_fp8", w_q)  # [N, K]
        self.register_buffer("weight_scale", w_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gemm={self.gemm}"

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x_q, x_scale = (quantize_rows if self.rowwise else quantize_whole)(x.reshape(-1, self.in_features))
        if self.gemm.startswith("scaled_mm"):
            y = torch._scaled_mm(
                x_q, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=x.dtype
            )
        else:
            w_scale = self.weight_scale.t() if self.rowwise else self.weight_scale
            y = ((x_q.float() * x_scale) @ (self.weight_fp8.float() * w_scale).t()).to(x.dtype)
        return y.reshape(*lead, self.out_features)


# ------------------------------------------------------------------------------------------------ attention
_GRAPHS: dict = {}
_HANDLES: dict = {}


def _cudnn():
    import cudnn  # the nvidia-cudnn-frontend wheel (the fp8 extra)

    return cudnn


def _graph(q8: Tensor, k8: Tensor, attn_scale: float):
    """A built cuDNN FP8 SDPA forward graph for q [B, Nq, H, d], k/v [B, Nk, H, d] (E4M3, contiguous), O like q."""
    key = (q8.device.index, tuple(q8.shape), q8.stride(), tuple(k8.shape), k8.stride(), attn_scale)
    if key in _GRAPHS:
        return _GRAPHS[key]
    cudnn = _cudnn()
    dev = q8.device.index
    if dev not in _HANDLES:
        _HANDLES[dev] = cudnn.create_handle()
    handle = _HANDLES[dev]
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)

    def bhsd(t: Tensor) -> dict:  # a [B, N, H, d] tensor seen as cuDNN's [B, H, N, d], with its own strides
        (b, n, h, d), (sb, sn, sh, sd) = t.shape, t.stride()
        return dict(dim=(b, h, n, d), stride=(sb, sh, sn, sd), data_type=e4m3)

    tq, tk, tv = (graph.tensor(name=n, **bhsd(t)) for n, t in (("q", q8), ("k", k8), ("v", k8)))
    scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
    dq, dk, dv, ds, ss, so = (graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so"))
    out, _, amax_s, amax_o = graph.sdpa_fp8(
        q=tq,
        k=tk,
        v=tv,
        descale_q=dq,
        descale_k=dk,
        descale_v=dv,
        descale_s=ds,
        scale_s=ss,
        scale_o=so,
        is_inference=True,
        attn_scale=attn_scale,
        use_causal_mask=False,
    )
    o = bhsd(q8)  # O is allocated like q (torch.empty_like)
    out.set_output(True).set_dim(o["dim"]).set_stride(o["stride"]).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    one = torch.ones(1, 1, 1, 1, dtype=torch.float32, device=q8.device)
    extra = {
        "workspace": torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=q8.device),
        "scale_s": one * SOFTMAX_SCALE,
        "descale_s": one / SOFTMAX_SCALE,
        "amax": torch.empty(2, 1, 1, 1, 1, dtype=torch.float32, device=q8.device),
    }
    _GRAPHS[key] = (graph, handle, (tq, tk, tv, dq, dk, dv, ds, ss, so, out, amax_s, amax_o), extra)
    return _GRAPHS[key]


@torch.library.custom_op("mvdit::cudnn_fp8_sdpa", mutates_args=())
def cudnn_fp8_sdpa(
    q8: Tensor,
    k8: Tensor,
    v8: Tensor,
    descale_q: Tensor,
    descale_k: Tensor,
    descale_v: Tensor,
    scale_o: Tensor,
    attn_scale: float,
) -> Tensor:
    """cuDNN's FP8 attention forward: q8 [B, Nq, H, d], k8/v8 [B, Nk, H, d] (E4M3, any strides) with their fp32
    [1, 1, 1, 1] dequantization scales; O = softmax(q k^T attn_scale) v, returned as E4M3 [B, Nq, H, d] scaled by
    scale_o. An opaque op to torch.compile, so the quantization around it still fuses."""
    q8, k8 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q8, k8))
    if v8.stride() != k8.stride():  # the graph gives v k's layout
        v8 = torch.empty_like(k8).copy_(v8)
    graph, handle, t, extra = _graph(q8, k8, attn_scale)
    cudnn = _cudnn()
    out = torch.empty_like(q8)
    tq, tk, tv, dq, dk, dv, ds, ss, so, to, amax_s, amax_o = t
    pack = {
        tq: q8,
        tk: k8,
        tv: v8,
        dq: descale_q,
        dk: descale_k,
        dv: descale_v,
        ds: extra["descale_s"],
        ss: extra["scale_s"],
        so: scale_o,
        to: out,
        amax_s: extra["amax"][0],
        amax_o: extra["amax"][1],
    }
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
    graph.execute(pack, extra["workspace"], handle=handle)
    return out


@cudnn_fp8_sdpa.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, attn_scale):
    return torch.empty_like(q8)


def _quantize_heads(t: Tensor) -> tuple[Tensor, Tensor]:
    """[B, H, N, d] (any strides) -> E4M3 [B, N, H, d] contiguous and its [1, 1, 1, 1] dequantization scale."""
    t8, s = quantize_tensor(t.transpose(1, 2))
    return t8.contiguous(), s


def cudnn_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Drop-in for F.scaled_dot_product_attention(q, k, v) on [B, H, N, d] bf16 heads, computed by cuDNN in FP8."""
    (q8, sq), (k8, sk), (v8, sv) = _quantize_heads(q), _quantize_heads(k), _quantize_heads(v)
    scale_o = 0.5 / sv  # |O| <= max|v| (softmax rows sum to 1): v's scale with one bit of headroom for rounding
    o8 = torch.ops.mvdit.cudnn_fp8_sdpa(q8, k8, v8, sq, sk, sv, scale_o, q.shape[-1] ** -0.5)
    return (o8.float() / scale_o).to(q.dtype).transpose(1, 2)


def emulated_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """What cudnn_attention computes, in fp32 on E4M3-rounded q/k/v and O (the softmax P is not rounded): CPU tests."""
    (q8, sq), (k8, sk), (v8, sv) = _quantize_heads(q), _quantize_heads(k), _quantize_heads(v)
    deq = [(t8.float() * s).transpose(1, 2) for t8, s in ((q8, sq), (k8, sk), (v8, sv))]
    o = F.scaled_dot_product_attention(*deq)
    scale_o = 0.5 / sv
    o8 = (o * scale_o).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return (o8.float() / scale_o).to(q.dtype)


ATTENTION = {"cudnn": cudnn_attention, "emulated": emulated_attention}


# ------------------------------------------------------------------------------------------------ selection
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def transformer_engine_version() -> str | None:
    return _version("transformer-engine") or _version("transformer_engine")


def _probe_gemm(device: torch.device) -> None:
    x = torch.randn(64, 128, device=device, dtype=torch.bfloat16)
    lin = nn.Linear(128, 32, bias=False).to(device, torch.bfloat16)
    with torch.no_grad():
        y, ref = Fp8Linear(lin)(x).float(), lin(x).float()
    err = float((y - ref).norm() / ref.norm())
    if not err < 0.1:
        raise RuntimeError(f"_scaled_mm probe is off by {err:.3f}")


def _probe_attention(device: torch.device, head_dim: int) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, head_dim, device=device, generator=g).to(torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err = float((cudnn_attention(q, k, v).float() - ref).norm() / ref.norm())
    if not err < 0.1:
        raise RuntimeError(f"cuDNN FP8 attention probe is off by {err:.3f}")


def plan_for(device: torch.device | str, head_dim: int = 128, require_gates: bool = True) -> Fp8Plan:
    """The best gated FP8 plan this device and install can run; Fp8Unavailable (message: why, and the fix) if none.
    Runs two tiny probes on the GPU (a _scaled_mm and, where the cuDNN frontend imports, one FP8 attention).
    require_gates=False also offers backends that have not passed the quality gates (the benchmark that measures
    them)."""
    device = torch.device(device)
    if why := capability.missing(device, MIN_CAPABILITY, "FP8 tensor cores (compute capability 8.9+)"):
        raise Fp8Unavailable(why)
    if require_gates and not GATED["gemm:scaled_mm"]:
        raise Fp8Unavailable(
            f"is not offered: its FP8 GEMMs {_gate_word('gemm:scaled_mm')} the quality gates (BENCHMARKS.md)"
        )
    if not hasattr(torch, "_scaled_mm"):
        raise Fp8Unavailable(f"needs torch._scaled_mm (torch {torch.__version__} lacks it); upgrade torch to 2.5+")
    try:
        _probe_gemm(device)
    except Exception as e:  # noqa: BLE001 - whatever breaks, the answer is the same one-line error
        raise Fp8Unavailable(f"torch._scaled_mm does not run on this GPU with torch {torch.__version__}: {e}") from e
    info = {
        "torch": torch.__version__,
        "cudnn_backend": torch.backends.cudnn.version(),
        "cudnn_frontend": _version("nvidia-cudnn-frontend"),
        "transformer_engine": transformer_engine_version(),
    }
    attention, why = "sdpa", None
    if require_gates and not GATED["attention:cudnn"]:
        why = f"cuDNN FP8 attention {_gate_word('attention:cudnn')} the quality gates (BENCHMARKS.md)"
    elif info["cudnn_frontend"] is None:
        why = f"nvidia-cudnn-frontend is not installed ({FIX_EXTRA})"
    else:
        try:
            _probe_attention(device, head_dim)
            attention = "cudnn"
        except Exception as e:  # noqa: BLE001 - any failure of the optional kernel means bf16 attention
            why = f"cuDNN FP8 attention does not run here: {type(e).__name__}: {str(e)[:200]}"
    if why:
        info["attention_fallback"] = why
    if info["transformer_engine"]:
        info["transformer_engine_note"] = "installed, not used: its E4M3 GEMMs and attention miss the gates too"
    return Fp8Plan("scaled_mm", attention, info)


def check(precision: str, device: torch.device | str, source: str = "experiment", head_dim: int = 128):
    """Before any model loads: None for bf16/fp32; for fp8 the plan, or an ExperimentError naming the file, the key
    and the fix."""
    if precision != "fp8":
        return None
    from mvdit.workflow.experiment import (
        ExperimentError,  # here, so the benchmarks can use this module without jsonschema
    )

    try:
        plan = plan_for(device, head_dim)
    except Fp8Unavailable as e:
        raise ExperimentError(f"{source}: infer.precision: fp8 {e}; set infer.precision: bf16") from e
    if "attention_fallback" in plan.info:
        log.warning("fp8: self-attention stays bf16: %s", plan.info["attention_fallback"])
    return plan


# ------------------------------------------------------------------------------------------------ conversion
def apply(net: nn.Module, plan: Fp8Plan) -> dict:
    """Convert a loaded MultiviewDiT in place: in every block the token-stream Linears (self-attention q/k/v/out,
    cross-attention q/out, MLP) become Fp8Linear and, unless plan.attention is "sdpa", the self-attention uses FP8
    attention. Call after loading (before context parallelism and compile_blocks). Returns counts for the log. Linears
    already wrapped (e.g. LoRA adapters) are left as they are and counted as skipped."""
    swapped = skipped = attn = 0
    for blk in net.blocks.values():
        for sub in blk.blocks:
            if sub.kind == "mlp":
                slots = [(sub.block, "layer1"), (sub.block, "layer2")]
            else:
                a = sub.block.attn
                slots = [(a.to_q, "0"), (a.to_out, "0")]
                if sub.kind == "self_attn":
                    slots += [(a.to_k, "0"), (a.to_v, "0")]
                    if plan.attention != "sdpa":
                        a.attention_fn = ATTENTION[plan.attention]
                        attn += 1
            for parent, name in slots:
                layer = parent.get_submodule(name)
                if type(layer) is not nn.Linear:
                    skipped += 1
                    continue
                parent.register_module(name, Fp8Linear(layer, plan.gemm))
                swapped += 1
    return {"fp8_linears": swapped, "skipped_linears": skipped, "fp8_attention_modules": attn}
