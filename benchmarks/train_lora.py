"""LoRA post-training iteration of the full 28-block 7B multiview DiT on one GPU, through the train.py path.

Random base weights of the real shape, built on the meta device, frozen in bf16; peft LoRA adapters
(mvdit.adapters.lora, default targets: q, k, v, out of both attentions and both MLP layers) in fp32 with fp32
AdamW state and an fp32 adapter EMA. Sharded with `parallelize` over a world-1 process group (FSDP2 per Block then root,
MixedPrecisionPolicy bf16 compute, fp32 gradient reduction), as src/train.py runs on one GPU. One iteration is
`draw_loss_randomness` + `training_loss` forward + backward + grad clipping + AdamW step + EMA update, at the full
6-view 57-frame 480x848 sample (76,320 tokens).

Activation checkpointing variants (per Block, non-reentrant: the composable `checkpoint` parallelize applies):
  ac   full AC (recompute each Block in backward), what train.activation_checkpointing: full gives;
  sac  selective (the same checkpoint with the selective policy: train.activation_checkpointing: selective): as
       ac, but the self-attention SDPA outputs are saved, not recomputed: +0.6 GiB per block;
  noac no checkpointing (needs ~23 GiB of activations per block at this size: does not fit 80 GB; opt-in).

The floor of each variant (common.train_floors: LoRA has no weight-gradient GEMMs for the frozen base; full or
selective recompute) comes from ceilings measured in the same call and, separately, from perf.md's.

Full shape (H100):  PYTHONPATH=src python benchmarks/train_lora.py --out benchmarks/results/train_lora.json
CPU smoke test:     PYTHONPATH=src python benchmarks/train_lora.py --preset tiny --height 64 --width 96 --frames 17 \
                        --text-len 16 --device cpu --out /tmp/train_lora.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from mvdit.adapters.lora import LoraSettings, add_lora, init_lora, lora_parameters  # noqa: E402
from mvdit.constants import CAMERAS  # noqa: E402
from mvdit.model.config import get_preset  # noqa: E402
from mvdit.model.network import DiffusionModel  # noqa: E402
from mvdit.training.ema import AdapterEma  # noqa: E402
from mvdit.training.loss import LossConfig, draw_loss_randomness, training_loss  # noqa: E402

PERF_MD = {"train_sample_model_flops": 1.11e16}  # the floors come from common.train_floors (LoRA, per checkpointing)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--variants", default="ac,sac", help="comma list of ac, sac, noac (run in this order)")
    p.add_argument("--reps", type=int, default=2, help="timed iterations per variant (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip-ceilings", action="store_true", help="no same-call ceilings (floors from perf.md only)")
    p.add_argument("--budget-s", type=float, default=0, help="skip variants that start after this many seconds")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def lora_flops(cfg, s: LoraSettings, tokens: int, ctx_tokens: int, fl: dict) -> dict:
    """Model FLOPs of one LoRA training sample (no recompute counted): 3x forward, minus the weight-gradient GEMMs
    of the frozen base (every base Linear), plus the adapters' own GEMMs (3x their forward)."""
    d, hidden, dc, r = cfg.model_channels, int(cfg.model_channels * cfg.mlp_ratio), cfg.crossattn_emb_channels, s.rank
    shapes = {  # target name -> (tokens, in, out) per block, for both attentions where the name occurs in both
        "to_q.0": [(tokens, d, d), (tokens, d, d)],
        "to_k.0": [(tokens, d, d), (ctx_tokens, dc, d)],
        "to_v.0": [(tokens, d, d), (ctx_tokens, dc, d)],
        "to_out.0": [(tokens, d, d), (tokens, d, d)],
        "layer1": [(tokens, d, hidden)],
        "layer2": [(tokens, hidden, d)],
    }
    adapter_fwd = sum(2 * n * r * (i + o) for t in s.targets for n, i, o in shapes.get(t, [])) * cfg.num_blocks
    total = 3 * fl["forward"] - fl["forward_gemm"] + 3 * adapter_fwd
    return {"adapter_forward": adapter_fwd, "train_sample_lora_model": total}


def build(cfg, s: LoraSettings, dev: str, mesh, variant: str) -> DiffusionModel:
    """Meta build -> add_lora (base bf16, adapters fp32) -> to_empty on the device -> random base, peft-init adapters
    -> checkpointing -> FSDP2 (parallelize) with bf16 compute."""
    from mvdit.runtime.distributed import parallelize

    with torch.device("meta"):
        model = DiffusionModel(cfg)
    add_lora(model, s, base_dtype=torch.bfloat16, adapter_dtype=torch.float32)
    model.to_empty(device=dev)
    C.init_random_(model)  # random base (buffers recomputed); the adapters get peft's init next
    init_lora(model, torch.Generator().manual_seed(0))
    ac = {"ac": "full", "sac": "selective"}.get(variant, "none")
    parallelize(model, mesh, param_dtype=torch.bfloat16, activation_checkpointing=ac)
    return model.train()


def run_variant(a, cfg, s: LoraSettings, mesh, variant: str, inputs: dict, fl: dict, lf: dict, ceil: dict) -> dict:
    """Build the model for `variant`, run one first iteration, then time a.reps iterations (after warm-up)."""
    dev = a.device
    r: dict = {}
    try:
        C.mem_reset(dev)
        t0 = time.perf_counter()
        model = build(cfg, s, dev, mesh, variant)
        C.sync(dev)
        params = lora_parameters(model)
        optim = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.1)
        ema = AdapterEma(model)
        r["build_s"] = time.perf_counter() - t0
        r["params_total"] = sum(p.numel() for p in model.parameters())
        r["params_adapters"] = sum(p.numel() for p in params)
        r["static_gib"] = C.mem_now_gib(dev)
        print(
            f"[build] {variant}: {r['params_total'] / 1e9:.3f} B params, {r['params_adapters'] / 1e6:.2f} M "
            f"adapter params, {r['static_gib']:.1f} GiB, {r['build_s']:.1f} s",
            flush=True,
        )
        draw_gen = torch.Generator(device=dev).manual_seed(1)
        x0, loss_cfg, losses = inputs["x0"], LossConfig(), []
        net_kw = {k: inputs[k] for k in ("fps", "padding_mask", "frame_repeat")}

        def step():
            draws = draw_loss_randomness(x0, loss_cfg, draw_gen)
            out = training_loss(model, x0, inputs["text"], draws, a.views, **net_kw)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            optim.zero_grad(set_to_none=True)
            ema.update(model, 0.999)
            losses.append(out.loss.detach())

        t0 = time.perf_counter()
        step()  # first iteration: allocates the optimizer state, plans kernels
        C.sync(dev)
        r["first_step_s"] = time.perf_counter() - t0
        print(f"[step] {variant}: first iteration {r['first_step_s']:.1f} s", flush=True)
        t = C.time_ms(step, dev, reps=a.reps, warmup=max(0, a.warmup - 1))
        r.update(C.mem_peak_gib(dev))
        r["step_ms"] = t
        r["s_per_iteration"] = it_s = C.med(t) * 1e-3
        r["losses"] = [float(x) for x in losses]
        r["finite"] = all(torch.isfinite(x).item() for x in losses)
        r["mfu_perfmd_flops"] = lf["train_sample_model"] / (it_s * C.H100_PEAK)
        r["mfu_lora_flops"] = lf["train_sample_lora_model"] / (it_s * C.H100_PEAK)
        # the floor of LoRA with this variant's checkpointing, from the same call's ceilings and from perf.md's
        ck = C.checkpointing_of(variant, variant != "noac")
        r["floor"] = C.train_floors(fl, ceil, ck, adapter_forward=lf["adapter_forward"])
        r["frac_of_floor"] = frac = C.floor_fractions(r["floor"], it_s)
        print(
            f"[step] {variant}: {it_s:.2f} s/iteration (median of {len(t)}), peak "
            f"{r.get('peak_allocated_gib', float('nan')):.1f} GiB allocated / "
            f"{r.get('peak_reserved_gib', float('nan')):.1f} GiB reserved, MFU {r['mfu_perfmd_flops']:.3f} "
            f"(perf.md FLOPs) {r['mfu_lora_flops']:.3f} (LoRA FLOPs), fraction of the {ck}-checkpointing LoRA floor "
            f"{frac['same_call'] or float('nan'):.3f} (same call) {frac['perfmd'][0]:.3f}-{frac['perfmd'][1]:.3f} "
            "(perf.md)",
            flush=True,
        )
    except Exception as e:  # noqa: BLE001 - record OOM or any failure and go on to the next variant
        r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        r["oom"] = C.is_oom(e)
        r.update(C.mem_peak_gib(dev))
        print(f"[step] {variant}: FAILED {r['error'][:300]}", flush=True)
    return r


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    dev = a.device
    cuda = dev.startswith("cuda")
    from mvdit.runtime.distributed import init_distributed

    d = init_distributed()  # one local process: a world-1 NCCL (GPU) or gloo (CPU) group, as train.py gets
    cfg = get_preset(a.preset)
    s = LoraSettings(rank=a.rank, alpha=a.alpha, dropout=a.dropout)
    shape = C.latent_shape(a.views, a.frames, a.height, a.width)
    fl = C.dit_flops(cfg, a.views, a.frames, a.height, a.width, a.text_len)
    is_7b = a.preset.startswith("7b")
    lf = lora_flops(cfg, s, fl["tokens"], a.views * a.text_len, fl)
    lf["train_sample_model"] = PERF_MD["train_sample_model_flops"] if is_7b else 3 * fl["forward"]
    res = {
        "benchmark": "train_lora",
        "env": C.env_info(dev),
        "args": vars(a),
        "lora": s.to_dict(),
        "shapes": {
            "latent": list(shape),
            "tokens": fl["tokens"],
            "text": [1, a.views * a.text_len, cfg.crossattn_emb_channels],
            "dtype": "base bf16 (frozen), adapters + AdamW state + EMA fp32, bf16 compute (FSDP2 MixedPrecisionPolicy)",
        },
        "flops": {**fl, **lf},
        "perf_md": PERF_MD,
        "runs": {},
    }
    try:
        import peft

        res["env"]["peft"] = peft.__version__
    except ImportError:
        pass
    print(
        f"[lora] {res['env']['device_name']} torch {torch.__version__} peft {res['env'].get('peft')} latent "
        f"{list(shape)} tokens {fl['tokens']} train sample {lf['train_sample_model']:.3e} (perf.md convention), "
        f"{lf['train_sample_lora_model']:.3e} LoRA model FLOPs",
        flush=True,
    )
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = 0.5 * torch.randn(shape, device=dev, generator=g)  # fp32 like train.py's encoded latents
    text = torch.randn(1, a.views * a.text_len, cfg.crossattn_emb_channels, device=dev, generator=g)
    fps = torch.tensor([24.0], device=dev)
    pm = torch.zeros(1, 1, *shape[-2:], device=dev)
    fr = torch.tensor([[1.0 if c in ("back_left", "back_right") else 0.0 for c in CAMERAS[: a.views]]], device=dev)

    inputs = {"x0": x0, "text": text, "fps": fps, "padding_mask": pm, "frame_repeat": fr}
    if not a.skip_ceilings:
        d_model, heads = cfg.model_channels, cfg.num_heads
        res["ceilings"] = C.ceilings(dev, torch.bfloat16, fl["tokens"], d_model, heads, backward=True)
        for k, v in res["ceilings"].items():
            print(f"[ceil] {k}: {v}", flush=True)
        C.save_json(a.out, res)
    for variant in [v for v in a.variants.split(",") if v]:
        if a.budget_s and time.time() - t_start > a.budget_s:
            res["runs"][variant] = {"skipped": "time budget"}
            print(f"[lora] {variant}: skipped (time budget)", flush=True)
            continue
        res["runs"][variant] = run_variant(a, cfg, s, d.mesh, variant, inputs, fl, lf, res.get("ceilings"))
        if cuda:
            torch.cuda.empty_cache()
        C.save_json(a.out, res)

    res["total_s"] = time.time() - t_start
    C.save_json(a.out, res)
    print(f"[lora] done in {res['total_s']:.0f} s", flush=True)
    torch.distributed.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
