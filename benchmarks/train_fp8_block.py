"""FP8 GEMMs for post-training, measured on one block of the 7B DiT (issue #21 item 5): forward + backward of one
Block at the full sample (76,320 tokens) with selective activation checkpointing and the compiled block forward (as
train.py runs it: mvdit.runtime.activation_checkpointing, "selective", compiled), bf16 GEMMs against FP8 GEMMs.

The FP8 variant replaces the block's token-stream Linear layers (the ones mvdit.runtime.fp8.apply converts for
inference: self-attention q/k/v/out, cross-attention q/out, MLP) with Fp8TrainLinear: the bf16 weight stays the
trained Parameter; forward, input gradient and weight gradient each run as torch._scaled_mm on E4M3 operands with
row-wise scales (torchao's "rowwise" float8 recipe: every operand quantized along its contraction dimension, fp32
accumulation, bf16 out). Everything else stays bf16. The block's loss is a fixed random projection of its output.

Reported per variant: median step time, MFU-equivalent (3 x the block's forward model FLOPs over time x 989e12),
peak memory; for FP8 the speed-up and the relative difference of the input and weight gradients from bf16's. The
adoption rule (issue #21): train.precision: fp8 only if >= 1.15x per block AND a short 7B-shape loss curve stays
within bf16's run-to-run spread; this script measures the first half.

H100:  PYTHONPATH=src python benchmarks/train_fp8_block.py --out benchmarks/results/train_fp8_block_h100.json
CPU:   PYTHONPATH=src python benchmarks/train_fp8_block.py --preset tiny --height 64 --width 96 --frames 17 \
           --device cpu --no-compile --out /tmp/train_fp8_block.json      (FP8 emulated: a smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from mvdit.model.config import get_preset  # noqa: E402
from mvdit.model.edm import run_net  # noqa: E402
from mvdit.model.network import MultiviewDiT  # noqa: E402
from mvdit.runtime import fp8  # noqa: E402

ADOPT_SPEEDUP = 1.15


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p)
    p.add_argument("--variants", default="bf16,fp8")
    p.add_argument("--checkpointing", default="selective", choices=["selective", "none"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--limit-s", type=float, default=0, help="start a variant only if it should end before this")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ FP8 training GEMM
def _q(t: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise E4M3 of a 2-D tensor made contiguous: (E4M3 [R, C], fp32 [R, 1])."""
    return fp8.quantize_rows(t.contiguous())


def _mm(a_q, a_s, b_q, b_s, emulate: bool, out_dtype) -> Tensor:
    """(a_q a_s) @ (b_q b_s)^T for row-major a_q [M, K] and b_q [N, K], both scaled per row (contraction along K)."""
    if emulate:
        return ((a_q.float() * a_s) @ (b_q.float() * b_s).t()).to(out_dtype)
    return torch._scaled_mm(a_q, b_q.t(), scale_a=a_s, scale_b=b_s.reshape(1, -1), out_dtype=out_dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """y = x W^T with all three GEMMs in FP8 (row-wise scales along each GEMM's contraction dimension)."""

    @staticmethod
    def forward(ctx, x2: Tensor, w: Tensor, emulate: bool) -> Tensor:
        ctx.save_for_backward(x2, w)  # bf16, as the bf16 Linear saves them
        ctx.emulate = emulate
        return _mm(*_q(x2), *_q(w), emulate, x2.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, w = ctx.saved_tensors
        e = ctx.emulate
        gx = _mm(*_q(g), *_q(w.t()), e, x2.dtype)  # [M, N] @ [N, K]: contraction over N
        gw = _mm(*_q(g.t()), *_q(x2.t()), e, w.dtype)  # [N, M] @ [M, K]: contraction over the tokens
        return gx, gw, None


class Fp8TrainLinear(nn.Module):
    """A bias-free Linear whose forward and backward GEMMs run in FP8; the weight stays a bf16 Parameter."""

    def __init__(self, linear: nn.Linear, emulate: bool):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Fp8TrainLinear takes bias-free Linear layers")
        self.weight, self.emulate = linear.weight, emulate
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = _Fp8LinearFn.apply(x.reshape(-1, self.in_features), self.weight, self.emulate)
        return y.reshape(*x.shape[:-1], self.out_features)


def token_linears(block: nn.Module):
    """(parent, name) of the Linears fp8.apply converts, in one Block."""
    for sub in block.blocks:
        if sub.kind == "mlp":
            yield from [(sub.block, "layer1"), (sub.block, "layer2")]
        else:
            a = sub.block.attn
            slots = [(a.to_q, "0"), (a.to_out, "0")]
            if sub.kind == "self_attn":
                slots += [(a.to_k, "0"), (a.to_v, "0")]
            yield from slots


def swap(block: nn.Module, to_fp8: bool, emulate: bool) -> int:
    n = 0
    for parent, name in token_linears(block):
        layer = parent.get_submodule(name)
        if to_fp8 and type(layer) is nn.Linear:
            parent.register_module(name, Fp8TrainLinear(layer, emulate))
            n += 1
        elif not to_fp8 and isinstance(layer, Fp8TrainLinear):
            lin = nn.Linear(layer.in_features, layer.out_features, bias=False, device=layer.weight.device)
            lin.weight = layer.weight
            parent.register_module(name, lin)
            n += 1
    return n


# ------------------------------------------------------------------------------------------------ main
def block_inputs(net, cfg, shape, views, text_len, dev, dtype) -> tuple:
    """The arguments the first Block receives in a real forward of this shape (captured by a pre-hook)."""
    cond, gt, _, _, g = C.random_condition(cfg, shape, views, text_len, dev, dtype)
    x = (gt.float() + 5.0 * torch.randn(shape, device=dev, generator=g)).to(dtype)
    captured = {}

    class Captured(Exception):
        pass

    def grab(m, args):
        captured["args"] = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        raise Captured

    h = net.blocks["block0"].register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            run_net(net, x, torch.tensor(5.0, device=dev), cond)
    except Captured:
        pass
    finally:
        h.remove()
    return captured["args"]


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    dev = a.device
    cuda = dev.startswith("cuda")
    emulate = not cuda
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = get_preset(a.preset, num_blocks=1)
    shape = C.latent_shape(a.views, a.frames, a.height, a.width)
    fl = C.dit_flops(cfg, a.views, a.frames, a.height, a.width, a.text_len)
    block_train = 3 * fl["per_block"]["total"]
    res = {
        "benchmark": "train_fp8_block",
        "env": C.env_info(dev),
        "args": vars(a),
        "latent": list(shape),
        "tokens": fl["tokens"],
        "flops": {"block_forward": fl["per_block"], "block_train_model": block_train},
        "adopt_rule": f">= {ADOPT_SPEEDUP}x per block, then a short 7B-shape loss curve within bf16's spread",
        "variants": {},
    }
    print(f"[fp8-train] {res['env']['device_name']} torch {torch.__version__} tokens {fl['tokens']}", flush=True)

    def save():
        res["elapsed_s"] = time.time() - t_start
        C.save_json(a.out, res)

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    net = C.build_random(MultiviewDiT, cfg, dev, dtype)
    args = block_inputs(net, cfg, shape, a.views, a.text_len, dev, dtype)
    block = net.blocks["block0"]
    block.requires_grad_(True)
    g = torch.Generator(device=dev).manual_seed(5)
    x0 = args[0]
    proj = torch.randn(x0.shape[-1], device=dev, generator=g).to(dtype)  # loss = <block(x), proj> / numel
    from mvdit.runtime.activation_checkpointing import checkpoint_activations

    if a.checkpointing == "selective":
        checkpoint_activations(block, "selective", compiled=not a.no_compile)
    elif not a.no_compile:
        block.compile(dynamic=False)
    probe = next(sub.block.layer1.weight for sub in block.blocks if sub.kind == "mlp")  # its gradient is compared
    grads = {}

    def step():
        block.zero_grad(set_to_none=True)
        x = x0.detach().requires_grad_(True)
        out = block(x, *args[1:])
        loss = (out * proj).sum() / out.numel()
        loss.backward()
        return x

    for name in [v for v in a.variants.split(",") if v]:
        r = res["variants"][name] = {}
        est = 3 * res["variants"].get("bf16", {}).get("step_ms_median", 2000) * 1e-3 * (a.reps + a.warmup) + 60
        if a.limit_s and time.time() - t_start + est > a.limit_s:
            r["skipped"] = "time budget"
            print(f"[var] {name}: skipped (time budget)", flush=True)
            continue
        try:
            r["swapped_linears"] = swap(block, name == "fp8", emulate)
            C.mem_reset(dev)
            t0 = time.perf_counter()
            x = step()
            C.sync(dev)
            r["first_call_s"] = time.perf_counter() - t0
            grads[name] = (x.grad.float().clone(), probe.grad.float().clone())
            t = C.time_ms(step, dev, reps=a.reps, warmup=a.warmup - 1 if a.warmup else 0)
            r["step_ms"] = t
            r["step_ms_median"] = C.med(t)
            r["mfu_equiv"] = block_train / (r["step_ms_median"] * 1e-3 * C.H100_PEAK)
            r.update(C.mem_peak_gib(dev))
        except Exception as e:  # noqa: BLE001 - record and go on
            r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            if cuda:
                torch.cuda.empty_cache()
        finally:
            swap(block, False, emulate)
            torch._dynamo.reset()  # the next variant compiles afresh
        print(f"[var] {name}: { {k: v for k, v in r.items() if k != 'step_ms'} }", flush=True)
        save()

    b, f = res["variants"].get("bf16", {}), res["variants"].get("fp8", {})
    if "bf16" in grads and "fp8" in grads:
        rel = lambda u, v: float((u - v).norm() / v.norm())  # noqa: E731
        f["input_grad_rel_diff_vs_bf16"] = rel(grads["fp8"][0], grads["bf16"][0])
        f["mlp_in_weight_grad_rel_diff_vs_bf16"] = rel(grads["fp8"][1], grads["bf16"][1])
    if b.get("step_ms_median") and f.get("step_ms_median"):
        f["speedup_vs_bf16"] = b["step_ms_median"] / f["step_ms_median"]
        res["adopt_step_1"] = {"speedup": f["speedup_vs_bf16"], "pass": f["speedup_vs_bf16"] >= ADOPT_SPEEDUP}
        if emulate:
            res["adopt_step_1"]["note"] = "FP8 emulated on the CPU: this speed-up says nothing"
    res["total_s"] = time.time() - t_start
    save()
    print(f"[fp8-train] {res.get('adopt_step_1')} done in {res['total_s']:.0f} s", flush=True)
    return res


if __name__ == "__main__":
    main()
