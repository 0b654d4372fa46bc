"""The tiny video tokenizer: a linear stand-in for Cosmos-Tokenize1-CV8x8x8, fitted to the synthetic renderer when the
tiny assets are built, written in the released file formats (encoder.jit, decoder.jit, mean_std.pt) so that
mvdit.encoders.tokenizer loads it exactly as it loads the real one.
"""

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mvdit.constants import LATENT_CHANNELS, SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
from mvdit.data.synthetic import clip_seed, render_clip

# Tiny stand-in: a linear tokenizer fitted to the synthetic renderer when the tiny assets are built. The encoder
# projects each 8x8 patch of pixel frame 0 onto its 16 principal components, and each 8x8x8 patch of frames 8j-7..8j,
# less the decoded frame 8j-8 repeated, onto the 16 principal components of such changes (PCA of rendered clips); the
# decoder maps the 3x3 neighbourhood of the current latent frame and of the previous one to the change (least squares)
# and adds it to the frame it decoded last. Latents of "no change" thus decode to the last frame held still, and a
# denoiser that learns nothing more than that already copies the input. Causal both ways, like CV8x8x8: latent frame
# 0 sees pixel frame 0 only, latent frame j sees frames <= 8j, and pixel frames of chunk j decode from latent frames
# <= j (the encoder runs the same recursion, closed loop, so that both add each change to the same picture).

_TINY_STATS_FRAMES = 16  # latent-frame statistics stored; enough for pixel chunks up to 121 frames
_TINY_FIT = dict(clips=12, frames=17, height=64, width=96, fps=10.0, supersample=2)  # the demo's clip format
# Decoder regularisation: ridge (relative to the mean feature energy) and a within-chunk temporal filter
# [a, 1 - 2a, a] folded into the decoder matrices (the least-squares residual is mostly frame-to-frame noise: without
# them the round trip changes 1.5x as much from frame to frame as the clip does). The filter 0.1 (was 0.2) gains
# 0.1-0.3 dB of round trip on the demo clips' frames 9-16 (docs/demo-tuning-2026-12-07-c.md).
_TINY_RIDGE = 1e-3
_TINY_TEMPORAL_SMOOTH = 0.1
# Ridge on the decoder's columns for the predictive latent frames (j >= 2), which code what the last two latent
# frames do not predict: much of that is unpredictable from the input frames, so a sampled latent there is in part
# noise; the ridge shrinks how far such a latent moves the pixels. 0.35 (was 1.0) with the filter 0.1: the round trip
# of the demo clips' frames 9-16 is at least 30.5 dB on each of the 24 (33.65 on the 4 held out; with 1.0: one clip
# at 28.6, 31.8 held out, 36+ without the extra ridge), while another clip's residual standing in for a sample scores
# SSIM 0.862 on the held-out clips (0.868 with 1.0, 0.838 without; docs/demo-tuning-2026-12-07-c.md).
_TINY_RESIDUAL_RIDGE = 0.35
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


def _repeat8(p: torch.Tensor) -> torch.Tensor:
    """Patches of one frame [B, h, w, 3*64] -> the same frame repeated over a chunk [B, h, w, 3*8*64]."""
    b, h, w, _ = p.shape
    return p.reshape(b, h, w, 3, 1, 64).expand(b, h, w, 3, 8, 64).reshape(b, h, w, 3 * 8 * 64)


def _neighbourhood(z: torch.Tensor) -> torch.Tensor:
    """Latent frame [B, 16, h, w] -> [B, h, w, 16*9 + 1]: the 3x3 neighbourhood (edges replicated) and a constant 1."""
    b, c, h, w = z.shape
    cols = nn.functional.unfold(nn.functional.pad(z, (1, 1, 1, 1), mode="replicate"), 3)  # [B, c*9, h*w]
    feats = cols.transpose(1, 2).reshape(b, h, w, c * 9)
    return torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1)


class _TinyEncoder(nn.Module):
    """[B,3,1+8k,H,W] in [-1,1] -> ([B,16,1+k,H/8,W/8],). Latent frame 0 sees pixel frame 0 only (causal).

    Latent frame j >= 1 encodes the change of frames 8j-7..8j from the decoded frame 8j-8 (closed loop: the encoder
    runs the decoder's recursion, so both add the change to the same picture); it sees frames <= 8j only."""

    def __init__(
        self,
        mean0: torch.Tensor,
        basis0: torch.Tensor,
        mean: torch.Tensor,
        basis: torch.Tensor,
        mean2: torch.Tensor,
        basis2: torch.Tensor,
        pred2: torch.Tensor,
        dec0: torch.Tensor,
        dec1: torch.Tensor,
        dec2: torch.Tensor,
        dec3: torch.Tensor,
    ) -> None:
        super().__init__()
        self.register_buffer("mean0", mean0.float())  # [192]
        self.register_buffer("basis0", basis0.float())  # [192, 16]
        self.register_buffer("mean", mean.float())  # [1536]
        self.register_buffer("basis", basis.float())  # [1536, 16]
        self.register_buffer("mean2", mean2.float())  # [1536]
        self.register_buffer("basis2", basis2.float())  # [1536, 16]
        self.register_buffer("pred2", pred2.float())  # [290, 1536]
        self.decoder = _TinyDecoder(dec0, dec1, dec2, dec3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        b, c, t, h, w = x.shape
        if c != 3 or (t - 1) % 8 != 0 or h % 8 != 0 or w % 8 != 0:
            raise ValueError("tiny encoder expects [B,3,1+8k,H,W] with H and W divisible by 8")
        z = ((_patches(x[:, :, :1]) - self.mean0) @ self.basis0).permute(0, 3, 1, 2)
        frames = [z]
        last = self.decoder.first(z)  # decoded pixel frame 0, [B, 3, 1, H, W]
        for j in range(1, 1 + (t - 1) // 8):
            change = _patches(x[:, :, 8 * j - 7 : 8 * j + 1]) - _repeat8(_patches(last))
            if j != 2:  # the change itself (chunk 1, and chunks 3+, which the demo's 17-frame clips do not have)
                z_j = ((change - self.mean) @ self.basis).permute(0, 3, 1, 2)
                z_prev2 = frames[-1]
            else:  # the part of the change that the last two latent frames do not predict
                z_prev2 = frames[-2]
                pred = torch.cat([_neighbourhood(frames[-1]), _neighbourhood(z_prev2)], dim=-1) @ self.pred2
                z_j = ((change - pred - self.mean2) @ self.basis2).permute(0, 3, 1, 2)
            last = self.decoder.chunk(z_j, frames[-1], z_prev2, last, j)[:, :, -1:]
            frames.append(z_j)
        return (torch.stack(frames, dim=2).contiguous(),)


class _TinyDecoder(nn.Module):
    """[B,16,1+k,h,w] -> [B,3,1+8k,8h,8w]; pixel frames of latent frame j >= 1: the decoded frame 8j-8 plus the change
    decoded from latent frames j and j-1 (causal: pixel frames of chunk j from latent frames <= j)."""

    def __init__(self, dec0: torch.Tensor, dec1: torch.Tensor, dec2: torch.Tensor, dec3: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("dec0", dec0.float())  # [145, 192]: frame 0 from its own latent
        self.register_buffer("dec1", dec1.float())  # [290, 1536]: change of chunk 1 from latent frames 1 and 0
        self.register_buffer("dec2", dec2.float())  # [435, 1536]: change of chunk 2 from latent frames 2, 1, 0
        self.register_buffer("dec3", dec3.float())  # [145, 1536]: change of chunk j >= 3 from latent frame j alone

    def first(self, z0: torch.Tensor) -> torch.Tensor:
        return _unpatch(_neighbourhood(z0) @ self.dec0, 1)

    def chunk(
        self, z: torch.Tensor, z_prev: torch.Tensor, z_prev2: torch.Tensor, last: torch.Tensor, j: int
    ) -> torch.Tensor:
        if j >= 3:  # longer clips than the demo's: change coding, decoded from the chunk's own latent frame
            return _unpatch(_neighbourhood(z) @ self.dec3, 8) + last
        feats = torch.cat([_neighbourhood(z), _neighbourhood(z_prev)], dim=-1)
        if j == 1:
            return _unpatch(feats @ self.dec1, 8) + last
        return _unpatch(torch.cat([feats, _neighbourhood(z_prev2)], dim=-1) @ self.dec2, 8) + last

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, k, t, h, w = z.shape
        if k != 16:
            raise ValueError("tiny decoder expects 16 latent channels")
        out = [self.first(z[:, :, 0])]
        for j in range(1, t):
            out.append(self.chunk(z[:, :, j], z[:, :, j - 1], z[:, :, max(j - 2, 0)], out[-1][:, :, -1:], j))
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
    # The basis of the changes: PCA of chunk 1 minus the true frame 0 (chunk 2 has its own basis, below).
    mean, basis = _pca((chunks[0] - _repeat8(p0)).reshape(-1, _PATCH), LATENT_CHANNELS)

    def lstsq(feats: torch.Tensor, target: torch.Tensor, own_ridge: float = _TINY_RIDGE) -> torch.Tensor:
        """Ridge least squares; own_ridge on the first 145 features (the 3x3 neighbourhood of the coded frame)."""
        a, y = feats.reshape(-1, feats.shape[-1]), target.reshape(-1, target.shape[-1])
        diag = torch.full((a.shape[1],), _TINY_RIDGE, dtype=a.dtype)
        diag[: 9 * LATENT_CHANNELS + 1] = own_ridge
        ridge = torch.diag(diag) * float((a * a).mean()) * len(a)
        return torch.linalg.solve(a.T @ a + ridge, a.T @ y)

    def chunk_decoder(feats: torch.Tensor, change: torch.Tensor, own_ridge: float) -> torch.Tensor:
        dec = lstsq(feats, change, own_ridge)
        return _smooth_in_time(dec, _TINY_TEMPORAL_SMOOTH) if _TINY_TEMPORAL_SMOOTH else dec

    z = [((p0 - mean0) @ basis0).permute(0, 3, 1, 2)]
    dec0 = lstsq(_neighbourhood(z[0]), p0)
    last = _neighbourhood(z[0]) @ dec0  # decoded frame 0 as patches [N, h, w, 192]
    decs = []
    # Closed loop, chunk by chunk as the encoder runs: the change from the *decoded* previous frame, its latent, and
    # a least-squares decoder of that change (dec1 for chunk 1, dec2 for chunk 2; the demo's clips have two).
    mean2 = basis2 = pred2 = None
    for j, c in enumerate(chunks, 1):
        change = c - _repeat8(last)
        if j == 1:
            changes1_closed = change
            z.append(((change - mean) @ basis).permute(0, 3, 1, 2))
            feats = torch.cat([_neighbourhood(z[j]), _neighbourhood(z[j - 1])], dim=-1)
        else:  # predictive: the latent codes what the last two latent frames do not predict (a linear map)
            prev = torch.cat([_neighbourhood(z[j - 1]), _neighbourhood(z[j - 2])], dim=-1)
            if pred2 is None:
                pred2 = lstsq(prev, change)
                mean2, basis2 = _pca((change - prev @ pred2).reshape(-1, _PATCH), LATENT_CHANNELS)
            z.append(((change - prev @ pred2 - mean2) @ basis2).permute(0, 3, 1, 2))
            feats = torch.cat([_neighbourhood(z[j]), prev], dim=-1)
        dec = chunk_decoder(feats, change, _TINY_RIDGE if j == 1 else _TINY_RESIDUAL_RIDGE)
        decs.append(dec)
        last = (feats @ dec + _repeat8(last)).reshape(*c.shape[:3], 3, TEMPORAL_COMPRESSION, -1)[..., -1, :]
        last = last.reshape(*c.shape[:3], -1)
    dec1, dec2 = decs[0], decs[-1]
    # Chunks j >= 3 (longer clips than the fit's): change-coded as chunk 1, decoded from their own latent frame only
    # (a predictor fitted on chunk 2 would read latents of another kind there, and its recursion drifts).
    dec3 = chunk_decoder(_neighbourhood(z[1]), changes1_closed, _TINY_RIDGE)
    # Per channel, as the released statistics: frame 0 (one pixel frame) and the later chunks each have their own.
    std = torch.empty(1, LATENT_CHANNELS, _TINY_STATS_FRAMES, 1, 1, dtype=torch.float64)
    std[0, :, 0, 0, 0] = z[0].std(dim=(0, 2, 3))
    std[0, :, 1, 0, 0] = z[1].std(dim=(0, 2, 3))
    std[0, :, 2, 0, 0] = z[2].std(dim=(0, 2, 3))
    std[0, :, 3:, 0, 0] = std[0, :, 1:2, 0, 0]  # chunks 3+ are coded as chunk 1
    return dict(
        mean0=mean0, basis0=basis0, mean=mean, basis=basis, mean2=mean2, basis2=basis2, pred2=pred2,
        dec0=dec0, dec1=dec1, dec2=dec2, dec3=dec3,
        latent_mean=torch.zeros_like(std), latent_std=std,
    )  # fmt: skip


def _smooth_in_time(dec: torch.Tensor, a: float) -> torch.Tensor:
    """Decoder [features, 3*8*64] -> the same followed by the filter [a, 1 - 2a, a] over the chunk's 8 frames
    (ends replicated), applied to the output columns (ordered colour, frame, row, column)."""
    t = TEMPORAL_COMPRESSION
    filt = torch.zeros(t, t, dtype=dec.dtype)
    for i in range(t):
        filt[i, i] += 1 - 2 * a
        filt[i, max(i - 1, 0)] += a
        filt[i, min(i + 1, t - 1)] += a
    w = dec.reshape(dec.shape[0], 3, t, -1)
    return torch.einsum("st,fctp->fcsp", filt, w).reshape(dec.shape)


def build_tiny_tokenizer(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny CV8x8x8-compatible tokenizer fitted to the synthetic renderer (fit_tiny_tokenizer): encoder.jit,
    decoder.jit, mean_std.pt and config.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fit = fit_tiny_tokenizer(seed)
    decs = fit["dec0"], fit["dec1"], fit["dec2"], fit["dec3"]
    pred = fit["mean2"], fit["basis2"], fit["pred2"]
    encoder = _TinyEncoder(fit["mean0"], fit["basis0"], fit["mean"], fit["basis"], *pred, *decs).eval()
    decoder = _TinyDecoder(*decs).eval()
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch, but it is the format of the released tokenizer.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(encoder), str(out_dir / "encoder.jit"))
        torch.jit.save(torch.jit.script(decoder), str(out_dir / "decoder.jit"))
    torch.save((fit["latent_mean"].float(), fit["latent_std"].float()), out_dir / "mean_std.pt")
    config = {
        "name": "tiny-cv8x8x8",
        "description": "linear stand-in for Cosmos-Tokenize1-CV8x8x8 fitted to the synthetic renderer: PCA encoder "
        "per 8x8 patch of frame 0, and of each later 8x8x8 chunk's change from the decoded frame before it (closed "
        "loop); chunk 2 codes only what a linear map of latent frames 1 and 0 does not predict; least-squares "
        "decoders of the change from the 3x3 neighbourhoods of the latent frames (chunk 3+: its own only), with ridge "
        "(stronger on the predictive chunk's own latent) and a within-chunk temporal filter",
        "latent_channels": LATENT_CHANNELS,
        "temporal_compression": TEMPORAL_COMPRESSION,
        "spatial_compression": SPATIAL_COMPRESSION,
        "fit": {
            **_TINY_FIT,
            "ridge": _TINY_RIDGE,
            "residual_ridge": _TINY_RESIDUAL_RIDGE,
            "temporal_smooth": _TINY_TEMPORAL_SMOOTH,
            "scene_seeds": f"clip_seed({10_000 + seed}, i)",
        },
        "mean_std_frames": _TINY_STATS_FRAMES,
        "seed": seed,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
