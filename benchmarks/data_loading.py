"""Data loading throughput: six-camera clips of 57 frames decoded and resized to 480x848 by MultiviewClipDataset
through a DataLoader, in clips/s, against the rate a training step consumes them.

Usage: python benchmarks/data_loading.py --out benchmarks/results/data_loading.json [--workers 0 2] [--clips 4]
The clips are made from the bundled real six-camera input (its frames looped to 57 per view), written as mp4 at
848x480 in the users' layout, so the decode cost is that of real H.264 at the model's resolution.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mvdit.constants import CAMERAS
from mvdit.data.dataset import MultiviewClipDataset
from mvdit.data.video_io import read_video, split_views, write_video

ROOT = Path(__file__).resolve().parents[1]
STEP_S_8XH100 = 29.3  # projected seconds per iteration, one sample per GPU (BENCHMARKS.md)


def make_clips(root: Path, n: int, frames: int = 57) -> None:
    src, fps = read_video(ROOT / "assets/video2world_multiview_input1.mp4")
    views = split_views(src, len(CAMERAS))
    for i in range(n):
        for cam, v in zip(CAMERAS, views, strict=True):
            idx = (np.arange(frames) + i) % len(v)
            write_video(root / "videos" / cam / f"clip_{i:03d}.mp4", v[idx], fps)
            (root / "captions" / cam).mkdir(parents=True, exist_ok=True)
            (root / "captions" / cam / f"clip_{i:03d}.txt").write_text("a snowy road\n")


def measure(root: Path, workers: int, epochs: int) -> dict:
    ds = MultiviewClipDataset(root, CAMERAS, 57, 480, 848, require_t5=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, shuffle=False)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            assert batch["video"].shape == (1, 3, 6 * 57, 480, 848)
            n += 1
    dt = time.perf_counter() - t0
    return {"workers": workers, "clips": n, "seconds": dt, "clips_per_s": n / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_clips(Path(tmp), args.clips)
        rows = [measure(Path(tmp), w, args.epochs) for w in args.workers]
    need = 1 / STEP_S_8XH100
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "shape": "6 views x 57 frames, decoded 848x480 -> resized 480x848 uint8",
        "rows": rows,
        "needed_clips_per_s_per_gpu": need,
        "headroom": max(r["clips_per_s"] for r in rows) / need,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
