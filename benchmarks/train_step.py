"""Training-step speed and memory of the 7B multiview DiT's block stack on one GPU.

The full 28-block model cannot be fully fine-tuned on one 80 GB GPU, so this runs `mvdit.training.loss.training_loss`
forward + backward through a DiffusionModel with N blocks (random weights of the real shape, bf16 parameters and
gradients; patch embedding, final layer and log-variance head included) at the full 76,320-token sample, with
activation checkpointing off and on (torch.utils.checkpoint around every Block, non-reentrant). The per-block
slope between two block counts extrapolates the 28-block time and memory. No optimizer step is timed. Each
variant's floor (common.train_floors: no, full or selective checkpointing) comes from the ceilings measured in the
same call and, separately, from perf.md's.

Full shape (H100):  PYTHONPATH=src python benchmarks/train_step.py --out benchmarks/results/train_step.json
CPU smoke test:     PYTHONPATH=src python benchmarks/train_step.py --preset tiny --height 64 --width 96 --frames 17 \
                        --device cpu --out /tmp/train.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from mvdit.constants import CAMERAS  # noqa: E402
from mvdit.model.config import get_preset  # noqa: E402
from mvdit.model.network import DiffusionModel  # noqa: E402
from mvdit.training.loss import LossConfig, draw_loss_randomness, training_loss  # noqa: E402

PERF_MD = {
    "train_sample_model_flops": 1.11e16,
    "floor_no_ac_s": 21.5,  # perf.md's two floors; per variant, C.train_floors recomputes them (selective, LoRA too)
    "floor_full_ac_s": 27.5,
    "eager_block_fwd_bwd_ms": 822,
    "diffusers_ac_block_s": 1.12,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p)
    p.add_argument("--full-blocks", type=int, default=28, help="depth to extrapolate to")
    p.add_argument("--blocks-noac", default="1,2", help="block counts without activation checkpointing")
    p.add_argument("--blocks-ac", default="2,4", help="block counts with activation checkpointing")
    p.add_argument(
        "--variants",
        default="base,cudnn",
        help="base (default SDPA), cudnn (cuDNN-first SDPA), +fusedqk (compiled q/k norm + RoPE), "
        "+compile (torch.compile of every Block), +sac (selective checkpointing: keep self-attention outputs)",
    )
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip-ceilings", action="store_true")
    p.add_argument("--budget-s", type=float, default=0, help="skip remaining runs after this many seconds (0: none)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def set_depth(
    model: DiffusionModel, all_blocks: list, n: int, ac: bool, compiled: bool = False, selective: bool = False
) -> None:
    """Use the first n blocks: each torch.compile'd when compiled (one graph shared by every block: regional
    compilation) and wrapped in non-reentrant activation checkpointing when ac (around the compiled block; selective
    keeps the self-attention outputs, as training does). The wrappers are rebuilt per run; the blocks stay."""
    import torch._dynamo
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    from mvdit.runtime.activation_checkpointing import selective_checkpoint_context

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    blocks = {}
    for name, blk in all_blocks[:n]:
        m = torch.compile(blk, dynamic=False) if compiled else blk
        if ac:
            kw = {"context_fn": selective_checkpoint_context()} if selective else {}
            m = checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kw)
        blocks[name] = m
    model.net.blocks = nn.ModuleDict(blocks)


def variant_ctx(name: str, net: nn.Module):
    parts = set(name.split("+"))
    stack = contextlib.ExitStack()
    if "cudnn" in parts:
        stack.enter_context(C.sdpa_backend("cudnn-first"))
    if "flash" in parts:
        stack.enter_context(C.sdpa_backend("flash"))
    if "fusedqk" in parts:
        stack.enter_context(C.fused_qk_norm_rope(net))
    return stack


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    dev, dtype = a.device, getattr(torch, a.dtype)
    cuda = dev.startswith("cuda")
    n_noac = [int(s) for s in a.blocks_noac.split(",") if s]
    n_ac = [int(s) for s in a.blocks_ac.split(",") if s]
    n_max = max(n_noac + n_ac)
    cfg_full = get_preset(a.preset, num_blocks=a.full_blocks)
    shape = C.latent_shape(a.views, a.frames, a.height, a.width)
    fl = C.dit_flops(cfg_full, a.views, a.frames, a.height, a.width, a.text_len)
    train_flops = 3 * fl["forward"]  # model FLOPs of one training sample of the full-depth model
    block_train_flops = 3 * fl["per_block"]["total"]
    res = {
        "benchmark": "train_step",
        "env": C.env_info(dev),
        "args": vars(a),
        "shapes": {
            "latent": list(shape),
            "tokens": fl["tokens"],
            "text": [1, a.views * a.text_len, 1024],
            "dtype": f"{a.dtype} params, grads and activations",
        },
        "flops": {**fl, "train_sample_model": train_flops, "train_block_model": block_train_flops},
        "perf_md": PERF_MD,
    }
    print(
        f"[train] {res['env']['device_name']} torch {torch.__version__} latent {list(shape)} tokens {fl['tokens']} "
        f"train sample {train_flops:.3e} model FLOPs",
        flush=True,
    )

    def over_budget():
        return a.budget_s and time.time() - t_start > a.budget_s

    if not a.skip_ceilings:
        cfg = cfg_full
        res["ceilings"] = C.ceilings(dev, dtype, fl["tokens"], cfg.model_channels, cfg.num_heads, backward=True)
        for k, v in res["ceilings"].items():
            print(f"[ceil] {k}: {v}", flush=True)
        C.save_json(a.out, res)

    cfg = get_preset(a.preset, num_blocks=n_max)
    C.mem_reset(dev)
    model = C.build_random(DiffusionModel, cfg, dev, dtype).train()
    all_blocks = list(model.net.blocks.items())
    params_per_block = sum(p.numel() for p in all_blocks[0][1].parameters())
    res["params_built"] = sum(p.numel() for p in model.parameters())
    res["params_per_block"] = params_per_block
    print(
        f"[build] {res['params_built'] / 1e9:.3f} B params ({n_max} blocks), {C.mem_now_gib(dev):.1f} GiB", flush=True
    )

    g = torch.Generator(device=dev).manual_seed(0)
    v = a.views
    x0 = (0.5 * torch.randn(shape, device=dev, generator=g)).to(dtype)
    text = torch.randn(1, v * a.text_len, 1024, device=dev, generator=g).to(dtype)
    fps = torch.tensor([24.0], device=dev, dtype=dtype)
    pm = torch.zeros(1, 1, *shape[-2:], device=dev, dtype=dtype)
    fr = torch.tensor(
        [[1.0 if c in ("back_left", "back_right") else 0.0 for c in CAMERAS[:v]]], device=dev, dtype=dtype
    )
    loss_cfg = LossConfig()
    draw_gen = torch.Generator(device=dev).manual_seed(1)

    def step():
        draws = draw_loss_randomness(x0, loss_cfg, draw_gen)
        out = training_loss(model, x0, text, draws, v, fps=fps, padding_mask=pm, frame_repeat=fr)
        out.loss.backward()
        return out.loss

    runs = [(False, n) for n in n_noac] + [(True, n) for n in n_ac]
    res["runs"] = {}
    for variant in [s for s in a.variants.split(",") if s]:
        c = res.get("ceilings", {})
        if variant == "cudnn" and c and c["sdpa_default_choice"] == c["sdpa_cudnn_first_choice"]:
            res["runs"][variant] = {"skipped": f"default SDPA already picks {c['sdpa_default_choice']}"}
            continue
        rv: dict = {}
        res["runs"][variant] = rv
        for ac, n in runs:
            key = f"{'ac' if ac else 'noac'}_{n}"
            if over_budget():
                rv[key] = {"skipped": "time budget"}
                continue
            r: dict = {"blocks": n, "activation_checkpointing": ac}
            rv[key] = r
            model.zero_grad(set_to_none=True)
            for _, blk in all_blocks:  # blocks outside the current depth too
                blk.zero_grad(set_to_none=True)
            parts = variant.split("+")
            set_depth(model, all_blocks, n, ac, compiled="compile" in parts, selective="sac" in parts)
            C.mem_reset(dev)
            r["static_gib"] = C.mem_now_gib(dev)
            try:
                with variant_ctx(variant, model.net):
                    t0 = time.perf_counter()
                    loss = step()  # also allocates the gradients, as the first step of a run would
                    C.sync(dev)
                    r["first_step_s"] = time.perf_counter() - t0
                    r["finite"] = bool(torch.isfinite(loss).item())
                    t = C.time_ms(step, dev, reps=a.reps, warmup=max(0, a.warmup - 1))
                r.update(C.mem_peak_gib(dev))
                r["step_ms"] = t
                r["step_ms_median"] = C.med(t)
                r["ms_per_block"] = r["step_ms_median"] / n
                print(
                    f"[step] {variant:14s} {key:8s} {r['step_ms_median']:8.1f} ms  ({r['ms_per_block']:.1f} ms/block)"
                    f"  peak {r.get('peak_allocated_gib', float('nan')):.1f} GiB  static {r['static_gib']:.1f} GiB",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                r["oom"] = C.is_oom(e)
                print(f"[step] {variant:14s} {key:8s} FAILED: {r['error'][:200]}", flush=True)
                if cuda:
                    torch.cuda.empty_cache()
            C.save_json(a.out, res)

        # extrapolate to the full depth from the per-block slope
        summary = {}
        for ac in (False, True):
            pts = sorted(
                (r["blocks"], r["step_ms_median"], r.get("peak_allocated_gib"))
                for r in rv.values()
                if r.get("activation_checkpointing") == ac and "step_ms_median" in r
            )
            if not pts:
                continue
            s: dict = {"points": pts}
            n_hi, t_hi, m_hi = pts[-1]
            if len(pts) > 1:
                n_lo, t_lo, m_lo = pts[0]
                slope = (t_hi - t_lo) / (n_hi - n_lo)
                s["ms_per_block_slope"] = slope
                s["fixed_ms"] = t_hi - n_hi * slope
                if m_hi is not None and m_lo is not None:
                    s["peak_gib_per_block_slope"] = (m_hi - m_lo) / (n_hi - n_lo)
            else:
                slope = t_hi / n_hi
                s["ms_per_block_slope"] = slope
                s["fixed_ms"] = 0.0
            t_full = (s["fixed_ms"] + a.full_blocks * slope) * 1e-3
            s["full_model_sample_s"] = t_full
            s["mfu"] = train_flops / (t_full * C.H100_PEAK)
            s["block_mfu"] = block_train_flops / (slope * 1e-3 * C.H100_PEAK)
            # the floor of this variant's own checkpointing (none / full / selective), from this call's ceilings
            # and from perf.md's; fraction = floor / time, so above 1 would mean a wrong floor
            s["floor"] = C.train_floors(fl, res.get("ceilings"), C.checkpointing_of(variant, ac))
            s["frac_of_floor"] = C.floor_fractions(s["floor"], t_full)
            if "peak_gib_per_block_slope" in s and m_hi is not None:
                pb_bytes = params_per_block * torch.finfo(dtype).bits / 8 / 2**30
                s["full_model_peak_gib_extrapolated"] = (
                    m_hi
                    + (a.full_blocks - n_hi) * s["peak_gib_per_block_slope"]
                    + (a.full_blocks - n_max) * 2 * pb_bytes  # weights + grads of the blocks not built
                )
            summary["ac" if ac else "noac"] = s
            print(
                f"[sum] {variant:14s} {'AC  ' if ac else 'noAC'} {slope:8.1f} ms/block  => {t_full:6.1f} s per "
                f"{a.full_blocks}-block sample  MFU {s['mfu']:.3f}  "
                f"floor frac {s['frac_of_floor']['same_call'] or float('nan'):.3f} (same call) "
                f"{s['frac_of_floor']['perfmd'][0]:.3f}-{s['frac_of_floor']['perfmd'][1]:.3f} (perf.md)  "
                f"mem/block {s.get('peak_gib_per_block_slope', float('nan')):.2f} GiB",
                flush=True,
            )
        rv["summary"] = summary
        C.save_json(a.out, res)

    res["total_s"] = time.time() - t_start
    C.save_json(a.out, res)
    print(f"[train] done in {res['total_s']:.0f} s", flush=True)
    return res


if __name__ == "__main__":
    main()
