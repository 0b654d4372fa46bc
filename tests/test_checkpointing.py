"""The checkpoint/resume protocol (mvdit.training.checkpointing) in one gloo process: the latest pointer moves last,
a half-written save is ignored and the previous checkpoint resumes exactly, pruning keeps the newest N. CPU."""

import errno
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mvdit.training.checkpointing as ckpt
from mvdit.runtime.distributed import Dist
from mvdit.training import TrainError
from mvdit.training.checkpointing import (
    ckpt_name,
    load_checkpoint,
    prune_checkpoints,
    read_latest,
    save_checkpoint,
)
from mvdit.training.ema import update_ema


@pytest.fixture(scope="module")
def d():
    """A one-process gloo group (what init_distributed makes without torchrun)."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    if owned:
        dist.destroy_process_group()


class Trainer:
    """A small model, its full EMA, AdamW with a schedule and a loss generator, stepped like train.py does."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 3))
        self.ema = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 3)).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, lambda k: min(1.0, (k + 1) / 4))
        self.gen = torch.Generator().manual_seed(seed + 1)

    def step(self):
        x = torch.randn(4, 6, generator=self.gen)
        self.model(x).square().mean().backward()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        self.sched.step()
        update_ema(self.ema, self.model, 0.5)

    def save(self, ckpt_dir, it, d, **kw):
        args = (self.model, self.ema, self.optim, self.sched, self.gen, {"skipped_steps": 0}, d)
        save_checkpoint(ckpt_dir, it, *args, **kw)

    def load(self, ckpt_dir, it, d):
        return load_checkpoint(ckpt_dir, it, self.model, self.ema, self.optim, self.sched, self.gen, d)

    def snapshot(self) -> dict:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "ema": {k: v.clone() for k, v in self.ema.state_dict().items()},
            "exp_avg": [s["exp_avg"].clone() for s in self.optim.state.values()],
            "lr": self.optim.param_groups[0]["lr"],
            "gen": self.gen.get_state().clone(),
            "cpu": torch.get_rng_state().clone(),
        }


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True)), k
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_the_latest_pointer_moves_last(tmp_path, d, monkeypatch):
    renamed = []
    replace = os.replace

    def recording_replace(src, dst):
        replace(src, dst)
        renamed.append(Path(dst).name)

    monkeypatch.setattr(os, "replace", recording_replace)  # every atomic file and the DCP folder end with a rename
    t = Trainer()
    t.step()
    t.save(tmp_path, 2, d)
    stem = ckpt_name(2)
    assert renamed[-1] == "latest_checkpoint.txt"
    assert renamed.count("latest_checkpoint.txt") == 1
    expected = {f"{stem}{s}" for s in ("_rng_rank0.safetensors", "_train_state", "_reg_model.pt", "_ema_model.pt")}
    expected |= {f"{stem}.pt", f"{stem}_trainer.json"}
    assert expected <= set(renamed[:-1]), renamed
    assert (tmp_path / "latest_checkpoint.txt").read_text() == f"{stem}.pt\n"
    assert read_latest(tmp_path) == 2


def test_a_half_written_save_is_ignored_and_the_previous_one_resumes_exactly(tmp_path, d, monkeypatch):
    t = Trainer()
    for _ in range(3):
        t.step()
    t.save(tmp_path, 3, d)
    saved = t.snapshot()
    t.step()
    after_4 = t.snapshot()  # what the uninterrupted run reaches one step later
    t.step()

    def disk_full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "write_json", disk_full)  # dies after the model files, before the pointer
    with pytest.raises(TrainError, match=f"could not write checkpoint {ckpt_name(5)}.*{ckpt_name(3)} is still the"):
        t.save(tmp_path, 5, d)
    monkeypatch.undo()
    assert (tmp_path / f"{ckpt_name(5)}_reg_model.pt").exists()  # written, but never named by the pointer
    # a crash mid-DCP leaves a temp folder behind: ignored as well
    (tmp_path / f".{ckpt_name(7)}_train_state.tmp").mkdir()
    (tmp_path / f".{ckpt_name(7)}_train_state.tmp/__0_0.distcp").write_bytes(b"partial")
    assert read_latest(tmp_path) == 3

    fresh = Trainer(seed=9)
    assert fresh.load(tmp_path, 3, d)["iteration"] == 3
    assert_same(fresh.snapshot(), saved)
    fresh.step()  # and continues exactly as the uninterrupted run did
    assert_same(fresh.snapshot(), after_4)


def test_resume_with_another_process_count_is_refused(tmp_path, d):
    t = Trainer()
    t.save(tmp_path, 1, d)
    other = Dist(rank=0, world=2, local_rank=0, device=d.device, mesh=None)
    with pytest.raises(TrainError, match="written by 1 processes, this run has 2"):
        t.load(tmp_path, 1, other)


def test_pruning_keeps_the_newest_n(tmp_path):
    for it in (2, 4, 6, 8):
        (tmp_path / f"{ckpt_name(it)}_train_state").mkdir()
        (tmp_path / f"{ckpt_name(it)}_train_state/__0_0.distcp").write_bytes(b"x")
        for suffix in (".pt", "_ema_model.pt", "_trainer.json", "_rng_rank0.safetensors"):
            (tmp_path / f"{ckpt_name(it)}{suffix}").write_bytes(b"x")
    (tmp_path / "latest_checkpoint.txt").write_text(f"{ckpt_name(8)}.pt\n")
    (tmp_path / f".{ckpt_name(10)}_train_state.tmp").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert {n[:14] for n in left if n.startswith("iter_")} == {ckpt_name(6), ckpt_name(8)}
    assert len([n for n in left if n.startswith("iter_")]) == 2 * 5
    assert "latest_checkpoint.txt" in left and f".{ckpt_name(10)}_train_state.tmp" in left
    prune_checkpoints(tmp_path, keep=1)
    assert {p.name[:14] for p in tmp_path.glob("iter_*")} == {ckpt_name(8)}


def test_an_unreadable_or_dangling_pointer_is_a_one_line_error(tmp_path):
    assert read_latest(tmp_path) is None
    (tmp_path / "latest_checkpoint.txt").write_text("garbage\n")
    with pytest.raises(TrainError, match="unreadable"):
        read_latest(tmp_path)
    (tmp_path / "latest_checkpoint.txt").write_text(f"{ckpt_name(4)}.pt\n")
    with pytest.raises(TrainError, match="training state is missing"):
        read_latest(tmp_path)
