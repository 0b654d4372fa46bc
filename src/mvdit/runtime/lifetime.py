"""Processes that end with their parent. torchrun starts each worker in a session of its own, so a SIGKILL to the
launcher's process group (a killed job, `kill -9` of launch.py or snakemake) would leave the workers training and
writing checkpoints beside a rerun. Linux's parent-death signal closes that gap; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when its parent exits. Returns whether it is armed."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)
    return True


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ
