"""Stale Snakemake locks: a snakemake killed with SIGKILL leaves `.snakemake/locks/` behind, and the next run of the
same command refuses to start. Each main invocation records itself in its own file (pid, host, boot, pid namespace,
process start time) and deletes it when it exits; locks are removed only when every other recorded run is provably
dead. Jobs parse the Snakefile too (on a compute node the login node's pid means nothing): they touch nothing here.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RUNS_DIR = "mvdit_runs"  # .snakemake/mvdit_runs/<pid>-<hash of host, boot, pid namespace>.json, one file per run
LEGACY_RECORD = "mvdit_pids"  # the earlier format: pids only, no host


@dataclass(frozen=True)
class RunRecord:
    pid: int
    host: str
    boot_id: str | None  # /proc/sys/kernel/random/boot_id; None where the system has none
    pid_ns: str | None  # /proc/self/ns/pid link target: containers on one kernel share the boot id, not this
    start_time: int | None  # /proc/<pid>/stat field 22 (clock ticks after boot): tells a reused pid from the run

    def same_machine(self, other: RunRecord) -> bool:
        """Whether a pid recorded by `other` can be looked up here: same host, same boot, same pid namespace."""
        return (self.host, self.boot_id, self.pid_ns) == (other.host, other.boot_id, other.pid_ns)

    def file_name(self) -> str:
        where = hashlib.sha256(f"{self.host}\0{self.boot_id}\0{self.pid_ns}".encode()).hexdigest()[:16]
        return f"{self.pid}-{where}.json"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process from /proc, or None if /proc has no such process."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces; fields from 3 on follow ')'
    return fields[0], int(fields[22 - 3])


def this_run(pid: int | None = None) -> RunRecord:
    """The record of process `pid` (default: this one) on this machine."""
    pid = os.getpid() if pid is None else pid
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    stat = _proc_stat(pid)
    return RunRecord(
        pid, socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), pid_ns, stat[1] if stat else None
    )


def provably_dead(run: RunRecord, here: RunRecord) -> bool:
    """True only if `run` was recorded on this machine (host, boot, pid namespace) and its process is gone, a zombie,
    or a different process that reuses its pid. A run recorded anywhere else is never called dead."""
    if not run.same_machine(here):
        return False
    stat = _proc_stat(run.pid)
    if stat is not None:
        state, start = stat
        return state == "Z" or (run.start_time is not None and start != run.start_time)
    if Path("/proc/self/stat").exists():  # /proc works here and has no such pid
        return True
    try:
        os.kill(run.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _load(path: Path) -> RunRecord | None:
    try:
        d = json.loads(path.read_text())
        return RunRecord(**d) if isinstance(d, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clear_stale_locks(workdir: str | os.PathLike, me: RunRecord | None = None) -> bool:
    """Record this run, then remove `<workdir>/.snakemake/locks` if every other recorded run is provably dead.

    Call it from the main invocation only (see clear_stale_locks_if_main). Records of provably dead runs are deleted;
    records from another host, boot or pid namespace, and unreadable ones, keep the locks (Snakemake then says to run
    `snakemake --unlock`). Returns True when stale locks were removed.
    """
    me = this_run() if me is None else me
    meta = Path(workdir) / ".snakemake"
    runs = meta / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    locks = meta / "locks"
    have_locks = locks.is_dir() and any(locks.iterdir())
    # our own record first: a concurrent run that looks after us sees it (each run writes only its own file)
    mine = runs / me.file_name()
    _write_atomic(mine, json.dumps(asdict(me)) + "\n")
    alive, unknown = [], []  # runs that hold the locks; records this host cannot judge
    legacy = meta / LEGACY_RECORD
    if legacy.exists():
        if have_locks:
            unknown.append(f"{legacy} (an earlier version's record: pids without a host)")
        else:
            legacy.unlink(missing_ok=True)  # nothing left for it to protect
    for path in sorted(runs.glob("*.json")):
        if path == mine:
            continue
        run = _load(path)
        if run is None:
            unknown.append(f"{path} (unreadable)")
        elif provably_dead(run, me):
            path.unlink(missing_ok=True)
        elif run.same_machine(me):
            alive.append(path)
        else:
            unknown.append(f"{path} (pid {run.pid} on host {run.host}, another machine, boot or pid namespace)")
    if not have_locks or alive:
        return False
    if unknown:
        log.warning(
            "note: kept .snakemake/locks: the run recorded in %s may still be alive; if no snakemake runs in "
            "this directory, delete that record and run `snakemake --unlock`",
            unknown[0],
        )
        return False
    shutil.rmtree(locks, ignore_errors=True)  # a concurrent run may be removing the same dead locks
    return True


def is_main_invocation(workflow) -> bool:
    """Whether the Snakefile is being parsed by the user's snakemake command, not by one of its jobs.

    Jobs re-parse the Snakefile in a `snakemake --mode subprocess` (local `run:`/`script:` jobs, --sdm) or
    `--mode remote` (SLURM and other executor plugins) process; only `--mode default` is the main invocation
    (Snakemake >= 8: `workflow.exec_mode`, and `workflow.is_main_process` where it exists). Unknown means not main.
    """
    main = getattr(workflow, "is_main_process", None)
    if isinstance(main, bool):
        return main
    mode = getattr(workflow, "exec_mode", None)
    return getattr(mode, "name", None) == "DEFAULT"


def clear_stale_locks_if_main(workflow, workdir: str | os.PathLike) -> bool:
    """clear_stale_locks in the main invocation, whose record is deleted again when it exits (even by an exception
    or Ctrl-C; only a killed run leaves one). In a job's parse nothing is read, written or removed."""
    if not is_main_invocation(workflow):
        return False
    me = this_run()
    removed = clear_stale_locks(workdir, me)
    atexit.register(forget_run, Path(workdir).resolve(), me)
    return removed


def forget_run(workdir: str | os.PathLike, me: RunRecord) -> None:
    """Delete the record of run `me` (by that process only: a forked child exiting must not erase its parent)."""
    if os.getpid() == me.pid:
        (Path(workdir) / ".snakemake" / RUNS_DIR / me.file_name()).unlink(missing_ok=True)
