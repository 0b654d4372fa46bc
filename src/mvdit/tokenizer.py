"""Causal video tokenizer wrapper: mirrors upstream `VideoJITTokenizer` (Cosmos-Tokenize1-CV8x8x8 TorchScript files,
per-channel and per-latent-frame mean/std, chunked encode/decode) and the multiview encode/decode of MV2W.
`build_tiny_tokenizer` writes a small fixed-basis stand-in in the same file formats for tests and dry runs.
"""

import contextlib
import json
import math
import warnings
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from mvdit.constants import LATENT_CHANNELS, SIGMA_DATA, SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION, TOKENIZER_REPO

_FIX = f"re-download it with `python src/download.py --source hf --repo {TOKENIZER_REPO}` (or --source tiny)"


class TokenizerLoadError(RuntimeError):
    """A tokenizer file is missing or unreadable; the message is one line naming the file and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Tiny stand-in: block-DCT projection of each 8x8x3 patch onto 16 low-frequency vectors, causal temporal pooling.

# Orthonormal colour transform (rows): luma and two opponent chroma axes.
_COLOUR = torch.tensor(
    [
        [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
        [1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)],
        [1 / math.sqrt(6), -2 / math.sqrt(6), 1 / math.sqrt(6)],
    ],
    dtype=torch.float64,
)
# (colour axis, vertical freq, horizontal freq) of the 16 latent channels: luma carries most detail, so it gets
# 10 coefficients (zig-zag order), each chroma axis 3.
_TINY_CHANNELS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 2, 0), (0, 1, 1), (0, 0, 2), (0, 0, 3), (0, 1, 2), (0, 2, 1), (0, 3, 0),
    (1, 0, 0), (1, 0, 1), (1, 1, 0),
    (2, 0, 0), (2, 0, 1), (2, 1, 0),
)  # fmt: skip
_TINY_STATS_FRAMES = 16  # latent-frame statistics stored; enough for pixel chunks up to 121 frames

# Image model behind the tiny mean/std: each colour channel has mean -0.1 and std 0.5 in [-1,1] units, the three
# channels correlate at 0.9, pixels correlate spatially as rho^|d| and consecutive frames as rho_t^|d|.
_PIXEL_MEAN, _PIXEL_STD, _COLOUR_CORR, _RHO, _RHO_T = -0.1, 0.5, 0.9, 0.95, 0.9


def _dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix [n, n]; row u is the u-th cosine basis vector."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def tiny_basis() -> torch.Tensor:
    """The 16 orthonormal patch vectors of the tiny tokenizer, [16, 3, 8, 8] float64 (rows of a 16x192 matrix)."""
    dct = _dct_matrix(SPATIAL_COMPRESSION)
    vecs = [_COLOUR[c][:, None, None] * dct[u][None, :, None] * dct[v][None, None, :] for c, u, v in _TINY_CHANNELS]
    return torch.stack(vecs)


def _tiny_mean_std(n_frames: int = _TINY_STATS_FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean/std [1, 16, n_frames, 1, 1] implied by the image model above (so normalised latents are ~unit).

    Frame 0 holds one pixel frame; frames >= 1 average 8 correlated frames, so their std is smaller.
    """
    dct = _dct_matrix(SPATIAL_COMPRESSION)
    idx = torch.arange(SPATIAL_COMPRESSION, dtype=torch.float64)
    spatial_cov = _RHO ** (idx[:, None] - idx[None, :]).abs()
    freq_var = torch.einsum("ui,ij,uj->u", dct, spatial_cov, dct)  # variance gain of each 1-D frequency
    colour_cov = _PIXEL_STD**2 * (_COLOUR_CORR + (1 - _COLOUR_CORR) * torch.eye(3, dtype=torch.float64))
    colour_var = torch.einsum("ci,ij,cj->c", _COLOUR, colour_cov, _COLOUR)
    std = torch.stack([(colour_var[c] * freq_var[u] * freq_var[v]).sqrt() for c, u, v in _TINY_CHANNELS])
    tidx = torch.arange(TEMPORAL_COMPRESSION, dtype=torch.float64)
    pooled_var = (_RHO_T ** (tidx[:, None] - tidx[None, :]).abs()).mean()  # variance gain of an 8-frame average
    frame_scale = torch.full((n_frames,), float(pooled_var.sqrt()), dtype=torch.float64)
    frame_scale[0] = 1.0
    std = std[:, None] * frame_scale[None, :]
    # Only the luma DC coefficient sees the pixel mean (a constant patch), scaled by the basis vector's sum.
    mean = torch.zeros_like(std)
    mean[0] = _PIXEL_MEAN * float(tiny_basis()[0].sum())
    shape = (1, LATENT_CHANNELS, n_frames, 1, 1)
    return mean.reshape(shape).float(), std.reshape(shape).float()


class _TinyEncoder(nn.Module):
    """[B,3,1+8k,H,W] in [-1,1] -> ([B,16,1+k,H/8,W/8],). Latent frame 0 sees pixel frame 0 only (causal)."""

    def __init__(self, basis: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("basis", basis.float())  # [16, 3, 8, 8]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        b, c, t, h, w = x.shape
        if c != 3 or (t - 1) % 8 != 0 or h % 8 != 0 or w % 8 != 0:
            raise ValueError("tiny encoder expects [B,3,1+8k,H,W] with H and W divisible by 8")
        groups = x[:, :, 1:].reshape(b, c, (t - 1) // 8, 8, h, w).mean(dim=3)
        pooled = torch.cat([x[:, :, :1], groups], dim=2)
        patches = pooled.reshape(b, c, pooled.shape[2], h // 8, 8, w // 8, 8)
        return (torch.einsum("bcthpwq,kcpq->bkthw", patches, self.basis.to(x.dtype)),)


class _TinyDecoder(nn.Module):
    """[B,16,1+k,h,w] -> [B,3,1+8k,8h,8w]: transpose of the patch projection, then linear interpolation in time."""

    def __init__(self, basis: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("basis", basis.float())  # [16, 3, 8, 8]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, k, t, h, w = z.shape
        if k != self.basis.shape[0]:
            raise ValueError("tiny decoder expects 16 latent channels")
        frames = torch.einsum("bkthw,kcpq->bcthpwq", z, self.basis.to(z.dtype)).reshape(b, 3, t, h * 8, w * 8)
        # Latent frame 0 sits at pixel time 0, frame j >= 1 at the centre 8j - 3.5 of the frames it averages.
        n_pix = 1 + 8 * (t - 1)
        pix = torch.arange(n_pix, device=z.device, dtype=torch.float32)
        pos = torch.where(pix < 4.5, pix / 4.5, 1.0 + (pix - 4.5) / 8.0).clamp(max=float(t - 1))
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=t - 1)
        frac = (pos - lo.float())[:, None]
        interp = (1.0 - frac) * nn.functional.one_hot(lo, t) + frac * nn.functional.one_hot(hi, t)
        return torch.einsum("bcjyx,tj->bctyx", frames, interp.to(z.dtype))


def build_tiny_tokenizer(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny CV8x8x8-compatible tokenizer: encoder.jit, decoder.jit, mean_std.pt and config.json.

    The basis is fixed (not learned, not random), so `seed` does not change the files; it is recorded in config.json
    to keep the builder's signature aligned with the other tiny stand-ins.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    basis = tiny_basis()
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch, but it is the format of the released tokenizer.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_TinyEncoder(basis).eval()), str(out_dir / "encoder.jit"))
        torch.jit.save(torch.jit.script(_TinyDecoder(basis).eval()), str(out_dir / "decoder.jit"))
    torch.save(_tiny_mean_std(), out_dir / "mean_std.pt")
    config = {
        "name": "tiny-cv8x8x8",
        "description": "fixed orthonormal block-DCT stand-in for Cosmos-Tokenize1-CV8x8x8 (not learned)",
        "latent_channels": LATENT_CHANNELS,
        "temporal_compression": TEMPORAL_COMPRESSION,
        "spatial_compression": SPATIAL_COMPRESSION,
        "channels": [{"colour": c, "freq": [u, v]} for c, u, v in _TINY_CHANNELS],
        "mean_std_frames": _TINY_STATS_FRAMES,
        "seed": seed,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


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
        self.latent_chunk = (pixel_chunk_frames - 1) // TEMPORAL_COMPRESSION + 1
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
