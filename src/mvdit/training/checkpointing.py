"""The checkpoint/resume protocol of training: upstream's file names, the DCP training state and per-rank RNG states,
all-ranks agreement on success, `latest_checkpoint.txt` moved last, pruning, and loading for an exact resume.

One checkpoint `iter_<9 digits>` in `checkpoints/`:
- `_train_state/` (DCP, sharded): weights, EMA and optimizer (LoRA: adapters, their EMA and optimizer only);
- `_rng_rank<r>.safetensors`: each rank's loss generator and torch CPU/CUDA RNG states;
- model files: full post-training writes upstream's `_reg_model.pt` (bf16) and `_ema_model.pt` (fp32); LoRA writes
  `_reg_adapter.safetensors` / `_ema_adapter.safetensors` and, at the final iteration, the merged `_ema_model.pt`;
- `.pt` (upstream's marker, {"iteration": it}) and `_trainer.json` (scheduler, world size, skipped steps).
Every file is written atomically and the pointer `latest_checkpoint.txt` moves only after all of them, so a crash
or a full disk at any point leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mvdit.adapters.lora import LoraSettings, adapter_state_dict, is_lora_key, merge_state_dict, save_adapter
from mvdit.assets.files import atomic_write, save_state_dict, write_json
from mvdit.runtime.distributed import Dist, full_state_dict, load_sharded_state, sharded_state
from mvdit.training import TrainError
from mvdit.training.ema import AdapterEma

LATEST = "latest_checkpoint.txt"


def ckpt_name(it: int) -> str:
    return f"iter_{it:09d}"


def read_latest(ckpt_dir: Path) -> int | None:
    """Iteration named by latest_checkpoint.txt (upstream format: a line `iter_000000200.pt`), if complete."""
    f = ckpt_dir / LATEST
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


def all_ok(ok: bool, device: torch.device) -> bool:
    """True on every rank only if `ok` is true on every rank (so all ranks take the same branch)."""
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# ----------------------------------------------------------------------------------------------- what is saved


def lora_train_state(model: nn.Module, ema: AdapterEma, optim: torch.optim.Optimizer) -> dict:
    """The sharded LoRA training state for DCP: adapters, their EMA and optimizer (the frozen base is not saved)."""
    adapters = {k: v for k, v in get_model_state_dict(model).items() if is_lora_key(k)}
    return {"model": adapters, "ema": ema.state_dict(), "optim": get_optimizer_state_dict(model, optim)}


def train_state(model: nn.Module, ema: nn.Module | AdapterEma, optim: torch.optim.Optimizer) -> dict:
    """The sharded training state DCP saves and loads in place: weights, EMA and optimizer (LoRA: adapters only)."""
    if isinstance(ema, AdapterEma):
        return lora_train_state(model, ema, optim)
    return sharded_state(model, ema, optim)


def load_train_state(model: nn.Module, ema: nn.Module | AdapterEma, optim: torch.optim.Optimizer, path: str) -> None:
    state = train_state(model, ema, optim)
    dcp.load(state, checkpoint_id=path)
    if isinstance(ema, AdapterEma):  # the frozen base comes from the initial checkpoint
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
        ema.load_state_dict(state["ema"])
        set_optimizer_state_dict(model, optim, state["optim"])
    else:
        load_sharded_state(model, ema, optim, state)


def model_files(model: nn.Module, ema: nn.Module | AdapterEma, lora: LoraSettings | None, final: bool, d: Dist):
    """{file suffix: content} of one checkpoint's model files: (state dict, dtype or None for fp32) for `.pt`, an
    adapter state dict for `.safetensors`. Collective (every rank calls; rank 0 receives the tensors)."""
    if lora is None:
        return {
            "_reg_model.pt": (full_state_dict(model), torch.bfloat16),
            "_ema_model.pt": (full_state_dict(ema), None),
        }
    ema_ad = ema.adapter_state_dict()
    files = {"_reg_adapter.safetensors": adapter_state_dict(model), "_ema_adapter.safetensors": ema_ad}
    if final:
        base = full_state_dict(model)
        if d.main:
            files["_ema_model.pt"] = (merge_state_dict(base, lora, adapters=ema_ad), torch.float32)
    return files


def rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    rng = {"generator": gen.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def set_rng_state(rng: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    gen.set_state(rng["generator"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


# ----------------------------------------------------------------------------------------------- save, prune, load


def save_checkpoint(
    ckpt_dir: Path,
    it: int,
    model,
    ema,
    optim,
    sched,
    gen,
    extra: dict,
    d: Dist,
    kill_in_save=False,
    lora=None,
    final=False,
) -> None:
    """Write one checkpoint; latest_checkpoint.txt moves only after every file is complete (all atomic).

    Full post-training writes upstream's reg (bf16) and EMA (fp32) model files; LoRA writes adapter-only safetensors
    (reg and EMA) and, at the final iteration, the merged EMA model where copy_ema and inference expect it.
    A failed write on any rank (e.g. a full disk) raises TrainError on every rank, leaving the previous checkpoint
    as the latest one. kill_in_save: SIGKILL this process after the DCP state is written (fault injection).
    """
    stem = ckpt_dir / ckpt_name(it)
    files = model_files(model, ema, lora, final, d)
    state = train_state(model, ema, optim)
    tmp = ckpt_dir / f".{stem.name}_train_state.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    error = ""
    try:  # every rank: its shards of the training state, then its RNG states
        dcp.save(state, checkpoint_id=str(tmp))
        if kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die with a half-written checkpoint
        meta = {"iteration": str(it)}
        atomic_write(
            f"{stem}_rng_rank{d.rank}.safetensors", lambda p: save_safetensors(rng_state(gen), p, metadata=meta)
        )
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's wrapper is a BaseException; any failure aborts
        error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if all_ok(not error, d.device) and d.main:
        try:  # rank 0, once every rank's part is complete: the model files, then the pointer
            done = ckpt_dir / f"{stem.name}_train_state"
            shutil.rmtree(done, ignore_errors=True)
            os.replace(tmp, done)
            for suffix, content in files.items():
                if suffix.endswith(".safetensors"):
                    save_adapter(f"{stem}{suffix}", content, lora, {"iteration": str(it)})
                else:
                    save_state_dict(f"{stem}{suffix}", content[0], dtype=content[1] or torch.float32)
            atomic_write(f"{stem}.pt", lambda p: torch.save({"iteration": it}, p))
            trainer = extra | {"iteration": it, "world_size": d.world, "scheduler": sched.state_dict()}
            write_json(f"{stem}_trainer.json", trainer)
            atomic_write(ckpt_dir / LATEST, lambda p: Path(p).write_text(f"{stem.name}.pt\n"))
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
    """Delete every file of all but the newest `keep` complete checkpoints (those with a training state)."""
    its = sorted(int(p.name[5:14]) for p in ckpt_dir.glob("iter_*_train_state"))
    for it in its[:-keep]:
        for p in ckpt_dir.glob(f"{ckpt_name(it)}*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def load_checkpoint(ckpt_dir: Path, it: int, model, ema, optim, sched, gen, d: Dist) -> dict:
    """Restore checkpoint `it` in place for an exact resume (same process count); returns its `_trainer.json`."""
    stem = ckpt_dir / ckpt_name(it)
    meta = json.loads(Path(f"{stem}_trainer.json").read_text())
    if meta["world_size"] != d.world:
        raise TrainError(
            f"{stem}_trainer.json was written by {meta['world_size']} processes, this run has {d.world}: "
            "exact resume needs the same count (set train.nproc/nodes back, or use a new experiment name)"
        )
    load_train_state(model, ema, optim, f"{stem}_train_state")
    sched.load_state_dict(meta["scheduler"])
    set_rng_state(load_safetensors(f"{stem}_rng_rank{d.rank}.safetensors"), gen)
    return meta
