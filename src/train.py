"""Post-train the multiview DiT (upstream `video2world_multiview_7b_example`), launched by torchrun.

One code path for 1 CPU process, N CPU processes (gloo) and N GPUs on M nodes (NCCL): FSDP2 per block then root,
bf16 compute over fp32 master weights, power-EMA, upstream-named checkpoints, exact auto-resume, clean stop on
SIGUSR1/SIGTERM. Example: torchrun --nproc_per_node=2 src/train.py --experiment experiments/tiny_demo.yaml \
  --data-manifest results/tiny_demo/data/manifest.json --out-dir results/tiny_demo/train
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from mvdit.checkpoint import CheckpointError, atomic_write, save_state_dict, write_json
from mvdit.experiment import ExperimentError, ema_beta, ema_gamma, load_experiment, lr_multiplier
from mvdit.lifetime import die_with_parent, under_torchrun
from mvdit.lora import (
    AdapterEma,
    LoraSettings,
    adapter_state_dict,
    add_lora,
    is_lora_key,
    lora_init_state_dict,
    lora_parameters,
    merge_state_dict,
    save_adapter,
)
from mvdit.loss import LossConfig, draw_loss_randomness, training_loss
from mvdit.manifest import dataset_from_manifest
from mvdit.network import DiffusionModel
from mvdit.parallel import (
    broadcast_full_state,
    full_state_dict,
    init_distributed,
    load_sharded_state,
    parallelize,
    sharded_state,
)
from mvdit.starting_point import initial_state_dict
from mvdit.tokenizer import VideoTokenizer

log = logging.getLogger("train")
EXIT_STOPPED = 3  # stopped by a signal after saving: rerun to resume
EXIT_NONFINITE = 4  # too many non-finite steps in a row


class TrainError(RuntimeError):
    pass


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


# ----------------------------------------------------------------------------------------------- checkpoints


def ckpt_name(it: int) -> str:
    return f"iter_{it:09d}"


def read_latest(ckpt_dir: Path) -> int | None:
    """Iteration named by latest_checkpoint.txt (upstream format: a line `iter_000000200.pt`), if complete."""
    f = ckpt_dir / "latest_checkpoint.txt"
    if not f.exists():
        return None
    name = f.read_text().strip()
    try:
        it = int(name.removeprefix("iter_").removesuffix(".pt"))
    except ValueError as e:
        raise TrainError(f"{f}: unreadable ({name!r}); delete it to start over or fix the iteration name") from e
    if not (ckpt_dir / f"{ckpt_name(it)}_train_state").is_dir():
        raise TrainError(f"{f} names {name} but its training state is missing; restore it or delete {f}")
    return it


def all_ok(ok: bool, device) -> bool:
    """True on every rank only if `ok` is true on every rank (so all ranks take the same branch)."""
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def lora_train_state(model, ema: AdapterEma, optim) -> dict:
    """The sharded LoRA training state for DCP: adapters, their EMA and optimizer (the frozen base is not saved)."""
    adapters = {k: v for k, v in get_model_state_dict(model).items() if is_lora_key(k)}
    return {"model": adapters, "ema": ema.state_dict(), "optim": get_optimizer_state_dict(model, optim)}


def save_checkpoint(
    ckpt_dir: Path, it: int, model, ema, optim, sched, gen, extra: dict, d, kill_in_save=False, lora=None, final=False
):
    """Write one checkpoint; latest_checkpoint.txt moves only after every file is complete (all atomic).

    Full post-training writes upstream's reg (bf16) and EMA (fp32) model files; LoRA writes adapter-only safetensors
    (reg and EMA) and, at the final iteration, the merged EMA model where copy_ema and inference expect it.
    A failed write on any rank (e.g. a full disk) raises TrainError on every rank, leaving the previous checkpoint
    as the latest one.
    """
    stem = ckpt_dir / ckpt_name(it)
    if lora is None:
        files = {
            "_reg_model.pt": (full_state_dict(model), torch.bfloat16),
            "_ema_model.pt": (full_state_dict(ema), None),
        }
        state = sharded_state(model, ema, optim)
    else:
        ema_ad = ema.adapter_state_dict()
        files = {"_reg_adapter.safetensors": adapter_state_dict(model), "_ema_adapter.safetensors": ema_ad}
        if final:
            base = full_state_dict(model)
            if d.main:
                files["_ema_model.pt"] = (merge_state_dict(base, lora, adapters=ema_ad), torch.float32)
        state = lora_train_state(model, ema, optim)
    tmp = ckpt_dir / f".{stem.name}_train_state.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    error = ""
    try:
        dcp.save(state, checkpoint_id=str(tmp))
        if kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die with a half-written checkpoint
        rng = {"generator": gen.get_state(), "cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        meta = {"iteration": str(it)}
        atomic_write(f"{stem}_rng_rank{d.rank}.safetensors", lambda p: save_safetensors(rng, p, metadata=meta))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's wrapper is a BaseException; any failure aborts
        error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if all_ok(not error, d.device) and d.main:
        try:
            final = ckpt_dir / f"{stem.name}_train_state"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for suffix, content in files.items():
                if suffix.endswith(".safetensors"):
                    save_adapter(f"{stem}{suffix}", content, lora, {"iteration": str(it)})
                else:
                    save_state_dict(f"{stem}{suffix}", content[0], dtype=content[1] or torch.float32)
            atomic_write(f"{stem}.pt", lambda p: torch.save({"iteration": it}, p))
            trainer = extra | {"iteration": it, "world_size": d.world, "scheduler": sched.state_dict()}
            write_json(f"{stem}_trainer.json", trainer)
            atomic_write(ckpt_dir / "latest_checkpoint.txt", lambda p: Path(p).write_text(f"{stem.name}.pt\n"))
        except OSError as e:
            error = f"{e.strerror or e} ({e.filename or stem})"
    if not all_ok(not error, d.device):
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        last = read_latest(ckpt_dir)
        kept = f"{ckpt_dir / ckpt_name(last)} is still the latest checkpoint" if last else "no checkpoint was kept"
        free = shutil.disk_usage(ckpt_dir).free / 2**20
        raise TrainError(
            f"could not write checkpoint {stem.name} in {ckpt_dir} ({free:.0f} MiB free there): "
            f"{error or 'failed on another rank'}; {kept}; "
            "free disk space (or lower train.keep_checkpoints) and rerun to resume"
        )


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    its = sorted(int(p.name[5:14]) for p in ckpt_dir.glob("iter_*_train_state"))
    for it in its[:-keep]:
        for p in ckpt_dir.glob(f"{ckpt_name(it)}*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def load_checkpoint(ckpt_dir: Path, it: int, model, ema, optim, sched, gen, d, lora=None) -> dict:
    stem = ckpt_dir / ckpt_name(it)
    meta = json.loads(Path(f"{stem}_trainer.json").read_text())
    if meta["world_size"] != d.world:
        raise TrainError(
            f"{stem}_trainer.json was written by {meta['world_size']} processes, this run has {d.world}: "
            "exact resume needs the same count (set train.nproc/nodes back, or use a new experiment name)"
        )
    if lora is None:
        state = sharded_state(model, ema, optim)
        dcp.load(state, checkpoint_id=f"{stem}_train_state")
        load_sharded_state(model, ema, optim, state)
    else:  # the frozen base comes from the initial checkpoint; adapters, their EMA and optimizer from DCP
        state = lora_train_state(model, ema, optim)
        dcp.load(state, checkpoint_id=f"{stem}_train_state")
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
        ema.load_state_dict(state["ema"])
        set_optimizer_state_dict(model, optim, state["optim"])
    sched.load_state_dict(meta["scheduler"])
    rng = load_safetensors(f"{stem}_rng_rank{d.rank}.safetensors")
    gen.set_state(rng["generator"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta


# ----------------------------------------------------------------------------------------------- model set-up


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


# ----------------------------------------------------------------------------------------------- data


class ResumableSampler(torch.utils.data.Sampler):
    """DistributedSampler order (seeded permutation per epoch), able to start mid-epoch at a given batch."""

    def __init__(self, n: int, d, batch: int, seed: int, start_step: int = 0):
        self.inner = torch.utils.data.DistributedSampler(
            range(n), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch, self.start_step = batch, start_step
        self.steps_per_epoch = len(self.inner) // batch
        if self.steps_per_epoch == 0:
            raise TrainError(f"dataset of {n} items is smaller than one global batch ({d.world} x {batch})")

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, offset = divmod(step, self.steps_per_epoch)
            self.inner.set_epoch(epoch)
            idx = list(self.inner)[offset * self.batch : self.steps_per_epoch * self.batch]
            yield from idx
            step = (epoch + 1) * self.steps_per_epoch

    def __len__(self):
        return 2**62


# ----------------------------------------------------------------------------------------------- the loop


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(args: argparse.Namespace) -> int:
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

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, on_signal)
    pid_dir = Path(os.environ.get("MVDIT_PID_DIR", "/nonexistent"))
    if pid_dir.is_dir():  # launch.py signals the workers directly (torchrun does not pass SIGUSR1 on)
        (pid_dir / f"rank{d.rank}.pid").write_text(str(os.getpid()))

    gpu = d.device.type == "cuda"
    param_dtype = torch.bfloat16 if (gpu and t.precision == "bf16") else None
    ac = t.activation_checkpointing
    lora = LoraSettings.from_dict(dataclasses.asdict(t.lora)) if t.lora.enabled else None
    full_sd = initial_state_dict(cfg, args.init_checkpoint) if d.main else None
    if lora is not None and d.main:
        full_sd = lora_init_state_dict(full_sd, lora, torch.Generator().manual_seed(t.seed))
    model = sharded_model(cfg.net, d, full_sd, param_dtype, ac, lora, compile_blocks=t.compile)
    if lora is None:
        ema = sharded_model(cfg.net, d, full_sd, None, False).requires_grad_(False)
        params = list(model.parameters())
    else:
        ema, params = AdapterEma(model), lora_parameters(model)
    del full_sd
    optim = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda k: lr_multiplier(k, t.warmup_steps, t.warmup_start))
    gen = torch.Generator(device=d.device).manual_seed(t.seed * 1000 + d.rank)
    gamma = ema_gamma(t.ema_rate)
    start, skipped_total = 0, 0
    latest = read_latest(ckpt_dir)
    if latest is not None:
        meta = load_checkpoint(ckpt_dir, latest, model, ema, optim, sched, gen, d, lora)
        start, skipped_total = latest, meta.get("skipped_steps", 0)
        if d.main:
            log.info("resumed from %s at iteration %d", ckpt_dir / ckpt_name(latest), latest)

    dataset = dataset_from_manifest(args.data_manifest, split="train", cache_items=cfg.data.cache_in_memory)
    sampler = ResumableSampler(len(dataset), d, t.batch_size, seed=t.seed, start_step=start)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=t.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=gpu,
        drop_last=True,
    )
    tokenizer = VideoTokenizer(
        args.tokenizer_dir or cfg.tokenizer_dir,
        device=d.device,
        dtype=torch.bfloat16 if param_dtype else torch.float32,
        pixel_chunk_frames=cfg.data.num_frames,
    )
    n_views = len(cfg.data.cameras)
    view_ids = torch.tensor(cfg.camera_indices, device=d.device)  # each camera keeps its view-embedding row
    loss_cfg = LossConfig(text_dropout=t.text_dropout, max_cond_frames=t.max_cond_frames)
    nan_at = {int(s) for s in args.debug_nan_at.split(",") if s}
    inf_at = {int(s) for s in args.debug_inf_at.split(",") if s}

    writer = None
    if t.tensorboard and d.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrainError(
                "train.tensorboard is on but the tensorboard package is missing: pip install tensorboard"
            ) from e
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start)
    log_path = out / "train_log.jsonl"
    if d.main:
        keep = [
            ln
            for ln in (log_path.read_text().splitlines() if log_path.exists() else [])
            if json.loads(ln)["step"] < start
        ]
        atomic_write(log_path, lambda p: Path(p).write_text("".join(x + "\n" for x in keep)))
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
        t0 = time.perf_counter()
        batch = next(data_iter)
        video = batch["video"].to(d.device, non_blocking=True)
        with torch.no_grad():
            x = video.to(tokenizer.dtype) / 127.5 - 1  # upstream's training normalisation
            x0 = tokenizer.encode_views(x, n_views).float()
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
        if finite:
            optim.step()
            with torch.no_grad():
                beta = ema_beta(it, gamma)
                if lora is not None:
                    ema.update(model, beta)
                else:
                    e_loc = [p.to_local() for p in ema.parameters()]
                    m_loc = [p.to_local().float() for p in model.parameters()]
                    torch._foreach_mul_(e_loc, beta)
                    torch._foreach_add_(e_loc, m_loc, alpha=1 - beta)
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
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if writer is not None:
                for key in ("loss", "edm_loss", "mse_loss", "logvar", "grad_norm", "lr", "samples_per_s"):
                    writer.add_scalar(f"train/{key}", rec[key], rec["step"])
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
        if streak >= t.max_nonfinite_streak:
            last = read_latest(ckpt_dir)
            msg = (
                f"{streak} non-finite steps in a row (last at iteration {it - 1}); last good checkpoint: "
                f"{ckpt_dir / ckpt_name(last) if last else 'none'}; lower train.lr or check the data"
            )
            if d.main:
                print(f"train.py: {msg}", file=sys.stderr)
            return EXIT_NONFINITE
        flag = torch.tensor([0 if stop["signal"] is None else 1], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if it % save_iter == 0 or it == iterations or flag.item():
            save_checkpoint(
                ckpt_dir,
                it,
                model,
                ema,
                optim,
                sched,
                gen,
                {"skipped_steps": skipped_total},
                d,
                kill_in_save=args.debug_kill_in_save == it,
                lora=lora,
                final=it == iterations,
            )
            if d.main:
                prune_checkpoints(ckpt_dir, t.keep_checkpoints)
        if flag.item() and it < iterations:
            if d.main:
                print(
                    f"train.py: stopped by a signal at iteration {it} after saving {ckpt_dir / ckpt_name(it)}; "
                    "rerun the same command to resume",
                    file=sys.stderr,
                )
            return EXIT_STOPPED
    bar.close()
    if writer is not None:
        writer.close()
    if d.main:
        stem = ckpt_dir / ckpt_name(iterations)
        write_json(
            out / "final.json",
            {
                "iteration": iterations,
                "ema_model": f"{stem}_ema_model.pt",
                "reg_model": f"{stem}_reg_model.pt" if lora is None else None,
                "reg_adapter": f"{stem}_reg_adapter.safetensors" if lora is not None else None,
                "ema_adapter": f"{stem}_ema_adapter.safetensors" if lora is not None else None,
                "skipped_steps": skipped_total,
                "world_size": d.world,
                "experiment": cfg.name,
            },
        )
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
        print(f"train.py: {e}", file=sys.stderr)
        code = 1
    except torch.OutOfMemoryError as e:
        print(
            f"train.py: out of GPU memory ({str(e).splitlines()[0]}); set train.activation_checkpointing: full, "
            "use more GPUs (FSDP shards the states), fewer data.cameras or a smaller data.height/width",
            file=sys.stderr,
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
