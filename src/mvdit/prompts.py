"""Prompt sets for multiview inference: a readable YAML per set (six camera prompts, the conditioning input and
sampling settings), or upstream's JSONL batch format. Everything is validated before any model loads.

YAML (paths relative to the project root, which they may not leave unless written as absolute paths):

    input: assets/video2world_multiview_input1.mp4   # one mp4, six views back to back (upstream's format), or
    # input: {front: a.mp4, left: b.mp4, ...}         # one file per camera (video or image)
    num_input_frames: 1          # 1 or 9: the last N frames of each view condition the generation
    seed: 1
    guidance: 7.0
    steps: 35
    prompts: {front: "...", left: "...", right: "...", back: "...", back_left: "...", back_right: "..."}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mvdit.constants import CAMERAS

# upstream's JSONL keys per camera (video2world_multiview.py)
JSONL_KEYS = {
    "front": "prompt",
    "left": "prompt_left",
    "right": "prompt_right",
    "back": "prompt_back",
    "back_left": "prompt_back_left",
    "back_right": "prompt_back_right",
}
SET_KEYS = {"input", "num_input_frames", "seed", "guidance", "steps", "prompts", "description", "fps"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class PromptSetError(ValueError):
    """An unusable prompt set; one line naming the file and the fix."""


@dataclass
class PromptSet:
    name: str
    source: Path
    prompts: dict[str, str]
    input: Path | dict[str, Path]
    num_input_frames: int = 1
    overrides: dict = field(default_factory=dict)  # seed, guidance, steps, fps


def resolve_path(value: str, root: Path, source: Path) -> Path:
    """A relative path must stay inside the project root; absolute paths are the user's own choice."""
    p = Path(value)
    if p.is_absolute():
        return p
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise PromptSetError(f"{source}: path {value!r} leaves the project directory; use an absolute path if intended")
    return full


def _check_prompts(prompts: dict, cameras: list[str], source: Path) -> dict[str, str]:
    if not isinstance(prompts, dict):
        raise PromptSetError(f"{source}: 'prompts' must map camera names to text")
    unknown = sorted(set(prompts) - set(CAMERAS))
    if unknown:
        raise PromptSetError(f"{source}: unknown camera {unknown[0]!r} in prompts (cameras: {', '.join(CAMERAS)})")
    for cam in cameras:
        text = prompts.get(cam)
        if not isinstance(text, str) or not text.strip():
            raise PromptSetError(f"{source}: missing or empty prompt for camera {cam!r}; add prompts.{cam}")
    return {cam: prompts[cam] for cam in cameras}


def load_prompt_sets(path: Path, cameras: list[str], root: Path) -> list[PromptSet]:
    """One YAML set, or every line of an upstream JSONL file (named <file stem>_<line index>)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PromptSetError(f"{path}: cannot read the prompt set ({e.strerror})") from e
    if path.suffix == ".jsonl":
        sets = []
        for i, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptSetError(f"{path}: line {i + 1} is not JSON ({e.msg})") from e
            prompts = {cam: rec.get(key) for cam, key in JSONL_KEYS.items() if rec.get(key) is not None}
            if "visual_input" not in rec:
                raise PromptSetError(f"{path}: line {i + 1} has no visual_input")
            sets.append(
                PromptSet(
                    f"{path.stem}_{i}",
                    path,
                    _check_prompts(prompts, cameras, path),
                    resolve_path(rec["visual_input"], root, path),
                    int(rec.get("num_input_frames", 1)),
                )
            )
        return sets
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PromptSetError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(d, dict):
        raise PromptSetError(f"{path}: a prompt set must be a YAML mapping")
    unknown = sorted(set(d) - SET_KEYS)
    if unknown:
        raise PromptSetError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(SET_KEYS))})")
    if "input" not in d:
        raise PromptSetError(f"{path}: no 'input' (the conditioning video or per-camera files)")
    inp = d["input"]
    if isinstance(inp, dict):
        bad = sorted(set(inp) - set(CAMERAS))
        if bad:
            raise PromptSetError(f"{path}: unknown camera {bad[0]!r} in input")
        missing = [c for c in cameras if c not in inp]
        if missing:
            raise PromptSetError(f"{path}: input has no file for camera {missing[0]!r}; add input.{missing[0]}")
        inp = {c: resolve_path(inp[c], root, path) for c in cameras}
    else:
        inp = resolve_path(str(inp), root, path)
    n = d.get("num_input_frames", 1)
    if n not in (1, 9):
        raise PromptSetError(f"{path}: num_input_frames must be 1 or 9, got {n!r}")
    overrides = {k: d[k] for k in ("seed", "guidance", "steps", "fps") if k in d}
    return [PromptSet(path.stem, path, _check_prompts(d.get("prompts"), cameras, path), inp, n, overrides)]


def _frame_count(p: Path, source: Path) -> int:
    from mvdit.video_io import probe_video  # here: video_io imports torch, which the Snakefile's parse need not load

    if not p.exists():
        raise PromptSetError(f"{source}: input file {p} does not exist")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return 1
    try:
        return probe_video(p).n_frames
    except ValueError as e:
        raise PromptSetError(f"{source}: {e}") from e


def check_input(ps: PromptSet, cameras: list[str]) -> None:
    """Fail before loading any model if the input is unreadable or too short for num_input_frames."""
    n = ps.num_input_frames
    if isinstance(ps.input, dict):
        for cam, p in ps.input.items():
            k = _frame_count(p, ps.source)
            if k < n:
                raise PromptSetError(f"{ps.source}: {p} has {k} frames, fewer than num_input_frames={n} ({cam})")
        return
    k = _frame_count(ps.input, ps.source)
    v = len(CAMERAS)
    if k % v:
        raise PromptSetError(
            f"{ps.source}: {ps.input} has {k} frames, not a multiple of {v} (upstream's format: the {v} views "
            "back to back in time); or give one file per camera"
        )
    if k // v < n:
        raise PromptSetError(f"{ps.source}: {ps.input} has {k // v} frames per view, fewer than num_input_frames={n}")


def read_condition_frames(ps: PromptSet, cameras: list[str]) -> list[np.ndarray]:
    """The last num_input_frames frames of each camera: list of uint8 [N, H, W, 3] in `cameras` order."""
    from mvdit.video_io import read_video, split_views  # here, as in _frame_count

    n = ps.num_input_frames
    if isinstance(ps.input, dict):
        views = {}
        for cam, p in ps.input.items():
            frames, _ = read_video(p)
            views[cam] = frames
    else:
        frames, _ = read_video(ps.input)
        views = dict(zip(CAMERAS, split_views(frames, len(CAMERAS)), strict=True))
    return [views[c][-n:] for c in cameras]
