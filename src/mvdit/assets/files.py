"""Files written so that a crash or a full disk never leaves a partial one: atomic replace with fsync, for state
dicts (torch.save) and JSON alike.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then rename over `path`.

    A crash (or a full disk) at any point leaves either the old file or no file, never a partial one. The temp file
    keeps `path`'s own name inside a private temp folder, so writers that record the file name (torch.save names its
    zip archive after it) produce identical bytes on every run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkdtemp's private mode must not stick to the result
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_state_dict(
    path: str | os.PathLike, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None
) -> None:
    """Atomically save a plain {name: tensor} dict (contiguous CPU tensors, optionally cast) with torch.save."""
    sd = {
        k: (v.detach().to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype)).contiguous()
        for k, v in state_dict.items()
    }
    atomic_write(path, lambda tmp: torch.save(sd, tmp))


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Atomic JSON write (indent 2, sorted keys)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))
