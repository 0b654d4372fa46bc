"""Video tokenizer wrapper and its tiny stand-in: file formats, shapes, causality, chunking, views, round trip."""

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange

from mvdit.constants import SIGMA_DATA
from mvdit.encoders.tokenizer import TokenizerLoadError, VideoTokenizer
from mvdit.tiny.tokenizer import build_tiny_tokenizer, fit_tiny_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(out)
    return out


def _jit_load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))


def _smooth_video(n_frames: int, height: int = 64, width: int = 96, shift: float = 0.0) -> torch.Tensor:
    """[1, 3, T, H, W] in [-1, 1]: slowly drifting low-frequency colour waves."""
    t = torch.arange(n_frames, dtype=torch.float32)[:, None, None]
    y = torch.arange(height, dtype=torch.float32)[None, :, None] / height
    x = torch.arange(width, dtype=torch.float32)[None, None, :] / width
    r = 0.5 * torch.sin(2 * math.pi * (x + 0.01 * t + shift)) * torch.cos(2 * math.pi * (0.7 * y - 0.005 * t))
    g = 0.4 * torch.cos(2 * math.pi * (0.5 * x + 0.5 * y + 0.008 * t + shift))
    b = (0.3 * torch.sin(2 * math.pi * (1.2 * y + 0.006 * t)) - 0.1).expand(n_frames, height, width)
    return torch.stack([r, g, b])[None]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / ((a.float() - b.float()) ** 2).mean()))


def test_tiny_files_use_the_upstream_formats(tok_dir):
    assert {"encoder.jit", "decoder.jit", "mean_std.pt", "config.json"} <= {p.name for p in tok_dir.iterdir()}
    encoder, decoder = _jit_load(tok_dir / "encoder.jit"), _jit_load(tok_dir / "decoder.jit")
    assert isinstance(encoder, torch.jit.ScriptModule) and isinstance(decoder, torch.jit.ScriptModule)
    mean, std = torch.load(tok_dir / "mean_std.pt", weights_only=True)
    assert mean.shape == std.shape and mean.shape[:2] == (1, 16) and mean.shape[3:] == (1, 1)
    assert mean.shape[2] >= 8 and (std > 0).all()
    # Frame 0 (one pixel frame) and the pooled frames have their own statistics.
    assert not torch.equal(std[:, :, 0], std[:, :, 1])
    config = json.loads((tok_dir / "config.json").read_text())
    assert config["latent_channels"] == 16 and config["temporal_compression"] == 8


@pytest.mark.parametrize("k", [0, 1, 3])
def test_jit_shapes_for_1_plus_8k_frames(tok_dir, k):
    encoder, decoder = _jit_load(tok_dir / "encoder.jit"), _jit_load(tok_dir / "decoder.jit")
    out = encoder(torch.rand(2, 3, 1 + 8 * k, 16, 24) * 2 - 1)
    assert isinstance(out, tuple)
    assert out[0].shape == (2, 16, 1 + k, 2, 3)
    assert decoder(out[0]).shape == (2, 3, 1 + 8 * k, 16, 24)


def test_encoder_is_causal(tok_dir):
    encoder = _jit_load(tok_dir / "encoder.jit")
    video = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    later = video.clone()
    later[:, :, 9:] = torch.rand_like(later[:, :, 9:])
    z, z_later = encoder(video)[0], encoder(later)[0]
    assert torch.equal(z[:, :, :2], z_later[:, :, :2])
    assert not torch.allclose(z[:, :, 2], z_later[:, :, 2])
    after_first = video.clone()
    after_first[:, :, 1:] = 0
    assert torch.equal(encoder(after_first)[0][:, :, 0], z[:, :, 0])


def test_round_trip_psnr_on_a_smooth_video(tok_dir):
    tok = VideoTokenizer(tok_dir)
    video = _smooth_video(57)
    latent = tok.encode(video)
    assert latent.shape == (1, 16, 8, 8, 12)
    assert 0.2 < float(latent.std()) < 3.0  # roughly unit scale after normalisation
    assert _psnr(tok.decode(latent), video) > 30.0


def test_bf16_round_trip(tok_dir):
    tok = VideoTokenizer(tok_dir, dtype=torch.bfloat16, pixel_chunk_frames=17)
    video = _smooth_video(17)
    latent = tok.encode(video)
    recon = tok.decode(latent)
    assert latent.dtype == torch.bfloat16 and recon.dtype == torch.bfloat16
    assert _psnr(recon, video) > 30.0


def test_several_57_frame_chunks(tok_dir):
    tok = VideoTokenizer(tok_dir)
    video = torch.cat([_smooth_video(57, 16, 24), _smooth_video(57, 16, 24, shift=0.3)], dim=2)
    latent = tok.encode(torch.cat([video, -video]))
    assert latent.shape == (2, 16, 16, 2, 3)
    assert tok.decode(latent).shape == (2, 3, 114, 16, 24)


def test_chunks_are_encoded_independently_and_batching_does_not_matter(tok_dir):
    video = torch.rand(2, 3, 3 * 9, 16, 16) * 2 - 1
    small = VideoTokenizer(tok_dir, pixel_chunk_frames=9, max_encode_batch=1, max_decode_batch=1)
    large = VideoTokenizer(tok_dir, pixel_chunk_frames=9, max_encode_batch=8, max_decode_batch=8)
    z_small, z_large = small.encode(video), large.encode(video)
    # fp32 rounding only: a batch of 8 may take another GEMM blocking than a batch of 1 (latents reach |z| ~ 5)
    torch.testing.assert_close(z_small, z_large, rtol=1e-6, atol=1e-6)
    per_chunk = torch.cat([large.encode(video[:, :, i : i + 9]) for i in range(0, 27, 9)], dim=2)
    torch.testing.assert_close(z_large, per_chunk, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(small.decode(z_small), large.decode(z_small), rtol=1e-6, atol=1e-6)


def test_normalisation_uses_per_latent_frame_statistics(tok_dir, tmp_path):
    shutil.copytree(tok_dir, tmp_path, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 16, 10, 1, 1, generator=gen)
    std = torch.rand(1, 16, 10, 1, 1, generator=gen) + 0.5
    torch.save((mean, std), tmp_path / "mean_std.pt")
    tok = VideoTokenizer(tmp_path, pixel_chunk_frames=17)  # 3 latent frames -> first 3 of the 10 columns
    assert tok.mean.shape == (1, 16, 3, 1, 1)
    video = torch.rand(1, 3, 34, 16, 16) * 2 - 1
    raw = torch.cat([_jit_load(tmp_path / "encoder.jit")(video[:, :, i : i + 17])[0] for i in (0, 17)], dim=2)
    expected = (raw - mean[:, :, :3].repeat(1, 1, 2, 1, 1)) / std[:, :, :3].repeat(1, 1, 2, 1, 1)
    latent = tok.encode(video)
    torch.testing.assert_close(latent, expected)
    decoder = _jit_load(tmp_path / "decoder.jit")
    torch.testing.assert_close(tok.decode(latent), torch.cat([decoder(raw[:, :, :3]), decoder(raw[:, :, 3:])], 2))


def test_encode_views_encodes_each_view_alone_and_scales_by_sigma_data(tok_dir):
    tok = VideoTokenizer(tok_dir, pixel_chunk_frames=9)
    views = [_smooth_video(9, 16, 24, shift=0.1 * v) for v in range(3)]
    latent = tok.encode_views(torch.cat(views, dim=2), n_views=3)
    assert latent.shape == (1, 16, 6, 2, 3)
    expected = torch.cat([tok.encode(v) * SIGMA_DATA for v in views], dim=2)
    torch.testing.assert_close(latent, expected, rtol=0, atol=1e-5)  # fp32 rounding of other GEMM batchings
    decoded = tok.decode_views(latent, n_views=3)
    assert decoded.shape == (1, 3, 27, 16, 24)
    per_view = rearrange(latent, "b c (v t) h w -> v b c t h w", v=3)
    expected_video = torch.cat([tok.decode(z / SIGMA_DATA) for z in per_view], dim=2)
    torch.testing.assert_close(decoded, expected_video, rtol=0, atol=1e-6)


def test_shape_errors_are_clear(tok_dir):
    tok = VideoTokenizer(tok_dir, pixel_chunk_frames=9)
    with pytest.raises(ValueError, match="multiple of pixel_chunk_frames"):
        tok.encode(torch.zeros(1, 3, 10, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        tok.encode(torch.zeros(1, 3, 9, 12, 16))
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        tok.encode(torch.zeros(3, 9, 16, 16))
    with pytest.raises(ValueError, match="latent_chunk"):
        tok.decode(torch.zeros(1, 16, 3, 2, 2))
    with pytest.raises(ValueError, match="views"):
        tok.encode_views(torch.zeros(1, 3, 20, 16, 16), n_views=3)
    with pytest.raises(ValueError, match="1 \\+ 8k"):
        VideoTokenizer(tok_dir, pixel_chunk_frames=56)


def test_offload_and_back(tok_dir):
    tok = VideoTokenizer(tok_dir, pixel_chunk_frames=9)
    video = _smooth_video(9, 16, 16)
    before = tok.encode(video)
    tok.offload()
    assert tok.device.type == "cpu" and tok.mean.device.type == "cpu"
    torch.testing.assert_close(tok.to("cpu").encode(video), before)


def _write_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a torch archive\n")


def _missing(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _not_a_pair(path: Path) -> None:
    torch.save({"mean": torch.zeros(16, 8)}, path)


def _too_few_frames(path: Path) -> None:
    torch.save((torch.zeros(1, 16, 4, 1, 1), torch.ones(1, 16, 4, 1, 1)), path)


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("encoder.jit", _missing),
        ("decoder.jit", _write_garbage),
        ("encoder.jit", _truncate),
        ("mean_std.pt", _missing),
        ("mean_std.pt", _truncate),
        ("mean_std.pt", _not_a_pair),
        ("mean_std.pt", _too_few_frames),
    ],
)
def test_bad_files_raise_a_one_line_load_error_naming_the_file(tok_dir, tmp_path, name, damage):
    shutil.copytree(tok_dir, tmp_path, dirs_exist_ok=True)
    damage(tmp_path / name)
    with pytest.raises(TokenizerLoadError) as err:
        VideoTokenizer(tmp_path)
    message = str(err.value)
    assert str(tmp_path / name) in message and "\n" not in message
    assert "download" in message


def test_on_moves_an_offloaded_tokenizer_for_a_block_of_work_and_back(tok_dir, monkeypatch):
    tok = VideoTokenizer(tok_dir)
    moves = []
    monkeypatch.setattr(tok, "to", lambda d: moves.append(str(d)) or tok)
    with tok.on("cuda:3", offload=True):
        assert moves == ["cuda:3"]
    assert moves == ["cuda:3", "cpu"]  # offload() returns it to the CPU
    with pytest.raises(RuntimeError), tok.on("cuda:3", offload=True):
        raise RuntimeError("a failed decode still offloads")
    assert moves[-1] == "cpu"
    moves.clear()
    with tok.on("cuda:3", offload=False):
        pass
    assert moves == []  # kept where it is


def _demo_clips(n: int) -> torch.Tensor:
    """[n*6, 3, 17, 64, 96] in [-1, 1]: held-out-like clips of the demo (its size, fps and data seed, not the fit's)."""
    from mvdit.data.synthetic import clip_seed, render_clip

    clips = [render_clip(clip_seed(0, 20 + i), 17, 64, 96, 6, fps=10.0, supersample=2) for i in range(n)]
    return torch.from_numpy(np.concatenate(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def test_round_trip_of_demo_clips_is_at_least_30_db(tok_dir):
    tok = VideoTokenizer(tok_dir, pixel_chunk_frames=17)
    video = _demo_clips(2)
    recon = tok.decode(tok.encode(video)).clamp(-1, 1)
    assert _psnr(recon, video) >= 30.0
    assert _psnr(recon[:, :, 1:], video[:, :, 1:]) >= 30.0  # the frames the demo predicts, alone


def test_decoder_is_causal(tok_dir):
    decoder = _jit_load(tok_dir / "decoder.jit")
    z = torch.randn(1, 16, 3, 2, 3)
    later = z.clone()
    later[:, :, 2] = torch.randn(1, 16, 2, 3)
    out, out_later = decoder(z), decoder(later)
    assert torch.equal(out[:, :, :9], out_later[:, :, :9])  # pixel frames 0..8 come from latent frames 0 and 1
    assert not torch.allclose(out[:, :, 9:], out_later[:, :, 9:])


def test_fit_is_deterministic_whatever_the_thread_count():
    cached = fit_tiny_tokenizer(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3 if threads != 3 else 2)  # other processes build the assets with other counts
    try:
        fresh = fit_tiny_tokenizer.__wrapped__(0)  # bypass the in-process cache: render and fit again
    finally:
        torch.set_num_threads(threads)
    assert fresh.keys() == cached.keys() and all(torch.equal(fresh[k], cached[k]) for k in fresh)
