"""Video and image I/O through ffmpeg, upstream's pixel normalisation, and the multiview file layouts.

Frames are uint8 numpy arrays [T, H, W, 3] (RGB); model pixels are float tensors [3, T, H, W] in [-1, 1).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F

from mvdit.constants import CAMERAS

# Grid position -> view index: top row left | front | right, bottom row back_left | back | back_right (WGP:755-776).
GRID_ORDER: tuple[int, ...] = (1, 0, 2, 4, 3, 5)

_FIX_HINT = "re-export it as an H.264 mp4 (ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4) or replace the file"


class VideoReadError(ValueError):
    """A video or image file is missing, empty, corrupt or holds no frames (message: one line)."""


@dataclass(frozen=True)
class VideoInfo:
    """Stream facts read without decoding: frame count, size and frame rate."""

    n_frames: int
    height: int
    width: int
    fps: float


MIN_FFMPEG = (5, 1)  # -fps_mode (frame-exact decoding) appeared in ffmpeg 5.1; imageio-ffmpeg < 0.6 bundles 4.2


@functools.cache
def ffmpeg_exe() -> str:
    """The bundled ffmpeg binary (there is no system ffmpeg on the target machines), checked to be new enough."""
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    version = imageio_ffmpeg.get_ffmpeg_version()
    m = re.match(r"n?(\d+)\.(\d+)", version)
    if m and (int(m.group(1)), int(m.group(2))) < MIN_FFMPEG:
        raise VideoReadError(
            f"{exe} is ffmpeg {version}, older than {'.'.join(map(str, MIN_FFMPEG))}; "
            "fix: pip install 'imageio-ffmpeg>=0.6' (or point IMAGEIO_FFMPEG_EXE at a newer ffmpeg)"
        )
    return exe


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise VideoReadError(f"cannot read {path}: no such file; fix: check the path")
    if path.stat().st_size == 0:
        raise VideoReadError(f"cannot read {path}: the file is empty; fix: {_FIX_HINT}")


_GENERIC = re.compile(r"^(error opening (input|output) files?|conversion failed)", re.I)


def _last_error_line(stderr: bytes) -> str:
    """ffmpeg's telling error lines, without "[ctx @ 0x..]" prefixes, joined onto one line for the message."""
    lines = [re.sub(r"^\[[^]]*\]\s*", "", ln.strip()) for ln in stderr.decode(errors="replace").splitlines()]
    bad = [
        ln for ln in lines if re.search(r"error|invalid|not found|no such|failed|corrupt|does not contain", ln, re.I)
    ]
    bad = [ln for ln in dict.fromkeys(bad) if ln and not _GENERIC.match(ln)]
    return "; ".join(bad[:3])[:300] or "ffmpeg failed"


# ", 848x480," or ", 848x480 [SAR" in a stream line; the lookahead skips codec tags such as "0x31637661)".
_SIZE_RE = re.compile(r", (\d+)x(\d+)(?=[\s,\[]|$)")
_FPS_RE = re.compile(r"([\d.]+)(k?) (fps|tbr)")


def _parse_stream(stderr: str, section: str) -> tuple[int, int, float]:
    """(width, height, fps) of the first video stream listed under `section` ("Input #0" or "Output #0")."""
    start = stderr.find(section)
    for line in stderr[start:].splitlines():
        if "Stream #" in line and "Video:" in line:
            size = _SIZE_RE.search(line)
            if size is None:
                break
            fps = 0.0
            for m in _FPS_RE.finditer(line):  # "fps" comes before "tbr"; either gives the nominal rate
                fps = float(m.group(1)) * (1000.0 if m.group(2) else 1.0)
                break
            return int(size.group(1)), int(size.group(2)), fps
    raise ValueError("no video stream")


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, size and fps of a video by stream-copying it (fast: no decoding). The frames are counted as the
    packets listed by the framecrc muxer, one line each: ffmpeg's own "frame=" statistics are not printed for stream
    copies by every version (7.0 omits them)."""
    path = Path(path)
    _check_file(path)
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path), "-map", "0:v:0", "-c", "copy"]
    proc = subprocess.run([*cmd, "-f", "framecrc", "-"], capture_output=True)
    err = proc.stderr.decode(errors="replace")
    n_frames = sum(1 for ln in proc.stdout.decode(errors="replace").splitlines() if ln and not ln.startswith("#"))
    try:
        width, height, fps = _parse_stream(err, "Input #0")
    except ValueError:
        raise VideoReadError(f"cannot read video {path}: {_last_error_line(proc.stderr)}; fix: {_FIX_HINT}") from None
    if proc.returncode != 0 or n_frames == 0:
        raise VideoReadError(f"cannot read video {path}: {_last_error_line(proc.stderr)} (no frames); fix: {_FIX_HINT}")
    return VideoInfo(n_frames=n_frames, height=height, width=width, fps=fps)


def _decode(path: Path, start_frame: int = 0, n_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode frames [start_frame, start_frame + n_frames) as RGB24 -> (uint8 [T, H, W, 3], fps)."""
    _check_file(path)
    stream = ffmpeg.input(str(path))
    if start_frame > 0 or n_frames is not None:
        end = None if n_frames is None else start_frame + n_frames
        stream = stream.trim(start_frame=start_frame, **({} if end is None else {"end_frame": end}))
        stream = stream.setpts("PTS-STARTPTS")
    # passthrough: one output frame per decoded frame, never duplicated or dropped to hit a constant rate.
    out = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough")
    out = out.global_args("-nostdin", "-hide_banner")
    try:
        data, err_bytes = out.run(cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as e:
        raise VideoReadError(f"cannot read video {path}: {_last_error_line(e.stderr)}; fix: {_FIX_HINT}") from None
    try:
        width, height, fps = _parse_stream(err_bytes.decode(errors="replace"), "Output #0")
    except ValueError:
        raise VideoReadError(f"cannot read video {path}: {_last_error_line(err_bytes)}; fix: {_FIX_HINT}") from None
    frame_bytes = width * height * 3
    count = len(data) // frame_bytes
    if count == 0:
        raise VideoReadError(f"cannot read video {path}: it decodes to no frames; fix: {_FIX_HINT}")
    frames = np.frombuffer(data, np.uint8, count * frame_bytes).reshape(count, height, width, 3)
    return frames.copy(), fps  # copy: frombuffer views are read-only


def read_video(path: str | os.PathLike, start_frame: int = 0, n_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video -> (uint8 [T, H, W, 3] RGB, fps); optionally only frames [start_frame, start_frame + n_frames).

    Raises VideoReadError (one line naming the file and the fix) for missing, empty, corrupt or frameless files.
    """
    return _decode(Path(path), start_frame, n_frames)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a png/jpg (or a video's first frame) -> uint8 [H, W, 3] RGB."""
    frames, _ = _decode(Path(path), 0, 1)
    return frames[0]


def _atomic_target(path: Path, suffix: str) -> Path:
    """A fresh temporary name next to `path`, so that os.replace onto `path` is atomic.

    Not mkstemp: its 0600 mode would survive the rename; the writer creates the file with the normal umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}"


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 24.0, crf: int = 16) -> None:
    """Write uint8 [T, H, W, 3] RGB frames as an H.264 mp4, atomically (temporary file + os.replace).

    Even sizes use yuv420p (plays everywhere); odd sizes use yuv444p, whose chroma needs no even size, so the
    decoded size always equals the input size (upstream writes with macro_block_size=1: no padding either).
    """
    path = Path(path)
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_video {path}: expected uint8 [T,H,W,3] with T>0, got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    tmp = _atomic_target(path, ".mp4")
    try:
        stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        stream = stream.output(
            str(tmp), format="mp4", vcodec="libx264", pix_fmt=pix_fmt, crf=crf, preset="medium", r=fps
        )
        stream.global_args("-nostdin", "-hide_banner").overwrite_output().run(
            cmd=ffmpeg_exe(), input=frames.tobytes(), capture_stdout=True, capture_stderr=True
        )
        os.replace(tmp, path)
    except ffmpeg.Error as e:
        raise RuntimeError(f"cannot write video {path}: {_last_error_line(e.stderr)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def to_model_pixels(
    frames: np.ndarray | torch.Tensor, height: int, width: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 [T, H0, W0, 3] -> [3, T, height, width] in [-1, 0.9921875] as upstream's input path (IU:606-618).

    x = u8/128 - 1 (not /127.5), then bicubic antialiased resize straight to (height, width): no crop, no aspect
    preservation. Upstream resizes in bf16 on the GPU; CPU torch has no bf16 antialiased bicubic, so there the
    resize runs in float32 and the result is cast to `dtype`.
    """
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"to_model_pixels: expected uint8 [T,H,W,3], got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 128.0 - 1.0  # TCHW, exact in bf16 too
    x = x.to(dtype)
    if tuple(x.shape[-2:]) != (height, width):
        work = dtype if (x.device.type != "cpu" or dtype in (torch.float32, torch.float64)) else torch.float32
        x = F.interpolate(x.to(work), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        x = x.to(dtype)
    return x.permute(1, 0, 2, 3).contiguous()


def from_model_pixels(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] as upstream: ((1+x).clamp(0,2)/2*255) then a truncating cast.

    The arithmetic runs in the input's dtype: pass bf16 to reproduce upstream bit for bit (network-sampling §4.5).
    """
    v = ((1 + video).clamp(0, 2) / 2 * 255).to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def resize_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H0, W0, 3] -> uint8 [T, height, width, 3]: bicubic antialiased in float, rounded and clamped back."""
    if frames.shape[1:3] == (height, width):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def split_views(frames: np.ndarray, n_views: int = len(CAMERAS)) -> list[np.ndarray]:
    """[V*K, ...] (views back to back in time, view-major) -> V arrays [K, ...]."""
    if len(frames) % n_views != 0:
        raise ValueError(f"split_views: {len(frames)} frames are not divisible into {n_views} views")
    k = len(frames) // n_views
    return [frames[v * k : (v + 1) * k] for v in range(n_views)]


def concat_views(views: Sequence[np.ndarray]) -> np.ndarray:
    """V arrays [K, ...] -> [V*K, ...]: upstream's flat multiview mp4 layout."""
    if len({len(v) for v in views}) != 1:
        raise ValueError(f"concat_views: views differ in length: {[len(v) for v in views]}")
    return np.concatenate(list(views), axis=0)


def grid_frames(views: Sequence[np.ndarray]) -> np.ndarray:
    """Six views [T, H, W, 3] in CAMERAS order -> [T, 2H, 3W, 3].

    Top row left | front | right, bottom row back_left | back | back_right (upstream's order [1, 0, 2, 4, 3, 5]).
    """
    if len(views) != len(GRID_ORDER):
        raise ValueError(f"grid_frames: expected {len(GRID_ORDER)} views, got {len(views)}")
    if len({v.shape for v in views}) != 1:
        raise ValueError(f"grid_frames: views differ in shape: {[v.shape for v in views]}")
    top = np.concatenate([views[i] for i in GRID_ORDER[:3]], axis=2)
    bottom = np.concatenate([views[i] for i in GRID_ORDER[3:]], axis=2)
    return np.concatenate([top, bottom], axis=1)


def contact_sheet(
    path: str | os.PathLike,
    views: Sequence[np.ndarray],
    n_frames: int = 4,
    names: Sequence[str] = CAMERAS,
    title: str | None = None,
) -> None:
    """PNG with one row per camera and `n_frames` evenly spaced frames per row, labelled; written atomically.

    views: V arrays uint8 [T, H, W, 3] in `names` order.
    """
    # Figure + Agg canvas directly: no pyplot, so no global backend state and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    n_views = len(views)
    n_t = len(views[0])
    idx = np.unique(np.linspace(0, n_t - 1, min(n_frames, n_t)).round().astype(int))
    h, w = views[0].shape[1:3]
    panel_w = 2.2
    fig = Figure(figsize=(panel_w * len(idx) + 0.8, panel_w * h / w * n_views + 0.6 + (0.3 if title else 0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_views, len(idx), squeeze=False)
    for v in range(n_views):
        for j, t in enumerate(idx):
            ax = axes[v, j]
            ax.imshow(views[v][t], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if v == 0:
                ax.set_title(f"frame {t}", fontsize=8)
            if j == 0:
                ax.set_ylabel(names[v] if v < len(names) else f"view {v}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = _atomic_target(path, ".png")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
