"""The Snakemake workflow: lint/format clean, the 7B example plans its full DAG, bad configs stop it with one line,
and the tiny demo runs end to end (reduced) with outputs people can watch.
"""

import json
import re
import subprocess
import tomllib

import numpy as np
import pytest
import yaml

from mvdit.data.video_io import probe_video, read_video

from .helpers import ROOT, job_counts, merged, snakemake, tool


def test_ruff_snakefmt_and_snakemake_lint_are_clean():
    for cmd in (
        [*tool("ruff"), "check", "src", "tests", "benchmarks"],
        [*tool("ruff"), "format", "--check", "src", "tests", "benchmarks"],
        [*tool("snakefmt"), "--check", "Snakefile"],
    ):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    r = snakemake("--lint", "--directory", str(ROOT))
    assert r.returncode == 0 and "Lints for" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_7b_example_dry_run_plans_the_full_dag(tmp_path):
    r = snakemake(
        "-n",
        "--configfile",
        str(ROOT / "experiments/video2world_multiview_7b_example.yaml"),
        "--directory",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    n_sets = len(list((ROOT / "prompts").glob("*.yaml")))
    assert n_sets >= 3
    assert counts == {
        "download": 3,
        "prepare_data": 1,
        "train": 1,
        "copy_ema": 1,
        "infer": n_sets,
        "report": 1,
        "all": 1,
        "total": 8 + n_sets,
    }
    assert "torchrun" not in r.stdout  # launched through src/launch.py, which builds the torchrun command
    r = snakemake(
        "-n",
        "-p",
        "--configfile",
        str(ROOT / "experiments/video2world_multiview_7b_example.yaml"),
        "--directory",
        str(tmp_path),
        "train",
    )
    assert "launch.py --nproc 8 --nnodes 1 -- " in r.stdout and "checkpoints/Cosmos-Predict1-7B" in r.stdout


def test_context_parallel_inference_runs_through_the_launcher_with_one_gpu_per_process(tmp_path):
    exp = yaml.safe_load((ROOT / "experiments/video2world_multiview_7b_example.yaml").read_text())
    exp["infer"] = exp.get("infer", {}) | {"nproc": 4}
    exp["resources"] = exp.get("resources", {}) | {"infer": {"gpus": 1, "cpus_per_task": 8}}
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    r = snakemake("-n", "-p", "--configfile", str(cfg), "--directory", str(tmp_path), "--forcerun", "infer")
    assert r.returncode == 0, r.stderr
    infer_cmds = [ln for ln in r.stdout.splitlines() if "infer.py" in ln]
    assert infer_cmds and all("launch.py --nproc 4 --on-stop terminate -- " in ln for ln in infer_cmds)
    jobs = r.stdout.split("rule ")
    infer_jobs = [j for j in jobs if j.startswith("infer:")]
    assert infer_jobs and all("gpu=4" in j and "cpus_per_task=32" in j for j in infer_jobs), infer_jobs[:1]
    prep = [j for j in jobs if j.startswith("prepare_data:")]
    assert prep and "gpu=1" in prep[0] and "cpus_per_task=8" in prep[0]  # one-process jobs keep one GPU


def test_evaluation_samples_with_the_inference_processes(tmp_path):
    exp = yaml.safe_load((ROOT / "experiments/tiny_demo.yaml").read_text())
    exp["infer"] |= {"nproc": 2}
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    r = snakemake("-n", "-p", "--configfile", str(cfg), "--directory", str(tmp_path))
    assert r.returncode == 0, r.stderr
    cmds = [ln for ln in r.stdout.splitlines() if "evaluate.py" in ln]
    assert cmds and "launch.py --nproc 2 --on-stop terminate -- " in cmds[0]
    jobs = [j for j in r.stdout.split("rule ") if j.startswith("evaluate:")]
    assert jobs and re.search(r"\bcpus_per_task=2\b", jobs[0])  # resources.infer are per process


def test_default_is_the_tiny_demo_and_plans_evaluation(tmp_path):
    r = snakemake("-n", "--directory", str(tmp_path))
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    assert counts["evaluate"] == 1 and counts["train"] == 1
    assert (tmp_path / "results/tiny_demo/experiment.yaml").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\ntrain: {oops: 1}\n", "unknown key train.oops"),
        ("name: x\ndata: {height: 100}\n", "data.height: 100 is not divisible by 16"),
        ("name: x\ndata: {num_frames: 10}\n", "data.num_frames: 10 is not 1 + 8k"),
        ("name: x\nmodel: {preset: tiny, overrides: {n_views: 4}}\n", "6 views but the model has 4"),
        ("name: x\ninfer: {nproc: 2}\nresources: {infer: {gpus: 2}}\n", "resources.infer.gpus: 2 GPUs per process"),
        ("name: x\ninfer: {nproc: 3, context_parallel: ulysses}\n", "ulysses needs infer.nproc=3 to divide"),
    ],
)
def test_bad_experiment_stops_before_any_work(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    r = snakemake("-n", "--configfile", str(cfg), "--directory", str(tmp_path))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and str(cfg) in lines[0]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.pt"))


def test_conda_env_lists_every_runtime_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "envs/mvdit.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    names = {p.split(">")[0].split("=")[0].lower() for p in pip}
    wanted = {d.split(">")[0].split("=")[0].lower() for d in deps} - {"snakemake", "snakemake-executor-plugin-slurm"}
    assert wanted <= names, sorted(wanted - names)
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"] if isinstance(d, str))


DEMO_OVERRIDES = {
    "name": "ci_demo",
    "data": {"num_clips": 6, "held_out": 2},
    "train": {"iterations": 24, "save_iter": 12, "warmup_steps": 5},
    "infer": {
        "steps": 4,
        "eval_clips": 2,
        "prompt_sets": ["synthetic_highway", "snowy_road_9frames", "synthetic_stills"],
    },
}


@pytest.mark.slow
def test_tiny_demo_runs_end_to_end(tmp_path):
    """A reduced demo: every rule runs, with 2 torchrun processes; outputs decode with the right size and length."""
    cfg = merged(yaml.safe_load((ROOT / "experiments/tiny_demo.yaml").read_text()), DEMO_OVERRIDES)
    exp = tmp_path / "ci_demo.yaml"
    exp.write_text(yaml.safe_dump(cfg))
    r = snakemake("--cores", "2", "--configfile", str(exp), "--directory", str(tmp_path), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = tmp_path / "results/ci_demo"
    d = cfg["data"]
    for ps in DEMO_OVERRIDES["infer"]["prompt_sets"]:
        out = res / "infer" / ps
        grid = probe_video(out / f"{ps}_grid.mp4")
        assert (grid.n_frames, grid.height, grid.width) == (d["num_frames"], 2 * d["height"], 3 * d["width"])
        flat = probe_video(out / f"{ps}.mp4")
        assert (flat.n_frames, flat.height, flat.width) == (6 * d["num_frames"], d["height"], d["width"])
        for cam in d.get("cameras", ["front", "left", "right", "back", "back_left", "back_right"]):
            frames, _ = read_video(out / f"{cam}.mp4")
            assert frames.shape == (d["num_frames"], d["height"], d["width"], 3) and frames.std() > 1
        assert len((out / f"{ps}.txt").read_text().splitlines()) == 6
        meta = json.loads((out / f"{ps}.json").read_text())
        assert meta["settings"]["steps"] == 4 and len(meta["checkpoint_sha256"]) == 64
        assert (out / f"{ps}_sheet.png").stat().st_size > 1000
    metrics = json.loads((res / "report/metrics.json").read_text())
    assert metrics["train"]["iterations"] == 24 and np.isfinite(metrics["train"]["final_loss_mean_last_10pct"])
    psnr = metrics["held_out"]["psnr_db"]
    assert all(np.isfinite(v) and 0 < v < 60 for v in psnr.values())
    # the baselines without a model: copy-last-frame and the tokenizer's own continuation (below its round trip)
    assert psnr["tokenizer_continuation"] < psnr["tokenizer_ceiling"] and "copy_last_frame" in psnr
    assert (res / "report/loss.png").stat().st_size > 1000
    ckpts = tmp_path / "results/ci_demo/train/checkpoints"
    assert (ckpts / "latest_checkpoint.txt").read_text().strip() == "iter_000000024.pt"
    assert (ckpts / "iter_000000012_ema_model.pt").exists() and (ckpts / "iter_000000012_reg_model.pt").exists()
    assert (res / "post-trained/model.pt").exists()
    assert not (tmp_path / "checkpoints/tiny/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview_post-trained").exists()
    # rerunning does nothing: every output is up to date
    r = snakemake("-n", "--configfile", str(exp), "--directory", str(tmp_path))
    assert "Nothing to be done" in r.stdout + r.stderr
    # the HTML report embeds the grid videos and plots
    r = snakemake("--report", str(tmp_path / "report.html"), "--configfile", str(exp), "--directory", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "report.html").stat().st_size > 10_000
