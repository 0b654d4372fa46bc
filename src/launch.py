"""Launch a torchrun program on this machine, or on every node of a SLURM job (one `srun` task per node, c10d
rendezvous on the job's first node), and turn stop signals into "save a checkpoint and exit 3".

Example: python src/launch.py --nproc 2 -- src/train.py --experiment ...            (this machine, or 1 SLURM node)
         python src/launch.py --nproc 8 --nnodes 4 -- src/train.py ...              (inside a SLURM job of 4 nodes)

Where it runs (--slurm auto): outside SLURM, and inside a SLURM job step (SLURM_STEP_ID set: a single-node Snakemake
rule runs inside the executor plugin's `srun -n1`), torchrun runs here. In a job's batch step (an sbatch script, or a
multi-node rule with the `mpi` resource, whose environment the plugin strips down to SLURM_JOB_ID) the training becomes
its own job step: `srun --nodes=M --ntasks-per-node=1` runs this script once per node, and each runs `torchrun
--nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=<first node's NodeAddr>:<port>`. Node list,
addresses and CPUs come from `scontrol` (SLURM_JOB_NODELIST and friends are stripped by the plugin).

Stop signals: SIGURG (SLURM's pre-timeout `sbatch --signal=URG@<s>`), SIGUSR1, SIGTERM and SIGINT ask the training
processes to finish the step, save a checkpoint and exit 3 (train.py's EXIT_STOPPED). They get SIGUSR1 from here:
they wrote their PIDs to $MVDIT_PID_DIR, because torchrun does not pass SIGUSR1 on. SLURM delivers `--signal` (and
what srun forwards) to EVERY process of a job step; URG is ignored by default, so torchrun, ffmpeg decoders and
Snakemake are unaffected, while USR1 would kill them. A second SIGTERM/SIGINT stops torchrun at once. The exit code is
the training processes' (3: stopped after saving, rerun to resume; 4: non-finite streak), not torchrun's blanket 1.
Programs with nothing to save (inference: --on-stop terminate) are stopped at the first stop signal instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mvdit.runtime.console import say
from mvdit.runtime.lifetime import die_with_parent

EXIT_STOPPED = 3  # train.py: stopped by a signal after saving a checkpoint
STOP_SIGNALS = (signal.SIGURG, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
SOFT = (signal.SIGURG, signal.SIGUSR1)  # repeated: still "save and stop"; a repeated TERM/INT means "now"
SRUN_WAIT_S = 120  # after the first node's task ends, srun waits this long for the others (a clean stop ends all)


class LaunchError(RuntimeError):
    pass


def log(msg: str) -> None:
    say(f"launch.py: {msg}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- SLURM queries


def scontrol(*args: str) -> str:
    try:
        r = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"scontrol {' '.join(args)} failed: {e}") from e
    if r.returncode != 0:
        raise LaunchError(f"scontrol {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def parse_fields(text: str) -> dict[str, str]:
    """`Key=Value Key2=Value2 ...` (scontrol -o) as a dict."""
    return dict(re.findall(r"(\S+?)=(\S*)", text))


def slurm_job(job_id: str) -> dict:
    """Node names, first node's address and CPUs per node of a running job, asked from the controller."""
    f = parse_fields(scontrol("show", "job", "-o", job_id))
    nodes = scontrol("show", "hostnames", f["NodeList"]).split()
    if not nodes:
        raise LaunchError(f"SLURM job {job_id} has no nodes (NodeList={f.get('NodeList')})")
    head = parse_fields(scontrol("show", "node", "-o", nodes[0])).get("NodeAddr") or nodes[0]
    cpus = int(f["NumCPUs"]) // len(nodes) if f.get("NumCPUs", "").isdigit() else None
    return {"nodes": nodes, "head_addr": head, "cpus_per_node": cpus}


def rendezvous_port(job_id: str) -> int:
    """Same on every node, different for jobs that share a node."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


# ----------------------------------------------------------------------------------------------- commands


def torchrun_command(
    nproc: int, nnodes: int, endpoint: str, program: list[str], rdzv_id: str = "mvdit", is_host: bool | None = None
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={rdzv_id}",
    ]
    if is_host is not None:  # the first node hosts the c10d store; the others connect to it
        cmd.append(f"--rdzv_conf=is_host={int(is_host)}")
    return cmd + program


def srun_command(
    nproc: int,
    nnodes: int,
    job_id: str,
    job: dict,
    program: list[str],
    port: int | None,
    overlap: bool,
    on_stop: str = "save",
) -> list[str]:
    """One task per node running this script as the node agent (which runs torchrun)."""
    cmd = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1"]
    if job["cpus_per_node"]:
        cmd.append(f"--cpus-per-task={job['cpus_per_node']}")
    cmd += ["--mem=0", f"--wait={SRUN_WAIT_S}", "--kill-on-bad-exit=0", "--unbuffered"]
    if overlap:
        cmd.append("--overlap")
    endpoint = f"{job['head_addr']}:{port or rendezvous_port(job_id)}"
    agent = [sys.executable, str(Path(__file__).resolve()), "--node-agent", "--nproc", str(nproc)]
    agent += ["--nnodes", str(nnodes), "--rdzv-endpoint", endpoint, "--rdzv-id", job_id, "--on-stop", on_stop]
    return cmd + agent + ["--", *program]


# ----------------------------------------------------------------------------------------------- running


def cpu_threads(nproc: int) -> int:
    """CPU threads per training process: this task's CPUs (SLURM's --cpus-per-task, else the CPU affinity) shared
    by the processes. Snakemake exports OMP_NUM_THREADS=<rule threads> to every rule, which would give each of
    the nproc processes that many threads, and the count changes float results: the same count everywhere keeps
    a SLURM run bitwise equal to a local one of the same shape."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    cpus = int(slurm) if slurm.isdigit() else len(os.sched_getaffinity(0))
    return max(1, cpus // nproc)


def run_torchrun(cmd: list[str], label: str, nproc: int, on_stop: str = "save") -> int:
    """Run torchrun with SIGUSR1 ignored; stop signals go to the training processes as SIGUSR1 (on_stop "save"),
    or stop torchrun and its processes at once (on_stop "terminate")."""
    pid_dir = tempfile.mkdtemp(prefix="mvdit-pids-")
    threads = str(cpu_threads(nproc))
    env = os.environ | {"MVDIT_PID_DIR": pid_dir, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    log(f"{label}{threads} CPU thread(s) per process (OMP_NUM_THREADS)")
    stop = {"signal": None}
    told: set[int] = set()
    proc = None

    def tell_workers() -> None:
        for f in Path(pid_dir).glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(f.read_text())
                if pid not in told:
                    os.kill(pid, signal.SIGUSR1)
                    told.add(pid)

    def on_signal(signum, _frame):
        if on_stop == "terminate" and proc is not None:
            if stop["signal"] is None:
                log(f"{label}got {signal.Signals(signum).name}: stopping the processes (nothing to save)")
            stop["signal"] = signum
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            return
        if stop["signal"] is None:
            stop["signal"] = signum
            log(f"{label}got {signal.Signals(signum).name}: the training processes save a checkpoint and stop")
            tell_workers()
        elif signum not in SOFT and proc is not None:
            log(f"{label}another {signal.Signals(signum).name}: stopping torchrun now")
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def ignore_usr1():  # in the child, before exec: SIG_IGN survives exec, a Python handler would not
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        die_with_parent()  # a killed launcher takes torchrun with it (and torchrun its workers: train.py)

    for s in STOP_SIGNALS:
        signal.signal(s, on_signal)
    try:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=ignore_usr1)
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop["signal"] is not None and on_stop == "save":
                    tell_workers()  # processes that registered after the signal came
        # torchrun turns any worker failure into exit 1; the workers' own codes (3 stopped, 4 non-finite) matter
        codes = [int(p.read_text()) for p in Path(pid_dir).glob("*.exit") if p.read_text().strip().isdigit()]
        if code and codes and max(codes) > 1:
            code = max(codes)
        return code
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        shutil.rmtree(pid_dir, ignore_errors=True)


def run_srun(cmd: list[str], job_id: str) -> int:
    """The launcher side of a SLURM step. A stop signal becomes `scancel --signal=URG` (every step of the job, the
    batch step excluded: only the node agents act on it); srun itself would forward USR1 or TERM to every process."""
    proc = subprocess.Popen(cmd)
    stop = {"count": 0}

    def on_signal(signum, _frame):
        stop["count"] += 1
        if stop["count"] == 1:
            log(f"got {signal.Signals(signum).name}: every node saves a checkpoint and stops")
            r = subprocess.run(["scancel", "--signal=URG", job_id], capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                return
            log(f"scancel --signal=URG {job_id} failed ({r.stderr.strip()}); passing SIGUSR1 through srun")
            sig = signal.SIGUSR1
        else:
            log(f"another {signal.Signals(signum).name}: terminating the job step")
            sig = signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    # not SIGURG: SLURM's pre-timeout signal reaches the agents directly (and, in a job step, this process too)
    for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    return proc.wait()


def slurm_mode(choice: str, nnodes: int) -> str:
    """'local' (torchrun here), 'srun' (a new job step) or 'srun-overlap' (from inside a job step)."""
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if choice == "never" or (choice == "auto" and not job_id):
        return "local"
    if not job_id:
        raise LaunchError("--slurm always: not inside a SLURM job (SLURM_JOB_ID is not set)")
    if not shutil.which("srun"):
        if choice == "auto" and nnodes == 1:
            return "local"
        raise LaunchError(f"SLURM job {job_id} but no `srun` on PATH")
    in_step = "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ
    if in_step:
        return "local" if nnodes == 1 and choice == "auto" else "srun-overlap"
    return "srun"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, required=True, help="processes (GPUs) per node")
    ap.add_argument("--nnodes", type=int, default=1, help="nodes (inside a SLURM job of at least that many)")
    ap.add_argument(
        "--slurm",
        choices=("auto", "always", "never"),
        default="auto",
        help="auto: a new job step when inside a SLURM job's batch step, torchrun here otherwise",
    )
    ap.add_argument("--port", type=int, default=None, help="rendezvous port (default: free / derived from job id)")
    ap.add_argument(
        "--on-stop",
        choices=("save", "terminate"),
        default="save",
        help="stop signals: save a checkpoint and exit 3 (training), or stop at once (inference)",
    )
    ap.add_argument("--node-agent", action="store_true", help=argparse.SUPPRESS)  # one srun task per node
    ap.add_argument("--rdzv-endpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rdzv-id", default="mvdit", help=argparse.SUPPRESS)
    ap.add_argument("program", nargs=argparse.REMAINDER, help="-- script.py [args]")
    args = ap.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        ap.error("give the program after --")
    if args.nproc < 1 or args.nnodes < 1:
        ap.error("--nproc and --nnodes must be at least 1")
    try:
        if args.node_agent:
            node_id = os.environ.get("SLURM_NODEID", "0")
            label = f"[{os.environ.get('SLURMD_NODENAME', socket.gethostname())}] "
            cmd = torchrun_command(
                args.nproc, args.nnodes, args.rdzv_endpoint, program, args.rdzv_id, is_host=node_id == "0"
            )
            log(
                f"{label}node {node_id} of {args.nnodes}, {args.nproc} process(es), "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}: {shlex.join(cmd)}"
            )
            code = run_torchrun(cmd, label, args.nproc, args.on_stop)
        else:
            mode = slurm_mode(args.slurm, args.nnodes)
            if mode == "local":
                if args.nnodes > 1:
                    raise LaunchError(
                        f"--nnodes {args.nnodes} needs a SLURM job of {args.nnodes} nodes (SLURM_JOB_ID is not set); "
                        "run through `snakemake --profile profiles/slurm` or sbatch"
                    )
                endpoint = f"127.0.0.1:{args.port or free_port()}"
                cmd = torchrun_command(args.nproc, 1, endpoint, program)
                where = f"SLURM job {os.environ['SLURM_JOB_ID']}, " if os.environ.get("SLURM_JOB_ID") else ""
                gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
                log(f"{where}{f'CUDA_VISIBLE_DEVICES={gpus}: ' if gpus is not None else ''}{shlex.join(cmd)}")
                code = run_torchrun(cmd, "", args.nproc, args.on_stop)
            else:
                job_id = os.environ.get("SLURM_JOB_ID") or os.environ["SLURM_JOBID"]
                job = slurm_job(job_id)
                if args.nnodes > len(job["nodes"]):
                    raise LaunchError(
                        f"--nnodes {args.nnodes} (train.nodes) but SLURM job {job_id} has {len(job['nodes'])} "
                        f"node(s) ({', '.join(job['nodes'])}); request as many (resources.train.nodes)"
                    )
                cmd = srun_command(
                    args.nproc, args.nnodes, job_id, job, program, args.port, mode == "srun-overlap", args.on_stop
                )
                log(f"SLURM job {job_id}, nodes {', '.join(job['nodes'][: args.nnodes])}: {shlex.join(cmd)}")
                code = run_srun(cmd, job_id)
    except LaunchError as e:
        log(str(e))
        return 1
    if code == EXIT_STOPPED:
        log("stopped after saving a checkpoint (exit 3); rerun to resume from latest_checkpoint.txt")
    return code


if __name__ == "__main__":
    sys.exit(main())
