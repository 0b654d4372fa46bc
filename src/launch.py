"""Launch a torchrun program on one node, or on every node of a SLURM allocation (srun, one task per node,
c10d rendezvous on the first node). Forwards SIGTERM/SIGUSR1 to the processes so training can save and stop.

Example: python src/launch.py --nproc 2 -- src/train.py --experiment ... (single node)
         python src/launch.py --nproc 8 --nnodes 4 -- src/train.py ...  (inside a SLURM job of 4 nodes)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_nodes() -> list[str]:
    """Host names of this job's nodes (derived inside the job: the executor plugin strips most SLURM_* variables)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise SystemExit("launch.py: --nnodes > 1 needs a SLURM allocation (SLURM_JOB_NODELIST is not set)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def command(nproc: int, nnodes: int, program: list[str], port: int | None = None) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        return [
            *torchrun,
            "--nnodes=1",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port or free_port()}",
            *program,
        ]
    head = slurm_nodes()[0]
    job = os.environ.get("SLURM_JOB_ID", "mvdit")
    return [
        "srun",
        f"--nodes={nnodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        *torchrun,
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={head}:{port or 29500}",
        f"--rdzv_id={job}",
        *program,
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, required=True, help="processes (GPUs) per node")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("program", nargs=argparse.REMAINDER, help="-- script.py [args]")
    args = ap.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        ap.error("give the program after --")
    cmd = command(args.nproc, args.nnodes, program)
    print("launch.py:", shlex.join(cmd), file=sys.stderr, flush=True)
    pid_dir = tempfile.mkdtemp(prefix="mvdit-pids-")
    proc = subprocess.Popen(cmd, env=os.environ | {"MVDIT_PID_DIR": pid_dir})

    def forward(signum, _frame):
        # torchrun's agent does not pass SIGUSR1 on (and kills its workers soon after SIGTERM), so the request
        # to save and stop goes straight to the training processes, which registered their pids
        pids = [int(p.read_text()) for p in Path(pid_dir).glob("*.pid")]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        if not pids:
            proc.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, forward)
    try:
        code = proc.wait()
        # torchrun turns any worker failure into exit 1; the workers' own codes (3 stopped, 4 non-finite) matter
        codes = [int(p.read_text()) for p in Path(pid_dir).glob("*.exit")]
        return max(codes) if code and codes and max(codes) > 1 else code
    finally:
        shutil.rmtree(pid_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
