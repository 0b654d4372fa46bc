"""The training engine: 2 gloo processes, exact resume after SIGKILL (also mid-save), non-finite steps, signals,
out of memory.

The kill tests draw where they kill at random per run; the seed is printed and named in every assertion message, and
MVDIT_TEST_SEED=<seed> repeats a run's draw."""

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mvdit.tiny.tokenizer import build_tiny_tokenizer

from .helpers import ROOT, mock_experiment, prepare_experiment

SRC = ROOT / "src"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    build_tiny_tokenizer(d / "tokenizer")
    exp = mock_experiment("t", iterations=10, save_iter=4, max_nonfinite_streak=3)
    prepare_experiment(d, exp)
    return d


def launch(setup, out, *extra, nproc=2, experiment="exp.yaml"):
    cmd = [
        sys.executable,
        SRC / "launch.py",
        "--nproc",
        str(nproc),
        "--",
        SRC / "train.py",
        "--experiment",
        setup / experiment,
        "--data-manifest",
        setup / "data/manifest.json",
        "--out-dir",
        out,
        "--tokenizer-dir",
        setup / "tokenizer",
        *extra,
    ]
    return subprocess.Popen(
        [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def run(setup, out, *extra, nproc=2, timeout=240, experiment="exp.yaml"):
    p = launch(setup, out, *extra, nproc=nproc, experiment=experiment)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def wait_for_steps(out, n, p=None, timeout=180):
    """Block until the run in `out` has logged n steps; fail if it does not (in time, or before process p ends)."""
    deadline = time.time() + timeout
    log = out / "train_log.jsonl"
    while time.time() < deadline and (p is None or p.poll() is None):
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"the run in {out} did not log {n} steps")


def drawn(name, choices):
    """One of `choices`, drawn at random for this run (MVDIT_TEST_SEED=<seed> repeats a draw). Returns the value and
    a note naming it and the seed, printed here and meant for assertion messages."""
    seed = int(os.environ.get("MVDIT_TEST_SEED") or random.SystemRandom().randrange(2**32))
    value = random.Random(f"{seed}:{name}").choice(list(choices))
    note = f"{name} = {value} (drawn with seed {seed}; MVDIT_TEST_SEED={seed} repeats it)"
    print(note)
    return value, note


def process_tree(pid: int) -> list[int]:
    """pid and its descendants. torchrun starts each worker in a session of its own, so a signal to launch.py's
    process group never reaches the training processes."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid] + [q for c in children for q in process_tree(int(c))]


def signal_every_process(p, sig) -> list[int]:
    """`sig` to launch.py, torchrun and every training process at once (a node failure, the OOM killer, SLURM
    signalling a whole job step). Returns their PIDs."""
    pids = process_tree(p.pid)
    assert len(pids) >= 4, f"launch.py, torchrun and 2 workers expected, found {pids}"
    for q in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(q, sig)
    return pids


def assert_all_gone(pids, timeout=60):
    def alive(q):
        try:
            return "zombie" not in Path(f"/proc/{q}/status").read_text().lower()
        except OSError:
            return False

    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(q) for q in pids):
        time.sleep(0.05)
    assert not any(alive(q) for q in pids), [q for q in pids if alive(q)]


def latest_iteration(out) -> int | None:
    f = out / "checkpoints/latest_checkpoint.txt"
    return int(f.read_text().strip().removeprefix("iter_").removesuffix(".pt")) if f.exists() else None


def assert_resumed(err, out, before, expected, note):
    """The rerun in `out` resumed from checkpoint iteration `expected`: it says so naming that checkpoint, and did not
    recompute the steps before it: their train_log lines, timings included, are those of the interrupted run
    (`before`) byte for byte, while every step from `expected` on was run again (new timings)."""
    resumed = re.findall(r"resumed from (\S+) at iteration (\d+)", err)
    assert resumed == [(str(out / "checkpoints" / f"iter_{expected:09d}"), str(expected))], f"{note}: {resumed}"
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(10)), note
    assert len(before) >= expected and lines[:expected] == before[:expected], f"{note}: steps before {expected} redone"
    assert all(a != b for a, b in zip(lines[expected:], before[expected:], strict=False)), f"{note}: not rerun"


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def weights(path):
    return torch.load(path, weights_only=True)


def assert_same_weights(a, b):
    sa, sb = weights(a), weights(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "ref"
    code, err = run(setup, out)
    assert code == 0, err
    return out


def test_uninterrupted_run_writes_upstream_checkpoints(reference):
    ck = reference / "checkpoints"
    assert (ck / "latest_checkpoint.txt").read_text().strip() == "iter_000000010.pt"
    for it in (4, 8, 10):
        for suffix in ("_reg_model.pt", "_ema_model.pt", ".pt"):
            assert (ck / f"iter_{it:09d}{suffix}").exists()
    assert weights(ck / "iter_000000010.pt") == {"iteration": 10}
    reg, ema = weights(ck / "iter_000000010_reg_model.pt"), weights(ck / "iter_000000010_ema_model.pt")
    assert reg["net.x_embedder.proj.1.weight"].dtype == torch.bfloat16
    assert ema["net.x_embedder.proj.1.weight"].dtype == torch.float32
    assert all(k.startswith(("net.", "logvar.")) for k in ema)
    log = [json.loads(x) for x in (reference / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(10))
    assert {
        "loss",
        "edm_loss",
        "mse_loss",
        "logvar",
        "grad_norm",
        "lr",
        "samples_per_s",
        "step_time_s",
        "peak_mem_gb",
    } <= set(log[0])
    assert log[0]["lr"] == pytest.approx(1e-3 * 1e-6) and log[5]["lr"] == pytest.approx(1e-3)


def test_sigkill_at_a_random_step_then_rerun_resumes_and_is_bitwise_identical(setup, reference):
    """SIGKILL to every process (launch.py, torchrun, the workers) once a step drawn at random has been logged, after
    the first checkpoint (checkpoints at 4 and 8 of 10 steps): the rerun resumes from the latest checkpoint at kill
    time and ends with the uninterrupted run's losses and final weights, bit for bit."""
    out = setup / "killed"
    step, note = drawn("kill after step", range(4, 8))
    p = launch(setup, out)
    wait_for_steps(out, step + 1, p)
    assert p.poll() is None, f"{note}: the run ended before the kill"
    pids = signal_every_process(p, signal.SIGKILL)
    p.wait()
    assert_all_gone(pids)
    before = (out / "train_log.jsonl").read_text().splitlines()
    assert json.loads(before[step])["step"] == step, f"{note}: step {step} was not reached"
    assert not (out / "final.json").exists(), note
    latest = latest_iteration(out)
    note += f"; killed after step {len(before) - 1} was logged, latest checkpoint iteration {latest}"
    print(note)
    assert latest in (4, 8) and latest <= len(before), note
    code, err = run(setup, out)
    assert code == 0, f"{note}\n{err[-3000:]}"
    assert_resumed(err, out, before, latest, note)
    assert losses(out) == losses(reference), note
    for name in ("iter_000000010_ema_model.pt", "iter_000000010_reg_model.pt"):
        assert_same_weights(out / "checkpoints" / name, reference / "checkpoints" / name)


def test_sigkill_of_the_launcher_alone_takes_torchrun_and_the_workers_with_it(setup):
    """kill -9 of launch.py only (snakemake or a job step killed): torchrun and the training processes, which torchrun
    starts in sessions of their own, end too instead of training on beside a rerun."""
    out = setup / "orphans"
    p = launch(setup, out)
    wait_for_steps(out, 2, p)
    pids = process_tree(p.pid)
    assert len(pids) >= 4, pids
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    n = len((out / "train_log.jsonl").read_text().splitlines())
    assert n < 10  # steps were left: orphans would go on logging them
    assert_all_gone(pids, timeout=10)
    time.sleep(1)
    assert len((out / "train_log.jsonl").read_text().splitlines()) == n  # nobody trained on


def test_kill_during_a_checkpoint_save_leaves_the_previous_one_in_charge(setup, reference):
    """SIGKILL of every process in the middle of the save of checkpoint 8 or 10 (drawn at random): the half-written
    one is ignored, the rerun resumes from the one before and is bitwise identical to an uninterrupted run."""
    out = setup / "killed_in_save"
    save, note = drawn("kill in the save of iteration", (8, 10))
    previous = {8: 4, 10: 8}[save]
    code, _ = run(setup, out, "--debug-kill-in-save", str(save))
    assert code != 0, note
    ck = out / "checkpoints"
    assert latest_iteration(out) == previous, note
    assert not (ck / f"iter_{save:09d}_train_state").exists() and not (out / "final.json").exists(), note
    assert list(ck.glob(f".iter_{save:09d}_train_state.tmp")), f"{note}: the save was not under way"
    before = (out / "train_log.jsonl").read_text().splitlines()
    assert len(before) == save, note  # killed in the save after step save - 1
    code, err = run(setup, out)
    assert code == 0, f"{note}\n{err[-3000:]}"
    assert_resumed(err, out, before, previous, note)
    assert losses(out) == losses(reference), note
    for name in ("iter_000000010_ema_model.pt", "iter_000000010_reg_model.pt"):
        assert_same_weights(ck / name, reference / "checkpoints" / name)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_step_is_skipped_and_a_streak_stops_the_run(setup, kind):
    """A NaN loss (NaN gradients too) or an Inf loss (finite gradients: only the loss check sees it) skips the step;
    train.max_nonfinite_streak (3) in a row stop the run, exit 4, naming the last good checkpoint."""
    flag = f"--debug-{kind}-at"
    out = setup / f"{kind}_once"
    code, err = run(setup, out, flag, "5")
    assert code == 0, err
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[5]["skipped"] and log[-1]["skipped_total"] == 1
    assert not any(r["skipped"] for r in log[:5] + log[6:])
    assert math.isnan(log[5]["loss"]) if kind == "nan" else log[5]["loss"] == math.inf
    assert math.isfinite(log[5]["grad_norm"]) == (kind == "inf")
    out = setup / f"{kind}_streak"
    code, err = run(setup, out, flag, "5,6,7")
    assert code == 4
    msg = [ln[ln.index("train.py: ") :] for ln in err.splitlines() if "non-finite steps in a row" in ln]
    assert len(msg) == 1, err[-2000:]
    assert msg[0].startswith("train.py: 3 non-finite steps in a row (last at iteration 7); last good checkpoint: ")
    assert f"last good checkpoint: {out / 'checkpoints/iter_000000004'};" in msg[0]
    assert (out / "checkpoints/latest_checkpoint.txt").read_text().strip() == "iter_000000004.pt"
    assert not (out / "final.json").exists()


def test_nan_and_inf_count_in_the_same_streak(setup):
    out = setup / "mixed_streak"
    code, err = run(setup, out, "--debug-nan-at", "5,7", "--debug-inf-at", "6")
    assert code == 4 and "3 non-finite steps in a row (last at iteration 7)" in err, err[-2000:]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped_total"] for r in log[5:]] == [1, 2, 3] and log[6]["loss"] == math.inf


def test_out_of_memory_in_training_is_one_line_and_keeps_the_last_checkpoint(setup, reference):
    """A CUDA OOM at step 6 (after the checkpoint at 4): every process says the same one line with the advice, exit 1,
    no traceback from train.py; checkpoint 4 stays the latest, loads, and the rerun resumes from it."""
    from mvdit.assets.checkpoint import load_model
    from mvdit.model.config import get_preset

    out = setup / "oom"
    code, err = run(setup, out, "--debug-oom-at", "6")
    assert code == 1, err[-3000:]
    lines = [ln[ln.index("train.py: ") :] for ln in err.splitlines() if "train.py: " in ln]
    assert lines and set(lines) == {
        "train.py: out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB (injected by --debug-oom-at)); "
        "set train.activation_checkpointing: full, use more GPUs (FSDP shards the states), fewer data.cameras or a "
        "smaller data.height/width"
    }, err[-3000:]
    assert 'train.py", line' not in err  # no traceback from the training processes (torchrun prints its own report)
    assert latest_iteration(out) == 4 and not (out / "final.json").exists()
    load_model(get_preset("tiny"), out / "checkpoints/iter_000000004_ema_model.pt")
    before = (out / "train_log.jsonl").read_text().splitlines()
    assert len(before) == 6  # steps 0-5; step 6 never finished
    code, err = run(setup, out)
    assert code == 0, err[-3000:]
    assert_resumed(err, out, before, 4, "OOM at step 6")
    assert losses(out) == losses(reference)


STOP = r"train\.py: stopped by a signal at iteration (\d+) after saving (\S+); rerun the same command to resume"


@pytest.mark.parametrize(
    "sig, to",
    [(signal.SIGUSR1, "launch.py"), (signal.SIGTERM, "launch.py"), (signal.SIGTERM, "every process")],
    ids=["SIGUSR1", "SIGTERM", "SIGTERM-to-the-group"],
)
def test_a_stop_signal_saves_exits_3_then_resumes(setup, reference, sig, to):
    """SIGUSR1 or SIGTERM to launch.py (which passes it on as SIGUSR1), or SIGTERM to every process (launch.py,
    torchrun and the workers, as `scancel` signals a job step): the step finishes, a checkpoint is saved at that
    iteration, exit 3 with the one line; the same command resumes from it and ends as an uninterrupted run."""
    out = setup / f"signalled_{sig.name}_{to.replace(' ', '_')}"
    p = launch(setup, out)
    wait_for_steps(out, 2, p)
    if to == "launch.py":
        p.send_signal(sig)
    else:
        signal_every_process(p, sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3, err[-3000:]
    stops = re.findall(STOP, err)
    assert len(stops) == 1, err[-3000:]
    it = int(stops[0][0])
    assert stops[0][1] == str(out / "checkpoints" / f"iter_{it:09d}")
    assert 2 <= it < 10 and latest_iteration(out) == it and not (out / "final.json").exists()
    assert (out / "checkpoints" / f"iter_{it:09d}_ema_model.pt").exists()
    before = (out / "train_log.jsonl").read_text().splitlines()
    assert len(before) == it
    code, err = run(setup, out)
    assert code == 0, err[-3000:]
    assert_resumed(err, out, before, it, f"{sig.name} at iteration {it}")
    assert losses(out) == losses(reference)


def test_resume_with_another_process_count_is_refused(setup, reference):
    out = setup / "one_proc"
    code, _ = run(setup, out, "--iterations", "4", nproc=2)
    assert code == 0
    code, err = run(setup, out, nproc=1)
    assert code == 1 and "exact resume needs the same count" in err


def test_activation_checkpointing_and_hybrid_sharding_train_the_same_model(setup, reference):
    """Recomputing activations (all, or all but attention) changes nothing; HSDP (2 replicas x 1 shard) matches FSDP
    up to reduction order."""
    exp = yaml.safe_load((setup / "exp.yaml").read_text())
    for name, change in (
        ("ac", {"activation_checkpointing": "full"}),
        ("hsdp", {"sharding": "hybrid", "shard_group_size": 1}),
        ("sac", {"activation_checkpointing": "selective"}),
        ("sac_compiled", {"activation_checkpointing": "selective", "compile": True}),
    ):
        e = dict(exp, train=exp["train"] | change)
        (setup / f"{name}.yaml").write_text(yaml.safe_dump(e))
        out = setup / name
        code, err = run(setup, out, "--iterations", "4", experiment=f"{name}.yaml")
        assert code == 0, err[-2000:]
        ref = losses(reference)[:4]
        if name in ("ac", "sac"):
            assert losses(out) == ref
        else:
            assert losses(out) == pytest.approx(ref, rel=1e-4)


def test_cached_latents_train_the_same_model_and_resume_exactly(setup, reference):
    """train.cache_latents: the losses are the uncached run's up to rounding (each item encoded alone, not in its
    batch), and a run stopped at iteration 4 and resumed (its cache rebuilt) ends bit for bit where the uninterrupted
    cached run does."""
    exp = yaml.safe_load((setup / "exp.yaml").read_text())
    (setup / "cached.yaml").write_text(yaml.safe_dump(dict(exp, train=exp["train"] | {"cache_latents": True})))
    code, err = run(setup, setup / "cached", experiment="cached.yaml")
    assert code == 0, err[-2000:]
    assert "train.cache_latents:" in err and "optimizer: AdamW, fused kernel" in err
    assert losses(setup / "cached") == pytest.approx(losses(reference), rel=1e-4)
    code, err = run(setup, setup / "cached_resumed", "--iterations", "4", experiment="cached.yaml")
    assert code == 0, err[-2000:]
    code, err = run(setup, setup / "cached_resumed", experiment="cached.yaml")
    assert code == 0, err[-2000:]
    assert "resumed from" in err
    assert losses(setup / "cached_resumed") == losses(setup / "cached")
    for name in ("iter_000000010_ema_model.pt", "iter_000000010_reg_model.pt"):
        assert_same_weights(setup / "cached_resumed/checkpoints" / name, setup / "cached/checkpoints" / name)


def test_tensorboard_logging_is_optional(setup):
    pytest.importorskip("tensorboard")
    exp = yaml.safe_load((setup / "exp.yaml").read_text())
    (setup / "tb.yaml").write_text(yaml.safe_dump(dict(exp, train=exp["train"] | {"tensorboard": True})))
    cmd = [
        sys.executable,
        SRC / "train.py",
        "--experiment",
        setup / "tb.yaml",
        "--data-manifest",
        setup / "data/manifest.json",
        "--out-dir",
        setup / "tb",
        "--tokenizer-dir",
        setup / "tokenizer",
        "--iterations",
        "2",
    ]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((setup / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_lora_post_training_through_the_same_engine(setup, tmp_path):
    """train.lora.enabled: adapter-only safetensors at every save, the merged EMA where copy_ema reads it, exact
    resume, and inference from base + adapter equal to the merged model."""
    from mvdit.adapters.lora import read_adapter
    from mvdit.assets.checkpoint import load_file, load_into
    from mvdit.model.config import get_preset

    exp = yaml.safe_load((setup / "exp.yaml").read_text())
    exp["train"] = exp["train"] | {"lora": {"enabled": True, "rank": 4, "alpha": 8}, "iterations": 8}
    (setup / "lora.yaml").write_text(yaml.safe_dump(exp))

    def go(out, *extra):
        code, err = run(setup, out, *extra, experiment="lora.yaml")
        return subprocess.CompletedProcess([], code, "", err)

    r = go(setup / "lora_ref")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = setup / "lora_ref/checkpoints"
    for it in (4, 8):
        sd, settings, _ = read_adapter(ck / f"iter_{it:09d}_ema_adapter.safetensors")
        assert settings.rank == 4 and all(".lora_" in k for k in sd)
        assert (ck / f"iter_{it:09d}_reg_adapter.safetensors").stat().st_size < 2_000_000
    assert not (ck / "iter_000000004_ema_model.pt").exists()  # merged only at the end
    merged = load_file(ck / "iter_000000008_ema_model.pt")
    from mvdit.assets.checkpoint import build_model

    load_into(build_model(get_preset("tiny"), seed=None), merged)  # a plain model, strictly: upstream's names
    final = json.loads((setup / "lora_ref/final.json").read_text())
    assert final["ema_model"].endswith("iter_000000008_ema_model.pt")
    # resume: stop after 4, continue to 8, same losses
    r = go(setup / "lora_resumed", "--iterations", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    r = go(setup / "lora_resumed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(setup / "lora_resumed") == losses(setup / "lora_ref")
