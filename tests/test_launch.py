"""src/launch.py: the torchrun/srun commands it builds, where it runs them (no SLURM, a job's batch step, a job step),
and stop signals end to end with train.py (no SLURM needed): SIGURG sent to the whole process group, as SLURM's
pre-timeout `--signal=URG@<s>` reaches every process of a job step, saves a checkpoint and exits 3, and the rerun
resumes to the same losses as an uninterrupted run; a signal that comes before the training processes have
registered still stops them after their first step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvdit.tiny.tokenizer import build_tiny_tokenizer

from .helpers import ROOT, mock_experiment, prepare_experiment

SRC = ROOT / "src"
sys.path.insert(0, str(SRC))
import launch  # noqa: E402

# ----------------------------------------------------------------------------------------------- commands


def test_torchrun_command_single_node_and_node_agent():
    cmd = launch.torchrun_command(2, 1, "127.0.0.1:1234", ["train.py", "--x", "1"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nnodes=1" in cmd and "--nproc_per_node=2" in cmd and "--rdzv_backend=c10d" in cmd
    assert "--rdzv_endpoint=127.0.0.1:1234" in cmd and cmd[-3:] == ["train.py", "--x", "1"]
    assert not any(c.startswith("--rdzv_conf") for c in cmd)
    host = launch.torchrun_command(8, 4, "10.0.0.1:20042", ["t.py"], rdzv_id="42", is_host=True)
    other = launch.torchrun_command(8, 4, "10.0.0.1:20042", ["t.py"], rdzv_id="42", is_host=False)
    assert "--rdzv_conf=is_host=1" in host and "--rdzv_conf=is_host=0" in other and "--rdzv_id=42" in host


def test_srun_command_runs_one_agent_per_node_with_all_cpus_and_memory():
    job = {"nodes": ["gpu01", "gpu02"], "head_addr": "10.1.2.3", "cpus_per_node": 64}
    cmd = launch.srun_command(8, 2, "4242", job, ["src/train.py", "--a"], port=None, overlap=False)
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert "--cpus-per-task=64" in cmd and "--mem=0" in cmd and "--overlap" not in cmd
    assert "--kill-on-bad-exit=0" in cmd and any(c.startswith("--wait=") for c in cmd)  # a clean stop ends all
    agent = cmd[cmd.index(sys.executable) :]
    assert agent[1].endswith("launch.py") and "--node-agent" in agent
    assert agent[agent.index("--rdzv-endpoint") + 1] == f"10.1.2.3:{launch.rendezvous_port('4242')}"
    assert agent[-3:] == ["--", "src/train.py", "--a"]
    assert "--overlap" in launch.srun_command(1, 2, "7", job | {"cpus_per_node": None}, ["t"], 29500, True)


def test_rendezvous_port_is_stable_per_job():
    assert launch.rendezvous_port("12345") == launch.rendezvous_port("12345") != launch.rendezvous_port("12346")
    assert 20000 <= launch.rendezvous_port("99999999_3") < 40000


@pytest.mark.parametrize(
    ("env", "choice", "nnodes", "mode"),
    [
        ({}, "auto", 1, "local"),
        ({"SLURM_JOB_ID": "5"}, "auto", 1, "srun"),  # a batch step (sbatch script, `mpi` rule): a new job step
        ({"SLURM_JOB_ID": "5"}, "auto", 2, "srun"),
        ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0"}, "auto", 1, "local"),  # inside the plugin's `srun -n1`
        ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0"}, "auto", 2, "srun-overlap"),
        ({"SLURM_JOB_ID": "5"}, "never", 1, "local"),
    ],
)
def test_where_training_runs(monkeypatch, env, choice, nnodes, mode):
    for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert launch.slurm_mode(choice, nnodes) == mode


def test_several_nodes_without_slurm_is_a_one_line_error(monkeypatch, capsys):
    for k in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(k, raising=False)
    assert launch.main(["--nproc", "2", "--nnodes", "2", "--", "train.py"]) == 1
    assert "--nnodes 2 needs a SLURM job of 2 nodes" in capsys.readouterr().err


def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH answering like SLURM 22.05 for job 77 on nodes gpu[07-08]."""
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        'case "$1 $2" in\n'
        '  "show job") echo "JobId=77 JobName=x JobState=RUNNING NodeList=gpu[07-08] BatchHost=gpu07 NumNodes=2 '
        'NumCPUs=128 NumTasks=2 CPUs/Task=64 TresPerNode=gres:gpu:8" ;;\n'
        '  "show hostnames") echo gpu07; echo gpu08 ;;\n'
        '  "show node") echo "NodeName=$4 Arch=x86_64 NodeAddr=10.0.0.$(echo $4 | tr -dc 0-9 | sed s/^0//) '
        'NodeHostName=$4" ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")


def test_job_layout_comes_from_scontrol(tmp_path, monkeypatch):
    fake_scontrol(tmp_path, monkeypatch)
    job = launch.slurm_job("77")
    assert job == {"nodes": ["gpu07", "gpu08"], "head_addr": "10.0.0.7", "cpus_per_node": 64}


def test_more_nodes_than_the_job_has_is_refused(tmp_path, monkeypatch, capsys):
    fake_scontrol(tmp_path, monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert launch.main(["--nproc", "8", "--nnodes", "4", "--", "train.py"]) == 1
    assert "SLURM job 77 has 2 node(s) (gpu07, gpu08)" in capsys.readouterr().err


def test_cpu_threads_per_process(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    assert launch.cpu_threads(8) == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert launch.cpu_threads(2) == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert launch.cpu_threads(1) == len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------------------------- signals


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    build_tiny_tokenizer(d / "tokenizer")
    prepare_experiment(d, mock_experiment("l", iterations=10, save_iter=5))
    return d


def start(setup, out) -> subprocess.Popen:
    cmd = [sys.executable, SRC / "launch.py", "--nproc", "2", "--", SRC / "train.py", "--experiment"]
    cmd += [setup / "exp.yaml", "--data-manifest", setup / "data/manifest.json", "--out-dir", out]
    cmd += ["--tokenizer-dir", setup / "tokenizer"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # never a job step, even under SLURM
    return subprocess.Popen(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even from a background shell
    )


def wait(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGINT)
        time.sleep(5)
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        pytest.fail(f"launch.py did not finish within {timeout} s:\n{err[-3000:]}")
    return p.returncode, err


def why(err: str) -> str:
    """The lines that say what went wrong (the workers' exceptions), then the end of the log."""
    lines = [ln for ln in err.splitlines() if "Error" in ln or "train.py:" in ln or "launch.py:" in ln]
    return "\n".join(lines[-20:]) + "\n...\n" + err[-1500:]


def steps(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def wait_for_steps(out, n: int, p: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    log = out / "train_log.jsonl"
    while time.monotonic() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"training did not log {n} steps")


def test_sigurg_to_the_whole_process_group_saves_exits_3_and_the_rerun_resumes(setup):
    ref = setup / "ref"
    code, err = wait(start(setup, ref))
    assert code == 0, why(err)
    out = setup / "urg"
    p = start(setup, out)
    wait_for_steps(out, 2, p)
    os.killpg(p.pid, signal.SIGURG)  # every process: launch.py, torchrun, workers (like SLURM's step signal)
    code, err = wait(p)
    assert code == 3, why(err)
    assert "got SIGURG" in err and "stopped by a signal at iteration" in err and "rerun to resume" in err
    latest = (out / "checkpoints/latest_checkpoint.txt").read_text().strip()
    stopped_at = int(latest.removeprefix("iter_").removesuffix(".pt"))
    assert 2 <= stopped_at < 10 and not (out / "final.json").exists()
    code, err = wait(start(setup, out))  # the rerun resumes from latest_checkpoint.txt
    assert code == 0, why(err)
    assert f"at iteration {stopped_at}" in err
    assert [s["step"] for s in steps(out)] == list(range(10))
    assert [s["loss"] for s in steps(out)] == [s["loss"] for s in steps(ref)]


def test_a_signal_before_the_workers_registered_still_stops_them(setup):
    out = setup / "early"
    p = start(setup, out)
    children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None and not children.read_text().split():
        time.sleep(0.01)  # launch.py handles signals before it starts torchrun
    assert not (out / "train_log.jsonl").exists()  # torchrun is starting; no training process has registered yet
    p.send_signal(signal.SIGUSR1)
    code, err = wait(p)
    assert code == 3, why(err)
    assert (out / "checkpoints/latest_checkpoint.txt").read_text().strip() == "iter_000000001.pt"


def test_on_stop_terminate_ends_programs_that_have_nothing_to_save(tmp_path):
    prog = tmp_path / "sleeper.py"
    prog.write_text(
        "import os, time, pathlib\n"
        f"pathlib.Path(r'{tmp_path}', 'rank' + os.environ['RANK']).write_text(str(os.getpid()))\n"
        "time.sleep(300)\n"
    )
    cmd = [sys.executable, SRC / "launch.py", "--nproc", "2", "--on-stop", "terminate", "--", prog]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.Popen([str(c) for c in cmd], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    files = [tmp_path / f"rank{r}" for r in (0, 1)]
    while time.monotonic() < deadline and not all(f.exists() and f.read_text() for f in files):
        time.sleep(0.05)  # each file is created, then written: wait for the pid inside
    pids = [int(f.read_text()) for f in files]
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)  # to launch.py alone, as Snakemake or a user would
    code, err = wait(p, timeout=60)
    assert code != 0 and time.monotonic() - t0 < 30
    assert "stopping the processes (nothing to save)" in err
    for pid in pids:  # the workers are gone too
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
