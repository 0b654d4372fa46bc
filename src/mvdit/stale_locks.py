"""Stale Snakemake locks: a snakemake killed with SIGKILL leaves `.snakemake/locks/` behind, and the next run of the
same command refuses to start. Every run of this workflow records its pid; when every recorded process is gone, the
locks they left are stale and are removed (a live run's locks are never touched).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale_locks(workdir: str | os.PathLike, pid: int | None = None) -> bool:
    """Record this process and remove `.snakemake/locks` if no earlier recorded process is alive.

    Returns True when stale locks were removed.
    """
    meta = Path(workdir) / ".snakemake"
    meta.mkdir(parents=True, exist_ok=True)
    record = meta / "mvdit_pids"
    me = os.getpid() if pid is None else pid
    known = [int(x) for x in record.read_text().split()] if record.exists() else []
    alive = [p for p in known if p != me and _alive(p)]
    locks = meta / "locks"
    removed = False
    if not alive and locks.is_dir() and any(locks.iterdir()):
        shutil.rmtree(locks)
        removed = True
    record.write_text(" ".join(str(p) for p in [*alive, me]) + "\n")
    return removed
