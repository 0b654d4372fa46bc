"""The workflow on a real SLURM (tests/slurm_cluster.py starts one here: 2 virtual nodes with fake GPUs as GRES),
through `snakemake --profile profiles/slurm`, against a local run of the same reduced tiny demo:

- the whole demo with multi-node training (2 nodes x 1 process: the `mpi` path, one srun task per node, c10d on
  the first node's address), interrupted by SLURM's stop signal (SIGURG to every job step, as the pre-timeout
  `--signal=URG@<s>` delivers it): it saves, exits 3, the profile's retries resubmit it and it resumes; the final
  EMA weights, losses and inference settings equal the uninterrupted local run bit for bit;
- single-node training (1 node x 2 processes inside the plugin's `srun -n1 --gpus=2`), alongside: equal too;
- every sbatch call carries its GPU request (and training the stop signal); a failed job's message names its logs.

Skips (with the reason) when SLURM cannot be installed or started (not root, no apt, daemons already running).
Every process is bounded: Snakemake gets SIGINT at its deadline (it ignores SIGTERM while jobs run), then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from .helpers import ROOT
from .slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NAME = "slurm_ci"
SETS = ["snowy_road", "synthetic_stills"]
ITERATIONS = 16
POST = f"results/{NAME}/post-trained/model.pt"
CI_FLAGS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5", "--jobs", "4"]
LOCAL = ["--configfile", "ci.yaml", "--profile", "profiles/local", "--cores", "2"]
SLURM = ["--configfile", "ci.yaml", "--profile", "profiles/slurm", *CI_FLAGS]
SNAKEMAKE_TIMEOUT = 420


def snakemake_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]


def copy_repo(dst: Path) -> Path:
    """The checkout's files (tracked and new, not ignored: no results/, checkpoints/, .venv) into dst."""
    dst.mkdir(parents=True)
    r = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=False
    )
    if r.returncode == 0:
        for rel in filter(None, r.stdout.decode().split("\0")):
            src = ROOT / rel
            if src.is_file():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / rel)
    else:  # not a git checkout
        skip = shutil.ignore_patterns(".git", ".venv", "results", "checkpoints", ".snakemake", "__pycache__")
        shutil.copytree(ROOT, dst, ignore=skip, dirs_exist_ok=True)
    return dst


def experiment(layout: str, threads: int) -> dict:
    """The tiny demo, reduced. Same model, data and training in every layout, world size 2 and the same CPU threads
    per training process: "local" 1 node x 2 here; "multi" 2 nodes x 1 on SLURM; "single" 1 node x 2 on SLURM."""
    cfg = yaml.safe_load((ROOT / "experiments/tiny_demo.yaml").read_text())
    cfg["name"] = NAME if layout != "single" else f"{NAME}_1node"
    cfg["data"].update(num_clips=5, held_out=1, height=32, width=48)
    cfg["train"].update(iterations=ITERATIONS, save_iter=4, warmup_steps=2)
    cfg["train"].update({"nproc": 1, "nodes": 2} if layout == "multi" else {"nproc": 2, "nodes": 1})
    cfg["infer"].update(steps=2, prompt_sets=SETS, eval_clips=1)
    infer = {"gpus": 1, "cpus_per_task": 1, "mem_mb": 2000, "runtime": 10}
    if layout == "multi":  # cpus_per_task: per node, i.e. per process here
        cfg["resources"] = {"train": {"gpus": 1, "nodes": 2, "cpus_per_task": threads, "mem_mb": 3000, "runtime": 10}}
    elif layout == "single":  # 2 processes share the node's CPUs (launch.py: threads = cpus // nproc, at least 1)
        cpus = 2 * threads if threads > 1 else 1
        cfg["resources"] = {"train": {"gpus": 2, "nodes": 1, "cpus_per_task": cpus, "mem_mb": 3000, "runtime": 10}}
    if layout != "local":
        cfg["resources"]["infer"] = infer
    return cfg


def sigint_default() -> None:
    """In the child: SIGINT as the default, even when this test runs in the background of a non-interactive shell
    (which starts it ignored). Otherwise the deadline's SIGINT would not stop Snakemake."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cmd: list[str], cwd: Path, env: dict, out: Path) -> subprocess.Popen:
    f = open(out, "w")  # noqa: SIM115 - closed by finish()
    p = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=sigint_default
    )
    p.log_file, p.log_path, p.t_start, p.t_end = f, out, time.monotonic(), None

    def note_end():
        p.wait()
        p.t_end = time.monotonic()

    threading.Thread(target=note_end, daemon=True).start()
    return p


def finish(p: subprocess.Popen, deadline: float) -> tuple[int, str]:
    """Wait until the deadline, then SIGINT (Snakemake cancels its SLURM jobs), then SIGKILL the process group."""
    try:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    p.log_file.close()
    return p.returncode, p.log_path.read_text(errors="replace")


def sbatch_logger(bin_dir: Path) -> Path:
    """An `sbatch` first on PATH that records its arguments, then runs the real one."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = bin_dir / "sbatch_calls.txt"
    real = shutil.which("sbatch")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {real} "$@"\n')
    (bin_dir / "sbatch").chmod(0o755)
    return calls


def squeue_jobs() -> list[tuple[str, str, str]]:
    """(job id, comment, working directory) of every job the controller still knows."""
    r = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%k|%Z"], capture_output=True, text=True, timeout=30)
    return [tuple(line.split("|", 2)) for line in r.stdout.splitlines() if line.count("|") == 2]


class StopTrainingOnce(threading.Thread):
    """Once the SLURM training has logged `after` steps, send SIGURG to its job steps (what SLURM's pre-timeout
    `--signal=URG@<s>` does; scancel signals every step but the batch step, like the timed signal)."""

    def __init__(self, workdir: Path, train_log: Path, after: int, deadline: float):
        super().__init__(daemon=True)
        self.workdir, self.train_log, self.after, self.deadline = workdir, train_log, after, deadline
        self.done = threading.Event()
        self.job_id = None
        self.at_step = None

    def run(self):
        while not self.done.is_set() and time.monotonic() < self.deadline:
            lines = self.train_log.read_text().splitlines() if self.train_log.exists() else []
            if len(lines) >= self.after:
                jobs = [j for j, c, wd in squeue_jobs() if c.startswith("rule_train") and Path(wd) == self.workdir]
                if jobs:
                    self.job_id = max(jobs, key=int)
                    self.at_step = len(lines)
                    subprocess.run(["scancel", "--signal=URG", self.job_id], timeout=30)
                    return
            time.sleep(0.2)

    def stop(self):
        self.done.set()


@pytest.fixture(scope="module")
def cluster():
    c = SlurmCluster(nodes=2, gpus=4, mem_mb=8000)
    try:
        c.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The reduced demo locally, through --profile profiles/slurm (multi-node), and its training alone on one node."""
    base = tmp_path_factory.mktemp("slurm")
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # per training process, every run
    dirs, env, calls = {}, {}, {}
    for layout in ("local", "multi", "single"):
        dirs[layout] = copy_repo(base / layout)
        (dirs[layout] / "ci.yaml").write_text(yaml.safe_dump(experiment(layout, threads), sort_keys=False))
        calls[layout] = sbatch_logger(base / f"bin-{layout}")
        env[layout] = os.environ | {"PATH": f"{base / f'bin-{layout}'}:{os.environ['PATH']}"}
    deadline = time.monotonic() + SNAKEMAKE_TIMEOUT
    t0 = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["local"] = start([*snakemake_cmd(), *LOCAL], dirs["local"], env["local"], base / "local.out")
        # the SLURM runs start once the local one has its data: its T5 caption embeddings (deterministic, and the
        # slowest part of data preparation on a CPU) are copied over, so three runs do not compute them on 2 cores
        manifest = dirs["local"] / f"results/{NAME}/data/manifest.json"
        while not manifest.exists() and procs["local"].poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        for layout in ("multi", "single"):
            if (dirs["local"] / "results/t5_cache").is_dir():
                shutil.copytree(dirs["local"] / "results/t5_cache", dirs[layout] / "results/t5_cache")
        t1 = time.monotonic()
        train_log = dirs["multi"] / f"results/{NAME}/train/train_log.jsonl"
        stopper = StopTrainingOnce(dirs["multi"], train_log, after=3, deadline=deadline)
        stopper.start()
        procs["multi"] = start([*snakemake_cmd(), *SLURM], dirs["multi"], env["multi"], base / "multi.out")
        single = [*SLURM, f"results/{NAME}_1node/train/final.json"]
        procs["single"] = start([*snakemake_cmd(), *single], dirs["single"], env["single"], base / "single.out")
        out = {layout: finish(procs[layout], deadline) for layout in ("multi", "single", "local")}
        stopper.stop()
        took = {k: f"{(p.t_end or time.monotonic()) - p.t_start:.0f} s" for k, p in procs.items()}
        print(
            f"\nSLURM cluster started in {cluster.startup_s:.1f} s; the SLURM runs {t1 - t0:.0f} s after the local one"
        )
        print(f"run times: {took}; return codes: { {k: v[0] for k, v in out.items()} }")
    finally:  # whatever happened (a pytest timeout included): nothing of ours keeps running
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # Snakemake cancels its SLURM jobs on SIGINT
                    os.killpg(p.pid, signal.SIGINT)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return {"dirs": dirs, "out": out, "calls": calls, "stopper": stopper, "cluster": cluster}


def ok(runs, which: str) -> str:
    rc, out = runs["out"][which]
    if rc != 0:
        pytest.fail(f"{which} run failed (rc {rc}):\n{out[-6000:]}\n{runs['cluster'].logs()}")
    return out


def records(root: Path, name: str = NAME) -> list[dict]:
    keep = ("step", "loss", "edm_loss", "mse_loss", "logvar", "grad_norm", "lr", "n_cond", "skipped")
    lines = (root / f"results/{name}/train/train_log.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in keep} for line in lines]


def assert_same_tensors(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs between {a} and {b}"


def test_slurm_run_matches_the_local_run_bit_for_bit(runs):
    ok(runs, "local")
    ok(runs, "multi")
    local, remote = runs["dirs"]["local"], runs["dirs"]["multi"]
    assert_same_tensors(local / POST, remote / POST)
    assert records(remote) == records(local)
    assert [r["step"] for r in records(remote)] == list(range(ITERATIONS))
    for root in (local, remote):
        final = json.loads((root / f"results/{NAME}/train/final.json").read_text())
        assert final["world_size"] == 2 and final["iteration"] == ITERATIONS
    for ps in SETS:
        ma = json.loads((local / f"results/{NAME}/infer/{ps}/{ps}.json").read_text())
        mb = json.loads((remote / f"results/{NAME}/infer/{ps}/{ps}.json").read_text())
        for key in ("settings", "checkpoint_sha256", "prompts", "resolution", "frames_per_view"):
            assert ma[key] == mb[key], (ps, key)
        assert (remote / f"results/{NAME}/infer/{ps}/{ps}_grid.mp4").stat().st_size > 1000
    ea = json.loads((local / f"results/{NAME}/report/metrics.json").read_text())["held_out"]["psnr_db"]
    eb = json.loads((remote / f"results/{NAME}/report/metrics.json").read_text())["held_out"]["psnr_db"]
    assert eb == pytest.approx(ea, rel=1e-6)


def test_stop_signal_saves_exits_3_and_the_retry_resumes(runs):
    out = ok(runs, "multi")
    stopper = runs["stopper"]
    assert stopper.job_id, "the training job was never signalled"
    # the first attempt saved and stopped; the failure names both logs; the profile's retry resumed it
    failed = f"SLURM-job '{stopper.job_id}' failed"
    assert failed in out, out[-4000:]
    error = out[max(0, out.index(failed) - 3000) :]
    assert f"results/{NAME}/logs/train.log" in error and f"slurm_logs/rule_train/{stopper.job_id}.log" in error
    assert "stopped by a signal at iteration" in error  # the rule log, shown by show-failed-logs
    assert "Trying to restart job" in out
    train_log = (runs["dirs"]["multi"] / f"results/{NAME}/logs/train.log").read_text()
    m = re.search(r"resumed from \S+iter_0*(\d+) at iteration (\d+)", train_log)
    assert m and 0 < int(m.group(2)) < ITERATIONS, train_log[-3000:]
    # multi-node layout: one agent per node, one of the node's fake GPUs visible to it (which one depends on the jobs
    # beside it and the stopped attempt's release: a CI run saw n1's GPU 2)
    for node, nid in (("n1", 0), ("n2", 1)):
        agent = rf"\[{node}\] node {nid} of 2, 1 process\(es\), CUDA_VISIBLE_DEVICES=\d: "
        assert re.search(agent, train_log), train_log[-3000:]


def sbatch_calls(runs, layout: str) -> dict[str, list[str]]:
    by_rule = {}
    for c in runs["calls"][layout].read_text().splitlines():
        rule = re.search(r"--comment '?rule_(\w+?)(?:_wildcards|'| )", c).group(1)
        by_rule.setdefault(rule, []).append(c)
    return by_rule


def test_every_sbatch_call_carries_its_gpus_and_training_the_stop_signal(runs):
    ok(runs, "multi")
    by_rule = sbatch_calls(runs, "multi")
    assert set(by_rule) == {"prepare_data", "train", "copy_ema", "infer", "evaluate"}  # download, report: local
    assert len(by_rule["train"]) == 2 and len(by_rule["infer"]) == 2  # train: the stopped attempt + the retry
    for c in by_rule["train"]:
        assert "--nodes=2" in c and "--ntasks=2" in c and "--ntasks-per-node=1" in c and "--gpus-per-node=1" in c
        assert re.search(r"--signal=URG@\d+", c) and "-t 10" in c and "--mem 3000" in c, c
    for rule in ("infer", "evaluate", "prepare_data"):
        for c in by_rule[rule]:
            assert "--gpus=1" in c and "-t 10" in c and "--mem 2000" in c, c
    assert "--gpus" not in by_rule["copy_ema"][0]
    assert (runs["dirs"]["multi"] / ".snakemake/slurm_logs/rule_train").is_dir()


def test_single_node_training_inside_the_plugin_job_step_matches_too(runs):
    """1 node x 2 processes: the rule runs inside the plugin's `srun -n1 --gpus=2`; launch.py runs torchrun there."""
    ok(runs, "local")
    ok(runs, "single")
    local, single = runs["dirs"]["local"], runs["dirs"]["single"]
    train_log = (single / f"results/{NAME}_1node/logs/train.log").read_text()
    # two of the node's fake GPUs (which two depends on the jobs beside it); no job step of its own
    assert re.search(r"CUDA_VISIBLE_DEVICES=\d,\d: ", train_log) and "srun --nodes" not in train_log, train_log[-3000:]
    assert records(single, f"{NAME}_1node") == records(local)
    ema = f"train/checkpoints/iter_{ITERATIONS:09d}_ema_model.pt"
    assert_same_tensors(local / f"results/{NAME}/{ema}", single / f"results/{NAME}_1node/{ema}")
    (call,) = sbatch_calls(runs, "single")["train"]
    assert "--gpus=2" in call and "--nodes=1" in call and re.search(r"--signal=URG@\d+", call), call
