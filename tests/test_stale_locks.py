"""Stale Snakemake locks: only the main invocation clears them, and only those of runs it can prove dead (same host,
boot and pid namespace; pid gone, a zombie, or reused by another process)."""

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mvdit.workflow.stale_locks import (
    RUNS_DIR,
    clear_stale_locks,
    clear_stale_locks_if_main,
    forget_run,
    is_main_invocation,
    this_run,
)

from .helpers import ROOT

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def locked(workdir: Path) -> Path:
    """A workdir holding Snakemake's locks, as a run leaves them when killed with SIGKILL."""
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text(str(workdir / "results/x.mp4") + "\n")
    return locks


def record(workdir: Path, run) -> Path:
    runs = workdir / ".snakemake" / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    p = runs / run.file_name()
    p.write_text(json.dumps(dataclasses.asdict(run)))
    return p


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def dead_run():
    """The record of a process of this machine that has exited (and been reaped)."""
    p = subprocess.Popen(["sleep", "60"])
    run = this_run(p.pid)
    p.kill()
    p.wait()
    return run


@linux_only
def test_a_dead_run_on_this_host_leaves_stale_locks_that_are_cleared(tmp_path):
    locks = locked(tmp_path)
    rec = record(tmp_path, dead_run())
    assert clear_stale_locks(tmp_path)
    assert not locks.exists() and not rec.exists()
    mine = json.loads((tmp_path / ".snakemake" / RUNS_DIR / this_run().file_name()).read_text())
    assert mine == dataclasses.asdict(this_run())  # pid, host, boot id, pid namespace, start time


@linux_only
def test_a_live_run_keeps_its_locks(tmp_path, sleeper):
    locks = locked(tmp_path)
    rec = record(tmp_path, this_run(sleeper.pid))
    assert not clear_stale_locks(tmp_path)
    assert (locks / "0.output.lock").exists() and rec.exists()


@linux_only
def test_a_reused_pid_with_another_start_time_counts_as_dead(tmp_path, sleeper):
    locks = locked(tmp_path)
    live = this_run(sleeper.pid)
    record(tmp_path, dataclasses.replace(live, start_time=live.start_time - 1000))
    assert clear_stale_locks(tmp_path)
    assert not locks.exists()


@linux_only
def test_a_killed_but_unreaped_process_counts_as_dead(tmp_path, sleeper):
    locks = locked(tmp_path)
    record(tmp_path, this_run(sleeper.pid))
    sleeper.send_signal(signal.SIGKILL)
    for _ in range(100):  # a zombie until the fixture reaps it
        if Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    assert clear_stale_locks(tmp_path)
    assert not locks.exists()


@pytest.mark.parametrize(
    "elsewhere",
    [{"host": "login-node-1"}, {"boot_id": "00000000-0000-0000-0000-000000000000"}, {"pid_ns": "pid:[1]"}],
    ids=["another host", "another boot", "another pid namespace"],
)
def test_a_run_recorded_elsewhere_is_never_called_dead(tmp_path, elsewhere, caplog):
    """A job on a compute node (or a run in another container) sees no such pid: the login node's run may be alive."""
    locks = locked(tmp_path)
    rec = record(tmp_path, dataclasses.replace(dead_run(), **elsewhere))
    before = rec.read_bytes()
    assert not clear_stale_locks(tmp_path)
    assert (locks / "0.output.lock").exists() and rec.read_bytes() == before
    assert "kept .snakemake/locks" in caplog.text and rec.name in caplog.text and "--unlock" in caplog.text


@pytest.mark.parametrize("text", ["{not json", '{"pid": 1}', "[]"])
def test_an_unreadable_record_keeps_the_locks(tmp_path, text):
    locks = locked(tmp_path)
    (tmp_path / ".snakemake" / RUNS_DIR).mkdir()
    (tmp_path / ".snakemake" / RUNS_DIR / "7-abc.json").write_text(text)
    assert not clear_stale_locks(tmp_path)
    assert (locks / "0.output.lock").exists()


def test_the_earlier_pid_list_keeps_locks_and_goes_once_there_are_none(tmp_path):
    legacy = tmp_path / ".snakemake" / "mvdit_pids"
    locks = locked(tmp_path)
    legacy.write_text("12345\n")
    assert not clear_stale_locks(tmp_path) and locks.exists() and legacy.exists()
    (locks / "0.output.lock").unlink()
    assert not clear_stale_locks(tmp_path) and not legacy.exists()


@linux_only
def test_runs_record_only_themselves_so_concurrent_runs_lose_nothing(tmp_path, sleeper):
    """Each run writes its own file atomically: a run starting beside a live one never drops the other's record."""
    other = record(tmp_path, this_run(sleeper.pid))
    clear_stale_locks(tmp_path)
    runs = sorted(p.name for p in (tmp_path / ".snakemake" / RUNS_DIR).iterdir())
    assert runs == sorted([other.name, this_run().file_name()])  # no temporary files left either


@pytest.mark.parametrize(
    "workflow, main",
    [
        (SimpleNamespace(is_main_process=True), True),
        (SimpleNamespace(is_main_process=False), False),
        (SimpleNamespace(exec_mode=SimpleNamespace(name="DEFAULT")), True),
        (SimpleNamespace(exec_mode=SimpleNamespace(name="REMOTE")), False),
        (SimpleNamespace(exec_mode=SimpleNamespace(name="SUBPROCESS")), False),
        (SimpleNamespace(), False),
    ],
)
def test_main_invocation_is_read_from_the_workflow(workflow, main):
    assert is_main_invocation(workflow) is main


@pytest.mark.parametrize("mode", ["REMOTE", "SUBPROCESS"])
def test_a_job_parse_touches_neither_locks_nor_records(tmp_path, mode):
    locks = locked(tmp_path)
    rec = record(tmp_path, dead_run())  # would be cleared by a main invocation
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    job = SimpleNamespace(is_main_process=False, exec_mode=SimpleNamespace(name=mode))
    assert not clear_stale_locks_if_main(job, tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert locks.exists() and rec.exists()


def test_forget_run_removes_only_that_runs_record(tmp_path, sleeper):
    clear_stale_locks(tmp_path)
    other = record(tmp_path, this_run(sleeper.pid))
    forget_run(tmp_path, this_run())
    forget_run(tmp_path, this_run(sleeper.pid))  # another process's record: only that process may forget it
    assert [p.name for p in (tmp_path / ".snakemake" / RUNS_DIR).iterdir()] == [other.name]


SNAKEFILE = """
import sys
from pathlib import Path
sys.path.insert(0, {src!r})
from mvdit.workflow.stale_locks import clear_stale_locks_if_main
print("cleared" if clear_stale_locks_if_main(workflow, Path.cwd()) else "not cleared", file=sys.stderr)

rule all:
    output: "done.txt"
    shell: "touch {{output}}"
"""


@linux_only
def test_a_real_snakemake_job_parse_leaves_the_locks_and_the_main_one_clears_them(tmp_path):
    """`snakemake --mode remote` is how the SLURM plugin's jobs start; the user's own command is the main one."""
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(src=str(ROOT / "src")))
    locks = locked(tmp_path)
    rec = record(tmp_path, dataclasses.replace(dead_run(), host="this-host-as-the-job-sees-it"))
    record(tmp_path, dead_run())
    snakemake = [str(Path(sys.executable).parent / "snakemake"), "--cores", "1", "-s", str(tmp_path / "Snakefile")]
    snakemake += ["-d", str(tmp_path)]
    ours = [tmp_path / ".snakemake" / d for d in ("locks", RUNS_DIR)]
    before = {p: p.read_bytes() for d in ours for p in d.iterdir()}
    job = subprocess.run([*snakemake, "--mode", "remote", "-n"], capture_output=True, text=True, timeout=60)
    assert "not cleared" in job.stderr, job.stderr
    assert {p: p.read_bytes() for d in ours for p in d.iterdir()} == before

    rec.unlink()  # only the dead run of this host is left
    main = subprocess.run([*snakemake, "-n"], capture_output=True, text=True, timeout=60)
    assert "cleared" in main.stderr and "not cleared" not in main.stderr, main.stderr
    assert not (locks / "0.output.lock").exists()  # Snakemake itself keeps an empty locks/
    assert list((tmp_path / ".snakemake" / RUNS_DIR).iterdir()) == []  # its own record went when it exited


@linux_only
def test_a_killed_main_run_leaves_its_record_and_a_finished_one_does_not(tmp_path):
    code = (
        f"import sys, os, time; sys.path.insert(0, {str(ROOT / 'src')!r})\n"
        "from types import SimpleNamespace\n"
        "from mvdit.workflow.stale_locks import clear_stale_locks_if_main\n"
        f"clear_stale_locks_if_main(SimpleNamespace(is_main_process=True), {str(tmp_path)!r})\n"
        "print('ready', flush=True)\n"
        "time.sleep(float(sys.argv[1]))\n"
    )
    runs = tmp_path / ".snakemake" / RUNS_DIR
    subprocess.run([sys.executable, "-c", code, "0"], check=True, timeout=60)
    assert list(runs.iterdir()) == []
    p = subprocess.Popen([sys.executable, "-c", code, "60"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait()
    assert [f.name for f in runs.iterdir()] == [f"{p.pid}-" + this_run().file_name().split("-", 1)[1]]
