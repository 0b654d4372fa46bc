"""Tests of mvdit.data.dataset: clip scanning and validation, the real-clip dataset, the mock dataset and the split."""

import pickle
import shutil

import numpy as np
import pytest
import torch

from mvdit.constants import CAMERAS, T5_DIM
from mvdit.data.dataset import (
    DatasetError,
    HeldOutSplit,
    MockDataset,
    MultiviewClipDataset,
    load_t5_embedding,
    save_t5_embedding,
    scan_clips,
)
from mvdit.data.synthetic import make_synthetic_dataset
from mvdit.data.video_io import read_video

N_FRAMES, H, W = 12, 24, 40


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, n_clips=2, n_frames=N_FRAMES, height=H, width=W, seed=3, supersample=1)
    return root


@pytest.fixture
def root(synth_root, tmp_path):
    """A private copy that a test may damage."""
    dst = tmp_path / "ds"
    shutil.copytree(synth_root, dst)
    return dst


def _write_t5(root, lengths=None):
    """Embeddings whose rows encode (camera, clip, row) so the concatenation order can be checked."""
    for ci, clip in enumerate(["clip_0000", "clip_0001"]):
        for v, cam in enumerate(CAMERAS):
            n = (lengths or {}).get(cam, 5 + v)
            emb = torch.full((n, T5_DIM), 100.0 * ci + v) + torch.arange(n)[:, None] / 64
            save_t5_embedding(root / "t5" / cam / f"{clip}.safetensors", emb.half(), prompt=f"{cam} {clip}")


def test_scan_clips(synth_root):
    clips = scan_clips(synth_root, CAMERAS, num_frames=9)
    assert [c.name for c in clips] == ["clip_0000", "clip_0001"]
    c = clips[0]
    assert (c.n_frames, c.height, c.width, c.fps) == (N_FRAMES, H, W, 24.0)
    assert set(c.videos) == set(CAMERAS) and c.t5 == {}
    assert all(c.captions[cam].startswith("The video is captured") for cam in CAMERAS)


def test_item_shapes_order_and_text(root):
    _write_t5(root, lengths={"front": 5, "left": 600})  # 600 > text_len: truncated
    ds = MultiviewClipDataset(root, CAMERAS, num_frames=8, height=H, width=W, text_len=512)
    assert len(ds) == 2
    item = ds[1]
    assert item["video"].shape == (3, 6 * 8, H, W) and item["video"].dtype == torch.uint8
    assert item["t5_text_embeddings"].shape == (6 * 512, T5_DIM) and item["t5_text_embeddings"].dtype == torch.float32
    assert item["t5_text_mask"].shape == (6 * 512,) and item["t5_text_mask"].dtype == torch.int64
    assert item["padding_mask"].shape == (1, H, W) and item["padding_mask"].dtype == torch.float32
    assert not item["padding_mask"].any()
    assert item["image_size"].tolist() == [H, W, H, W] and item["image_size"].dtype == torch.int64
    assert item["fps"] == 24.0 and isinstance(item["fps"], float)
    assert item["num_frames"] == 8 and item["clip"] == "clip_0001"
    # view-major: frame v*T + t is camera v's frame t (same size, so no resize is involved)
    for v, cam in enumerate(CAMERAS):
        frames, _ = read_video(root / "videos" / cam / "clip_0001.mp4")
        assert torch.equal(item["video"][:, v * 8 : (v + 1) * 8], torch.from_numpy(frames[:8]).permute(3, 0, 1, 2))
    # text: view v's block holds its own embedding, zero-padded; the mask marks the real rows
    emb, mask = item["t5_text_embeddings"].view(6, 512, T5_DIM), item["t5_text_mask"].view(6, 512)
    assert mask.sum(1).tolist() == [5, 512, 7, 8, 9, 10]
    for v in range(6):
        n = int(mask[v].sum())
        assert torch.allclose(emb[v, 0], torch.full((T5_DIM,), 100.0 + v))
        assert not emb[v, n:].any()


def test_windows_and_resize(root):
    _write_t5(root)
    ds = MultiviewClipDataset(root, num_frames=5, height=16, width=32, window_stride=3)
    assert len(ds) == 2 * 3  # starts 0, 3, 6 of 12 frames
    item = ds[2]
    assert item["clip"] == "clip_0000" and item["start_frame"] == 6
    assert item["video"].shape == (3, 30, 16, 32) and item["video"].dtype == torch.uint8
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["video"].shape == (2, 3, 30, 16, 32) and batch["fps"].shape == (2,)


def test_missing_t5(root):
    with pytest.raises(DatasetError, match="t5/front/clip_0000.safetensors"):
        MultiviewClipDataset(root, num_frames=4, height=H, width=W)
    item = MultiviewClipDataset(root, num_frames=4, height=H, width=W, require_t5=False)[0]
    assert not item["t5_text_embeddings"].any() and not item["t5_text_mask"].any()


def test_missing_camera(root):
    gone = root / "videos" / "back_left" / "clip_0001.mp4"
    gone.unlink()
    with pytest.raises(DatasetError) as err:
        scan_clips(root, CAMERAS, 4)
    msg = str(err.value)
    assert str(gone) in msg and "clip_0001" in msg and "back_left" in msg and "fix" in msg and "\n" not in msg


def test_short_video(root):
    with pytest.raises(DatasetError) as err:
        scan_clips(root, CAMERAS, N_FRAMES + 1)
    msg = str(err.value)
    assert "videos/front/clip_0000.mp4" in msg and f"has {N_FRAMES} frames" in msg and f"={N_FRAMES + 1}" in msg


def test_corrupt_video(root):
    bad = root / "videos" / "right" / "clip_0000.mp4"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DatasetError, match=str(bad)):
        scan_clips(root, CAMERAS, 4)


def test_captions(root):
    empty = root / "captions" / "left" / "clip_0000.txt"
    empty.write_text("  \n")
    with pytest.raises(DatasetError, match=f"caption {empty} is empty"):
        scan_clips(root, CAMERAS, 4)
    # a shared caption is used where a camera has none; per-camera files win
    shutil.rmtree(root / "captions" / "left")
    (root / "captions" / "clip_0000.txt").write_text("shared 0\n")
    (root / "captions" / "clip_0001.txt").write_text("shared 1\n")
    clips = scan_clips(root, CAMERAS, 4)
    assert clips[0].captions["left"] == "shared 0" and clips[1].captions["left"] == "shared 1"
    assert clips[0].captions["front"].startswith("The video")
    (root / "captions" / "clip_0001.txt").unlink()
    with pytest.raises(DatasetError, match="clip_0001.*no caption for 'left'"):
        scan_clips(root, CAMERAS, 4)


def test_upstream_layout_with_pickles(root, tmp_path):
    view_map = {f"pinhole_{cam}": cam for cam in CAMERAS}
    up = tmp_path / "upstream"
    for key, cam in view_map.items():
        shutil.copytree(root / "videos" / cam, up / "videos" / key)
        (up / "t5_xxl" / key).mkdir(parents=True)
        for clip in ("clip_0000", "clip_0001"):
            arr = np.full((3 + CAMERAS.index(cam), T5_DIM), CAMERAS.index(cam), np.float16)
            with open(up / "t5_xxl" / key / f"{clip}.pkl", "wb") as f:
                pickle.dump([arr], f)
    with pytest.raises(DatasetError, match="allow_pickle=True"):
        MultiviewClipDataset(up, num_frames=4, height=H, width=W, view_map=view_map)
    ds = MultiviewClipDataset(up, num_frames=4, height=H, width=W, view_map=view_map, allow_pickle=True)
    item = ds[0]
    mask = item["t5_text_mask"].view(6, 512)
    assert mask.sum(1).tolist() == [3, 4, 5, 6, 7, 8]
    assert item["t5_text_embeddings"].view(6, 512, T5_DIM)[4, 0, 0] == 4.0
    with pytest.raises(DatasetError, match="maps no view key"):
        scan_clips(up, CAMERAS, 4, view_map={"pinhole_front": "front"})


def test_t5_file_round_trip(tmp_path):
    emb = torch.randn(7, T5_DIM)
    path = tmp_path / "t5" / "front" / "a.safetensors"
    save_t5_embedding(path, emb, "a prompt")
    assert torch.equal(load_t5_embedding(path), emb)
    with pytest.raises(ValueError):
        save_t5_embedding(path, torch.zeros(3, 7), "bad")


def test_mock_dataset():
    ds = MockDataset(num_items=4, num_frames=3, num_views=6, height=8, width=16, seed=0)
    assert len(ds) == 4
    item = ds[1]
    assert item["video"].shape == (3, 18, 8, 16) and item["video"].dtype == torch.uint8
    assert int(item["video"].max()) <= 254
    assert item["t5_text_embeddings"].shape == (3072, T5_DIM) and item["t5_text_embeddings"].dtype == torch.float32
    assert item["t5_text_mask"].shape == (512,) and item["t5_text_mask"].dtype == torch.int64  # upstream quirk
    assert bool(item["t5_text_mask"].all())
    assert item["fps"] == 24 and item["num_frames"] == 3
    assert item["image_size"].tolist() == [8, 16, 8, 16]
    assert item["padding_mask"].shape == (1, 8, 16) and not item["padding_mask"].any()
    assert item["video_name"]["video_path"] == "mock_video_path"
    assert torch.equal(ds[1]["video"], item["video"])
    assert torch.equal(ds[1]["t5_text_embeddings"], item["t5_text_embeddings"])
    assert not torch.equal(ds[2]["video"], item["video"])
    other = MockDataset(num_items=4, num_frames=3, num_views=6, height=8, width=16, seed=1)
    assert not torch.equal(other[1]["video"], item["video"])
    with pytest.raises(IndexError):
        ds[4]


def test_held_out_split():
    names = [f"clip_{i:03d}" for i in range(40)]
    split = HeldOutSplit(fraction=0.1, seed=0)
    train, held = split.split(names)
    assert len(held) == 4 and len(train) == 36
    assert set(train) | set(held) == set(names) and not set(train) & set(held)
    assert split.split(list(reversed(names))) == (train, held)
    assert HeldOutSplit(fraction=0.1, seed=1).split(names)[1] != held
    assert HeldOutSplit(fraction=0.01).split(names[:5])[1] != []  # at least one held out
    assert HeldOutSplit(fraction=0.0).split(names) == (names, [])
    assert HeldOutSplit(fraction=0.9).split(names[:2])[0] != []  # never all
