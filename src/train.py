"""Post-train the multiview DiT (upstream `video2world_multiview_7b_example`), launched by torchrun.

One code path for 1 CPU process, N CPU processes (gloo) and N GPUs on M nodes (NCCL): FSDP2 per block then root,
bf16 compute over fp32 master weights, power-EMA, upstream-named checkpoints, exact auto-resume, clean stop on
SIGUSR1/SIGTERM. Example: torchrun --nproc_per_node=2 src/train.py --experiment experiments/tiny_demo.yaml \
  --data-manifest results/tiny_demo/data/manifest.json --out-dir results/tiny_demo/train
The EMA lives in mvdit.training.ema, the checkpoint/resume protocol in mvdit.training.checkpointing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mvdit.adapters.lora import LoraSettings, add_lora, lora_init_state_dict, lora_parameters
from mvdit.assets.checkpoint import CheckpointError
from mvdit.assets.files import atomic_write, write_json
from mvdit.data.manifest import dataset_from_manifest
from mvdit.encoders.tokenizer import VideoTokenizer
from mvdit.model.network import DiffusionModel
from mvdit.runtime.console import say
from mvdit.runtime.distributed import broadcast_full_state, init_distributed, parallelize
from mvdit.runtime.lifetime import die_with_parent, under_torchrun
from mvdit.training import TrainError
from mvdit.training.checkpointing import ckpt_name, load_checkpoint, prune_checkpoints, read_latest, save_checkpoint
from mvdit.training.ema import AdapterEma, ema_beta, ema_gamma, update_ema
from mvdit.training.latents import Indexed, TrainingLatents
from mvdit.training.loader import train_loader
from mvdit.training.loss import draw_loss_randomness, loss_config, training_loss
from mvdit.training.optim import optimizer_and_schedule
from mvdit.training.starting_point import initial_state_dict
from mvdit.workflow.experiment import ExperimentError, load_experiment

log = logging.getLogger("train")
EXIT_STOPPED = 3  # stopped by a signal after saving: rerun to resume
EXIT_NONFINITE = 4  # too many non-finite steps in a row


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, type=Path, help="experiment YAML")
    ap.add_argument("--data-manifest", required=True, type=Path, help="manifest.json written by prepare_data.py")
    ap.add_argument("--out-dir", required=True, type=Path, help="checkpoints/, train_log.jsonl and final.json go here")
    ap.add_argument("--init-checkpoint", type=Path, default=None, help="default: the model.pt train.init names")
    ap.add_argument("--tokenizer-dir", type=Path, default=None, help="default: <checkpoint_dir>/<tokenizer repo>")
    ap.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    ap.add_argument("--save-iter", type=int, default=None, help="override train.save_iter")
    ap.add_argument("--debug-nan-at", default="", help=argparse.SUPPRESS)  # fault injection for the test suite
    ap.add_argument("--debug-kill-in-save", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--debug-inf-at", default="", help=argparse.SUPPRESS)
    ap.add_argument("--debug-oom-at", type=int, default=-1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------- set-up


def sharded_model(
    net_cfg, d, full_sd: dict | None, param_dtype, ac, lora=None, compile_blocks: bool = False
) -> DiffusionModel:
    with torch.device("meta"):
        model = DiffusionModel(net_cfg)
    if lora is not None:
        add_lora(model, lora, base_dtype=param_dtype)  # frozen base in the compute dtype, fp32 adapters
    parallelize(model, d.mesh, param_dtype=param_dtype, activation_checkpointing=ac, compile_blocks=compile_blocks)
    model.to_empty(device=d.device)
    model.net.pos_embedder.reset_buffers()
    broadcast_full_state(model, full_sd)
    return model


def build_models(cfg, args, d, param_dtype, lora):
    """(model, ema, trainable params): the sharded model from the initial checkpoint, and its EMA (a full fp32 copy,
    or the adapters' EMA with LoRA)."""
    t = cfg.train
    full_sd = initial_state_dict(cfg, args.init_checkpoint) if d.main else None
    if lora is not None and d.main:
        full_sd = lora_init_state_dict(full_sd, lora, torch.Generator().manual_seed(t.seed))
    model = sharded_model(cfg.net, d, full_sd, param_dtype, t.activation_checkpointing, lora, compile_blocks=t.compile)
    if lora is None:
        return model, sharded_model(cfg.net, d, full_sd, None, False).requires_grad_(False), list(model.parameters())
    return model, AdapterEma(model), lora_parameters(model)


def watch_stop_signals(rank: int) -> dict:
    """SIGUSR1/SIGTERM set stop["signal"] (the loop saves and exits 3 at the end of the step)."""
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, on_signal)
    pid_dir = Path(os.environ.get("MVDIT_PID_DIR", "/nonexistent"))
    if pid_dir.is_dir():  # launch.py signals the workers directly (torchrun does not pass SIGUSR1 on)
        (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    return stop


def open_logs(out: Path, start: int, tensorboard: bool, main: bool):
    """(tensorboard writer or None, train_log.jsonl path); the log keeps only the steps before `start`."""
    writer = None
    if tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrainError(
                "train.tensorboard is on but the tensorboard package is missing: pip install tensorboard"
            ) from e
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start)
    log_path = out / "train_log.jsonl"
    if main:
        keep = [
            ln
            for ln in (log_path.read_text().splitlines() if log_path.exists() else [])
            if json.loads(ln)["step"] < start
        ]
        atomic_write(log_path, lambda p: Path(p).write_text("".join(x + "\n" for x in keep)))
    return writer, log_path


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def log_step(log_path: Path, writer, bar, rec: dict) -> None:
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if writer is not None:
        for key in ("loss", "edm_loss", "mse_loss", "logvar", "grad_norm", "lr", "samples_per_s"):
            writer.add_scalar(f"train/{key}", rec[key], rec["step"])
    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", refresh=False)  # mininterval paces the log
    bar.update(1)


def write_final(out: Path, stem: Path, iterations: int, skipped: int, world: int, name: str, lora) -> None:
    write_json(
        out / "final.json",
        {
            "iteration": iterations,
            "ema_model": f"{stem}_ema_model.pt",
            "reg_model": f"{stem}_reg_model.pt" if lora is None else None,
            "reg_adapter": f"{stem}_reg_adapter.safetensors" if lora is not None else None,
            "ema_adapter": f"{stem}_ema_adapter.safetensors" if lora is not None else None,
            "skipped_steps": skipped,
            "world_size": world,
            "experiment": name,
        },
    )


# ----------------------------------------------------------------------------------------------- the loop


def train(args: argparse.Namespace) -> int:
    # set-up: processes, model and EMA, optimizer, resume, data
    cfg = load_experiment(args.experiment)
    t = cfg.train
    iterations = args.iterations or t.iterations
    save_iter = args.save_iter or t.save_iter
    d = init_distributed(t.shard_group_size, hybrid=t.sharding == "hybrid")
    torch.manual_seed(t.seed + d.rank)
    out = args.out_dir
    ckpt_dir = out / "checkpoints"
    if d.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    stop = watch_stop_signals(d.rank)

    gpu = d.device.type == "cuda"
    param_dtype = torch.bfloat16 if (gpu and t.precision == "bf16") else None
    lora = LoraSettings.from_dict(dataclasses.asdict(t.lora)) if t.lora.enabled else None
    model, ema, params = build_models(cfg, args, d, param_dtype, lora)
    optim, sched = optimizer_and_schedule(params, t)
    if d.main:
        log.info("optimizer: AdamW, %s", "fused kernel" if optim.defaults.get("fused") else "per-tensor loop")
    gen = torch.Generator(device=d.device).manual_seed(t.seed * 1000 + d.rank)
    gamma = ema_gamma(t.ema_rate)
    start, skipped_total = 0, 0
    latest = read_latest(ckpt_dir)
    if latest is not None:
        meta = load_checkpoint(ckpt_dir, latest, model, ema, optim, sched, gen, d)
        start, skipped_total = latest, meta.get("skipped_steps", 0)
        if d.main:
            log.info("resumed from %s at iteration %d", ckpt_dir / ckpt_name(latest), latest)

    dataset = dataset_from_manifest(args.data_manifest, split="train", cache_items=cfg.data.cache_in_memory)
    loader = train_loader(Indexed(dataset), d, t.batch_size, t.seed, start, cfg.data.num_workers)
    tokenizer = VideoTokenizer(
        args.tokenizer_dir or cfg.tokenizer_dir,
        device=d.device,
        dtype=torch.bfloat16 if param_dtype else torch.float32,
        pixel_chunk_frames=cfg.data.num_frames,
    )
    n_views = len(cfg.data.cameras)
    latents = TrainingLatents(tokenizer, n_views, cache=t.cache_latents)
    view_ids = torch.tensor(cfg.camera_indices, device=d.device)  # each camera keeps its view-embedding row
    loss_cfg = loss_config(t)
    nan_at = {int(s) for s in args.debug_nan_at.split(",") if s}
    inf_at = {int(s) for s in args.debug_inf_at.split(",") if s}
    writer, log_path = open_logs(out, start, t.tensorboard, d.main)
    bar = tqdm(
        total=iterations,
        initial=start,
        desc="train",
        unit="it",
        disable=not d.main,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not every step
    )
    streak, it, data_iter = 0, start, iter(loader)
    model.train()
    while it < iterations:
        # step: encode the batch, loss, backward, clip; all ranks agree whether the step is finite
        t0 = time.perf_counter()
        batch = next(data_iter)
        x0 = latents(batch)
        text = batch["t5_text_embeddings"].to(d.device, torch.float32)
        fps = batch["fps"].to(d.device, torch.float32).reshape(-1)
        draws = draw_loss_randomness(x0, loss_cfg, gen)
        out_loss = training_loss(model, x0, text, draws, n_views, fps=fps, view_indices=view_ids)
        loss = out_loss.loss
        if it in nan_at:
            loss = loss * float("nan")
        if it in inf_at:
            loss = loss + float("inf")  # finite gradients: only the loss check catches it
        if it == args.debug_oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by --debug-oom-at)")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        stats = torch.stack(
            [loss.detach(), out_loss.edm_loss.detach(), out_loss.mse_loss.detach(), out_loss.logvar.detach().mean()]
        )
        dist.all_reduce(stats)
        stats /= d.world
        finite = bool(torch.isfinite(stats[0]) and torch.isfinite(grad_norm))
        lr = optim.param_groups[0]["lr"]
        # optimizer and EMA: only a finite step counts; a streak of non-finite ones stops the run
        if finite:
            optim.step()
            update_ema(ema, model, ema_beta(it, gamma))
            streak = 0
        else:
            streak += 1
            skipped_total += 1
        optim.zero_grad(set_to_none=True)
        sched.step()
        it += 1
        step_time = time.perf_counter() - t0
        if d.main:
            rec = {
                "step": it - 1,
                "loss": float(stats[0]),
                "edm_loss": float(stats[1]),
                "mse_loss": float(stats[2]),
                "logvar": float(stats[3]),
                "grad_norm": float(grad_norm),
                "lr": lr,
                "n_cond": draws.n_cond,
                "samples_per_s": d.world * t.batch_size / step_time,
                "step_time_s": step_time,
                "peak_mem_gb": peak_memory_gb(d.device),
                "skipped": not finite,
                "skipped_total": skipped_total,
            }
            log_step(log_path, writer, bar, rec)
        if streak >= t.max_nonfinite_streak:
            last = read_latest(ckpt_dir)
            msg = (
                f"{streak} non-finite steps in a row (last at iteration {it - 1}); last good checkpoint: "
                f"{ckpt_dir / ckpt_name(last) if last else 'none'}; lower train.lr or check the data"
            )
            if d.main:
                say(f"train.py: {msg}")
            return EXIT_NONFINITE
        # save: every save_iter, at the end, and when any rank got a stop signal (then exit 3)
        flag = torch.tensor([0 if stop["signal"] is None else 1], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if it % save_iter == 0 or it == iterations or flag.item():
            kill = args.debug_kill_in_save == it
            extra = {"skipped_steps": skipped_total}
            save_checkpoint(ckpt_dir, it, model, ema, optim, sched, gen, extra, d, kill, lora, final=it == iterations)
            if d.main:
                prune_checkpoints(ckpt_dir, t.keep_checkpoints)
        if flag.item() and it < iterations:
            if d.main:
                say(
                    f"train.py: stopped by a signal at iteration {it} after saving {ckpt_dir / ckpt_name(it)}; "
                    "rerun the same command to resume"
                )
            return EXIT_STOPPED
    bar.close()
    if writer is not None:
        writer.close()
    if d.main:
        stem = ckpt_dir / ckpt_name(iterations)
        write_final(out, stem, iterations, skipped_total, d.world, cfg.name, lora)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if under_torchrun():
        die_with_parent()  # torchrun killed: no orphan keeps training beside a rerun
    code = 1  # an unexpected exception propagates with its traceback and this code
    try:
        code = train(args)
    except (ExperimentError, CheckpointError, TrainError) as e:
        say(f"train.py: {e}")
        code = 1
    except torch.OutOfMemoryError as e:
        say(
            f"train.py: out of GPU memory ({str(e).splitlines()[0]}); set train.activation_checkpointing: full, "
            "use more GPUs (FSDP shards the states), fewer data.cameras or a smaller data.height/width"
        )
        code = 1
    finally:
        if dist.is_initialized():
            pid_dir = Path(os.environ.get("MVDIT_PID_DIR", "/nonexistent"))
            if pid_dir.is_dir():  # tell launch.py why we stopped: torchrun reports every failure as exit 1
                (pid_dir / f"rank{dist.get_rank()}.exit").write_text(str(code))
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
