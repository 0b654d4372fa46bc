"""Multiview training data: on-disk clip layouts, validation, and datasets that yield upstream's batch items.

Layout for users' rigs (every camera of CAMERAS, the same clip names in every folder):

    <root>/videos/<camera>/<clip>.mp4            one video per camera per clip
    <root>/captions/<clip>.txt                   one caption for all cameras, or
    <root>/captions/<camera>/<clip>.txt          a caption per camera (wins over the shared one)
    <root>/t5/<camera>/<clip>.safetensors        T5-11B embedding: key "emb" [L, 1024] (L <= 512 real tokens),
                                                 metadata {"prompt": ...}; written by the T5 rule from the captions

Upstream's later layout (PR #23) is read when `view_map` maps its view keys to camera names:

    <root>/videos/<view_key>/<clip>.mp4  and  <root>/t5_xxl/<view_key>/<clip>.pkl (pickled [np.float16 [L, 1024]])

Pickles can run code, so they are only loaded with allow_pickle=True. Items follow training.md §1.2/§1.3: video
uint8 [3, V*T, H, W] view-major (frame v*T + t), T5 [V*512, 1024] in camera order.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from mvdit.constants import CAMERAS, T5_DIM, T5_MAX_LENGTH
from mvdit.data.video_io import VideoReadError, probe_video, read_video, resize_uint8

DEFAULT_FPS = 24.0  # upstream's fallback when a video reports no frame rate


class DatasetError(ValueError):
    """A dataset clip is missing a file, too short, or has an empty caption (message: one line with the fix)."""


@dataclass(frozen=True)
class ClipInfo:
    """One validated clip: per-camera files, captions and the usable frame count (the shortest camera's)."""

    name: str
    videos: dict[str, Path]
    captions: dict[str, str]  # empty when captions were not required and are absent
    t5: dict[str, Path]  # only the cameras whose embedding file exists
    n_frames: int
    fps: float
    height: int
    width: int


def _folders(cameras: Sequence[str], view_map: Mapping[str, str] | None) -> dict[str, str]:
    """camera -> folder name: the camera itself, or the upstream view key that view_map maps onto it."""
    if view_map is None:
        return {c: c for c in cameras}
    inverse = {cam: key for key, cam in view_map.items()}
    missing = [c for c in cameras if c not in inverse]
    if missing:
        raise DatasetError(f"view_map {dict(view_map)} maps no view key to camera(s) {missing}; fix: add them")
    return {c: inverse[c] for c in cameras}


def t5_path(root: Path, folder: str, clip: str, upstream: bool) -> Path:
    """Where a clip's embedding for one camera lives (upstream: .pkl, or .pickle when only that exists)."""
    if not upstream:
        return root / "t5" / folder / f"{clip}.safetensors"
    pkl = root / "t5_xxl" / folder / f"{clip}.pkl"
    alt = pkl.with_suffix(".pickle")
    return alt if not pkl.exists() and alt.exists() else pkl


def read_caption(root: str | os.PathLike, folder: str, clip: str) -> tuple[Path, str | None]:
    """(path, text) of a clip's caption for one camera folder; per-camera file wins; text None when absent."""
    root = Path(root)
    for path in (root / "captions" / folder / f"{clip}.txt", root / "captions" / f"{clip}.txt"):
        if path.is_file():
            return path, path.read_text(encoding="utf-8").strip()
    return root / "captions" / folder / f"{clip}.txt", None


def scan_clips(
    root: str | os.PathLike,
    cameras: Sequence[str] = CAMERAS,
    num_frames: int = 57,
    *,
    view_map: Mapping[str, str] | None = None,
    require_captions: bool = True,
    require_t5: bool = False,
    skipped: list[tuple[str, str]] | None = None,
) -> list[ClipInfo]:
    """Find and validate every clip under `root` (layouts: module docstring) -> ClipInfo list sorted by name.

    Raises DatasetError (one line naming the file and the fix) for a missing camera video, views of different
    lengths, a video shorter than num_frames or unreadable, a missing or empty caption (if required), a missing
    embedding (if required). With `skipped` (a list), bad clips are left out and (clip, reason) appended instead.
    """
    root = Path(root)
    folders = _folders(cameras, view_map)
    upstream = view_map is not None
    names: set[str] = set()
    for cam in cameras:
        d = root / "videos" / folders[cam]
        if not d.is_dir():
            raise DatasetError(f"camera folder {d} does not exist; fix: put each camera's clips in videos/<camera>/")
        names |= {p.stem for p in d.glob("*.mp4")}
    if not names:
        raise DatasetError(f"no clips (*.mp4) under {root / 'videos'}; fix: write videos/<camera>/<clip>.mp4 files")

    def probe(path: Path):
        try:
            return probe_video(path)
        except VideoReadError as e:
            return e

    videos = {n: {c: root / "videos" / folders[c] / f"{n}.mp4" for c in cameras} for n in sorted(names)}
    # ffmpeg runs in subprocesses, so threads overlap the probes.
    paths = [p for per_cam in videos.values() for p in per_cam.values() if p.is_file()]
    with ThreadPoolExecutor(max_workers=8) as pool:
        infos = dict(zip(paths, pool.map(probe, paths), strict=True))

    def check(n: str, per_cam: dict[str, Path]) -> ClipInfo:
        for cam, path in per_cam.items():
            if not path.is_file():
                raise DatasetError(
                    f"clip {n!r} lacks camera {cam!r}: {path} is missing; fix: add it or remove the clip's "
                    f"other camera files"
                )
        for path in per_cam.values():
            info = infos[path]
            if isinstance(info, VideoReadError):
                raise DatasetError(str(info))
            if info.n_frames < num_frames:
                raise DatasetError(
                    f"{path} has {info.n_frames} frames but num_frames={num_frames} are required; "
                    f"fix: drop the clip or lower num_frames"
                )
        lengths = {cam: infos[p].n_frames for cam, p in per_cam.items()}
        if len(set(lengths.values())) > 1:
            raise DatasetError(
                f"clip {n!r}: its views differ in length ({lengths}); fix: trim every camera of "
                f"{root / 'videos'}/*/{n}.mp4 to the same frames"
            )
        captions = {}
        for cam in cameras:
            cpath, text = read_caption(root, folders[cam], n)
            if text is None and require_captions:
                raise DatasetError(
                    f"clip {n!r} has no caption for {cam!r}: neither {cpath} nor {root / 'captions' / (n + '.txt')} "
                    f"exists; fix: write one"
                )
            if text == "" and require_captions:
                raise DatasetError(f"caption {cpath} is empty; fix: write a description of the clip into it")
            if text:
                captions[cam] = text
        t5 = {}
        for cam in cameras:
            tpath = t5_path(root, folders[cam], n, upstream)
            if tpath.is_file():
                t5[cam] = tpath
            elif require_t5:
                raise DatasetError(
                    f"clip {n!r} lacks the text embedding {tpath}; fix: run the T5 embedding rule on the captions"
                )
        first = infos[per_cam[cameras[0]]]
        return ClipInfo(
            name=n,
            videos=dict(per_cam),
            captions=captions,
            t5=t5,
            n_frames=min(lengths.values()),
            fps=first.fps if first.fps > 0 else DEFAULT_FPS,
            height=first.height,
            width=first.width,
        )

    clips = []
    for n, per_cam in videos.items():
        try:
            clips.append(check(n, per_cam))
        except DatasetError as e:
            if skipped is None:
                raise
            skipped.append((n, str(e)))
    return clips


def save_t5_embedding(path: str | os.PathLike, emb: torch.Tensor | np.ndarray, prompt: str) -> None:
    """Write one prompt's embedding [L, 1024] (real tokens only) as safetensors key "emb", atomically."""
    path = Path(path)
    t = torch.as_tensor(emb).contiguous()
    if t.ndim != 2 or t.shape[1] != T5_DIM:
        raise ValueError(f"save_t5_embedding {path}: expected [L, {T5_DIM}], got {tuple(t.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive the rename.
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.safetensors"
    try:
        save_file({"emb": t}, tmp, metadata={"prompt": prompt})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_t5_embedding(path: str | os.PathLike, allow_pickle: bool = False) -> torch.Tensor:
    """Read an embedding file (.safetensors key "emb", or upstream's pickle) -> float32 [L, 1024]."""
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        if not allow_pickle:
            raise DatasetError(
                f"refusing to unpickle {path} (pickles can run code); fix: pass allow_pickle=True if you trust "
                f"the file, or convert it to t5/<camera>/<clip>.safetensors"
            )
        with open(path, "rb") as f:
            obj = pickle.load(f)
        # upstream's get_t5_embeddings.py stores a list holding one np.float16 [L, 1024] array
        arr = obj[0] if isinstance(obj, list | tuple) else obj
        emb = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    else:
        try:
            with safe_open(path, framework="pt") as f:
                # "embedding": the text encoder's prompt cache files hold the same rows under this key
                key = "emb" if "emb" in f.keys() else "embedding"
                emb = f.get_tensor(key).float()
        except Exception as e:  # safetensors raises several types for bad files
            raise DatasetError(f"cannot read embedding {path} ({e}); fix: regenerate it with the T5 rule") from None
    if emb.ndim != 2 or emb.shape[1] != T5_DIM:
        raise DatasetError(f"embedding {path} has shape {tuple(emb.shape)}, not [L, {T5_DIM}]; fix: regenerate it")
    return emb


def pad_text(emb: torch.Tensor | None, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, 1024] -> (float32 [text_len, 1024] zero-padded or truncated, int64 mask [text_len], 1 = real token)."""
    out = torch.zeros(text_len, T5_DIM)
    mask = torch.zeros(text_len, dtype=torch.int64)
    if emb is not None:
        n = min(len(emb), text_len)
        out[:n] = emb[:n]
        mask[:n] = 1
    return out, mask


class MultiviewClipDataset(Dataset):
    """Real multiview clips as upstream batch items (training.md §1.2/§1.3), one per window of num_frames.

    item: video uint8 [3, V*T, H, W] (frame v*T + t), t5_text_embeddings float32 [V*text_len, 1024],
    t5_text_mask int64 [V*text_len], fps float, padding_mask float32 [1, H, W], image_size int64 [H, W, H, W],
    num_frames int (T per view), clip str, start_frame int, video_name dict (as upstream's mock).
    Windows: frames [0, T) of each clip, or every start in steps of window_stride when it is given.
    require_t5=False gives zero embeddings with a zero mask where an embedding file is absent (smoke tests).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cameras: Sequence[str] = CAMERAS,
        num_frames: int = 57,
        height: int = 480,
        width: int = 848,
        text_len: int = T5_MAX_LENGTH,
        *,
        window_stride: int | None = None,
        clips: Sequence[str] | None = None,
        view_map: Mapping[str, str] | None = None,
        require_t5: bool = True,
        allow_pickle: bool = False,
    ) -> None:
        self.root = Path(root)
        self.cameras = tuple(cameras)
        self.num_frames, self.height, self.width, self.text_len = num_frames, height, width, text_len
        self.allow_pickle = allow_pickle
        # Upstream's layout has T5 pickles instead of captions, so captions are only required for ours.
        found = scan_clips(
            root, cameras, num_frames, view_map=view_map, require_captions=view_map is None, require_t5=require_t5
        )
        if clips is not None:
            by_name = {c.name: c for c in found}
            unknown = sorted(set(clips) - set(by_name))
            if unknown:
                raise DatasetError(f"clips {unknown[:5]} are not under {self.root / 'videos'}; fix: check the names")
            found = [by_name[n] for n in clips]
        if not allow_pickle:  # fail at construction, not in a DataLoader worker many steps later
            for clip in found:
                for path in clip.t5.values():
                    if path.suffix in (".pkl", ".pickle"):
                        load_t5_embedding(path, allow_pickle=False)  # raises the one-line DatasetError
        self.clips: list[ClipInfo] = found
        self.windows: list[tuple[int, int]] = []
        for i, clip in enumerate(found):
            last = clip.n_frames - num_frames
            starts = [0] if window_stride is None else range(0, last + 1, window_stride)
            self.windows += [(i, s) for s in starts]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        ci, start = self.windows[index]
        clip = self.clips[ci]
        views = []
        for cam in self.cameras:
            frames, _ = read_video(clip.videos[cam], start, self.num_frames)
            if len(frames) != self.num_frames:  # probe and decode disagree: a damaged file
                raise DatasetError(
                    f"{clip.videos[cam]} decoded {len(frames)} frames from {start}, expected {self.num_frames}; "
                    f"fix: re-encode the video"
                )
            views.append(resize_uint8(frames, self.height, self.width))
        video = torch.from_numpy(np.concatenate(views, 0)).permute(3, 0, 1, 2).contiguous()  # [3, V*T, H, W]
        embs, masks = [], []
        for cam in self.cameras:
            path = clip.t5.get(cam)
            emb = None if path is None else load_t5_embedding(path, self.allow_pickle)
            e, m = pad_text(emb, self.text_len)
            embs.append(e)
            masks.append(m)
        h, w = self.height, self.width
        return {
            "video": video,
            "t5_text_embeddings": torch.cat(embs),
            "t5_text_mask": torch.cat(masks),
            "fps": float(clip.fps),
            "padding_mask": torch.zeros(1, h, w),
            "image_size": torch.tensor([h, w, h, w], dtype=torch.int64),
            "num_frames": self.num_frames,
            "clip": clip.name,
            "start_frame": start,
            "video_name": {
                "video_path": str(clip.videos[self.cameras[0]]),
                "t5_embedding_path": str(clip.t5.get(self.cameras[0], "")),
                "start_frame_id": str(start),
            },
        }


class MockDataset(Dataset):
    """Upstream's MockDataset (dataset_multiview.py:68-87), deterministic per (seed, index).

    item: video uint8 [3, V*T, H, W] uniform in [0, 254]; t5_text_embeddings randn [V*text_len, 1024];
    t5_text_mask ones [text_len] (upstream quirk: one view long, unused); fps 24; image_size; num_frames; padding_mask.
    """

    def __init__(
        self,
        num_items: int = 10000,
        num_frames: int = 57,
        num_views: int = 6,
        height: int = 704,
        width: int = 1280,
        text_len: int = T5_MAX_LENGTH,
        seed: int = 0,
    ) -> None:
        self.num_items, self.num_frames, self.num_views = num_items, num_frames, num_views
        self.height, self.width, self.text_len, self.seed = height, width, text_len, seed

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
        v, t, h, w = self.num_views, self.num_frames, self.height, self.width
        return {
            "video": torch.randint(0, 255, (3, v * t, h, w), dtype=torch.uint8, generator=g),
            "video_name": {
                "video_path": "mock_video_path",
                "t5_embedding_path": "mock_t5_embedding_path",
                "start_frame_id": "0",
            },
            "t5_text_embeddings": torch.randn(v * self.text_len, T5_DIM, generator=g),
            "t5_text_mask": torch.ones(self.text_len, dtype=torch.int64),
            "fps": 24,
            "image_size": torch.tensor([h, w, h, w], dtype=torch.int64),
            "num_frames": t,
            "padding_mask": torch.zeros(1, h, w),
        }


@dataclass(frozen=True)
class HeldOutSplit:
    """Deterministic train / held-out split of clip names: order by a seeded hash, hold out the first n.

    A clip's rank depends only on its name and the seed, so adding clips never moves old ones between the sides
    except at the boundary. At least `min_held_out` clips are held out (when fraction > 0), never all of them.
    """

    fraction: float = 0.1
    seed: int = 0
    min_held_out: int = 1

    def split(self, names: Sequence[str]) -> tuple[list[str], list[str]]:
        """names -> (train, held_out), each sorted."""
        names = sorted(set(names))
        if self.fraction <= 0 or len(names) < 2:
            return names, []
        n_held = min(len(names) - 1, max(self.min_held_out, round(self.fraction * len(names))))
        ranked = sorted(names, key=lambda n: hashlib.sha256(f"{self.seed}:{n}".encode()).hexdigest())
        held = set(ranked[:n_held])
        return [n for n in names if n not in held], [n for n in names if n in held]
