"""FP8 inference of the 7B DiT (mvdit.runtime.fp8) against the bf16 path, on one GPU, random weights of the real shape.

Phases (--phases, comma-separated; each writes into the JSON as it ends):
  ceilings  GEMM rates at the block's shapes (bf16 F.linear, FP8 _scaled_mm tensor-wise and row-wise, the row-wise
            quantization alone) and attention at the sample's shape (bf16 SDPA, cuDNN FP8 with and without the q/k/v
            quantization around it)
  error     one forward per variant against an fp32 reference (fp32 weights = the bf16 values, exact fp32 GEMMs and
            chunked fp32 attention, no TF32): relative L2 error of the network output; the gate is fp8 <= 3x bf16
  forward   the same forwards timed (warm-up/compile first, CUDA events, median), per-block times, peak memory
  rope      A/B of one compiled block: RoPE cos/sin computed once per forward (the package now) or in every block
  gate35    35-step samples (guidance 7) through SamplingSession.sample at a reduced shape (--gate-*), bf16 and each FP8
            variant from the same seed: cosine similarity of the final latents to bf16's; gate >= 0.99
  sample    one whole 35-step sample at the full shape with --sample-variant (bf16 or an FP8 one), compiled, per step
Variants: bf16 (the package), fp8 (FP8 GEMMs + cuDNN FP8 attention), fp8-gemm (FP8 GEMMs, bf16 attention),
fp8-gemm-tw (FP8 GEMMs with one scale per tensor instead of per row, bf16 attention), fp8-attn (bf16 GEMMs, FP8
attention), bf16-fa4 (bf16, every attention by FlashAttention-4's kernels: infer.sdpa_backend fa4; needs the fa4
extra, whose kernel the attention ceilings then time too). On the CPU (--device cpu) FP8 is emulated: a smoke test of
the script.

H100:  PYTHONPATH=src python benchmarks/infer_fp8.py --out benchmarks/results/infer_fp8_h100.json
A short lease (BENCHMARKS.md's FP8 section has the three commands for a full one): attention ceilings, the error gate
for bf16 and fp8-attn, gate35 only for a variant that passed, fp8 last if time is left; nothing starts that would end
after --limit-s seconds from the script's start:
       PYTHONPATH=src python benchmarks/infer_fp8.py --phases ceilings,error,forward,gate35 --ceilings attention \
           --variants bf16,fp8-attn --late-variants fp8 --gate-variants bf16,fp8-attn --gate35-passed-only \
           --reps 1 --ref-tf32 --need-cudnn --limit-s 220 --out infer_fp8_attn.json
CPU:   PYTHONPATH=src python benchmarks/infer_fp8.py --preset tiny --height 64 --width 96 --frames 17 --device cpu \
           --gate-height 32 --gate-width 48 --gate-frames 9 --steps 2 --out /tmp/infer_fp8.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from mvdit.model import network  # noqa: E402
from mvdit.model.config import get_preset  # noqa: E402
from mvdit.model.edm import Condition, run_net  # noqa: E402
from mvdit.model.network import Attention, MultiviewDiT  # noqa: E402
from mvdit.runtime import fa4, fp8  # noqa: E402

BF16_SAMPLE_S_SECTION8 = 438.99  # BENCHMARKS.md §8: a whole bf16 35-step sample, compiled, one H100, 2026-12-06
PERF_MD_SAMPLE_FLOOR_S = (402, 421)
WITHOUT_CUDNN_FP8 = ("bf16", "fp8-gemm", "fp8-gemm-tw", "bf16-fa4")  # the variants that run without the frontend


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p)
    p.add_argument("--phases", default="ceilings,error,forward,rope,gate35")
    p.add_argument("--variants", default="bf16,fp8,fp8-gemm,fp8-attn")
    p.add_argument("--sample-variant", default="fp8")
    p.add_argument("--gate-variants", default="bf16,fp8,fp8-gemm")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--sigma", type=float, default=5.0, help="noise level of the error/timing forward")
    p.add_argument("--gate-views", type=int, default=6)
    p.add_argument("--gate-height", type=int, default=240)
    p.add_argument("--gate-width", type=int, default=416)
    p.add_argument("--gate-frames", type=int, default=17)
    p.add_argument("--no-compile", action="store_true", help="time eager forwards (default: compiled blocks)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=0, help="skip further work after this many seconds (0: none)")
    p.add_argument("--limit-s", type=float, default=0, help="start the whole sample only if it ends before this")
    p.add_argument("--late-variants", default="", help="variants timed after the sample, if --budget-s allows")
    p.add_argument("--ref-tf32", action="store_true", help="the fp32 reference's matmuls in TF32 (10-bit mantissa)")
    p.add_argument("--ceilings", default="gemm,attention", help="which ceilings the ceilings phase measures")
    p.add_argument(
        "--need-cudnn",
        action="store_true",
        help="stop after the ceilings if cuDNN FP8 attention does not run (at the probe or at the full shape)",
    )
    p.add_argument(
        "--gate35-passed-only",
        action="store_true",
        help="gate35 only for variants that passed the per-forward error gate (bf16 always)",
    )
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ variants
def variant_plan(name: str, emulate: bool) -> tuple[str | None, str | None]:
    """(gemm, attention) of a variant; None leaves that part bf16."""
    g, a = ("emulated", "emulated") if emulate else ("scaled_mm", "cudnn")
    tw = g + "_tensorwise"
    return {
        "bf16": (None, None),
        "fp8": (g, a),
        "fp8-gemm": (g, None),
        "fp8-gemm-tw": (tw, None),
        "fp8-attn": (None, a),
        "bf16-fa4": (None, None),
    }[name]


class Swap:
    """Install a variant on the network (mvdit.runtime.fp8.apply, or only its attention) and undo it afterwards."""

    def __init__(self, net: nn.Module, name: str, emulate: bool):
        self.net, self.name = net, name
        self.gemm, self.attn = variant_plan(name, emulate)
        self.linears = {n: m for n, m in net.named_modules() if type(m) is nn.Linear}

    def __enter__(self):
        if self.name.endswith("-fa4"):
            fa4.apply(self.net)
        if self.gemm:
            fp8.apply(self.net, fp8.Fp8Plan(self.gemm, self.attn or "sdpa"))
        elif self.attn:
            for blk in self.net.blocks.values():
                blk.blocks[0].block.attn.attention_fn = fp8.ATTENTION[self.attn]
        return self

    def __exit__(self, *exc):
        for n, m in self.linears.items():
            parent, _, child = n.rpartition(".")
            self.net.get_submodule(parent).register_module(child, m)
        for m in self.net.modules():
            if isinstance(m, Attention):
                m.__dict__.pop("attention_fn", None)
        return False


def exact_attention(q, k, v, chunk: int = 1024):
    """fp32 softmax(q k^T / sqrt(d)) v in query chunks (no TF32): the reference's self-attention."""
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    kt = k.transpose(-1, -2)
    for i in range(0, q.shape[2], chunk):  # chunk 1024 at 76,320 keys, 32 heads: 10 GB of scores
        s = torch.matmul(q[:, :, i : i + chunk] * scale, kt)
        s.sub_(s.amax(-1, keepdim=True)).exp_()
        s.div_(s.sum(-1, keepdim=True))
        out[:, :, i : i + chunk] = torch.matmul(s, v)
        del s
    return out


def cast_cond(cond: Condition, dtype) -> Condition:
    kw = {}
    for f in dataclasses.fields(cond):
        v = getattr(cond, f.name)
        kw[f.name] = v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return Condition(**kw)


def make_inputs(cfg, shape, views, text_len, dev, dtype, sigma):
    cond, gt, text, cameras, g = C.random_condition(cfg, shape, views, text_len, dev, dtype)
    x = (gt.float() + sigma * torch.randn(shape, device=dev, generator=g)).to(dtype)
    return x, cond, gt, text, cameras


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cos(a, b) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


# ------------------------------------------------------------------------------------------------ ceilings
def gemm_ceilings(dev, n, d, hidden) -> dict:
    out = {}
    g = torch.Generator(device=dev).manual_seed(1)
    for m, k, nn_ in [(n, d, d), (n, d, hidden), (n, hidden, d)]:
        key = f"{m}x{k}x{nn_}"
        a = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
        w = torch.randn(nn_, k, device=dev, generator=g).to(torch.bfloat16)
        flops = 2 * m * k * nn_
        r = {}
        t = C.med(C.time_ms(functools.partial(F.linear, a, w), dev, reps=10, warmup=3))
        r["bf16"] = {"ms": t, "tflops": flops / t / 1e9}
        a8, sa = fp8.quantize_rows(a)
        w8, sw = fp8.quantize_rows(w)
        sw = sw.reshape(1, -1).contiguous()
        one = torch.ones((), device=dev)
        for name, fn in [
            (
                "fp8_tensorwise",
                lambda a8=a8, w8=w8, one=one: torch._scaled_mm(a8, w8.t(), one, one, out_dtype=torch.bfloat16),
            ),
            (
                "fp8_tensorwise_fast_accum",
                lambda a8=a8, w8=w8, one=one: torch._scaled_mm(
                    a8, w8.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True
                ),
            ),
            (
                "fp8_rowwise",
                lambda a8=a8, w8=w8, sa=sa, sw=sw: torch._scaled_mm(a8, w8.t(), sa, sw, out_dtype=torch.bfloat16),
            ),
        ]:
            try:
                t = C.med(C.time_ms(fn, dev, reps=10, warmup=3))
                r[name] = {"ms": t, "tflops": flops / t / 1e9}
            except Exception as e:  # noqa: BLE001
                r[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        r["quantize_rows_eager_ms"] = C.med(C.time_ms(functools.partial(fp8.quantize_rows, a), dev, reps=10, warmup=3))
        out[key] = r
        print(
            f"[ceil] gemm {key}: "
            + ", ".join(f"{k_} {v['tflops']:.0f} TF/s" for k_, v in r.items() if isinstance(v, dict) and "tflops" in v),
            flush=True,
        )
        del a, w, a8, w8
    return out


def attention_ceilings(dev, n, heads, hd, cudnn_ok: bool, fa4_ok: bool = False) -> dict:
    g = torch.Generator(device=dev).manual_seed(2)
    q, k, v = (torch.randn(1, heads, n, hd, device=dev, generator=g).to(torch.bfloat16) for _ in range(3))
    flops = 4 * n * n * hd * heads
    out = {"shape": [1, heads, n, hd], "flops": flops}
    t = C.med(C.time_ms(functools.partial(F.scaled_dot_product_attention, q, k, v), dev, reps=3, warmup=1))
    out["bf16_sdpa_default"] = {"ms": t, "tflops": flops / t / 1e9, "kernel": C.sdpa_choice(q, k, v)}
    if cudnn_ok:
        try:
            (q8, sq), (k8, sk), (v8, sv) = (fp8._quantize_heads(x) for x in (q, k, v))
            so = 0.5 / sv
            t0 = time.perf_counter()
            fn = functools.partial(torch.ops.mvdit.cudnn_fp8_sdpa, q8, k8, v8, sq, sk, sv, so, hd**-0.5)
            fn()
            C.sync(dev)
            out["fp8_cudnn_first_call_s"] = time.perf_counter() - t0  # the cuDNN graph build included
            t = C.med(C.time_ms(fn, dev, reps=3, warmup=1))
            out["fp8_cudnn_kernel"] = {"ms": t, "tflops": flops / t / 1e9}
            t = C.med(C.time_ms(functools.partial(fp8.cudnn_attention, q, k, v), dev, reps=3, warmup=1))
            out["fp8_cudnn_with_quantization_eager"] = {"ms": t, "tflops": flops / t / 1e9}
            # accuracy of the kernel alone at this shape, against fp32 attention on 1024 queries
            ref = exact_attention(q[:, :, :1024].float(), k.float(), v.float())
            out["fp8_cudnn_rel_err_first_1024_queries"] = rel(fp8.cudnn_attention(q, k, v)[:, :, :1024], ref)
            out["bf16_sdpa_rel_err_first_1024_queries"] = rel(F.scaled_dot_product_attention(q, k, v)[:, :, :1024], ref)
        except Exception as e:  # noqa: BLE001 - the error is the result
            out["fp8_cudnn_error"] = f"{type(e).__name__}: {str(e)[:800]}"
    if fa4_ok:
        try:
            t0 = time.perf_counter()
            fa4.attention(q, k, v)
            C.sync(dev)
            out["bf16_fa4_first_call_s"] = time.perf_counter() - t0  # the kernel's compilation for this shape
            t = C.med(C.time_ms(functools.partial(fa4.attention, q, k, v), dev, reps=3, warmup=1))
            out["bf16_fa4"] = {
                "ms": t,
                "tflops": flops / t / 1e9,
                "speedup_vs_sdpa": out["bf16_sdpa_default"]["ms"] / t,
            }
            ref = exact_attention(q[:, :, :1024].float(), k.float(), v.float())
            out["bf16_fa4_rel_err_first_1024_queries"] = rel(fa4.attention(q, k, v)[:, :, :1024], ref)
            out["bf16_sdpa_rel_err_first_1024_queries"] = rel(F.scaled_dot_product_attention(q, k, v)[:, :, :1024], ref)
        except Exception as e:  # noqa: BLE001 - the error is the result
            out["fa4_error"] = f"{type(e).__name__}: {str(e)[:800]}"
    for key, val in out.items():
        if isinstance(val, dict) or "err" in key or "first_call" in key:
            print(f"[ceil] attention {key}: {val}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    dev = a.device
    cuda = dev.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    emulate = not cuda
    phases = [p for p in a.phases.split(",") if p]
    variants = [v for v in a.variants.split(",") if v]
    variants_all = variants + [v for v in a.late_variants.split(",") if v]
    cfg = get_preset(a.preset)
    shape = C.latent_shape(a.views, a.frames, a.height, a.width)
    fl = C.dit_flops(cfg, a.views, a.frames, a.height, a.width, a.text_len)
    res = {"benchmark": "infer_fp8", "env": C.env_info(dev), "args": vars(a), "flops": fl, "latent": list(shape)}

    def over_budget():
        return a.budget_s and time.time() - t_start > a.budget_s

    def fits(need_s: float) -> bool:
        """Whether work of about need_s seconds still ends inside --limit-s (always, without a limit)."""
        return not a.limit_s or time.time() - t_start + need_s <= a.limit_s

    def forward_s() -> float:  # the bf16 forward once measured, else the last H100 figure
        return res.get("variants", {}).get("bf16", {}).get("forward_ms_median", 6200.0) * 1e-3

    def save():
        res["elapsed_s"] = time.time() - t_start
        C.save_json(a.out, res)

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        plan = fp8.plan_for(dev, cfg.head_dim, require_gates=False)  # this script measures the gates
        res["plan"] = plan.describe()
        if plan.attention != "cudnn":
            variants = [v for v in variants if v in WITHOUT_CUDNN_FP8]
            variants_all = [v for v in variants_all if v in WITHOUT_CUDNN_FP8]
    else:
        res["plan"] = fp8.Fp8Plan("emulated", "emulated").describe()
    cudnn_ok = res["plan"]["self_attention"].startswith("cuDNN")
    fa4_ok = False
    if any(v.endswith("-fa4") for v in variants_all + [a.sample_variant]):
        try:
            t0 = time.perf_counter()
            res["fa4"] = fa4.check(dev, cfg.head_dim, dtype)  # the probe compiles the kernel once
            res["fa4_check_s"] = time.perf_counter() - t0
            fa4_ok = True
        except fa4.Fa4Unavailable as e:
            res["fa4"] = f"unavailable: {e}"
            variants = [v for v in variants if not v.endswith("-fa4")]
            variants_all = [v for v in variants_all if not v.endswith("-fa4")]
        print(f"[fa4] {res['fa4']}", flush=True)
    print(f"[fp8] {res['env']['device_name']} torch {torch.__version__} plan {res['plan']}", flush=True)
    save()

    ceils = [c for c in a.ceilings.split(",") if c]
    if "ceilings" in phases and cuda and "gemm" in ceils:
        res["gemm_ceilings"] = gemm_ceilings(
            dev, fl["tokens"], cfg.model_channels, int(cfg.model_channels * cfg.mlp_ratio)
        )
        save()
    if "ceilings" in phases and cuda and "attention" in ceils:
        res["attention_ceilings"] = attention_ceilings(dev, fl["tokens"], cfg.num_heads, cfg.head_dim, cudnn_ok, fa4_ok)
        save()
        if "fp8_cudnn_error" in res["attention_ceilings"]:  # runs at the probe's shape, not at the sample's
            variants = [v for v in variants if v in WITHOUT_CUDNN_FP8]
            variants_all = [v for v in variants_all if v in WITHOUT_CUDNN_FP8]
            cudnn_ok = False
    if a.need_cudnn and not cudnn_ok:
        res["stopped"] = "cuDNN FP8 attention does not run here (--need-cudnn): " + str(
            res["plan"].get("attention_fallback") or res.get("attention_ceilings", {}).get("fp8_cudnn_error")
        )
        res["total_s"] = time.time() - t_start
        save()
        print(f"[fp8] {res['stopped']}", flush=True)
        return res

    C.mem_reset(dev)
    t0 = time.perf_counter()
    net = C.build_random(MultiviewDiT, cfg, dev, dtype).eval()
    net.requires_grad_(False)
    res["build_s"] = time.perf_counter() - t0
    x, cond, gt, text, cameras = make_inputs(cfg, shape, a.views, a.text_len, dev, dtype, 0.0)
    g = torch.Generator(device=dev).manual_seed(3)
    x = (gt.float() + a.sigma * torch.randn(shape, device=dev, generator=g)).to(dtype)
    sigma = torch.tensor(a.sigma, device=dev)
    print(f"[build] {res['build_s']:.1f} s, {C.mem_now_gib(dev):.1f} GiB", flush=True)

    stamps: list = []

    @torch.compiler.disable  # a hook of a compiled block: traced, it recompiled per event until dynamo's limit
    def stamp(*_):
        if cuda:
            stamps.append(torch.cuda.Event(enable_timing=True))
            stamps[-1].record()

    for blk in net.blocks.values():
        blk.register_forward_pre_hook(stamp)
        blk.register_forward_hook(stamp)

    def fwd():
        stamps.clear()
        with torch.no_grad():
            return run_net(net, x, sigma, cond)

    ref = None
    if "error" in phases and not over_budget() and fits(15 * forward_s()):  # the fp32 forward: about 92 s on an H100
        t0 = time.perf_counter()
        torch.backends.cuda.matmul.allow_tf32 = a.ref_tf32
        net.float()
        for blk in net.blocks.values():
            blk.blocks[0].block.attn.attention_fn = exact_attention
        with torch.no_grad():
            ref = run_net(net, x.float(), sigma, cast_cond(cond, torch.float32)).float()
        C.sync(dev)
        for blk in net.blocks.values():
            del blk.blocks[0].block.attn.attention_fn
        net.to(dtype)
        torch.backends.cuda.matmul.allow_tf32 = False
        res["reference"] = {
            "s": time.perf_counter() - t0,
            "norm": float(ref.norm()),
            "what": "fp32 weights and activations, chunked exact attention, matmuls "
            + ("in TF32" if a.ref_tf32 else "in full fp32 (no TF32)"),
        }
        print(f"[ref] fp32 forward in {res['reference']['s']:.1f} s", flush=True)
        save()

    res["variants"] = {}
    outs = {}

    def run_variants(names):
        for name in names:
            if over_budget() or not fits(15 + (a.reps + 1) * forward_s()):
                res["variants"][name] = {"skipped": "time budget"}
                print(f"[var] {name}: skipped (time budget)", flush=True)
                continue
            r = res["variants"][name] = {}
            try:
                C.mem_reset(dev)
                with Swap(net, name, emulate), C.compiled_blocks(net) if not a.no_compile else _null():
                    t0 = time.perf_counter()
                    out = fwd()
                    C.sync(dev)
                    r["first_call_s"] = time.perf_counter() - t0
                    if ref is not None:
                        r["rel_err_vs_fp32"] = rel(out, ref)
                    outs[name] = out.float()
                    if "forward" in phases:
                        t = C.time_ms(fwd, dev, reps=a.reps, warmup=0)
                        r["forward_ms"] = t
                        r["forward_ms_median"] = C.med(t)
                        if cuda and stamps:
                            torch.cuda.synchronize()
                            try:  # block hooks inside compiled blocks may not record their events
                                bm = [stamps[i].elapsed_time(stamps[i + 1]) for i in range(0, len(stamps) - 1, 2)]
                                r["block_ms_median"] = C.med(bm)
                            except (ValueError, RuntimeError) as e:
                                r["block_ms_median"] = f"not measured ({type(e).__name__})"
                        eq = r["forward_ms_median"] * 1e-3
                        r["mfu_equiv"] = fl["forward"] / (eq * C.H100_PEAK)
                        r["sample_35_from_forwards_s"] = 2 * a.steps * eq
                    r.update(C.mem_peak_gib(dev))
                del out
            except Exception as e:  # noqa: BLE001 - record and go on
                r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                if cuda:
                    torch.cuda.empty_cache()
            print(f"[var] {name}: {r}", flush=True)
            save()
        if "bf16" in outs:
            for name, o in outs.items():
                res["variants"][name]["rel_diff_vs_bf16"] = rel(o, outs["bf16"])
        e = {k: v.get("rel_err_vs_fp32") for k, v in res["variants"].items() if isinstance(v, dict)}
        if e.get("bf16"):
            res["error_gate"] = {
                k: {"ratio_to_bf16": v / e["bf16"], "pass": v <= 3 * e["bf16"]} for k, v in e.items() if v
            }
        t = {k: v.get("forward_ms_median") for k, v in res["variants"].items() if isinstance(v, dict)}
        if t.get("bf16"):
            res["speedup_vs_bf16"] = {k: t["bf16"] / v for k, v in t.items() if v}
        print(f"[gate] per-forward error: {res.get('error_gate')}  speed-up: {res.get('speedup_vs_bf16')}", flush=True)
        save()

    if "error" in phases or "forward" in phases:
        run_variants(variants)

    if "gate35" in phases and not over_budget():
        gv = [v for v in a.gate_variants.split(",") if v in variants]
        if a.gate35_passed_only:
            passed = {k for k, v in res.get("error_gate", {}).items() if v["pass"]}
            gv = [v for v in gv if v == "bf16" or v in passed]
        if len(gv) < 2:
            res["gate35"] = {"skipped": f"no FP8 variant passed the per-forward error gate ({a.gate_variants})"}
        elif not fits(25 * len(gv)):  # about 20 s a variant at the reduced shape on an H100
            res["gate35"] = {"skipped": "time budget"}
        else:
            res["gate35"] = gate35(net, cfg, dev, dtype, a, emulate, gv)
        if "skipped" in res["gate35"]:
            print(f"[gate35] {res['gate35']}", flush=True)
        save()

    if "sample" in phases and not over_budget():
        fwd_s = res["variants"].get(a.sample_variant, {}).get("forward_ms_median", 0) * 1e-3
        need = 2 * a.steps * fwd_s + 45  # the forwards plus compilation
        if a.sample_variant.endswith("-fa4") and not fa4_ok:
            res["sample"] = {"skipped": res["fa4"]}
        elif a.limit_s and fwd_s and time.time() - t_start + need > a.limit_s:
            res["sample"] = {"skipped": f"needs about {need:.0f} s, {a.limit_s - (time.time() - t_start):.0f} s left"}
        else:
            res["sample"] = whole_sample(net, dev, gt, text, cameras, a, emulate, fl, res, save)
        save()

    if "rope" in phases and not over_budget():
        res["rope_ab"] = rope_ab(net, cfg, dev, dtype, shape, a, cond)
        save()

    late = [v for v in a.late_variants.split(",") if v and v in variants_all]
    if late and not over_budget():
        run_variants(late)

    res["total_s"] = time.time() - t_start
    save()
    print(f"[fp8] done in {res['total_s']:.0f} s", flush=True)
    return res


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *e):
        return False


def rope_ab(net, cfg, dev, dtype, shape, a, cond) -> dict:
    """One compiled block, interleaved: the package's per-forward cos/sin table against cos/sin in every block."""
    from mvdit.model.posemb import rope_table

    blk = net.blocks["block0"]
    captured = {}

    class Captured(Exception):
        pass

    def grab(m, args):
        captured["args"] = args
        raise Captured

    h = blk.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            run_net(net, torch.randn(shape, device=dev).to(dtype), torch.tensor(5.0, device=dev), cond)
    except Captured:
        pass
    h.remove()
    args = list(captured["args"])
    t = shape[2] // a.views
    angles = net.pos_embedder(a.views, t, shape[3] // cfg.patch_spatial, shape[4] // cfg.patch_spatial, cond.fps)

    def old_apply_rope(x, ang):
        c, s = ang.cos(), ang.sin()
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat([-x2, x1], dim=-1) * s).to(x.dtype)

    base = type(blk).forward
    new = torch.compile(functools.partial(base, blk), dynamic=False)
    orig_apply = network.apply_rope
    times = {"table_per_forward": [], "cos_sin_per_block": []}
    res = {}
    try:
        with torch.no_grad():
            args_new = tuple(args)
            args_old = tuple(args[:4] + [angles] + args[5:])
            for _ in range(2):
                new(*args_new)
            network.apply_rope = old_apply_rope
            old = torch.compile(functools.partial(base, blk), dynamic=False)
            for _ in range(2):
                old(*args_old)
            for _ in range(6):
                network.apply_rope = orig_apply
                times["table_per_forward"] += C.time_ms(lambda: new(*args_new), dev, reps=1, warmup=0)
                network.apply_rope = old_apply_rope
                times["cos_sin_per_block"] += C.time_ms(lambda: old(*args_old), dev, reps=1, warmup=0)
        network.apply_rope = orig_apply
        res = {k: {"ms": v, "median": C.med(v)} for k, v in times.items()}
        res["saving_ms_per_block"] = res["cos_sin_per_block"]["median"] - res["table_per_forward"]["median"]
        res["table_build_ms"] = C.med(C.time_ms(lambda: rope_table(angles), dev, reps=5, warmup=1))
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    finally:
        network.apply_rope = orig_apply
        torch._dynamo.reset()
    print(f"[rope] {res}", flush=True)
    return res


def gate35(net, cfg, dev, dtype, a, emulate, variants) -> dict:
    """35-step samples at a reduced shape (eager), one per variant from the same seed; cosine to the bf16 latent."""
    shape = C.latent_shape(a.gate_views, a.gate_frames, a.gate_height, a.gate_width)
    session = C.sampling_session(a.preset, a.gate_views, a.gate_frames, a.gate_height, a.gate_width, a.text_len, dev)
    _, cond, gt, text, cameras = make_inputs(cfg, shape, a.gate_views, a.text_len, dev, dtype, 0.0)
    out = {
        "latent": list(shape),
        "tokens": C.dit_flops(cfg, a.gate_views, a.gate_frames, a.gate_height, a.gate_width, a.text_len)["tokens"],
        "steps": a.steps,
    }
    lat = {}
    for name in variants:
        t0 = time.perf_counter()
        try:
            with Swap(net, name, emulate):
                lat[name] = session.sample(net, gt, text, 9, steps=a.steps, guidance=7.0, seed=1, fps=24.0)
            C.sync(dev)
            out[name] = {"s": time.perf_counter() - t0, "finite": bool(lat[name].isfinite().all())}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(f"[gate35] {name}: {out[name]}", flush=True)
    if "bf16" in lat:
        for name, v in lat.items():
            out[name]["cos_vs_bf16"] = cos(v, lat["bf16"])
            out[name]["rel_diff_vs_bf16"] = rel(v, lat["bf16"])
            out[name]["pass"] = out[name]["cos_vs_bf16"] >= 0.99
    print(f"[gate35] {out}", flush=True)
    return out


def whole_sample(net, dev, gt, text, cameras, a, emulate, fl, res, save) -> dict:
    """One whole 35-step sample at the full shape with --sample-variant, compiled, timed per step."""
    session = C.sampling_session(a.preset, len(cameras), a.frames, a.height, a.width, a.text_len, dev)
    name = a.sample_variant
    cuda = dev.startswith("cuda")
    r = res["sample"] = {"variant": name, "steps": a.steps, "wall_at_step_s": []}
    marks = []
    with Swap(net, name, emulate), C.compiled_blocks(net) if not a.no_compile else _null():
        C.mem_reset(dev)
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        if cuda:
            start.record()
        t0 = time.perf_counter()

        def mark(i):
            r["wall_at_step_s"].append(time.perf_counter() - t0)  # saved as it goes: a cut-off run still tells
            save()
            if cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                marks.append(e)

        lat = session.sample(net, gt, text, 9, steps=a.steps, guidance=7.0, seed=1, fps=24.0, step_callback=mark)
        C.sync(dev)
        r["wall_s"] = time.perf_counter() - t0
        r.update(C.mem_peak_gib(dev))
    if cuda:
        pts = [start] + marks
        r["steps_ms"] = [p.elapsed_time(q) for p, q in zip(pts[:-1], pts[1:], strict=True)]
        r["step_ms_median_2_on"] = C.med(r["steps_ms"][1:])
    r["finite"] = bool(lat.isfinite().all())
    r["mfu_equiv"] = 2 * a.steps * fl["forward"] / (r["wall_s"] * C.H100_PEAK)
    r["bf16_section8_s"] = BF16_SAMPLE_S_SECTION8
    r["speedup_vs_section8"] = BF16_SAMPLE_S_SECTION8 / r["wall_s"]
    r["frac_of_bf16_floor"] = [f / r["wall_s"] for f in PERF_MD_SAMPLE_FLOOR_S]
    r["latent_norm"] = float(lat.float().norm())
    r["goal_s"] = 420 if name.startswith("bf16") else 330  # issue #21: bf16 <= 420 s, FP8 <= 330 s on one H100
    print(f"[sample] {name}: {r['wall_s']:.1f} s (goal <= {r['goal_s']} s), MFU-equiv {r['mfu_equiv']:.3f}", flush=True)
    return r


if __name__ == "__main__":
    main()
