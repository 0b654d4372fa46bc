"""Causal video tokenizer wrapper: mirrors upstream `VideoJITTokenizer` (Cosmos-Tokenize1-CV8x8x8 TorchScript files,
per-channel and per-latent-frame mean/std, chunked encode/decode) and the multiview encode/decode of MV2W.
`build_tiny_tokenizer` writes a small linear stand-in, fitted to the synthetic renderer, in the same file formats.
"""

import contextlib
import functools
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from mvdit.constants import LATENT_CHANNELS, SIGMA_DATA, SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION, TOKENIZER_REPO

_FIX = f"re-download it with `python src/download.py --source hf --repo {TOKENIZER_REPO}` (or --source tiny)"


class TokenizerLoadError(RuntimeError):
    """A tokenizer file is missing or unreadable; the message is one line naming the file and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Tiny stand-in: a linear tokenizer fitted to the synthetic renderer when the tiny assets are built. The encoder
# projects each 8x8 patch of pixel frame 0, and each 8x8x8 patch of frames 8j-7..8j, onto its 16 principal
# components (PCA of rendered clips); the decoder is a least-squares map from the 3x3 neighbourhood of the current
# latent frame and of the previous one to the patch's pixels. Causal both ways, like CV8x8x8: latent frame 0 sees
# pixel frame 0 only, latent frame j sees frames <= 8j, and pixel frames of chunk j decode from latent frames <= j.

_TINY_STATS_FRAMES = 16  # latent-frame statistics stored; enough for pixel chunks up to 121 frames
_TINY_FIT = dict(clips=6, frames=17, height=64, width=96, fps=10.0, supersample=2)  # the demo's clip format
_PATCH0 = 3 * SPATIAL_COMPRESSION**2  # one 8x8 RGB patch of pixel frame 0
_PATCH = TEMPORAL_COMPRESSION * _PATCH0  # one 8x8x8 RGB patch of a later chunk


def _patches(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, t, H, W] -> [B, H/8, W/8, 3*t*64], ordered (colour, frame, row, column) within a patch."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // 8, 8, w // 8, 8).permute(0, 3, 5, 1, 2, 4, 6)
    return x.reshape(b, h // 8, w // 8, c * t * 64)


def _unpatch(p: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of _patches: [B, h, w, 3*t*64] -> [B, 3, t, 8h, 8w]."""
    b, h, w, _ = p.shape
    return p.reshape(b, h, w, 3, t, 8, 8).permute(0, 3, 4, 1, 5, 2, 6).reshape(b, 3, t, h * 8, w * 8)


def _neighbourhood(z: torch.Tensor) -> torch.Tensor:
    """Latent frame [B, 16, h, w] -> [B, h, w, 16*9 + 1]: the 3x3 neighbourhood (edges replicated) and a constant 1."""
    b, c, h, w = z.shape
    cols = nn.functional.unfold(nn.functional.pad(z, (1, 1, 1, 1), mode="replicate"), 3)  # [B, c*9, h*w]
    feats = cols.transpose(1, 2).reshape(b, h, w, c * 9)
    return torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1)


class _TinyEncoder(nn.Module):
    """[B,3,1+8k,H,W] in [-1,1] -> ([B,16,1+k,H/8,W/8],). Latent frame 0 sees pixel frame 0 only (causal)."""

    def __init__(self, mean0: torch.Tensor, basis0: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean0", mean0.float())  # [192]
        self.register_buffer("basis0", basis0.float())  # [192, 16]
        self.register_buffer("mean", mean.float())  # [1536]
        self.register_buffer("basis", basis.float())  # [1536, 16]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        b, c, t, h, w = x.shape
        if c != 3 or (t - 1) % 8 != 0 or h % 8 != 0 or w % 8 != 0:
            raise ValueError("tiny encoder expects [B,3,1+8k,H,W] with H and W divisible by 8")
        frames = [(_patches(x[:, :, :1]) - self.mean0) @ self.basis0]
        for j in range(1, 1 + (t - 1) // 8):
            frames.append((_patches(x[:, :, 8 * j - 7 : 8 * j + 1]) - self.mean) @ self.basis)
        return (torch.stack(frames, dim=1).permute(0, 4, 1, 2, 3).contiguous(),)


class _TinyDecoder(nn.Module):
    """[B,16,1+k,h,w] -> [B,3,1+8k,8h,8w]; pixel frames of latent frame j from latent frames j and j-1 (causal)."""

    def __init__(self, dec0: torch.Tensor, dec1: torch.Tensor, dec2: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("dec0", dec0.float())  # [145, 192]: frame 0 from its own latent
        self.register_buffer("dec1", dec1.float())  # [290, 1536]: chunk 1 from latent frames 1 and 0
        self.register_buffer("dec2", dec2.float())  # [290, 1536]: chunk j >= 2 from latent frames j and j-1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, k, t, h, w = z.shape
        if k != 16:
            raise ValueError("tiny decoder expects 16 latent channels")
        out = [_unpatch(_neighbourhood(z[:, :, 0]) @ self.dec0, 1)]
        for j in range(1, t):
            feats = torch.cat([_neighbourhood(z[:, :, j]), _neighbourhood(z[:, :, j - 1])], dim=-1)
            out.append(_unpatch(feats @ (self.dec1 if j == 1 else self.dec2), 8))
        return torch.cat(out, dim=2)


def _pca(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [N, D] -> (mean [D], top-k principal directions [D, k]) by subspace iteration from a fixed start
    (a full eigh of D = 1536 takes seconds on 2 cores); signs fixed so each direction's largest entry is positive."""
    mean = p.mean(0)
    cov = (p - mean).T @ (p - mean) / len(p)
    q = torch.randn(cov.shape[0], 2 * k, generator=torch.Generator().manual_seed(0), dtype=cov.dtype)
    for _ in range(30):
        q = torch.linalg.qr(cov @ q).Q
    vals, vecs = torch.linalg.eigh(q.T @ cov @ q)  # Rayleigh-Ritz: the best k directions in the subspace
    basis = q @ vecs[:, -k:].flip(1)
    return mean, basis * torch.sign(basis[basis.abs().argmax(0), torch.arange(k)])


@functools.lru_cache(maxsize=2)
def fit_tiny_tokenizer(seed: int = 0) -> dict[str, torch.Tensor]:
    """Fit the tiny tokenizer to clips of the synthetic renderer (scenes unrelated to any data set's): float64 PCA
    bases, least-squares decoders and latent statistics. Deterministic on any machine: the sums run on one thread
    (with several, their order, and so the last bits, follow the thread count); a few seconds on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_tiny_tokenizer(seed)
    finally:
        torch.set_num_threads(threads)


def _fit_tiny_tokenizer(seed: int) -> dict[str, torch.Tensor]:
    from mvdit.synthetic import clip_seed, render_clip  # local: the renderer is only needed to build

    f = _TINY_FIT
    clips = [
        render_clip(clip_seed(10_000 + seed, i), f["frames"], f["height"], f["width"], 6, f["fps"], f["supersample"])
        for i in range(f["clips"])
    ]
    video = torch.from_numpy(np.concatenate(clips)).permute(0, 4, 1, 2, 3).double() / 127.5 - 1  # [N, 3, T, H, W]
    n_chunks = (f["frames"] - 1) // TEMPORAL_COMPRESSION
    p0 = _patches(video[:, :, :1])
    chunks = [_patches(video[:, :, 8 * j - 7 : 8 * j + 1]) for j in range(1, 1 + n_chunks)]
    mean0, basis0 = _pca(p0.reshape(-1, _PATCH0), LATENT_CHANNELS)
    mean, basis = _pca(torch.cat(chunks).reshape(-1, _PATCH), LATENT_CHANNELS)
    z = [((p0 - mean0) @ basis0).permute(0, 3, 1, 2)] + [((c - mean) @ basis).permute(0, 3, 1, 2) for c in chunks]

    def lstsq(feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a, y = feats.reshape(-1, feats.shape[-1]), target.reshape(-1, target.shape[-1])
        ridge = 1e-6 * torch.eye(a.shape[1], dtype=a.dtype) * float((a * a).mean()) * len(a)
        return torch.linalg.solve(a.T @ a + ridge, a.T @ y)

    def pair(j: int) -> torch.Tensor:
        return torch.cat([_neighbourhood(z[j]), _neighbourhood(z[j - 1])], dim=-1)

    dec0 = lstsq(_neighbourhood(z[0]), p0)
    dec1 = lstsq(pair(1), chunks[0])
    dec2 = lstsq(torch.cat([pair(j) for j in range(2, 1 + n_chunks)]), torch.cat(chunks[1:]))
    # Per channel, as the released statistics: frame 0 (one pixel frame) and the later chunks each have their own.
    std = torch.empty(1, LATENT_CHANNELS, _TINY_STATS_FRAMES, 1, 1, dtype=torch.float64)
    std[0, :, 0, 0, 0] = z[0].std(dim=(0, 2, 3))
    std[0, :, 1:, 0, 0] = torch.cat(z[1:]).std(dim=(0, 2, 3))[:, None]
    return dict(
        mean0=mean0, basis0=basis0, mean=mean, basis=basis, dec0=dec0, dec1=dec1, dec2=dec2,
        latent_mean=torch.zeros_like(std), latent_std=std,
    )  # fmt: skip


def build_tiny_tokenizer(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny CV8x8x8-compatible tokenizer fitted to the synthetic renderer (fit_tiny_tokenizer): encoder.jit,
    decoder.jit, mean_std.pt and config.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fit = fit_tiny_tokenizer(seed)
    encoder = _TinyEncoder(fit["mean0"], fit["basis0"], fit["mean"], fit["basis"]).eval()
    decoder = _TinyDecoder(fit["dec0"], fit["dec1"], fit["dec2"]).eval()
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch, but it is the format of the released tokenizer.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(encoder), str(out_dir / "encoder.jit"))
        torch.jit.save(torch.jit.script(decoder), str(out_dir / "decoder.jit"))
    torch.save((fit["latent_mean"].float(), fit["latent_std"].float()), out_dir / "mean_std.pt")
    config = {
        "name": "tiny-cv8x8x8",
        "description": "linear stand-in for Cosmos-Tokenize1-CV8x8x8 fitted to the synthetic renderer: PCA encoder "
        "per 8x8 patch of frame 0 and 8x8x8 patch of each later chunk, least-squares decoder from the 3x3 "
        "neighbourhood of the current and previous latent frame",
        "latent_channels": LATENT_CHANNELS,
        "temporal_compression": TEMPORAL_COMPRESSION,
        "spatial_compression": SPATIAL_COMPRESSION,
        "fit": {**_TINY_FIT, "scene_seeds": f"clip_seed({10_000 + seed}, i)"},
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
