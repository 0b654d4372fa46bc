"""Causal video tokenizer wrapper: mirrors upstream `VideoJITTokenizer` (Cosmos-Tokenize1-CV8x8x8 TorchScript files,
per-channel and per-latent-frame mean/std, chunked encode/decode) and the multiview encode/decode of MV2W.
The tiny stand-in written in these formats is in mvdit.tiny.tokenizer.
"""

import contextlib
import warnings
from pathlib import Path

import torch
from einops import rearrange

from mvdit.constants import (
    LATENT_CHANNELS,
    SIGMA_DATA,
    SPATIAL_COMPRESSION,
    TEMPORAL_COMPRESSION,
    TOKENIZER_REPO,
    latent_frames,
)

_FIX = f"re-download it with `python src/download.py --source hf --repo {TOKENIZER_REPO}` (or --source tiny)"


class TokenizerLoadError(RuntimeError):
    """A tokenizer file is missing or unreadable; the message is one line naming the file and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Wrapper around the JIT files (real or tiny).


def _load_jit(path: Path, device: torch.device | str, dtype: torch.dtype) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise TokenizerLoadError(f"tokenizer file {path} is missing; {_FIX}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError, ValueError or zipfile errors for bad archives
        raise TokenizerLoadError(
            f"tokenizer file {path} is not a loadable TorchScript archive ({type(exc).__name__}); {_FIX}"
        ) from exc
    return module.eval().to(dtype)


def _load_mean_std(path: Path, latent_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read (mean, std) and keep the first `latent_chunk` latent-frame columns -> two [1, 16, latent_chunk, 1, 1]."""
    if not path.is_file():
        raise TokenizerLoadError(f"tokenizer file {path} is missing; {_FIX}")
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TokenizerLoadError(f"tokenizer file {path} is unreadable ({type(exc).__name__}); {_FIX}") from exc
    ok = (
        isinstance(stats, (tuple, list))
        and len(stats) == 2
        and all(isinstance(s, torch.Tensor) and s.numel() % LATENT_CHANNELS == 0 for s in stats)
    )
    if not ok:
        raise TokenizerLoadError(f"tokenizer file {path} does not hold a (mean, std) pair of tensors; {_FIX}")
    mean, std = (s.float().reshape(LATENT_CHANNELS, -1) for s in stats)
    if mean.shape != std.shape or mean.shape[1] < latent_chunk:
        raise TokenizerLoadError(
            f"tokenizer file {path} has mean/std of shapes {list(mean.shape)}/{list(std.shape)}, fewer than the "
            f"{latent_chunk} latent frames a chunk needs; {_FIX}"
        )
    return tuple(s[:, :latent_chunk].reshape(1, LATENT_CHANNELS, latent_chunk, 1, 1) for s in (mean, std))


class VideoTokenizer:
    """Chunked encode/decode with per-channel, per-latent-frame normalisation (upstream `VideoJITTokenizer`)."""

    def __init__(
        self,
        tokenizer_dir: Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pixel_chunk_frames: int = 57,
        max_encode_batch: int = 8,
        max_decode_batch: int = 4,
    ) -> None:
        if pixel_chunk_frames < 1 or (pixel_chunk_frames - 1) % TEMPORAL_COMPRESSION != 0:
            raise ValueError(f"pixel_chunk_frames must be 1 + 8k, got {pixel_chunk_frames}")
        if max_encode_batch < 1 or max_decode_batch < 1:
            raise ValueError("max_encode_batch and max_decode_batch must be >= 1")
        tokenizer_dir = Path(tokenizer_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.pixel_chunk_frames = pixel_chunk_frames
        self.latent_chunk = latent_frames(pixel_chunk_frames)
        self.max_encode_batch = max_encode_batch
        self.max_decode_batch = max_decode_batch
        self.encoder = _load_jit(tokenizer_dir / "encoder.jit", self.device, dtype)
        self.decoder = _load_jit(tokenizer_dir / "decoder.jit", self.device, dtype)
        mean, std = _load_mean_std(tokenizer_dir / "mean_std.pt", self.latent_chunk)
        self.mean = mean.to(self.device, dtype)  # [1, 16, latent_chunk, 1, 1]
        self.std = std.to(self.device, dtype)

    def to(self, device: torch.device | str) -> "VideoTokenizer":
        """Move the JIT modules and statistics to `device` (e.g. back from an offload)."""
        self.device = torch.device(device)
        self.encoder.to(self.device)
        self.decoder.to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def offload(self) -> "VideoTokenizer":
        """Move everything to CPU and release cached GPU memory (upstream --offload_tokenizer)."""
        was_cuda = self.device.type == "cuda"
        self.to("cpu")
        if was_cuda:
            torch.cuda.empty_cache()
        return self

    @contextlib.contextmanager
    def on(self, device: torch.device | str, offload: bool):
        """The tokenizer on `device` for a block of work, back on the CPU afterwards when `offload`."""
        if offload:
            self.to(device)
        try:
            yield self
        finally:
            if offload:
                self.offload()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Pixel video [B, 3, n*P, H, W] in [-1, 1] -> normalised latent [B, 16, n*t, H/8, W/8].

        P = pixel_chunk_frames. Each chunk of P frames is encoded on its own (t = (P-1)/8 + 1 latent frames),
        at most max_encode_batch chunks per call, and normalised with the per-latent-frame statistics.
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video [B, 3, T, H, W], got shape {list(video.shape)}")
        b, _, t, h, w = video.shape
        if t % self.pixel_chunk_frames != 0:
            raise ValueError(f"frame count {t} is not a multiple of pixel_chunk_frames={self.pixel_chunk_frames}")
        if h % SPATIAL_COMPRESSION or w % SPATIAL_COMPRESSION:
            raise ValueError(f"height and width must be divisible by {SPATIAL_COMPRESSION}, got {h}x{w}")
        chunks = rearrange(
            video.to(self.device, self.dtype), "b c (n t) h w -> (b n) c t h w", t=self.pixel_chunk_frames
        )
        latents = []
        for batch in chunks.split(self.max_encode_batch):
            out = self.encoder(batch)
            latents.append(out[0] if isinstance(out, (tuple, list)) else out)  # upstream keeps element 0 of a tuple
        z = (torch.cat(latents) - self.mean) / self.std
        return rearrange(z, "(b n) c t h w -> b c (n t) h w", b=b)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, 16, n*t, h, w] -> pixel video [B, 3, n*P, 8h, 8w] (inverse of `encode`)."""
        if latent.dim() != 5 or latent.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"expected a latent [B, {LATENT_CHANNELS}, T, H, W], got shape {list(latent.shape)}")
        b, _, t, _, _ = latent.shape
        if t % self.latent_chunk != 0:
            raise ValueError(f"latent frame count {t} is not a multiple of latent_chunk={self.latent_chunk}")
        z = rearrange(latent.to(self.device, self.dtype), "b c (n t) h w -> (b n) c t h w", t=self.latent_chunk)
        z = z * self.std + self.mean
        video = torch.cat([self.decoder(batch) for batch in z.split(self.max_decode_batch)])
        return rearrange(video, "(b n) c t h w -> b c (n t) h w", b=b)

    def encode_views(self, video: torch.Tensor, n_views: int) -> torch.Tensor:
        """View-major video [B, 3, V*T, H, W] -> net latent [B, 16, V*t, H/8, W/8]; each view alone, x sigma_data."""
        if video.dim() != 5 or video.shape[2] % n_views != 0:
            raise ValueError(f"frame axis of shape {list(video.shape)} does not split into {n_views} views")
        per_view = rearrange(video, "b c (v t) h w -> (b v) c t h w", v=n_views)
        z = self.encode(per_view) * SIGMA_DATA
        return rearrange(z, "(b v) c t h w -> b c (v t) h w", v=n_views)

    def decode_views(self, latent: torch.Tensor, n_views: int) -> torch.Tensor:
        """Network latent [B, 16, V*t, h, w] -> view-major video [B, 3, V*T, 8h, 8w]; divides by sigma_data first."""
        if latent.dim() != 5 or latent.shape[2] % n_views != 0:
            raise ValueError(f"frame axis of shape {list(latent.shape)} does not split into {n_views} views")
        per_view = rearrange(latent, "b c (v t) h w -> (b v) c t h w", v=n_views)
        video = self.decode(per_view / SIGMA_DATA)
        return rearrange(video, "(b v) c t h w -> b c (v t) h w", v=n_views)
