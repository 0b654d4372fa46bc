"""The CUDA path of the scripts, end to end on the tiny assets: data, torchrun training on NCCL in bf16 with
selective checkpointing, stop-and-resume, EMA copy, and inference in bf16 with every offload flag and compiled
blocks. Skipped without CUDA (run on a GPU machine: pytest -m gpu)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from .helpers import ROOT, prepare_tiny_experiment, train_command

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SRC = ROOT / "src"
DIT = "Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview"
TOK = "Cosmos-Tokenize1-CV8x8x8-720p"


def py(*args, timeout=600, check=True):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert not check or r.returncode == 0, r.stderr[-4000:]
    return r


def test_train_resume_copy_and_infer_on_cuda(tmp_path):
    ck = prepare_tiny_experiment(
        tmp_path,
        "gpu",
        data={"num_clips": 4, "held_out": 1, "num_frames": 17, "height": 64, "width": 96, "text_len": 16},
        train={
            "iterations": 300,
            "save_iter": 150,
            "nproc": 1,
            "lr": 1e-3,
            "warmup_steps": 10,
            "precision": "bf16",
            "activation_checkpointing": "selective",
            "cache_latents": True,  # the cache on CUDA, rebuilt by the resumed run
        },
        infer={
            "steps": 4,
            "precision": "bf16",
            "offload_text_encoder": True,
            "offload_tokenizer": True,
            "compile": True,
        },
    )
    out = tmp_path / "train"
    cmd = train_command(
        1, tmp_path / "exp.yaml", tmp_path / "data", out, ck / TOK, "--init-checkpoint", ck / DIT / "model.pt"
    )
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)  # save and stop (exit 3), as a SLURM pre-timeout signal would
    _, err = p.communicate(timeout=300)
    assert p.returncode == 3, err[-4000:]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # resumes from latest_checkpoint.txt
    assert r.returncode == 0, r.stderr[-4000:]
    assert "optimizer: AdamW, fused kernel" in r.stderr and "train.cache_latents:" in r.stderr, r.stderr[-4000:]
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(300))
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert all(0 < s["peak_mem_gb"] < 8 for s in steps)  # measured on the GPU
    assert (out / "final.json").exists()

    post = ck / f"{DIT}_post-trained/model.pt"
    py(SRC / "copy_ema.py", "--experiment", tmp_path / "exp.yaml", "--train-dir", out, "--out", post)
    env_out = tmp_path / "infer"
    py(
        SRC / "infer.py",
        "--experiment",
        tmp_path / "exp.yaml",
        "--prompt-set",
        ROOT / "prompts/synthetic_highway.yaml",
        "--checkpoint",
        post,
        "--out-dir",
        env_out,
        "--tokenizer-dir",
        ck / TOK,
        "--t5-dir",
        ck / "google-t5/t5-11b",
        "--cache-dir",
        tmp_path / "t5_cache",
        "--project-root",
        ROOT,
    )
    meta = json.loads((env_out / "synthetic_highway.json").read_text())
    assert meta["device"].startswith("cuda") and meta["dtype"] == "torch.bfloat16"
    kernel = meta["sdpa_backend"]["kernel"]  # a fused kernel, not the math one (FlashAttention-4 with the fa4 extra)
    assert kernel in {"cudnn", "flash", "efficient"} or kernel.startswith("fa4 (flash-attn-4 ")
    assert 0 < meta["peak_gpu_memory_gb"] < 4 and meta["peak_gpu_memory_gb_per_rank"] == [meta["peak_gpu_memory_gb"]]
    assert (env_out / "synthetic_highway_grid.mp4").stat().st_size > 0
    step_s = sorted(s["step_time_s"] for s in steps)[len(steps) // 2]
    print(json.dumps({"median_step_s": step_s, "infer_timings_s": meta["timings_s"], "device": meta["device_name"]}))


def test_evaluate_on_cuda_in_bf16(tmp_path):
    ck = prepare_tiny_experiment(
        tmp_path,
        "gpu_eval",
        data={"num_clips": 3, "held_out": 2, "num_frames": 17, "height": 64, "width": 96, "text_len": 16},
        infer={"steps": 3, "precision": "bf16", "eval_clips": 2, "eval_samples": 2},
    )
    release = ck / DIT / "model.pt"
    py(
        SRC / "evaluate.py",
        "--experiment",
        tmp_path / "exp.yaml",
        "--data-manifest",
        tmp_path / "data/manifest.json",
        "--trained",
        release,
        "--baseline",
        release,
        "--tokenizer-dir",
        ck / TOK,
        "--out",
        tmp_path / "eval.json",
    )
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["clips"] == 2 and all(0 < v < 100 for v in ev["psnr_db"].values())
    assert ev["psnr_db"]["post_trained"] == ev["psnr_db"]["untrained"]  # the same model twice, the same seeds
