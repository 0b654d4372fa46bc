"""Where one compiled 7B DiT Block's forward time goes, and whether cheap inductor settings speed it up.

Builds ONE `mvdit.model.network.Block` of the preset (random weights) and the inputs a Block receives inside
`MultiviewDiT.forward` at the full sample (x [B, N, D], emb [B, D], AdaLN-LoRA [B, 3D], context [B, V*L, Dc], RoPE
angles [N, head_dim] fp32, sin-cos table [N, D], ViewRuns); the inputs come from the network's own preamble, run on a
1-block copy of the preset and stopped at the block. Then, in one process:

  ceilings    bf16 GEMM N x D x D and fused SDPA forward per backend (common.ceilings) -> the floor of one block
  components  each GEMM shape of the block, self-attention SDPA on the block's [B, N, h, d]-strided layout and the
              per-view cross-attention SDPA, timed alone
  variants    the block forward (CUDA events, warm-up, median):
                eager            the module as it is
                compile          blk.compile(dynamic=False), exactly mvdit.runtime.compile.compile_blocks
                compile-cdt      the same with inductor's coordinate_descent_tuning
                compile-max      mode="max-autotune-no-cudagraphs" (max_autotune + coordinate descent tuning)
                compile-max-tma  max-autotune with Triton's persistent TMA matmul templates
                eager-contig, compile-contig
                                 eager / compile with q, k, v made contiguous [B, h, N, d] before every SDPA (a
                                 candidate src change: cuDNN ran the strided layout 5 % slower when timed alone)
              a '#tag' suffix repeats a variant (e.g. compile#2: a second measurement of the same variant). Each
              records its first-call (compile) time, the relative output difference from eager, and a
              torch.profiler table of its CUDA kernels (top 25 by total time, and grouped: GEMM, attention, Triton
              fused, ATen elementwise, copies, other).

Full shape (H100):  PYTHONPATH=src python benchmarks/block_profile.py --out benchmarks/results/block_profile_h100.json
CPU smoke test:     PYTHONPATH=src python benchmarks/block_profile.py --preset tiny --height 64 --width 96 --frames 17 \
                        --device cpu --variants eager,compile --skip-ceilings --out /tmp/block_profile.json
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from mvdit.model.config import get_preset  # noqa: E402
from mvdit.model.network import MultiviewDiT  # noqa: E402

# torch.compile arguments of each variant (None: eager); "compile" goes through compile_blocks itself
VARIANTS: dict[str, dict | None] = {
    "eager": None,
    "compile": {},
    "compile-cdt": {"options": {"coordinate_descent_tuning": True}},
    "compile-max": {"mode": "max-autotune-no-cudagraphs"},
    "compile-max-tma": {
        "options": {
            "max_autotune": True,
            "coordinate_descent_tuning": True,
            "triton.enable_persistent_tma_matmul": True,
        }
    },
}
CONTIG = ("eager-contig", "compile-contig")  # the same as eager / compile, with contiguous SDPA inputs
GROUPS = ("gemm", "attention", "triton_fused", "aten_elementwise", "copy", "other")


class BudgetExceeded(BaseException):
    """Raised by SIGALRM when the time budget is spent."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p)
    p.add_argument("--variants", default="eager,compile,compile-cdt,compile-max", help="comma list; see above")
    p.add_argument("--reps", type=int, default=10, help="timed forwards per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards after the first (compiling) call")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip-ceilings", action="store_true")
    p.add_argument("--skip-components", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--top", type=int, default=25, help="kernels in each printed table")
    p.add_argument(
        "--budget-s",
        type=float,
        default=540,
        help="stop cleanly (SIGALRM, then summary and JSON) after this many seconds; 0: no limit",
    )
    p.add_argument(
        "--max-reserve-s",
        type=float,
        default=150,
        help="start a max-autotune variant only with at least this many seconds of the budget left",
    )
    p.add_argument("--out", default=None)
    p.add_argument(
        "--regroup",
        default=None,
        metavar="JSON",
        help="no run: reload a result JSON, recompute the kernel groups, print the summary and write it to --out",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ inputs
class _Captured(Exception):
    pass


def block_inputs(cfg, shape, views: int, text_len: int, dev: str, dtype: torch.dtype):
    """A 1-block MultiviewDiT of `cfg` (random weights); its forward runs up to the block, whose positional
    arguments (x, emb, lora, context, rope, pos_emb, views) are captured. Returns (block, args)."""
    net = C.build_random(MultiviewDiT, cfg.replace(num_blocks=1), dev, dtype).eval()
    net.requires_grad_(False)
    blk = net.blocks["block0"]
    got: list = []

    def grab(module, args):
        got.append(args)
        raise _Captured

    h = blk.register_forward_pre_hook(grab)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(shape, device=dev, generator=g).to(dtype)  # c_in-scaled latent ~ N(0, 1)
    text = torch.randn(1, views * text_len, cfg.crossattn_emb_channels, device=dev, generator=g).to(dtype)
    sigma = torch.tensor(40.0, device=dev)
    frame_repeat = torch.zeros(1, views, device=dev, dtype=dtype)
    frame_repeat[:, -2:] = 0.1
    with torch.no_grad():
        try:
            net(
                x=x,
                timesteps=(0.25 * sigma.log()).reshape(1).to(dtype),
                crossattn_emb=text,
                fps=torch.tensor([24.0], device=dev, dtype=dtype),
                padding_mask=torch.zeros(1, 1, *shape[-2:], device=dev, dtype=dtype),
                frame_repeat=frame_repeat,
                n_views=views,
            )
        except _Captured:
            pass
    h.remove()
    if not got:
        raise RuntimeError("the block was never called")
    args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in got[0])
    del net.blocks["block0"]  # keep the block, free the rest of the network
    del net
    return blk, args


def describe(args) -> list:
    names = ["x", "emb", "lora", "context", "rope", "pos_emb", "views"]
    out = []
    for n, a in zip(names, args, strict=False):
        if isinstance(a, torch.Tensor):
            out.append({"name": n, "shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")})
        else:
            out.append({"name": n, "value": repr(a)})
    return out


# ------------------------------------------------------------------------------------------------ variants
def install(blk, name: str) -> None:
    """Put the variant on the block through its seams (eager: the block as it is)."""
    base = name.split("#")[0]
    if base in CONTIG:
        for m in C.attentions(blk):
            m.attention_fn = contiguous_sdpa
        base = base.removesuffix("-contig")
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join([*VARIANTS, *CONTIG])}")
    spec = VARIANTS[base]
    if spec is None:
        return
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if base == "compile":
        from mvdit.runtime.compile import compile_blocks

        compile_blocks(types.SimpleNamespace(blocks={"block0": blk}))  # exactly what inference does
    else:
        blk.compile(dynamic=False, **spec)


def contiguous_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())


def uninstall(blk) -> None:
    C.uncompile(blk)
    for m in C.attentions(blk):
        m.__dict__.pop("attention_fn", None)
    torch._dynamo.reset()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------ profiler
def classify(name: str) -> str:
    n = name.lower()
    if n.startswith("triton_tem"):  # inductor's Triton matmul templates (max-autotune)
        return "gemm"
    if n.startswith("triton"):  # fused pointwise/reduction kernels; their names can mention the consumer (sdpa, mm)
        return "triton_fused"
    if any(s in n for s in ("cudnn", "flash", "fmha", "sdpa", "attention")):
        return "attention"
    if any(
        s in n for s in ("gemm", "gemv", "splitk", "cutlass", "sm90_xmma", "nvjet", "triton_tem", "_mm_", "matmul")
    ) or n in (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
    ):
        return "gemm"
    if any(s in n for s in ("memcpy", "memset", "copy_kernel", "direct_copy", "cat_array", "catarray")):
        return "copy"
    if any(s in n for s in ("elementwise", "reduce_kernel", "layer_norm", "norm_kernel", "at::native", "softmax")):
        return "aten_elementwise"
    return "other"


def profile_once(fn, dev: str, top: int, block_ms: float) -> dict:
    """One call of fn under torch.profiler: per-kernel totals, the call sequence, and grouped totals."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.startswith("cuda")
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    C.sync(dev)
    with profile(activities=acts) as prof:
        fn()
        C.sync(dev)
    seq = []
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                seq.append((e.time_range.start, e.name, e.time_range.elapsed_us() / 1e3))
        seq.sort()
        span_ms = (max(s + d * 1e3 for s, _, d in seq) - seq[0][0]) / 1e3 if seq else 0.0
        items = [(n, d) for _, n, d in seq]
    else:  # CPU: ATen ops by self time (no kernel view); nested ops make 'calls' approximate
        ka = prof.key_averages()
        items = []
        for e in ka:
            if e.self_cpu_time_total > 0:
                items += [(e.key, e.self_cpu_time_total / 1e3 / max(e.count, 1))] * e.count
        span_ms = sum(d for _, d in items)
    per: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for n, d in items:
        per[n][0] += 1
        per[n][1] += d
    busy = sum(d for _, d in items)
    rows = sorted(per.items(), key=lambda kv: -kv[1][1])
    table = [
        {
            "kernel": n[:90],
            "group": classify(n),
            "calls": c,
            "total_ms": t,
            "pct_of_kernels": 100 * t / busy if busy else float("nan"),
            "pct_of_block": 100 * t / block_ms if block_ms else float("nan"),
        }
        for n, (c, t) in rows
    ]
    groups = {g: {"ms": 0.0, "calls": 0} for g in GROUPS}
    for n, (c, t) in rows:
        groups[classify(n)]["ms"] += t
        groups[classify(n)]["calls"] += c
    for g in groups.values():
        g["pct_of_block"] = 100 * g["ms"] / block_ms if block_ms else float("nan")
    return {
        "activity": "cuda" if cuda else "cpu",
        "kernel_count": len(items),
        "kernel_busy_ms": busy,
        "first_to_last_kernel_ms": span_ms,
        "block_ms_timed": block_ms,
        "top": table[:top],
        "all_kernels": table,
        "groups": groups,
        "sequence": [{"kernel": n[:120], "ms": round(d, 4)} for n, d in items] if cuda else None,
    }


def regroup(pr: dict) -> None:
    """Recompute the groups of a stored profile with the current classify()."""
    groups = {g: {"ms": 0.0, "calls": 0} for g in GROUPS}
    block_ms = pr["block_ms_timed"]
    for r in pr["all_kernels"]:
        r["group"] = classify(r["kernel"])
        groups[r["group"]]["ms"] += r["total_ms"]
        groups[r["group"]]["calls"] += r["calls"]
    for g in groups.values():
        g["pct_of_block"] = 100 * g["ms"] / block_ms if block_ms else float("nan")
    for r in pr["top"]:
        r["group"] = classify(r["kernel"])
    pr["groups"] = groups


def print_table(name: str, pr: dict, top: int) -> None:
    print(
        f"\n[prof] {name}: {pr['kernel_count']} kernels, busy {pr['kernel_busy_ms']:.2f} ms, "
        f"first-to-last {pr['first_to_last_kernel_ms']:.2f} ms, timed block {pr['block_ms_timed']:.2f} ms",
        flush=True,
    )
    print(f"  {'kernel':90s} {'group':16s} {'calls':>5s} {'ms':>9s} {'%blk':>6s}")
    for r in pr["top"][:top]:
        print(f"  {r['kernel']:90s} {r['group']:16s} {r['calls']:5d} {r['total_ms']:9.3f} {r['pct_of_block']:6.2f}")


def print_groups(prs: dict) -> None:
    print("\n[prof] grouped kernel time per block forward, ms (% of the timed block)")
    print(f"  {'variant':18s}" + "".join(f"{g:>22s}" for g in GROUPS) + f"{'busy':>10s}{'timed':>10s}")
    for name, pr in prs.items():
        cells = "".join(f"{pr['groups'][g]['ms']:11.2f} ({pr['groups'][g]['pct_of_block']:5.1f}%)   " for g in GROUPS)
        print(f"  {name:18s}{cells}{pr['kernel_busy_ms']:10.2f}{pr['block_ms_timed']:10.2f}")


# ------------------------------------------------------------------------------------------------ components
def components(cfg, args, dev: str, dtype: torch.dtype, n_views: int) -> dict:
    """The block's matrix products and SDPA calls, each timed alone on random data of the block's shapes."""
    x, context = args[0], args[3]
    b, n, d = x.shape
    m, dc = context.shape[1], context.shape[2]
    hidden = int(d * cfg.mlp_ratio)
    heads, hd = cfg.num_heads, d // cfg.num_heads
    reps = 10 if dev.startswith("cuda") else 2
    g = torch.Generator(device=dev).manual_seed(1)
    out: dict = {"gemm": {}, "sdpa": {}}
    # (name, rows, in, out, uses per block)
    shapes = [
        ("tokens_x_D_to_D", b * n, d, d, 6),  # self q, k, v, out; cross q, out
        ("tokens_x_D_to_4D (mlp1)", b * n, d, hidden, 1),
        ("tokens_x_4D_to_D (mlp2)", b * n, hidden, d, 1),
        ("text_x_Dc_to_D (cross k, v)", b * m, dc, d, 2),
    ]
    total_ms = 0.0
    total_fl = 0
    for name, rows, k_in, k_out, uses in shapes:
        a = torch.randn(rows, k_in, device=dev, dtype=dtype, generator=g)
        w = torch.randn(k_out, k_in, device=dev, dtype=dtype, generator=g)
        t = C.med(C.time_ms(functools.partial(F.linear, a, w), dev, reps=reps, warmup=2))
        fl = 2 * rows * k_in * k_out
        out["gemm"][name] = {"shape": [rows, k_in, k_out], "uses": uses, "ms": t, "tflops": fl / (t * 1e-3) / 1e12}
        total_ms += uses * t
        total_fl += uses * fl
        del a, w
    out["gemm_total_ms"] = total_ms
    out["gemm_total_flops"] = total_fl
    out["gemm_total_tflops"] = total_fl / (total_ms * 1e-3) / 1e12

    def sdpa_time(q, k, v):
        return C.med(C.time_ms(functools.partial(F.scaled_dot_product_attention, q, k, v), dev, reps=3, warmup=1))

    # self-attention on the layout the block produces ([B, N, h, d] memory seen as [B, h, N, d])
    q, k, v = (torch.randn(b, n, heads, hd, device=dev, dtype=dtype, generator=g).transpose(1, 2) for _ in range(3))
    fl = 4 * b * n * n * d
    t = sdpa_time(q, k, v)
    out["sdpa"]["self_bnhd_strided"] = {
        "shape": list(q.shape),
        "kernel": C.sdpa_choice(q, k, v),
        "ms": t,
        "tflops": fl / (t * 1e-3) / 1e12,
    }
    del q, k, v
    # cross-attention: each view's tokens over its own text tokens, views folded into the batch
    per = n // n_views
    lt = m // n_views
    q = torch.randn(b * n_views, per, heads, hd, device=dev, dtype=dtype, generator=g).transpose(1, 2)
    k, v = (torch.randn(b * n_views, lt, heads, hd, device=dev, dtype=dtype, generator=g).transpose(1, 2) for _ in "kv")
    fl = 4 * b * n * lt * d
    t = sdpa_time(q, k, v)
    out["sdpa"]["cross_per_view"] = {
        "shape_q": list(q.shape),
        "shape_kv": list(k.shape),
        "kernel": C.sdpa_choice(q, k, v),
        "ms": t,
        "tflops": fl / (t * 1e-3) / 1e12,
    }
    del q, k, v
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    a = parse_args(argv)
    if a.regroup:
        import json

        res = json.loads(Path(a.regroup).read_text())
        for v in res.get("variants", {}).values():
            if "profile" in v:
                regroup(v["profile"])
        res["groups_recomputed"] = {"date": C.DATE, "by": "block_profile.py --regroup"}
        summary(res)
        C.save_json(a.out, res)
        return res
    t_start = time.time()
    dev, dtype = a.device, getattr(torch, a.dtype)
    cuda = dev.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    stopped = {"flag": False}

    def on_alarm(signum, frame):
        stopped["flag"] = True
        raise BudgetExceeded(f"time budget of {a.budget_s:.0f} s spent")

    if a.budget_s > 0 and hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(int(a.budget_s))

    def left() -> float:
        return a.budget_s - (time.time() - t_start) if a.budget_s > 0 else float("inf")

    cfg = get_preset(a.preset)
    shape = C.latent_shape(a.views, a.frames, a.height, a.width)
    fl = C.dit_flops(cfg, a.views, a.frames, a.height, a.width, a.text_len)
    pb = fl["per_block"]
    res: dict = {
        "benchmark": "block_profile",
        "env": C.env_info(dev),
        "args": vars(a),
        "shapes": {"latent": list(shape), "tokens": fl["tokens"], "dtype": a.dtype},
        "flops_per_block": pb,
        "inductor_mode_options": torch._inductor.list_mode_options(),
        "variant_specs": {k: v for k, v in VARIANTS.items()},
    }
    print(
        f"[block] {res['env']['device_name']} torch {torch.__version__} preset {a.preset} latent {list(shape)} "
        f"tokens {fl['tokens']} block {pb['total']:.3e} FLOPs (gemm {pb['gemm']:.3e}, self-attn "
        f"{pb['self_attn']:.3e}, cross-attn {pb['cross_attn']:.3e})",
        flush=True,
    )
    try:
        run(a, res, cfg, shape, fl, dev, dtype, cuda, left)
    except BudgetExceeded as e:
        res["stopped"] = str(e)
        print(f"[block] STOPPED: {e}", flush=True)
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    res["wall_s"] = time.time() - t_start
    summary(res)
    C.save_json(a.out, res)
    print(f"[block] done in {res['wall_s']:.0f} s", flush=True)
    return res


def run(a, res, cfg, shape, fl, dev, dtype, cuda, left):
    pb = fl["per_block"]
    if not a.skip_ceilings:
        t0 = time.perf_counter()
        c = C.ceilings(dev, dtype, fl["tokens"], cfg.model_channels, cfg.num_heads)
        res["ceilings"] = c
        sd = C.best_sdpa_tflops(c)
        floor_ms = (
            pb["gemm"] / (c["gemm"]["tflops"] * 1e12) + (pb["self_attn"] + pb["cross_attn"]) / (sd * 1e12)
        ) * 1e3
        res["floor_per_block_ms"] = floor_ms
        res["floor_terms_ms"] = {
            "gemm_at_ceiling": pb["gemm"] / (c["gemm"]["tflops"] * 1e12) * 1e3,
            "self_attn_at_best_sdpa": pb["self_attn"] / (sd * 1e12) * 1e3,
            "cross_attn_at_best_sdpa": pb["cross_attn"] / (sd * 1e12) * 1e3,
        }
        print(
            f"[ceil] gemm {c['gemm']['ms']:.2f} ms {c['gemm']['tflops']:.0f} TF/s; best sdpa {sd:.0f} TF/s "
            f"(default picks {c['sdpa_default_choice']}); floor per block {floor_ms:.1f} ms "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        for k, v in c.items():
            if k.startswith("sdpa_fwd_"):
                print(f"[ceil] {k}: {v}", flush=True)
        C.save_json(a.out, res)

    # ---------------------------------------------------------------- block + inputs
    C.mem_reset(dev)
    t0 = time.perf_counter()
    blk, args = block_inputs(cfg, shape, a.views, a.text_len, dev, dtype)
    C.sync(dev)
    res["build_and_inputs_s"] = time.perf_counter() - t0
    res["block_params"] = sum(p.numel() for p in blk.parameters())
    res["block_inputs"] = describe(args)
    print(
        f"[build] block {res['block_params'] / 1e6:.1f} M params, inputs "
        + ", ".join(
            f"{d['name']} {d['shape']} {d['dtype']}" if "shape" in d else f"{d['name']}={d['value']}"
            for d in res["block_inputs"]
        )
        + f" ({res['build_and_inputs_s']:.1f} s)",
        flush=True,
    )
    C.save_json(a.out, res)

    if not a.skip_components:
        t0 = time.perf_counter()
        comp = components(cfg, args, dev, dtype, a.views)
        res["components"] = comp
        for k, v in comp["gemm"].items():
            print(f"[comp] gemm {k:28s} {v['shape']} x{v['uses']}: {v['ms']:.3f} ms {v['tflops']:.0f} TF/s")
        print(
            f"[comp] gemm total per block {comp['gemm_total_ms']:.2f} ms at {comp['gemm_total_tflops']:.0f} TF/s",
            flush=True,
        )
        for k, v in comp["sdpa"].items():
            print(f"[comp] sdpa {k}: {v['ms']:.2f} ms {v['tflops']:.0f} TF/s ({v['kernel']})", flush=True)
        if "ceilings" in res:
            # the floor with every GEMM at its own shape's measured rate, attention at the measured SDPA times
            res["floor_per_block_components_ms"] = (
                comp["gemm_total_ms"] + comp["sdpa"]["self_bnhd_strided"]["ms"] + comp["sdpa"]["cross_per_view"]["ms"]
            )
        print(f"[comp] {time.perf_counter() - t0:.1f} s", flush=True)
        C.save_json(a.out, res)

    # ---------------------------------------------------------------- variants
    def fwd():
        with torch.no_grad():
            return blk(*args)

    ref = None
    res["variants"] = {}
    profiles: dict = {}
    for name in [s for s in a.variants.split(",") if s]:
        base = name.split("#")[0]
        need = a.max_reserve_s if "max" in base else min(20.0, a.max_reserve_s)
        if left() < need:
            res["variants"][name] = {"skipped": f"time budget ({left():.0f} s left, {need:.0f} s needed)"}
            print(f"[var] {name}: skipped, {left():.0f} s of the budget left", flush=True)
            continue
        r: dict = {}
        res["variants"][name] = r
        try:
            uninstall(blk)
            install(blk, name)
            C.mem_reset(dev)
            t0 = time.perf_counter()
            out = fwd()
            C.sync(dev)
            r["first_call_s"] = time.perf_counter() - t0
            if ref is None and base == "eager":
                ref = out
            if ref is not None:
                r["rel_diff_vs_eager"] = rel(out, ref)
                r["rel_diff_of_increment_vs_eager"] = rel(out - args[0], ref - args[0])
            r["finite"] = bool(torch.isfinite(out).all())
            del out
            t = C.time_ms(fwd, dev, reps=a.reps, warmup=a.warmup)
            r["ms"] = t
            r["ms_median"] = C.med(t)
            r["spread_pct"] = 100 * (max(t) - min(t)) / C.med(t)
            r.update(C.mem_peak_gib(dev))
            if "floor_per_block_ms" in res:
                r["frac_of_floor"] = res["floor_per_block_ms"] / r["ms_median"]
            if base.startswith("compile"):
                from torch._dynamo.utils import counters

                r["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
                r["dynamo_unique_graphs"] = counters["stats"].get("unique_graphs")
            print(
                f"[var] {name:16s} {r['ms_median']:8.2f} ms (min {min(t):.2f} max {max(t):.2f}, {a.reps} reps)  "
                f"first call {r['first_call_s']:6.1f} s  diff vs eager {r.get('rel_diff_vs_eager', float('nan')):.2e}"
                f" (increment {r.get('rel_diff_of_increment_vs_eager', float('nan')):.2e})  "
                f"peak {r.get('peak_allocated_gib', float('nan')):.1f} GiB",
                flush=True,
            )
            C.save_json(a.out, res)
            if not a.no_profile:
                try:
                    pr = profile_once(fwd, dev, a.top, r["ms_median"])
                    r["profile"] = pr
                    profiles[name] = pr
                except BudgetExceeded:
                    raise
                except Exception as e:  # noqa: BLE001 - a profiler that can't run here
                    r["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"[prof] {name} failed: {r['profile_error']}", flush=True)
        except BudgetExceeded as e:
            r["error"] = f"stopped: {e}"
            raise
        except Exception as e:  # noqa: BLE001 - record and go on with the next variant
            r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"[var] {name} FAILED: {r['error']}", flush=True)
            if C.is_oom(e) and cuda:
                torch.cuda.empty_cache()
        finally:
            C.save_json(a.out, res)
    uninstall(blk)


def summary(res: dict) -> None:
    vs = res.get("variants", {})
    top = res["args"]["top"]
    for name in ("eager", "compile"):
        if "profile" in vs.get(name, {}):
            print_table(name, vs[name]["profile"], top)
    prs = {k: v["profile"] for k, v in vs.items() if "profile" in v}
    if prs:
        print_groups(prs)
    ok = {k: v for k, v in vs.items() if "ms_median" in v}
    base = ok.get("compile", {}).get("ms_median")
    res["speedup_vs_compile"] = {k: base / v["ms_median"] for k, v in ok.items()} if base else None
    floor = res.get("floor_per_block_ms")
    print("\n[summary] block forward per variant")
    print(
        f"  {'variant':18s} {'median ms':>10s} {'spread%':>8s} {'first s':>8s} {'vs compile':>11s} "
        f"{'diff':>9s} {'incr diff':>9s} {'floor/t':>8s}"
    )
    for k, v in vs.items():
        if "ms_median" not in v:
            print(f"  {k:18s} {v.get('skipped') or v.get('error')}")
            continue
        sp = res["speedup_vs_compile"][k] if res["speedup_vs_compile"] else float("nan")
        print(
            f"  {k:18s} {v['ms_median']:10.2f} {v['spread_pct']:8.2f} {v['first_call_s']:8.1f} {sp:10.3f}x "
            f"{v.get('rel_diff_vs_eager', float('nan')):9.2e} "
            f"{v.get('rel_diff_of_increment_vs_eager', float('nan')):9.2e}"
            f" {(floor / v['ms_median']) if floor else float('nan'):8.3f}"
        )
    if floor:
        ft = res["floor_terms_ms"]
        print(
            f"  floor per block {floor:.1f} ms = gemm {ft['gemm_at_ceiling']:.1f} + self-attn "
            f"{ft['self_attn_at_best_sdpa']:.1f} + cross-attn {ft['cross_attn_at_best_sdpa']:.1f} ms"
            + (
                "; with per-shape GEMM rates and the block's SDPA layouts: "
                f"{res['floor_per_block_components_ms']:.1f} ms"
                if "floor_per_block_components_ms" in res
                else ""
            )
        )


if __name__ == "__main__":
    main()
