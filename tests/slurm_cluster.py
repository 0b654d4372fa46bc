"""A throw-away SLURM cluster on this one machine, for the test suite (and by hand: `python tests/slurm_cluster.py
up|down`). Debian/Ubuntu, root, no systemd needed.

- installs `slurmctld slurmd slurm-client munge` with apt-get when they are absent (root only);
- writes /etc/slurm/slurm.conf + gres.conf (the default path: the executor plugin strips SLURM_CONF inside jobs),
  backing up and later restoring files it did not write;
- starts munged (unless one already answers), slurmctld and one slurmd per virtual node (n1, n2, ...: same host,
  NodeAddr 127.0.0.1, own port) whose fake GPUs are GRES on /dev/tty* (CUDA_VISIBLE_DEVICES is set, nothing else);
- stops exactly the processes it started, by PID (SIGTERM, then SIGKILL), after cancelling the cluster's jobs.

Accounting is off (accounting_storage/none): `sacct` fails, so Snakemake's SLURM plugin must use
`--slurm-status-command squeue`, which works because MinJobAge keeps finished jobs visible for 10 minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = {"slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd", "munged": "/usr/sbin/munged"}
MARK = "# written by tests/slurm_cluster.py (mvdit CI cluster)"
CONF_DIR = Path("/etc/slurm")
RUN = Path("/run/mvdit-slurm-ci")  # PID files of what we started
STATE = Path("/var/lib/slurm/mvdit-ci")
LOGS = Path("/var/log/slurm/mvdit-ci")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip with it)."""


def _run(cmd, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _running(names: set[str]) -> dict[int, str]:
    """PIDs of processes whose command name is in `names` (read from /proc; nothing is signalled)."""
    found = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (c := _comm(int(p.name))) in names:
            found[int(p.name)] = c
    return found


def ensure_installed(timeout: float = 300) -> None:
    """Install the Debian packages when a daemon is missing; raise SlurmUnavailable with the reason otherwise."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting a SLURM cluster needs root (slurmd runs as root); not root here")
    if all(Path(p).exists() for p in DAEMONS.values()) and shutil.which("sbatch"):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        r = _run(["apt-get", "update", "-qq"], timeout=timeout, env=env)
        if r.returncode == 0:
            r = _run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], timeout=timeout, env=env
            )
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"apt-get did not finish within {timeout:.0f} s") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {' | '.join(tail)}")
    if not all(Path(p).exists() for p in DAEMONS.values()):
        raise SlurmUnavailable("apt-get succeeded but the SLURM daemons are still missing")


class SlurmCluster:
    """`with SlurmCluster(nodes=2) as c:` — a controller and `nodes` virtual nodes with `gpus` fake GPUs each."""

    def __init__(self, nodes: int = 2, gpus: int = 8, cpus: int | None = None, mem_mb: int = 8000):
        self.nodes, self.gpus, self.mem_mb = nodes, gpus, mem_mb
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.procs: dict[str, int] = {}  # name -> PID of every daemon we started
        self._popen: dict[str, subprocess.Popen] = {}
        self._backups: dict[Path, Path | None] = {}

    # ------------------------------------------------------------------------------------------- config

    def slurm_conf(self) -> str:
        lines = [
            MARK,
            "ClusterName=mvdit-ci",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=slurm",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "ReturnToService=2",
            f"SlurmctldPidFile={RUN}/slurmctld.pid",
            f"SlurmdPidFile={RUN}/slurmd-%n.pid",
            f"StateSaveLocation={STATE}/ctld",
            f"SlurmdSpoolDir={STATE}/slurmd-%n",
            f"SlurmctldLogFile={LOGS}/slurmctld.log",
            f"SlurmdLogFile={LOGS}/slurmd-%n.log",
            "SlurmctldPort=16817",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=500",
            "MinJobAge=600",  # finished jobs stay visible to squeue (the plugin's status command here)
            "KillWait=5",
            "InactiveLimit=0",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "GresTypes=gpu",
        ]
        for i, n in enumerate(self.names):
            lines.append(
                f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={17001 + i} CPUs={self.cpus} "
                f"RealMemory={self.mem_mb} Gres=gpu:{self.gpus} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def gres_conf(self) -> str:
        last = self.gpus - 1
        files = "/dev/tty0" if last == 0 else f"/dev/tty[0-{last}]"
        return MARK + "\n" + "".join(f"NodeName={n} Name=gpu File={files}\n" for n in self.names)

    def _write_conf(self, name: str, text: str) -> None:
        path = CONF_DIR / name
        if path not in self._backups:
            if path.exists() and MARK not in path.read_text(errors="replace"):
                backup = path.with_name(name + ".mvdit-ci-backup")
                shutil.copy2(path, backup)
                self._backups[path] = backup
            else:
                self._backups[path] = None
        path.write_text(text)

    def _restore_conf(self) -> None:
        for path, backup in self._backups.items():
            if backup is not None:
                shutil.move(backup, path)
            else:
                path.unlink(missing_ok=True)
        self._backups.clear()

    # ------------------------------------------------------------------------------------------- start / stop

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(LOGS / f"{name}.out", "ab")  # the daemon keeps its own copy of the descriptor
        # own session: a Ctrl-C to the test run reaches the test, not the daemons (they are stopped by PID)
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        self._popen[name] = p
        self.procs[name] = p.pid
        (RUN / f"{name}.pid").write_text(str(p.pid))

    def _wait(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for name, p in self._popen.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {p.returncode} while waiting for {what}: {self.logs()}")
            time.sleep(0.2)
        raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}: {self.logs()}")

    def _munge_ok(self) -> bool:
        m = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return m.returncode == 0 and subprocess.run(["unmunge"], input=m.stdout, capture_output=True).returncode == 0

    def start(self) -> SlurmCluster:
        ensure_installed()
        others = _running({"slurmctld", "slurmd", "slurmdbd"})
        if others:
            raise SlurmUnavailable(
                f"SLURM daemons are already running here ({', '.join(f'{c}[{p}]' for p, c in others.items())}); "
                "not touching a cluster this test did not start (left by a killed test run? "
                "`python tests/slurm_cluster.py down` stops those)"
            )
        t0 = time.monotonic()
        for d in (RUN, STATE, LOGS):
            d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(STATE / "ctld", ignore_errors=True)  # fresh controller state: job ids restart at 1
        for f in [*LOGS.glob("*.log"), *LOGS.glob("*.out")]:  # logs() shows this run's only
            f.unlink()
        for d in [STATE / "ctld", *(STATE / f"slurmd-{n}" for n in self.names)]:
            d.mkdir(parents=True, exist_ok=True)
        for d in (STATE, STATE / "ctld", LOGS):
            shutil.chown(d, "slurm", "slurm")
        try:
            # munge: reuse a working one, else start ours
            if not (shutil.which("munge") and self._munge_ok()):
                Path("/run/munge").mkdir(exist_ok=True)
                shutil.chown("/run/munge", "munge", "munge")
                key = Path("/etc/munge/munge.key")
                if not key.exists() or key.stat().st_size == 0:
                    _run(["mungekey", "-c", "-f", "-k", str(key)])
                    shutil.chown(key, "munge", "munge")
                    key.chmod(0o600)
                pid_file = RUN / "munged.daemon.pid"
                pid_file.unlink(missing_ok=True)
                shutil.chown(RUN, "root", "munge")
                RUN.chmod(0o775)
                r = _run(["runuser", "-u", "munge", "--", DAEMONS["munged"], "--force", f"--pid-file={pid_file}"])
                if r.returncode != 0:
                    raise SlurmUnavailable(f"munged did not start: {r.stderr.strip()}")
                self._wait("munged's PID file", lambda: pid_file.exists() and pid_file.read_text().strip(), 10)
                pid = int(pid_file.read_text())
                if _comm(pid) != "munged":
                    raise SlurmUnavailable(f"munged PID file names {pid}, which is not munged")
                self.procs["munged"] = pid
                (RUN / "munged.pid").write_text(str(pid))
                self._wait("munge", self._munge_ok, 10)
            self._write_conf("slurm.conf", self.slurm_conf())
            self._write_conf("gres.conf", self.gres_conf())
            self._spawn("slurmctld", [DAEMONS["slurmctld"], "-D", "-i"])
            self._wait("slurmctld", lambda: _run(["scontrol", "ping"], timeout=10).returncode == 0, 30)
            for n in self.names:
                self._spawn(f"slurmd-{n}", [DAEMONS["slurmd"], "-D", "-N", n])

            def idle() -> bool:
                out = _run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], timeout=10).stdout.split()
                return len(set(out)) == self.nodes

            self._wait(f"{self.nodes} idle node(s)", idle, 60)
            r = _run(["srun", "-N1", "-n1", "true"], timeout=60)
            if r.returncode != 0:
                raise SlurmUnavailable(f"smoke test `srun true` failed: {r.stderr.strip()}")
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def logs(self, lines: int = 15) -> str:
        out = []
        for f in sorted(LOGS.glob("*.log")) + sorted(LOGS.glob("*.out")):
            tail = f.read_text(errors="replace").strip().splitlines()[-lines:]
            if tail:
                out.append(f"--- {f}\n" + "\n".join(tail))
        return "\n".join(out)

    def cancel_all_jobs(self, timeout: float = 30) -> None:
        """Cancel every job of this (throw-away) cluster and wait until none runs, so no slurmstepd outlives it."""
        if "slurmctld" not in self.procs:
            return
        ids = _run(["squeue", "-h", "-o", "%i"], timeout=10).stdout.split()
        if not ids:
            return
        _run(["scancel", *ids], timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _run(["squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i"], timeout=10).stdout.split():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop what start() started, by PID: slurmds, then slurmctld, then munged; restore the config files."""
        try:
            self.cancel_all_jobs()
        except (OSError, subprocess.SubprocessError):
            pass
        slurmds = [n for n in self.procs if n.startswith("slurmd-")]
        for group in (slurmds, ["slurmctld"], ["munged"]):
            _terminate({n: self.procs.pop(n) for n in group if n in self.procs}, self._popen)
        for f in RUN.glob("*.pid"):
            f.unlink(missing_ok=True)
        self._restore_conf()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate(pids: dict[str, int], popen: dict[str, subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM each PID (only if it is still the daemon we started), wait, then SIGKILL what is left."""
    alive = {}
    for name, pid in pids.items():
        want = "munged" if name == "munged" else name.split("-")[0]
        if _comm(pid) == want:
            os.kill(pid, signal.SIGTERM)
            alive[name] = pid
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        for name, pid in list(alive.items()):
            if name in popen:
                if popen[name].poll() is not None:
                    del alive[name]
            elif not _comm(pid):
                del alive[name]
        time.sleep(0.1)
    for name, pid in alive.items():
        os.kill(pid, signal.SIGKILL)
        if name in popen:
            popen[name].wait(timeout=10)


def _down_from_pid_files() -> None:
    """`down` for a cluster started by `up` in another process: the PIDs come from RUN/*.pid."""
    names = {f.stem: int(f.read_text()) for f in RUN.glob("*.pid") if f.stem != "munged.daemon"}
    if "slurmctld" in names:
        ids = _run(["squeue", "-h", "-o", "%i"], timeout=10).stdout.split()
        if ids:
            _run(["scancel", *ids], timeout=10)
            time.sleep(3)
    slurmds = [n for n in names if n.startswith("slurmd-")]
    for group in (slurmds, ["slurmctld"], ["munged"]):
        _terminate({n: names[n] for n in group if n in names}, {})
    for f in RUN.glob("*.pid"):
        f.unlink(missing_ok=True)
    for name in ("slurm.conf", "gres.conf"):
        path, backup = CONF_DIR / name, CONF_DIR / f"{name}.mvdit-ci-backup"
        if backup.exists():
            shutil.move(backup, path)
        elif path.exists() and MARK in path.read_text(errors="replace"):
            path.unlink()


if __name__ == "__main__":
    if sys.argv[1:] == ["up"]:
        c = SlurmCluster().start()
        print(f"SLURM cluster up in {c.startup_s:.1f} s: nodes {', '.join(c.names)}; PIDs {c.procs}")
        print(_run(["sinfo"]).stdout)
    elif sys.argv[1:] == ["down"]:
        _down_from_pid_files()
        print("stopped")
    else:
        sys.exit("usage: python tests/slurm_cluster.py up|down")
