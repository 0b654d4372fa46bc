"""Multiview inference speed of the 7B DiT (random weights of the real shape) on one GPU.

Measures, in one process: the ceilings (bf16 GEMM tokens x 4096 x 4096, fused SDPA forward per backend); one DiT
forward per variant (warm-up first, CUDA events, median) with per-block times and peak memory; and real sampling
steps through the sampling session infer.py uses (`SamplingSession.sample`: classifier-free guidance, Euler),
extrapolated to a 35-step sample.

Variants are monkeypatches of mvdit (src/ unchanged), joined with '+':
  base      the package as it is (torch's default SDPA backend)
  cudnn     SDPA with cuDNN first (sdpa_kernel([CUDNN, FLASH, EFFICIENT, MATH], set_priority=True))
  flash     SDPA forced to the flash backend
  fusedqk   per-head q/k RMSNorm + RoPE as one torch.compile'd function
  compile   torch.compile of every Block (regional compilation)
  batch2    the conditional and unconditional guidance passes as one batch-2 forward

Full shape (H100):   PYTHONPATH=src python benchmarks/infer.py --out benchmarks/results/infer.json
CPU smoke test:      PYTHONPATH=src python benchmarks/infer.py --preset tiny --height 64 --width 96 --frames 17 \
                         --steps 2 --device cpu --out /tmp/infer.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from mvdit.model.config import get_preset  # noqa: E402
from mvdit.model.edm import run_net  # noqa: E402
from mvdit.model.network import MultiviewDiT  # noqa: E402

PERF_MD = {
    "forward_flops": 3.70e15,
    "forward_floor_s": [5.75, 6.0],
    "block_floor_ms": [205, 215],
    "sample_35_floor_s": [402, 421],
    "diffusers_forward_s": 7.20,
    "diffusers_sample_s": 504,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p)
    p.add_argument("--steps", type=int, default=35, help="sampling steps of one sample (extrapolation)")
    p.add_argument("--gen-steps", type=int, default=3, help="real sampling steps run through SamplingSession.sample")
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--reps", type=int, default=3, help="timed forwards of the baseline (other variants: --var-reps)")
    p.add_argument("--var-reps", type=int, default=2)
    p.add_argument("--variants", default="base,cudnn,cudnn+fusedqk,cudnn+batch2,cudnn+compile")
    p.add_argument("--gen-variants", default="base,best", help="'best' = fastest measured CFG step")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip-ceilings", action="store_true")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="start no further forward variant after this many seconds (0: no limit)",
    )
    p.add_argument(
        "--gen-budget-s",
        type=float,
        default=0,
        help="start no further generate run after this many seconds (0: no limit)",
    )
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


class Stamp:
    """A point in time on the device stream (CUDA event) or the host clock (CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()
        else:
            self.t = time.perf_counter()

    def ms_to(self, other: Stamp) -> float:
        return self.ev.elapsed_time(other.ev) if self.cuda else (other.t - self.t) * 1e3


def variant_contexts(name: str, net):
    parts = set(name.split("+"))
    unknown = parts - {"base", "cudnn", "flash", "fusedqk", "compile", "batch2"}
    if unknown:
        raise ValueError(f"unknown variant parts {unknown}")
    stack = contextlib.ExitStack()
    if "cudnn" in parts:
        stack.enter_context(C.sdpa_backend("cudnn-first"))
    if "flash" in parts:
        stack.enter_context(C.sdpa_backend("flash"))
    if "fusedqk" in parts:
        stack.enter_context(C.fused_qk_norm_rope(net))
    if "compile" in parts:
        stack.enter_context(C.compiled_blocks(net))
    return stack, "batch2" in parts


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    dev, dtype = a.device, getattr(torch, a.dtype)
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = get_preset(a.preset)
    shape = C.latent_shape(a.views, a.frames, a.height, a.width)
    fl = C.dit_flops(cfg, a.views, a.frames, a.height, a.width, a.text_len)
    res = {
        "benchmark": "infer",
        "env": C.env_info(dev),
        "args": vars(a),
        "shapes": {
            "latent": list(shape),
            "tokens": fl["tokens"],
            "text": [1, a.views * a.text_len, cfg.crossattn_emb_channels],
            "dtype": a.dtype,
        },
        "flops": fl,
        "perf_md": PERF_MD,
    }
    print(
        f"[infer] {res['env']['device_name']} torch {torch.__version__} latent {list(shape)} tokens {fl['tokens']} "
        f"forward {fl['forward']:.3e} FLOPs",
        flush=True,
    )
    is_7b = a.preset.startswith("7b")

    def over_budget(limit=None):
        limit = a.budget_s if limit is None else limit
        return limit and time.time() - t_start > limit

    if not a.skip_ceilings:
        res["ceilings"] = C.ceilings(dev, dtype, fl["tokens"], cfg.model_channels, cfg.num_heads)
        c = res["ceilings"]
        print(
            "[ceil] gemm {:.1f} ms {:.0f} TF/s; sdpa default={} cudnn-first={}".format(
                c["gemm"]["ms"], c["gemm"]["tflops"], c["sdpa_default_choice"], c["sdpa_cudnn_first_choice"]
            ),
            flush=True,
        )
        for k, v in c.items():
            if k.startswith("sdpa_fwd_"):
                print(f"[ceil] {k}: {v}", flush=True)
        # the floor of one forward from this call's ceilings: GEMMs at the GEMM rate, attention at the best SDPA rate
        res["floor_from_ceilings_s"] = fl["forward_gemm"] / (c["gemm"]["tflops"] * 1e12) + (
            fl["forward_self_attn"] + fl["forward_cross_attn"]
        ) / (C.best_sdpa_tflops(c) * 1e12)
        C.save_json(a.out, res)

    # ------------------------------------------------------------------ build
    C.mem_reset(dev)
    t0 = time.perf_counter()
    net = C.build_random(MultiviewDiT, cfg, dev, dtype).eval()
    net.requires_grad_(False)
    model = net  # run_net keeps the latent in the weights' dtype
    C.sync(dev)
    res["build_s"] = time.perf_counter() - t0
    res["params"] = sum(p.numel() for p in net.parameters())
    res["weights_gib"] = C.mem_now_gib(dev)
    print(
        f"[build] {res['params'] / 1e9:.3f} B params in {res['build_s']:.1f} s, {res['weights_gib']:.1f} GiB",
        flush=True,
    )

    cond, gt, text, cameras, g = C.random_condition(cfg, shape, a.views, a.text_len, dev, dtype)
    cond2 = cond.both_branches()
    x = (40.0 * torch.randn(shape, device=dev, generator=g)).to(dtype)
    sigma = torch.tensor(40.0, device=dev)

    # per-block stamps
    stamps: list = []
    blocks = list(net.blocks.values())
    for blk in blocks:
        blk.register_forward_pre_hook(lambda m, i: stamps.append(("s", Stamp(dev))))
        blk.register_forward_hook(lambda m, i, o: stamps.append(("e", Stamp(dev))))

    def block_ms() -> list[float]:
        s = [st for k, st in stamps if k == "s"]
        e = [st for k, st in stamps if k == "e"]
        return [x.ms_to(y) for x, y in zip(s, e, strict=False)]

    def fwd1():
        stamps.clear()
        with torch.no_grad():
            return run_net(model, x, sigma, cond)

    def fwd2():
        stamps.clear()
        with torch.no_grad():
            return run_net(model, torch.cat([x, x]), sigma, cond2)

    ref = None
    res["variants"] = {}
    for name in [s for s in a.variants.split(",") if s]:
        if over_budget():
            res["variants"][name] = {"skipped": "time budget"}
            continue
        c = res.get("ceilings", {})
        if name == "cudnn" and c and c["sdpa_default_choice"] == c["sdpa_cudnn_first_choice"]:
            res["variants"][name] = {"skipped": f"default SDPA already picks {c['sdpa_default_choice']}"}
            continue
        r: dict = {}
        res["variants"][name] = r
        try:
            stack, batched = variant_contexts(name, net)
            with stack:
                C.mem_reset(dev)
                f = fwd2 if batched else fwd1
                t0 = time.perf_counter()
                out = f()
                C.sync(dev)
                r["first_call_s"] = time.perf_counter() - t0  # includes compilation / table builds
                if batched:
                    out = out[:1]
                if ref is None:
                    ref = out.float()
                r["rel_err_vs_first"] = float((out.float() - ref).norm() / ref.norm())
                del out
                reps = a.reps if name == "base" else a.var_reps
                t = C.time_ms(f, dev, reps=reps, warmup=0)
                bm = block_ms()
                r.update(C.mem_peak_gib(dev))
            fwd_ms = C.med(t)
            r["forward_ms"] = t
            r["forward_ms_median"] = fwd_ms
            r["batch"] = 2 if batched else 1
            r["cfg_step_forward_ms"] = fwd_ms if batched else 2 * fwd_ms
            r["per_forward_equiv_ms"] = r["cfg_step_forward_ms"] / 2
            r["block_ms_median"] = C.med(bm)
            r["block_ms_sum"] = sum(bm)
            r["outside_blocks_ms"] = (fwd_ms - sum(bm)) if bm else None
            eq = r["per_forward_equiv_ms"] * 1e-3
            r["tflops_model"] = fl["forward"] / eq / 1e12
            r["mfu"] = fl["forward"] / (eq * C.H100_PEAK)
            if is_7b:
                r["frac_of_perfmd_floor"] = [f_ / eq for f_ in PERF_MD["forward_floor_s"]]
                r["block_frac_of_perfmd_floor"] = [
                    f_ / r["block_ms_median"] / (2 if batched else 1) for f_ in PERF_MD["block_floor_ms"]
                ]
            if "floor_from_ceilings_s" in res:
                r["frac_of_same_call_floor"] = res["floor_from_ceilings_s"] / eq
            r["sample_35_extrapolated_s"] = a.steps * r["cfg_step_forward_ms"] * 1e-3
            print(
                f"[fwd] {name:22s} fwd {fwd_ms:9.1f} ms (batch {r['batch']}) per-fwd-equiv "
                f"{r['per_forward_equiv_ms']:9.1f} ms  block {r['block_ms_median']:7.2f} ms  MFU {r['mfu']:.3f}  "
                f"peak {r.get('peak_allocated_gib', float('nan')):.1f} GiB  first {r['first_call_s']:.1f} s  "
                f"err {r['rel_err_vs_first']:.2e}",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - record and go on with the next variant
            r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"[fwd] {name} FAILED: {r['error']}", flush=True)
            if C.is_oom(e) and dev.startswith("cuda"):
                torch.cuda.empty_cache()
        C.save_json(a.out, res)

    ok = {k: v for k, v in res["variants"].items() if "cfg_step_forward_ms" in v and v["rel_err_vs_first"] < 0.05}
    best = min(ok, key=lambda k: ok[k]["cfg_step_forward_ms"]) if ok else "base"
    res["best_variant"] = best
    if "base" in ok:
        base_ms = ok["base"]["cfg_step_forward_ms"]
        res["speedup_vs_base"] = {k: base_ms / v["cfg_step_forward_ms"] for k, v in ok.items()}
    print(f"[fwd] best variant: {best}  speed-ups vs base: {res.get('speedup_vs_base')}", flush=True)

    # ------------------------------------------------------------------ real sampling steps
    session = C.sampling_session(a.preset, a.views, a.frames, a.height, a.width, a.text_len, dev)
    res["generate"] = {}
    gen_names = []
    for s in a.gen_variants.split(","):
        s = best if s == "best" else s
        if s and s not in gen_names:
            gen_names.append(s)
    for name in gen_names:
        if over_budget(a.gen_budget_s):
            res["generate"][name] = {"skipped": "time budget"}
            continue
        r = {}
        res["generate"][name] = r
        try:
            stack, batch2 = variant_contexts(name, net)
            with stack:
                C.mem_reset(dev)
                marks = []
                t0 = time.perf_counter()
                start = Stamp(dev)
                out = session.sample(
                    model,
                    gt,
                    text,
                    9,
                    steps=a.gen_steps,
                    guidance=a.guidance,
                    seed=1,
                    fps=24.0,
                    batch_guidance=batch2,
                    step_callback=lambda i, marks=marks: marks.append(Stamp(dev)),
                )
                C.sync(dev)
                r["wall_s"] = time.perf_counter() - t0
                r.update(C.mem_peak_gib(dev))
            pts = [start] + marks
            steps_ms = [p.ms_to(q) for p, q in zip(pts[:-1], pts[1:], strict=True)]
            steady = steps_ms[1:] if len(steps_ms) > 1 else steps_ms
            r["steps_ms"] = steps_ms
            r["step_ms_steady_median"] = C.med(steady)
            r["finite"] = bool(torch.isfinite(out).all())
            r["sample_35_s"] = a.steps * r["step_ms_steady_median"] * 1e-3
            r["mfu"] = 2 * fl["forward"] / (r["step_ms_steady_median"] * 1e-3 * C.H100_PEAK)
            if is_7b:
                r["frac_of_perfmd_floor"] = [f_ / r["sample_35_s"] for f_ in PERF_MD["sample_35_floor_s"]]
            if "floor_from_ceilings_s" in res:
                r["frac_of_same_call_floor"] = 2 * res["floor_from_ceilings_s"] / (r["step_ms_steady_median"] * 1e-3)
            fv = res["variants"].get(name, {})
            if "cfg_step_forward_ms" in fv:
                r["step_overhead_ms_vs_forwards"] = r["step_ms_steady_median"] - fv["cfg_step_forward_ms"]
            print(
                f"[gen] {name:22s} steps {[round(s_) for s_ in steps_ms]} ms  "
                f"steady {r['step_ms_steady_median']:.1f} ms/step  => {r['sample_35_s']:.1f} s per "
                f"{a.steps}-step sample  MFU {r['mfu']:.3f}  "
                f"peak {r.get('peak_allocated_gib', float('nan')):.1f} GiB",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"[gen] {name} FAILED: {r['error']}", flush=True)
        C.save_json(a.out, res)

    res["total_s"] = time.time() - t_start
    C.save_json(a.out, res)
    print(f"[infer] done in {res['total_s']:.0f} s", flush=True)
    return res


if __name__ == "__main__":
    main()
