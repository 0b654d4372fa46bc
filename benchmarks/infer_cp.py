"""Context-parallel inference of the 7B DiT (`mvdit.runtime.context_parallel`): per-GPU compute, communication, and the
P-GPU time of a 35-step sample with guidance.

Both ways of sharing self-attention are measured: "ulysses" (all-to-all of q, k, v and the output over heads) and
"allgather" (every rank gathers all keys and values).
One GPU (emulated ranks): for each P in --worlds, rank 0's share of a P-way forward is timed: its N/P tokens through
every block, with stand-in collectives that write their outputs locally (same shapes and bytes written; values do
not change the speed). The link time is modelled from --link-gbps (NCCL bus bandwidth per GPU) and added without
overlap (an upper bound): that is the projection.
Several GPUs (torchrun --nproc_per_node P): the real NCCL forward is timed, and one block's collectives on their
own (measured communication); the speed-up over one GPU is measured directly.

One H100/H200:  PYTHONPATH=src python benchmarks/infer_cp.py --out benchmarks/results/infer_cp.json
8 GPUs:         PYTHONPATH=src torchrun --nproc_per_node 8 benchmarks/infer_cp.py --out infer_cp_8.json
CPU smoke test: PYTHONPATH=src python benchmarks/infer_cp.py --preset tiny --height 64 --width 96 --frames 17 \\
                    --device cpu --worlds 1,2 --out /tmp/cp.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from mvdit.model.config import get_preset  # noqa: E402
from mvdit.model.edm import Condition, condition_indicator, run_net  # noqa: E402
from mvdit.model.network import MultiviewDiT  # noqa: E402
from mvdit.runtime import context_parallel  # noqa: E402

PERF_MD = {"sample_35_floor_1gpu_s": [402, 421], "sample_35_floor_8gpu_ideal_s": [50, 53], "upstream_8gpu_step_s": 3.7}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p)
    p.add_argument("--worlds", default="1,2,4,8", help="process counts to emulate on one GPU")
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--compile", default="eager,compiled", help="eager, compiled or both")
    p.add_argument("--cp-modes", default="ulysses,allgather", help="context-parallel modes to measure")
    p.add_argument("--batches", default="1", help="1: a guidance step is two forwards; 2: one forward of both")
    p.add_argument("--link-gbps", type=float, default=360.0, help="all-gather bus bandwidth per GPU, GB/s (model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--budget-s", type=float, default=0, help="start no new measurement after this many seconds")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


class LocalGather:
    """Stand-in for ContextParallel on one GPU: rank 0 of `world` (it holds the largest share). Each collective
    builds its output from the local data (repeated, then trimmed), so every shape and write matches."""

    def __init__(self, world: int, mode: str):
        self.rank, self.world, self.mode = 0, world, mode

    def all_gather(self, x, dim, sizes):
        return torch.cat([x] * self.world, dim=dim).narrow(dim, 0, sum(sizes))

    def heads_to_tokens(self, x, sizes):
        hp = x.shape[2] // self.world
        return torch.cat([x[:, :, :hp]] * self.world, dim=3).narrow(3, 0, sum(sizes))

    def tokens_to_heads(self, x, sizes):
        return torch.cat([x.narrow(2, 0, sizes[self.rank])] * self.world, dim=1)


def sdpa_shard_ceilings(dev, dtype, n: int, world: int, heads: int, hd: int) -> dict:
    """Fused SDPA forward of one rank's queries (n / world) over all n keys, per backend: the fastest is used."""
    g = torch.Generator(device=dev).manual_seed(0)
    nq = -(-n // world)
    q = torch.randn(1, heads, nq, hd, device=dev, dtype=dtype, generator=g)
    k, v = (torch.randn(1, heads, n, hd, device=dev, dtype=dtype, generator=g) for _ in range(2))
    fl = 4 * nq * n * hd * heads
    out = {"shape_q": list(q.shape), "shape_kv": list(k.shape), "default_choice": C.sdpa_choice(q, k, v)}
    names = ["default", "cudnn", "flash", "efficient"] if dev.startswith("cuda") else ["default"]
    for name in names:
        try:
            with C.sdpa_backend(name):
                t = C.time_ms(functools.partial(F.scaled_dot_product_attention, q, k, v), dev, reps=3, warmup=1)
            out[name] = {"ms": C.med(t), "tflops": fl / (C.med(t) * 1e-3) / 1e12}
        except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    ok = {k: v for k, v in out.items() if isinstance(v, dict) and "ms" in v}
    out["fastest"] = min(ok, key=lambda k: ok[k]["ms"]) if ok else "default"
    return out


def waited(t):
    """The collective's result, waited for (funcol returns it before the transfer ends)."""
    return t.wait() if hasattr(t, "wait") else t


def comm_model(cfg, n: int, world: int, mode: str, link_gbps: float, bytes_per: int, batch: int = 1) -> dict:
    """Bytes each rank receives per forward, and their time at link_gbps. allgather: every block's keys and values,
    (P-1)/P of 2 N D; ulysses: q, k, v and the output of its N/P tokens, (P-1)/P of 4 N D / P. Plus the final output
    gather (all modes)."""
    d = cfg.model_channels
    per_block = 2 * batch * n * d * bytes_per if mode == "allgather" else 4 * batch * n * d * bytes_per / world
    final = batch * n * cfg.patch_spatial**2 * cfg.out_channels * bytes_per
    recv = (cfg.num_blocks * per_block + final) * (world - 1) / world
    return {"bytes_per_block": per_block, "recv_bytes_per_forward": recv, "ms": recv / (link_gbps * 1e9) * 1e3}


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    real_world = int(os.environ.get("WORLD_SIZE", "1"))
    procs = context_parallel.init_processes(a.device)
    dev = str(procs.device)
    dtype = getattr(torch, a.dtype) if dev.startswith("cuda") else torch.float32
    main_proc = procs.main
    say = print if main_proc else (lambda *_, **__: None)
    cfg = get_preset(a.preset)
    shape = C.latent_shape(a.views, a.frames, a.height, a.width)
    fl = C.dit_flops(cfg, a.views, a.frames, a.height, a.width, a.text_len)
    n = fl["tokens"]
    res = {
        "benchmark": "infer_cp",
        "env": C.env_info(dev),
        "args": vars(a),
        "processes": real_world,
        "shapes": {"latent": list(shape), "tokens": n, "dtype": str(dtype)},
        "flops": fl,
        "perf_md": PERF_MD,
        "results": {},
    }
    say(f"[cp] {res['env']['device_name']} torch {torch.__version__} tokens {n} processes {real_world}", flush=True)
    out_path = a.out if main_proc else None

    net = C.build_random(MultiviewDiT, cfg, dev, dtype).eval()
    net.requires_grad_(False)
    g = torch.Generator(device=dev).manual_seed(0)
    v, t_lat = a.views, shape[2] // a.views
    gt = (0.5 * torch.randn(shape, device=dev, generator=g)).to(dtype)
    cond = Condition(
        gt_latent=gt,
        indicator=condition_indicator(v, t_lat, min(2, t_lat), dtype=dtype, device=dev),
        crossattn_emb=torch.randn(1, v * a.text_len, cfg.crossattn_emb_channels, device=dev, generator=g).to(dtype),
        n_views=v,
        fps=torch.tensor([24.0], device=dev, dtype=dtype),
        padding_mask=torch.zeros(1, 1, *shape[-2:], device=dev, dtype=dtype),
    )
    x = (40.0 * torch.randn(shape, device=dev, generator=g)).to(dtype)
    sigma = torch.tensor(40.0, device=dev)

    x2, cond2 = torch.cat([x, x]), cond.both_branches()

    def forward(batch: int = 1):
        """batch 1: one guidance branch (a step runs two); batch 2: both branches in one forward."""
        with torch.no_grad():
            return run_net(net, x, sigma, cond) if batch == 1 else run_net(net, x2, sigma, cond2)

    # with several processes: each alone first (the one-GPU baseline, all GPUs at once), then all together
    worlds = [1, real_world] if real_world > 1 else [int(w) for w in a.worlds.split(",") if w]
    modes = [m for m in a.compile.split(",") if m]
    batches = [int(b) for b in a.batches.split(",") if b]
    bytes_per = torch.finfo(dtype).bits // 8
    base_ms: dict[str, float] = {}
    plans = []  # (world, context-parallel mode)
    for world in worlds:
        cps = ["none"] if world == 1 else [m for m in a.cp_modes.split(",") if m]
        plans += [(world, m) for m in cps if m != "ulysses" or cfg.num_heads % world == 0]
    shard_sdpa: dict[int, dict] = {}
    for world, cp_mode in plans:
        if world not in shard_sdpa:
            sd = sdpa_shard_ceilings(dev, dtype, n, world, cfg.num_heads, cfg.head_dim)
            shard_sdpa[world] = sd
            say(
                f"[sdpa] P={world} q {sd['shape_q']} kv {sd['shape_kv']}: "
                + ", ".join(f"{k} {v_['ms']:.1f} ms" for k, v_ in sd.items() if isinstance(v_, dict) and "ms" in v_)
                + f" -> {sd['fastest']}",
                flush=True,
            )
        sd = shard_sdpa[world]
        if world == 1:
            context_parallel.disable(net)
            comm = {"ms": 0.0}
        elif real_world > 1:
            cp = context_parallel.enable(net, mode=cp_mode)
            sizes = context_parallel.shard_sizes(n, world)
            hd, nl = cfg.head_dim, sizes[procs.rank]
            if cp_mode == "ulysses":
                qkv = torch.randn(3, 1, cfg.num_heads, nl, hd, device=dev, dtype=dtype)
                o = torch.randn(1, cfg.num_heads // world, n, hd, device=dev, dtype=dtype)

                def block_comm(qkv=qkv, o=o, cp=cp, sizes=sizes):
                    waited(cp.heads_to_tokens(qkv, sizes))
                    return waited(cp.tokens_to_heads(o, sizes))

                per_block = 4 * n * cfg.model_channels * bytes_per / world
            else:
                kv = torch.randn(2, 1, cfg.num_heads, nl, hd, device=dev, dtype=dtype)

                def block_comm(kv=kv, cp=cp, sizes=sizes):
                    return waited(cp.all_gather(kv, 3, sizes))

                per_block = 2 * n * cfg.model_channels * bytes_per
            t = C.time_ms(block_comm, dev, reps=5, warmup=2)
            comm = {"measured_ms_per_block": C.med(t), "bytes_per_block": per_block}
            comm["measured_ms"] = comm["measured_ms_per_block"] * cfg.num_blocks
            comm["bus_gbps"] = per_block * (world - 1) / world / (C.med(t) * 1e-3) / 1e9
        else:
            context_parallel.install(net, LocalGather(world, cp_mode))
            comm = comm_model(cfg, n, world, cp_mode, a.link_gbps, bytes_per) | {"modelled_at_gbps": a.link_gbps}
        for mode, batch in [(m, b) for m in modes for b in batches]:
            key = (f"P{world}_{mode}" if world == 1 else f"P{world}_{cp_mode}_{mode}") + ("_b2" if batch == 2 else "")
            if a.budget_s and time.time() - t_start > a.budget_s:
                res["results"][key] = {"skipped": "time budget"}
                continue
            r = {"world": world, "context_parallel": cp_mode, "mode": mode, "batch": batch, "sdpa": sd, "comm": comm}
            comm_ms = batch * comm.get("ms", comm.get("measured_ms", 0.0))
            res["results"][key] = r
            try:
                with contextlib.ExitStack() as stack:
                    stack.enter_context(C.sdpa_backend(sd["fastest"]))
                    if mode == "compiled":
                        stack.enter_context(C.compiled_blocks(net))
                    C.mem_reset(dev)
                    t0 = time.perf_counter()
                    forward(batch)
                    C.sync(dev)
                    r["first_call_s"] = time.perf_counter() - t0
                    t = C.time_ms(functools.partial(forward, batch), dev, reps=a.reps, warmup=0)
                    r.update(C.mem_peak_gib(dev))
                r["forward_ms"] = t
                fwd = C.med(t)
                r["forward_ms_median"] = fwd
                r["tflops_per_gpu"] = batch * fl["forward"] / world / (fwd * 1e-3) / 1e12
                if real_world > 1 or world == 1:
                    r["projected_forward_ms"] = fwd  # measured end to end, communication included
                else:
                    r["projected_forward_ms"] = fwd + comm_ms  # no overlap assumed: an upper bound
                step_ms = r["projected_forward_ms"] * (2 // batch)  # one guidance step: both branches
                r["step_ms"] = step_ms
                r["sample_s"] = a.steps * step_ms * 1e-3
                r["mfu_per_gpu"] = 2 * fl["forward"] / world / (step_ms * 1e-3 * C.H100_PEAK)
                if world == 1 and batch == 1:
                    base_ms[mode] = step_ms
                if mode in base_ms:
                    r["speedup_vs_1gpu"] = base_ms[mode] / step_ms
                    r["scaling_efficiency"] = r["speedup_vs_1gpu"] / world
                say(
                    f"[fwd] P={world} {cp_mode:9s} {mode:8s} b{batch} compute {fwd:8.1f} ms  comm {comm_ms:6.1f} ms"
                    f"  -> forward {r['projected_forward_ms']:8.1f} ms, {a.steps}-step CFG {r['sample_s']:6.1f} s"
                    f"  MFU/GPU {r['mfu_per_gpu']:.3f}  speed-up {r.get('speedup_vs_1gpu', float('nan')):.2f}x"
                    f"  peak {r.get('peak_allocated_gib', float('nan')):.1f} GiB  first {r['first_call_s']:.1f} s",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001 - record and go on
                r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                say(f"[fwd] {key} FAILED: {r['error']}", flush=True)
                if C.is_oom(e) and dev.startswith("cuda"):
                    torch.cuda.empty_cache()
            C.save_json(out_path, res)
    res["total_s"] = time.time() - t_start
    C.save_json(out_path, res)
    say(f"[cp] done in {res['total_s']:.0f} s", flush=True)
    context_parallel.finish()
    return res


if __name__ == "__main__":
    main()
