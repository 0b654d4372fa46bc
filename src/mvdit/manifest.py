"""The data manifest written by prepare_data.py: which dataset, which clips train and which are held out.
Training and evaluation build their dataset from it, so every rule sees the same split.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset

from mvdit.constants import CAMERAS
from mvdit.data import MockDataset, MultiviewClipDataset


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable data manifest ({e}); re-run the data rule") from e


def dataset_from_manifest(path: str | Path, split: str = "train") -> Dataset:
    """split: "train" or "held_out"."""
    m = read_manifest(path)
    if m["source"] == "mock":
        return MockDataset(
            num_items=m["mock_items"],
            num_frames=m["num_frames"],
            num_views=len(m["cameras"]),
            height=m["height"],
            width=m["width"],
            text_len=m["text_len"],
            seed=m["seed"],
        )
    return MultiviewClipDataset(
        m["root"],
        cameras=m.get("cameras", CAMERAS),
        num_frames=m["num_frames"],
        height=m["height"],
        width=m["width"],
        text_len=m["text_len"],
        clips=m[split],
    )
