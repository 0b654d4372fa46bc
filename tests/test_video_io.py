"""Tests of mvdit.data.video_io: ffmpeg round trips, bad files, upstream pixel normalisation and multiview layouts."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mvdit.constants import CAMERAS
from mvdit.data.video_io import (
    VideoReadError,
    concat_views,
    contact_sheet,
    from_model_pixels,
    grid_frames,
    probe_video,
    read_image,
    read_video,
    resize_uint8,
    split_views,
    to_model_pixels,
    write_video,
)

REAL_CLIP = Path(__file__).parent / "data" / "video2world_multiview_input1.mp4"


def smooth_frames(t: int, h: int, w: int) -> np.ndarray:
    """Smooth moving colour gradients [T, H, W, 3]: compress well, so round trips stay within a few levels."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    frames = [np.stack([xx * 200 + 20 + 2 * i, yy * 180 + 30, (1 - xx) * 120 + 60 + i], -1) for i in range(t)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(48, 80), (21, 33), (30, 17)])
def test_write_read_round_trip(tmp_path, size):
    h, w = size
    frames = smooth_frames(10, h, w)
    path = tmp_path / "sub" / "clip.mp4"
    write_video(path, frames, fps=24)
    back, fps = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert fps == pytest.approx(24.0)
    assert np.abs(back.astype(int) - frames).mean() < 3.0
    info = probe_video(path)
    assert (info.n_frames, info.height, info.width) == (10, h, w)
    # atomic write: nothing but the final file is left in the folder
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.mp4"]


def test_read_window_and_fractional_fps(tmp_path):
    frames = smooth_frames(12, 16, 24)
    path = tmp_path / "a.mp4"
    write_video(path, frames, fps=12.5)
    full, fps = read_video(path)
    part, _ = read_video(path, start_frame=4, n_frames=5)
    assert fps == pytest.approx(12.5)
    assert np.array_equal(part, full[4:9])


def test_write_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "fix" in msg


def test_bad_files_raise_video_read_error(tmp_path):
    good = tmp_path / "good.mp4"
    write_video(good, smooth_frames(8, 32, 48), fps=24)
    data = good.read_bytes()
    cases = {
        "empty.mp4": b"",
        "garbage.mp4": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "truncated.mp4": data[: len(data) // 2],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(VideoReadError) as err:
            read_video(path)
        _assert_one_line_naming(err, path)
        with pytest.raises(VideoReadError) as err:
            probe_video(path)
        _assert_one_line_naming(err, path)
    assert issubclass(VideoReadError, ValueError)
    with pytest.raises(VideoReadError, match="no such file"):
        read_video(tmp_path / "missing.mp4")


def test_real_multiview_clip():
    frames, fps = read_video(REAL_CLIP)
    assert frames.shape == (54, 480, 848, 3)
    assert fps == pytest.approx(30.0)
    views = split_views(frames, len(CAMERAS))
    assert len(views) == 6 and all(v.shape == (9, 480, 848, 3) for v in views)
    assert np.array_equal(concat_views(views), frames)
    assert probe_video(REAL_CLIP).n_frames == 54
    with pytest.raises(ValueError, match="divisible"):
        split_views(frames[:53], 6)


def test_read_image(tmp_path):
    import matplotlib.image

    img = smooth_frames(1, 20, 30)[0]
    path = tmp_path / "img.png"
    matplotlib.image.imsave(path, img)
    back = read_image(path)
    assert back.shape == (20, 30, 3)
    assert np.abs(back.astype(int) - img).max() <= 1


def test_to_model_pixels_normalisation():
    frames = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    x = to_model_pixels(frames, 16, 16)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 0.9921875  # u8/128 - 1, not /127.5
    small = to_model_pixels(np.repeat(frames, 2, 0), 8, 12)
    assert small.shape == (3, 2, 8, 12)
    # bf16 falls back to a float32 resize on CPU; the values still follow the float32 path
    xb = to_model_pixels(np.repeat(frames, 2, 0), 8, 12, dtype=torch.bfloat16)
    assert xb.dtype == torch.bfloat16
    assert torch.allclose(xb.float(), small, atol=1e-2)


def test_from_model_pixels_truncates():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, 2 * 100.7 / 255 - 1]).reshape(1, 1, 1, 6).repeat(3, 1, 1, 1)
    u8 = from_model_pixels(x)
    assert u8.shape == (1, 1, 6, 3) and u8.dtype == np.uint8
    assert u8[0, 0, :, 0].tolist() == [0, 0, 127, 255, 255, 100]


def test_resize_uint8():
    frames = smooth_frames(3, 24, 40)
    out = resize_uint8(frames, 12, 20)
    assert out.shape == (3, 12, 20, 3) and out.dtype == np.uint8
    assert resize_uint8(frames, 24, 40) is frames
    assert abs(out.astype(float).mean() - frames.astype(float).mean()) < 2


def test_grid_layout_places_cameras():
    views = [np.full((2, 4, 5, 3), 10 * (v + 1), np.uint8) for v in range(6)]
    grid = grid_frames(views)
    assert grid.shape == (2, 8, 15, 3)
    expected = {
        (0, 0): "left",
        (0, 1): "front",
        (0, 2): "right",
        (1, 0): "back_left",
        (1, 1): "back",
        (1, 2): "back_right",
    }
    for (row, col), cam in expected.items():
        block = grid[:, row * 4 : (row + 1) * 4, col * 5 : (col + 1) * 5]
        assert np.all(block == 10 * (CAMERAS.index(cam) + 1)), cam


def test_contact_sheet(tmp_path):
    views = [smooth_frames(7, 24, 40) for _ in range(6)]
    path = tmp_path / "sheet.png"
    contact_sheet(path, views, n_frames=3, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_image(path).ndim == 3
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]


def test_an_ffmpeg_too_old_for_frame_exact_decoding_is_a_one_line_error(monkeypatch):
    from mvdit.data import video_io

    monkeypatch.setattr(video_io.imageio_ffmpeg, "get_ffmpeg_version", lambda: "4.2.2-static")
    video_io.ffmpeg_exe.cache_clear()
    try:
        with pytest.raises(video_io.VideoReadError, match=r"ffmpeg 4\.2\.2-static, older than 5\.1; fix: pip install"):
            video_io.ffmpeg_exe()
    finally:
        video_io.ffmpeg_exe.cache_clear()
    monkeypatch.undo()
    assert Path(video_io.ffmpeg_exe()).exists()
