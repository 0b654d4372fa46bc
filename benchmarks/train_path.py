"""The post-training path a user runs, timed: prepare_data.py, then launch.py -> torchrun -> train.py (what the train
rule runs), stopped by SIGUSR1 after the first iterations (save and exit, as a SLURM pre-timeout signal does), the
same command again to resume to the end (its final save), then the strict load of the final EMA model that
copy_ema.py does. Any preset, process count, resolution, LoRA or full fine-tuning.

It writes an experiment YAML (mock data: upstream's random videos and T5 embeddings, seeded scratch weights; the
tokenizer is the tiny stand-in, which has the real latent shapes), runs the scripts as subprocesses and reports
seconds per iteration (from train_log.jsonl), peak GPU memory, start-up, save and resume times and file sizes.

7B LoRA on one GPU, reduced sample (about 5 min on an H100):
  PYTHONPATH=src python benchmarks/train_path.py --preset 7b-multiview --lora --height 240 --width 416 --frames 17 \
      --out benchmarks/results/train_path_7b_lora.json
7B full fine-tuning on 8 GPUs, the full sample (issue #10):
  PYTHONPATH=src python benchmarks/train_path.py --preset 7b-multiview --nproc 8 --iterations 6 --stop-after 3 \
      --activation-checkpointing full --out train_path_7b_8gpu.json
CPU smoke test (tests/test_benchmarks.py):
  PYTHONPATH=src python benchmarks/train_path.py --preset tiny --lora --height 32 --width 48 --frames 9 --text-len 8 \
      --nproc 2 --device cpu --out /tmp/train_path.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from mvdit.assets.checkpoint import build_model, load_file, load_into  # noqa: E402
from mvdit.constants import CAMERAS  # noqa: E402
from mvdit.model.config import get_preset  # noqa: E402
from mvdit.tiny.tokenizer import build_tiny_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_shape_args(p)  # --preset, --views, --height, --width, --frames, --text-len
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--iterations", type=int, default=4, help="the whole run (one save, at the end)")
    p.add_argument("--stop-after", type=int, default=2, help="iterations logged before the stop signal")
    p.add_argument("--lora", action="store_true", help="rank-16 adapters on a frozen base (train.lora)")
    p.add_argument("--activation-checkpointing", default="full", choices=["none", "full", "selective"])
    p.add_argument("--compile", action="store_true", help="train.compile")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def experiment(a) -> dict:
    cuda = a.device == "cuda"
    train = {
        "init": "scratch",
        "iterations": a.iterations,
        "save_iter": a.iterations,
        "nproc": a.nproc,
        "precision": "bf16" if cuda else "fp32",
        "activation_checkpointing": a.activation_checkpointing,
        "compile": a.compile,
    }
    if a.lora:
        train["lora"] = {"enabled": True, "rank": 16, "alpha": 16}
    data = {"source": "mock", "num_frames": a.frames, "height": a.height, "width": a.width, "text_len": a.text_len}
    data["cameras"] = list(CAMERAS[: a.views])
    return {"name": "train_path", "model": {"preset": a.preset}, "data": data, "train": train}


def run(cmd: list, log: Path, env: dict) -> float:
    """Run a script to completion (its output to `log`); seconds taken. A failure stops the benchmark."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        sys.exit(
            f"train_path: {Path(str(cmd[1])).name} failed (exit {r.returncode}); see {log}:\n" + log.read_text()[-3000:]
        )
    return time.perf_counter() - t0


def stop_after(cmd: list, rows: int, log_file: Path, out: Path, env: dict) -> float:
    """Start training, send SIGUSR1 once `rows` iterations are logged, wait for the save-and-exit (exit 3); seconds
    from the signal to the exit."""
    with open(log_file, "w") as f:
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log = out / "train_log.jsonl"
        while p.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= rows):
            time.sleep(0.2)
        t0 = time.perf_counter()
        p.send_signal(signal.SIGUSR1)
        p.wait()
    if p.returncode != 3:
        sys.exit(
            f"train_path: the stopped leg exited {p.returncode}, not 3; see {log_file}:\n"
            + log_file.read_text()[-3000:]
        )
    return time.perf_counter() - t0


def main(argv=None) -> int:
    a = parse_args(argv)
    res = {"benchmark": "train_path", "env": C.env_info(a.device), "args": {k: str(v) for k, v in vars(a).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        w = a.work_dir or Path(tmp)
        w.mkdir(parents=True, exist_ok=True)
        exp = w / "exp.yaml"
        exp.write_text(yaml.safe_dump(experiment(a)))
        build_tiny_tokenizer(w / "tokenizer")
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        run(
            [sys.executable, SRC / "prepare_data.py", "--experiment", exp, "--out-dir", w / "data"], w / "prep.log", env
        )
        out = w / "train"
        train = [sys.executable, SRC / "launch.py", "--nproc", a.nproc, "--", SRC / "train.py", "--experiment", exp]
        train += ["--data-manifest", w / "data/manifest.json", "--out-dir", out, "--tokenizer-dir", w / "tokenizer"]
        t0 = time.perf_counter()
        res["stop_signal_to_exit_s"] = stop_after(train, a.stop_after, w / "train1.log", out, env)
        res["first_leg_s"] = time.perf_counter() - t0
        res["iterations_before_stop"] = len((out / "train_log.jsonl").read_text().splitlines())
        res["resume_leg_s"] = run(train, w / "train2.log", env)  # resumes from latest_checkpoint.txt
        rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        steps = [r["step_time_s"] for r in rows]
        res["steps"] = [r["step"] for r in rows]
        res["step_time_s"] = steps
        res["loss"] = [r["loss"] for r in rows]
        first = {0, res["iterations_before_stop"]}  # each process's first iteration pays warm-up (and compile)
        steady = sorted(t for i, t in enumerate(steps) if i not in first) or steps
        res["steady_step_s_median"] = steady[len(steady) // 2]
        res["peak_mem_gb"] = max(r.get("peak_mem_gb") or 0 for r in rows)
        for leg in ("train1", "train2"):
            res[f"{leg}_log_tail"] = (w / f"{leg}.log").read_text()[-1500:]
        final = json.loads((out / "final.json").read_text())
        res["final"] = final
        ckpts = out / "checkpoints"
        res["files_mb"] = {p.name: p.stat().st_size / 2**20 for p in sorted(ckpts.glob("iter_*")) if p.is_file()}
        t0 = time.perf_counter()
        ema = Path(final["ema_model"])
        net_cfg = get_preset(a.preset)
        report = load_into(build_model(net_cfg, seed=None), load_file(ema), source=str(ema))  # copy_ema's check
        res["ema_strict_load_s"] = time.perf_counter() - t0
        res["ema_tensors"] = len(report.loaded)
    res["date"] = C.DATE
    C.save_json(str(a.out), res)
    print(
        f"[train_path] {a.preset} lora={a.lora} nproc={a.nproc} {a.frames}x{a.height}x{a.width}: steady "
        f"{res['steady_step_s_median']:.2f} s/iteration, peak {res['peak_mem_gb']:.1f} GB, first leg "
        f"{res['first_leg_s']:.0f} s, resume leg {res['resume_leg_s']:.0f} s, EMA strict load "
        f"{res['ema_strict_load_s']:.0f} s ({res['ema_tensors']} tensors)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
