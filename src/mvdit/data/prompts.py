"""Prompt sets for multiview inference: a readable YAML per set (camera prompts, the conditioning input and sampling
settings), or upstream's JSONL batch format, from prompts/ or anywhere the experiment lists. Everything is validated
before any model loads; nothing here imports torch (the Snakefile resolves the sets while it parses).

YAML (input paths relative to the repository, which they may not leave unless written as absolute paths):

    input: assets/video2world_multiview_input1.mp4   # one mp4, six views back to back (upstream's format), or
    # input: {front: a.mp4, left: b.mp4, ...}         # one file per camera (video or image)
    num_input_frames: 1          # 1 or 9: the last N frames of each view condition the generation
    seed: 1                      # these five (and fps) default to the experiment's infer values
    guidance: 7.0
    steps: 35
    prompts: {front: "...", left: "...", right: "...", back: "...", back_left: "...", back_right: "..."}

A side camera without a prompt gets upstream's default prompt for it (its command-line defaults); the front prompt is
required. Upstream's JSONL: one set per line, named <file stem>_<line index>; `visual_input` resolves against the
experiment's infer.visual_root (default: the repository, where upstream's assets/diffusion/... layout exists).
"""

from __future__ import annotations

import glob
import json
import os
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
# upstream's argument defaults for the side cameras (cosmos_predict1/diffusion/inference/video2world_multiview.py),
# verbatim: the left one ends with a space there too. Upstream applies them on its command line; its batch mode stops
# with a KeyError on a line without them, where we fill them in the same way.
UPSTREAM_SIDE_PROMPTS = {
    "left": "The video is captured from a camera mounted on a car. The camera is facing to the left. ",
    "right": "The video is captured from a camera mounted on a car. The camera is facing to the right.",
    "back": "The video is captured from a camera mounted on a car. The camera is facing backwards.",
    "back_left": "The video is captured from a camera mounted on a car. The camera is facing the rear left side.",
    "back_right": "The video is captured from a camera mounted on a car. The camera is facing the rear right side.",
}
# a set's sampling settings; what a set does not say comes from the experiment (infer.<key>), else from these, the
# experiment schema's own defaults (a test keeps the two equal)
DEFAULT_SETTINGS = {"num_input_frames": 1, "seed": 1, "guidance": 7.0, "steps": 35, "fps": 24}
SET_KEYS = {"input", "prompts", "description", *DEFAULT_SETTINGS}
JSONL_SET_KEYS = {"visual_input", *JSONL_KEYS.values(), *DEFAULT_SETTINGS}
SET_SUFFIXES = (".yaml", ".yml", ".jsonl")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class PromptSetError(ValueError):
    """An unusable prompt set; one line naming the file and the fix."""


@dataclass
class PromptSet:
    name: str
    source: Path
    prompts: dict[str, str]  # camera -> text, in the order of the cameras asked for
    input: Path | dict[str, Path]
    settings: dict = field(default_factory=lambda: dict(DEFAULT_SETTINGS))  # num_input_frames, seed, guidance, ...
    default_prompt_cameras: list[str] = field(default_factory=list)  # cameras given upstream's default prompt

    @property
    def num_input_frames(self) -> int:
        return self.settings["num_input_frames"]


def resolve_path(value: str, root: Path, source: str | Path) -> Path:
    """`value` under `root`: a relative path may not climb out of it (symlinks inside it are the user's choice);
    absolute paths are the user's own choice too."""
    p = Path(value)
    if p.is_absolute():
        return p
    top = Path(os.path.normpath(Path(root).absolute()))
    full = Path(os.path.normpath(top / p))
    if not full.is_relative_to(top):
        raise PromptSetError(f"{source}: path {value!r} leaves {top}; use an absolute path if intended")
    return full


def _prompts(given: dict, cameras: list[str], source: str | Path, key: str) -> tuple[dict[str, str], list[str]]:
    """Every camera's prompt: the front one must be given; a side camera without one gets upstream's default."""
    unknown = sorted(set(given) - set(CAMERAS))
    if unknown:
        raise PromptSetError(f"{source}: unknown camera {unknown[0]!r} in {key} (cameras: {', '.join(CAMERAS)})")
    prompts, defaulted = {}, []
    for cam in cameras:
        text = given.get(cam)
        if text is None and cam in UPSTREAM_SIDE_PROMPTS:
            text = UPSTREAM_SIDE_PROMPTS[cam]
            defaulted.append(cam)
        if not isinstance(text, str) or not text.strip():
            where = f"{key}.{cam}" if key == "prompts" else JSONL_KEYS[cam]
            raise PromptSetError(f"{source}: missing or empty prompt for camera {cam!r}; give {where}")
        prompts[cam] = text
    return prompts, defaulted


def _settings(given: dict, defaults: dict | None, source: str | Path) -> dict:
    """The set's own values over the experiment's, over DEFAULT_SETTINGS; each checked."""
    if defaults is not None and set(defaults) - set(DEFAULT_SETTINGS):
        raise ValueError(f"unknown prompt-set defaults {sorted(set(defaults) - set(DEFAULT_SETTINGS))}")
    s = DEFAULT_SETTINGS | (defaults or {}) | {k: given[k] for k in DEFAULT_SETTINGS if k in given}
    if s["num_input_frames"] not in (1, 9) or isinstance(s["num_input_frames"], bool):
        raise PromptSetError(f"{source}: num_input_frames must be 1 or 9, got {s['num_input_frames']!r}")
    for k, kind in (("seed", int), ("steps", int), ("guidance", (int, float)), ("fps", (int, float))):
        if not isinstance(s[k], kind) or isinstance(s[k], bool):
            raise PromptSetError(f"{source}: {k} must be {'an integer' if kind is int else 'a number'}, got {s[k]!r}")
    for k, ok, rule in (
        ("steps", s["steps"] >= 1, ">= 1"),
        ("fps", s["fps"] > 0, "> 0"),
        ("guidance", s["guidance"] >= 0, ">= 0"),
    ):
        if not ok:
            raise PromptSetError(f"{source}: {k} must be {rule}, got {s[k]!r}")
    return s


def _jsonl_sets(path: Path, text: str, cameras: list[str], defaults: dict | None, visual_root: Path) -> list:
    sets = []
    for i, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
        where = f"{path}: line {i + 1}"  # errors name the file and the line
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{where} is not JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise PromptSetError(f"{where} is not a JSON object")
        unknown = sorted(set(rec) - JSONL_SET_KEYS)
        if unknown:
            raise PromptSetError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(JSONL_SET_KEYS))})")
        if not isinstance(rec.get("visual_input"), str):
            raise PromptSetError(f"{where}: no visual_input (the conditioning video, six views back to back)")
        given = {cam: rec[key] for cam, key in JSONL_KEYS.items() if key in rec}
        prompts, defaulted = _prompts(given, cameras, where, "jsonl")
        inp = resolve_path(rec["visual_input"], visual_root, where)
        sets.append(
            PromptSet(f"{path.stem}_{i}", path, prompts, inp, _settings(rec, defaults, where), defaulted),
        )
    return sets


def load_prompt_sets(
    path: Path,
    cameras: list[str],
    root: Path,
    defaults: dict | None = None,
    visual_root: Path | None = None,
) -> list[PromptSet]:
    """One YAML set, or every line of an upstream JSONL file (named <file stem>_<line index>).

    `root`: the repository (YAML `input` paths resolve there); `defaults`: the experiment's num_input_frames, seed,
    guidance, steps and fps, for what a set does not say; `visual_root`: where JSONL `visual_input` paths resolve
    (default: `root`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PromptSetError(f"{path}: cannot read the prompt set ({e.strerror})") from e
    if path.suffix == ".jsonl":
        return _jsonl_sets(path, text, cameras, defaults, Path(visual_root or root))
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
    given = d.get("prompts")
    if not isinstance(given, dict):
        raise PromptSetError(f"{path}: 'prompts' must map camera names to text (at least prompts.front)")
    prompts, defaulted = _prompts(given, cameras, path, "prompts")
    return [PromptSet(path.stem, path, prompts, inp, _settings(d, defaults, path), defaulted)]


def _in_prompts_dir(prompts: Path) -> list[Path]:
    """The sets every experiment runs unless it lists its own: prompts/*.yaml, then prompts/*.jsonl."""
    return sorted(prompts.glob("*.yaml")) + sorted(prompts.glob("*.jsonl"))


def _is_glob(entry: str) -> bool:
    return any(c in entry for c in "*?[")


def _files_of(entry: str, base: Path, where: str) -> list[tuple[Path, str | None]]:
    """(file, set name or None for all of its sets) for one infer.prompt_sets entry: a set name in prompts/, a path or
    glob under `base`, or an absolute path or glob."""
    prompts = base / "prompts"
    if "/" not in entry and not _is_glob(entry) and not entry.endswith(SET_SUFFIXES):
        found = [(f, None) for f in (prompts / f"{entry}.yaml", prompts / f"{entry}.jsonl") if f.is_file()]
        stem, _, line = entry.rpartition("_")
        if not found and line.isdigit() and (prompts / f"{stem}.jsonl").is_file():
            found = [(prompts / f"{stem}.jsonl", entry)]  # <stem>_<i>: one line of a JSONL in prompts/
        if not found:
            have = [f.stem + ("[_<i>]" if f.suffix == ".jsonl" else "") for f in _in_prompts_dir(prompts)]
            raise PromptSetError(
                f"{where}: no prompt set named {entry!r} in {prompts} (have: {', '.join(have) or 'none'}); "
                "name one of those, or give a file path or glob"
            )
        return found
    absolute = Path(entry).is_absolute()
    top = Path(os.path.normpath(base.absolute()))
    if not absolute and not Path(os.path.normpath(top / entry)).is_relative_to(top):
        raise PromptSetError(f"{where}: {entry!r} leaves the repository {base}; write it as an absolute path")
    pattern = entry if absolute else str(base / entry)
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    files = [(p, None) for p in matches if p.is_file() and p.suffix in SET_SUFFIXES]
    if not files:
        what = "matches nothing" if not matches else f"matches no {'/'.join(SET_SUFFIXES)} file"
        rel = "" if absolute else f" (relative to {base})"
        if not absolute and (prompts / entry).is_file():
            rel += f"; for {prompts / entry} write prompts/{entry} or the set name {Path(entry).stem}"
        raise PromptSetError(f"{where}: {entry!r} {what}{rel}; fix the path or glob, or remove the entry")
    return files


def resolve_prompt_sets(
    entries: list[str] | None,
    base: Path,
    cameras: list[str],
    visual_root: Path | None = None,
    source: str = "<experiment>",
) -> dict[str, tuple[Path, int]]:
    """{set name: (file, index in that file)} for the experiment's infer.prompt_sets, in the order listed.

    `entries` None: every *.yaml and *.jsonl in `base`/prompts. Each entry is a set name in prompts/ (a file stem, or
    <stem>_<i> for one line of a JSONL there), a file or glob relative to `base` (the repository), or an absolute
    path or glob. Every set is loaded (and so validated) here; `source` is the experiment file errors name."""
    base = Path(base)
    key = f"{source}: infer.prompt_sets"
    if entries is None:
        picks = [(None, f, None) for f in _in_prompts_dir(base / "prompts")]
    else:
        picks = [(e, *pick) for e in entries for pick in _files_of(e, base, f"{key}: entry {e!r}")]
    sets: dict[str, tuple[Path, int]] = {}
    loaded: dict[Path, list[PromptSet]] = {}
    for entry, f, name in picks:
        where = key if entry is None else f"{key}: entry {entry!r}"
        f = f.resolve()
        if f not in loaded:
            loaded[f] = load_prompt_sets(f, cameras, base, visual_root=visual_root)
        chosen = [(i, ps) for i, ps in enumerate(loaded[f]) if name is None or ps.name == name]
        if not chosen:
            raise PromptSetError(
                f"{where}: {f} has {len(loaded[f])} sets ({loaded[f][0].name} to "
                f"{loaded[f][-1].name}); name one of those, or the file's stem for all"
            )
        for i, ps in chosen:
            if ps.name in sets and sets[ps.name] != (f, i):
                raise PromptSetError(
                    f"{where}: two prompt sets are named {ps.name!r}: {sets[ps.name][0]} and {f}; "
                    "rename one of the files (a set is named after its file)"
                )
            sets[ps.name] = (f, i)
    return sets


def _frame_count(p: Path, source: Path) -> int:
    from mvdit.data.video_io import (
        probe_video,  # here: video_io imports torch, which the Snakefile's parse need not load
    )

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
    from mvdit.data.video_io import read_video, split_views  # here, as in _frame_count

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
