"""The training engine: 2 gloo processes, exact resume after SIGKILL (also mid-save), non-finite steps, signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from mvdit.tokenizer import build_tiny_tokenizer

from .conftest import ROOT, mock_experiment, prepare_experiment

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


def wait_for_steps(out, n, timeout=180):
    """Block until the run in `out` has logged n steps."""
    deadline = time.time() + timeout
    log = out / "train_log.jsonl"
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= n):
        time.sleep(0.05)


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


def test_sigkill_at_a_random_step_then_rerun_is_bitwise_identical(setup, reference):
    out = setup / "killed"
    p = launch(setup, out)
    wait_for_steps(out, 6)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "final.json").exists()
    code, err = run(setup, out)
    assert code == 0, err
    assert losses(out) == losses(reference)
    for name in ("iter_000000010_ema_model.pt", "iter_000000010_reg_model.pt"):
        assert_same_weights(out / "checkpoints" / name, reference / "checkpoints" / name)


def test_kill_during_a_checkpoint_save_leaves_the_previous_one_in_charge(setup, reference):
    out = setup / "killed_in_save"
    code, _ = run(setup, out, "--debug-kill-in-save", "8")
    assert code != 0
    ck = out / "checkpoints"
    assert (ck / "latest_checkpoint.txt").read_text().strip() == "iter_000000004.pt"
    assert not (ck / "iter_000000008_train_state").exists()
    code, err = run(setup, out)
    assert code == 0, err
    assert losses(out) == losses(reference)
    assert_same_weights(ck / "iter_000000010_ema_model.pt", reference / "checkpoints/iter_000000010_ema_model.pt")


def test_non_finite_step_is_skipped_and_a_streak_stops_the_run(setup):
    out = setup / "nan_once"
    code, err = run(setup, out, "--debug-nan-at", "5")
    assert code == 0, err
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[5]["skipped"] and log[-1]["skipped_total"] == 1
    out = setup / "nan_streak"
    code, err = run(setup, out, "--debug-nan-at", "5,6,7")
    assert code == 4
    assert "3 non-finite steps in a row" in err and "iter_000000004" in err
    assert (out / "checkpoints/latest_checkpoint.txt").read_text().strip() == "iter_000000004.pt"
    assert not (out / "final.json").exists()


def test_sigusr1_saves_and_exits_3_then_resumes(setup, reference):
    out = setup / "signalled"
    p = launch(setup, out)
    wait_for_steps(out, 2)
    p.send_signal(signal.SIGUSR1)  # to launch.py, which passes it to the training processes
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    assert "stopped by a signal" in err
    code, err = run(setup, out)
    assert code == 0, err
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
    from mvdit.checkpoint import load_file, load_into
    from mvdit.config import get_preset
    from mvdit.lora import read_adapter

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
    from mvdit.checkpoint import build_model

    load_into(build_model(get_preset("tiny"), seed=None), merged)  # a plain model, strictly: upstream's names
    final = json.loads((setup / "lora_ref/final.json").read_text())
    assert final["ema_model"].endswith("iter_000000008_ema_model.pt")
    # resume: stop after 4, continue to 8, same losses
    r = go(setup / "lora_resumed", "--iterations", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    r = go(setup / "lora_resumed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(setup / "lora_resumed") == losses(setup / "lora_ref")
