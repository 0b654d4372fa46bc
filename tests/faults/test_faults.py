"""Fault injection on the tiny pipeline: killed jobs, corrupt or foreign files, full disks, OOM, unsafe loads.
Each case asserts what the user sees (a one-line error naming the file and the fix, a non-zero exit) and what is
kept. The README's fault table lists them.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mvdit.assets.checkpoint import build_model, load_model
from mvdit.assets.files import atomic_write, save_state_dict
from mvdit.data.video_io import read_video
from mvdit.model.config import get_preset

from ..helpers import mock_experiment, prepare_experiment, tiny_inference_setup, train_command

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DIT = "Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview"


def snakemake_cmd(*args):
    exe = ROOT / ".venv/bin/snakemake"
    return [
        *([str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]),
        "-s",
        str(ROOT / "Snakefile"),
        *args,
    ]


def tree(path: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime) for p in path.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- safety


def test_every_torch_load_is_weights_only_and_pickle_needs_an_opt_in():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            args = m.group(1)
            if "weights_only=True" in args:
                continue
            before = text[: m.start()].splitlines()[-6:]
            assert "weights_only=False" in args and any("allow_pickle" in ln for ln in before), f"{path}: {m.group(0)}"
        for m in re.finditer(r"pickle\.load\(", text):
            before = "\n".join(text[: m.start()].splitlines()[-12:])
            assert "allow_pickle" in before, f"{path}: pickle.load without an allow_pickle guard"


# ---------------------------------------------------------------------------------------------- bad files at inference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_inference_setup(tmp_path_factory.mktemp("tiny"), "f", steps=2)


def infer(
    tiny, *, prompt_set=ROOT / "prompts/synthetic_highway.yaml", checkpoint=None, tokenizer=None, out="out", exp=None
):
    ck = tiny / "checkpoints"
    cmd = [
        sys.executable,
        SRC / "infer.py",
        "--experiment",
        exp or tiny / "exp.yaml",
        "--prompt-set",
        prompt_set,
        "--checkpoint",
        checkpoint or ck / DIT / "model.pt",
        "--out-dir",
        tiny / out,
        "--project-root",
        ROOT,
        "--tokenizer-dir",
        tokenizer or ck / "Cosmos-Tokenize1-CV8x8x8-720p",
        "--t5-dir",
        ck / "google-t5/t5-11b",
        "--cache-dir",
        tiny / "t5_cache",
    ]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)


def one_error_line(r, *needles):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("infer.py: ")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for n in needles:
        assert str(n) in lines[0], lines[0]


def test_inference_runs_with_the_tiny_assets(tiny):
    r = infer(tiny)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tiny / "out/synthetic_highway_grid.mp4").exists()
    kernel = json.loads((tiny / "out/synthetic_highway.json").read_text())["sdpa_backend"]
    assert kernel["setting"] == "auto" and kernel["kernel"] in {"flash", "math"}  # torch's CPU choice
    assert f"attention kernel: {kernel['kernel']} " in r.stderr


@pytest.mark.parametrize("backend", ["math", "cudnn", "fa4"])
def test_a_forced_attention_backend_runs_or_stops_before_any_model_loads(tiny, tmp_path, backend):
    exp = yaml.safe_load((tiny / "exp.yaml").read_text())
    exp["infer"]["sdpa_backend"] = backend
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    r = infer(tiny, exp=path, out=f"out_{backend}")
    if backend == "math":  # runs everywhere
        assert r.returncode == 0, r.stderr[-2000:]
        meta = json.loads((tiny / "out_math/synthetic_highway.json").read_text())
        assert meta["sdpa_backend"] == {"setting": "math", "kernel": "math"}
        return
    if backend == "fa4":  # FlashAttention-4 runs bf16/fp16 on Hopper or later
        one_error_line(r, path, "infer.sdpa_backend: fa4 needs a CUDA GPU with compute capability 9.0+", "auto")
    else:
        one_error_line(r, path, "infer.sdpa_backend: cudnn cannot run float32 attention on cpu", "auto")
    assert "Loading weights" not in r.stderr
    assert not (tiny / f"out_{backend}").exists()


@pytest.mark.parametrize("kind", ["truncated", "not_a_checkpoint", "wrong_architecture", "missing"])
def test_bad_checkpoints_are_one_line_errors_and_delete_nothing(tiny, tmp_path, kind):
    good = tiny / "checkpoints" / DIT / "model.pt"
    bad = tmp_path / "model.pt"
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    elif kind == "not_a_checkpoint":
        bad.write_text("this is a README, not weights\n")
    elif kind == "wrong_architecture":
        save_state_dict(bad, build_model(get_preset("tiny-posttrain")).state_dict())
    before = tree(tiny / "checkpoints")
    r = infer(tiny, checkpoint=bad, out=f"out_{kind}")
    one_error_line(r, bad)
    assert tree(tiny / "checkpoints") == before
    if kind != "missing":
        assert bad.exists()


def test_tokenizer_that_is_not_torchscript(tiny, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in (tiny / "checkpoints/Cosmos-Tokenize1-CV8x8x8-720p").iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    (tok / "encoder.jit").write_text("not torchscript")
    one_error_line(infer(tiny, tokenizer=tok, out="out_tok"), tok / "encoder.jit")


@pytest.mark.parametrize("kind", ["corrupt_mp4", "empty_prompt", "unknown_camera", "too_short", "leaves_project"])
def test_bad_prompt_set_fails_before_any_model_loads(tiny, tmp_path, kind):
    """The fault-table row: one line naming the prompt-set file (and what is wrong in it), before any model loads;
    nothing is written."""
    d = yaml.safe_load((ROOT / "prompts/synthetic_highway.yaml").read_text())
    if kind == "corrupt_mp4":
        clip = tmp_path / "clip.mp4"
        clip.write_bytes((ROOT / "assets/synthetic_highway.mp4").read_bytes()[:2000])
        d["input"] = str(clip)
    elif kind == "empty_prompt":
        d["prompts"]["back_left"] = ""
    elif kind == "unknown_camera":
        d["prompts"]["roof"] = "The camera is facing up."
    elif kind == "too_short":  # one still per camera cannot give 9 input frames
        d = yaml.safe_load((ROOT / "prompts/synthetic_stills.yaml").read_text()) | {"num_input_frames": 9}
    else:
        d["input"] = "../outside.mp4"
    what = {
        "corrupt_mp4": "clip.mp4",
        "empty_prompt": "back_left",
        "unknown_camera": "'roof'",
        "too_short": "fewer than num_input_frames=9",
        "leaves_project": "'../outside.mp4' leaves",
    }[kind]
    ps = tmp_path / "set.yaml"
    ps.write_text(yaml.safe_dump(d))
    r = infer(tiny, prompt_set=ps, out=f"out_{kind}")
    one_error_line(r, f"infer.py: {ps}: ", what)  # the line starts with the prompt-set file's name
    assert "Loading weights" not in r.stderr  # the T5 encoder never loaded
    assert not (tiny / f"out_{kind}").exists()


def test_out_of_memory_gives_advice(tiny, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_script", SRC / "infer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(mod.SamplingSession, "sample", oom)
    ck = tiny / "checkpoints"
    rc = mod.main(
        [
            "--experiment",
            str(tiny / "exp.yaml"),
            "--prompt-set",
            str(ROOT / "prompts/synthetic_highway.yaml"),
            "--checkpoint",
            str(ck / DIT / "model.pt"),
            "--out-dir",
            str(tiny / "out_oom"),
            "--project-root",
            str(ROOT),
            "--tokenizer-dir",
            str(ck / "Cosmos-Tokenize1-CV8x8x8-720p"),
            "--t5-dir",
            str(ck / "google-t5/t5-11b"),
            "--cache-dir",
            str(tiny / "t5_cache"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "out of GPU memory" in err and "offload" in err


# ---------------------------------------------------------------------------------------------- killed writes


def test_a_write_killed_midway_leaves_the_previous_file(tmp_path):
    """What every save uses (checkpoints, the EMA copy, manifests, JSON): SIGKILL mid-write keeps the old file."""
    target = tmp_path / "model.pt"
    target.write_bytes(b"old complete file")
    code = (
        "import os, signal, sys\n"
        "from mvdit.assets.files import atomic_write\n"
        "def w(p):\n"
        "    open(p, 'wb').write(b'half of the new')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write({str(target)!r}, w)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": str(SRC)})
    assert r.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old complete file"
    atomic_write(target, lambda p: Path(p).write_bytes(b"new"))
    assert target.read_bytes() == b"new"


def test_copy_ema_refuses_a_truncated_ema_file_and_writes_nothing(tiny, tmp_path):
    train = tmp_path / "train"
    (train / "checkpoints").mkdir(parents=True)
    ema = train / "checkpoints/iter_000000010_ema_model.pt"
    good = tiny / "checkpoints" / DIT / "model.pt"
    ema.write_bytes(good.read_bytes()[:5000])
    (train / "final.json").write_text(json.dumps({"iteration": 10, "ema_model": str(ema)}))
    out = tmp_path / "post/model.pt"
    r = subprocess.run(
        [sys.executable, SRC / "copy_ema.py", "--experiment", tiny / "exp.yaml", "--train-dir", train, "--out", out],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and str(ema) in r.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------- disk full in training


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip()}); needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, small_disk):
    from mvdit.tiny.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(tmp_path / "tok")
    exp = mock_experiment("full", iterations=8, save_iter=4, mock_items=8)
    prepare_experiment(tmp_path, exp)
    out = small_disk / "train"
    cmd = train_command(2, tmp_path / "exp.yaml", tmp_path / "data", out, tmp_path / "tok")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    msg = [ln for ln in r.stderr.splitlines() if "could not write checkpoint" in ln]
    assert msg and "iter_000000008" in msg[0] and "iter_000000004 is still the latest checkpoint" in msg[0]
    assert "free disk space" in msg[0] and "MiB free there" in msg[0]
    ck = out / "checkpoints"
    assert (ck / "latest_checkpoint.txt").read_text().strip() == "iter_000000004.pt"
    load_model(get_preset("tiny"), ck / "iter_000000004_ema_model.pt")  # the previous checkpoint is usable
    assert not list(ck.glob(".*tmp"))
    # with space again, the same command resumes from iteration 4 and finishes
    moved = tmp_path / "train"
    subprocess.run(["cp", "-a", str(out), str(moved)], check=True)
    cmd[cmd.index(str(out))] = str(moved)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and (moved / "final.json").exists()


# ---------------------------------------------------------------------------------------------- killed workflow


def prompt_jsons(res: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in res.glob("infer/*/*.json")}


@pytest.mark.slow
def test_sigkill_during_the_third_prompt_set_then_rerun_finishes_and_redoes_only_that(tmp_path):
    base = yaml.safe_load((ROOT / "experiments/tiny_demo.yaml").read_text())
    cfg = base | {"name": "kill", "infer": base["infer"] | {"checkpoint": "release", "steps": 6}}
    exp = tmp_path / "kill.yaml"
    exp.write_text(yaml.safe_dump(cfg))
    sets = sorted(p.stem for p in (ROOT / "prompts").glob("*.yaml"))
    assert len(sets) >= 3
    targets = [f"results/kill/infer/{s}/{s}_grid.mp4" for s in sets]

    def run(workdir, wait=True):
        cmd = snakemake_cmd("--cores", "1", "--configfile", str(exp), "--directory", str(workdir), *targets)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if wait:
            out, _ = p.communicate(timeout=600)
            assert p.returncode == 0, out[-3000:]
        return p

    ref, work = tmp_path / "ref", tmp_path / "work"
    run(ref)
    p = run(work, wait=False)
    res = work / "results/kill"
    deadline = time.time() + 400
    while time.time() < deadline and not (len(prompt_jsons(res)) >= 2 and len(list(res.glob("logs/infer/*.log"))) >= 3):
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done_before = prompt_jsons(res)
    assert 2 <= len(done_before) < len(sets), done_before
    run(work)
    after = prompt_jsons(res)
    assert set(after) == set(sets)
    for name, mtime in done_before.items():
        assert after[name] == mtime, f"{name} was redone"
    for s in sets:
        for cam in ("front", "back_left"):
            a, _ = read_video(ref / f"results/kill/infer/{s}/{cam}.mp4")
            b, _ = read_video(res / f"infer/{s}/{cam}.mp4")
            assert np.array_equal(a, b), (s, cam)
        ja = json.loads((ref / f"results/kill/infer/{s}/{s}.json").read_text())
        jb = json.loads((res / f"infer/{s}/{s}.json").read_text())
        assert ja["settings"] == jb["settings"] and ja["checkpoint_sha256"] == jb["checkpoint_sha256"]
