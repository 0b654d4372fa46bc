"""The data rule on users' clips: T5 embeddings once per caption, bad clips reported or skipped, camera subsets
under their own folder names (5-camera rigs), and the manifest the training reads."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from mvdit.data.manifest import dataset_from_manifest
from mvdit.data.synthetic import make_synthetic_dataset
from mvdit.data.video_io import read_video, write_video
from mvdit.tiny.text_encoder import build_tiny_t5

from .helpers import ROOT


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    build_tiny_t5(d / "t5")
    make_synthetic_dataset(d / "clips", 4, 9, 32, 48, seed=1)
    return d


def prepare(assets, tmp_path, data: dict):
    root = tmp_path / "data_root"
    if not root.exists():
        shutil.copytree(assets / "clips", root)
    exp = {
        "name": "p",
        "data": {
            "source": "real",
            "root": str(root),
            "num_frames": 9,
            "height": 32,
            "width": 48,
            "text_len": 16,
            "held_out": 1,
        }
        | data,
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    cmd = [
        sys.executable,
        ROOT / "src/prepare_data.py",
        "--experiment",
        tmp_path / "exp.yaml",
        "--out-dir",
        tmp_path / "out",
        "--t5-dir",
        assets / "t5",
        "--cache-dir",
        tmp_path / "cache",
        "--device",
        "cpu",
    ]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    return r, root


def test_real_clips_get_embeddings_once_and_a_manifest(assets, tmp_path):
    r, root = prepare(assets, tmp_path, {})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert len(m["train"]) == 3 and len(m["held_out"]) == 1 and m["skipped"] == []
    assert len(list((root / "t5").rglob("*.safetensors"))) == 4 * 6
    item = dataset_from_manifest(tmp_path / "out/manifest.json")[0]
    assert item["video"].shape == (3, 6 * 9, 32, 48) and item["t5_text_embeddings"].shape == (6 * 16, 1024)
    r, _ = prepare(assets, tmp_path, {})  # second run: nothing to encode
    assert "0 new T5 embeddings" in r.stderr


def test_bad_clips_stop_the_rule_or_are_skipped_and_reported(assets, tmp_path):
    root = tmp_path / "data_root"
    shutil.copytree(assets / "clips", root)
    (root / "videos/left/clip_0001.mp4").unlink()  # a missing camera
    frames, fps = read_video(root / "videos/back/clip_0002.mp4")
    write_video(root / "videos/back/clip_0002.mp4", frames[:8], fps)  # too short, and a different length
    r, _ = prepare(assets, tmp_path, {})
    assert r.returncode == 1
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("prepare_data.py: ")][0]
    assert "clip_0001" in line and "videos/left/clip_0001.mp4" in line
    r, _ = prepare(assets, tmp_path, {"skip_bad_clips": True, "held_out": 0})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert {s["clip"] for s in m["skipped"]} == {"clip_0001", "clip_0002"}
    assert sorted(m["train"] + m["held_out"]) == ["clip_0000", "clip_0003"]


def test_views_of_different_lengths_are_named(assets, tmp_path):
    root = tmp_path / "data_root"
    shutil.copytree(assets / "clips", root)
    frames, fps = read_video(root / "videos/front/clip_0000.mp4")
    write_video(root / "videos/front/clip_0000.mp4", frames[: len(frames)] if len(frames) > 9 else frames, fps)
    extra = [*frames, *frames[:2]]
    import numpy as np

    write_video(root / "videos/right/clip_0000.mp4", np.stack(extra), fps)
    r, _ = prepare(assets, tmp_path, {})
    assert r.returncode == 1 and "views differ in length" in r.stderr


def test_five_camera_rig_with_its_own_folder_names(assets, tmp_path):
    root = tmp_path / "data_root"
    shutil.copytree(assets / "clips", root)
    names = {
        "front": "pinhole_front",
        "left": "pinhole_side_left",
        "right": "pinhole_side_right",
        "back_left": "pinhole_back_left",
        "back_right": "pinhole_back_right",
    }
    for cam, folder in names.items():
        (root / "videos" / cam).rename(root / "videos" / folder)
        (root / "captions" / cam).rename(root / "captions" / folder)
    shutil.rmtree(root / "videos/back")
    cams = list(names)
    view_map = {folder: cam for cam, folder in names.items()}
    r, _ = prepare(assets, tmp_path, {"cameras": cams, "view_map": view_map})
    assert r.returncode == 1 and "t5" in r.stderr  # upstream's layout needs its own embeddings (t5_xxl pickles)
    for folder in names.values():  # give them: write upstream-format pickles
        (root / "t5_xxl" / folder).mkdir(parents=True)
        for clip in ("clip_0000", "clip_0001", "clip_0002", "clip_0003"):
            import pickle

            import numpy as np

            with open(root / "t5_xxl" / folder / f"{clip}.pkl", "wb") as f:
                pickle.dump([np.ones((5, 1024), dtype=np.float16)], f)
    r, _ = prepare(assets, tmp_path, {"cameras": cams, "view_map": view_map, "allow_pickle": True})
    assert r.returncode == 0, r.stderr[-2000:]
    ds = dataset_from_manifest(tmp_path / "out/manifest.json")
    item = ds[0]
    assert item["video"].shape == (3, 5 * 9, 32, 48) and item["t5_text_embeddings"].shape == (5 * 16, 1024)
    (tmp_path / "out/manifest.json").write_text(
        (tmp_path / "out/manifest.json").read_text().replace('"allow_pickle": true', '"allow_pickle": false')
    )
    with pytest.raises(Exception, match="refusing to unpickle"):
        dataset_from_manifest(tmp_path / "out/manifest.json")[0]
