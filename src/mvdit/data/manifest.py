"""The data manifest written by prepare_data.py: which dataset, which clips train and which are held out.
Training and evaluation build their dataset from it, so every rule sees the same split.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset

from mvdit.constants import CAMERAS
from mvdit.data.dataset import MockDataset, MultiviewClipDataset


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable data manifest ({e}); re-run the data rule") from e


class CachedDataset(Dataset):
    """Keeps decoded items in memory after their first use (small datasets: decoding mp4s dominates a tiny step)."""

    def __init__(self, inner: Dataset):
        self.inner = inner
        self.items: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        if index not in self.items:
            self.items[index] = self.inner[index]
        return self.items[index]


def dataset_from_manifest(path: str | Path, split: str = "train", cache_items: bool = False) -> Dataset:
    """split: "train" or "held_out"; cache_items keeps decoded real/synthetic clips in memory."""
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
    ds = MultiviewClipDataset(
        m["root"],
        cameras=m.get("cameras", CAMERAS),
        num_frames=m["num_frames"],
        height=m["height"],
        width=m["width"],
        text_len=m["text_len"],
        clips=m[split],
        view_map=m.get("view_map"),
        allow_pickle=m.get("allow_pickle", False),
        window_stride=m.get("window_stride"),
    )
    return CachedDataset(ds) if cache_items else ds
