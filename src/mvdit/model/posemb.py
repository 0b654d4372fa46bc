"""Position encodings of the multiview DiT: 3-D RoPE for self-attention and the fixed sin-cos table added at the
start of every block. Both restart the time axis in every view (views are stacked view-major along time).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from torch import Tensor, nn


def axis_split(dim: int) -> tuple[int, int, int]:
    """Split a feature width into (t, h, w) parts the way upstream does: h = w = dim // 6 * 2, t = the rest."""
    dim_h = dim // 6 * 2
    return dim - 2 * dim_h, dim_h, dim_h


def ntk_theta(ratio: float, dim: int, base: float = 10000.0) -> float:
    """NTK-scaled RoPE base: base * ratio ** (dim / (dim - 2))."""
    return base * ratio ** (dim / (dim - 2))


class RopePosition3D(nn.Module):
    """3-D rotary angles, [N, head_dim] per token, for tokens ordered (v t h w).

    `seq` is a persistent buffer (the released checkpoint carries it); the frequency exponents are non-persistent.
    Angles are evaluated in the buffers' dtype, so a model cast to bf16 computes them in bf16 as upstream does.
    """

    def __init__(
        self,
        head_dim: int,
        len_h: int,
        len_w: int,
        len_t: int,
        ratios: tuple[float, float, float],
        base_fps: float = 24.0,
    ):
        super().__init__()
        self.dim_t, self.dim_h, self.dim_w = axis_split(head_dim)
        self.theta_h = ntk_theta(ratios[0], self.dim_h)
        self.theta_w = ntk_theta(ratios[1], self.dim_w)
        self.theta_t = ntk_theta(ratios[2], self.dim_t)
        self.base_fps = base_fps
        self.register_buffer("seq", torch.arange(max(len_h, len_w, len_t), dtype=torch.float32))
        self.register_buffer("dim_spatial_range", torch.empty(self.dim_h // 2), persistent=False)
        self.register_buffer("dim_temporal_range", torch.empty(self.dim_t // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the buffers, e.g. after building on the meta device."""
        dev = self.seq.device
        self.seq.copy_(torch.arange(self.seq.numel(), dtype=torch.float32, device=dev))
        sr = torch.arange(0, self.dim_h, 2, device=dev)[: self.dim_h // 2].float() / self.dim_h
        tr = torch.arange(0, self.dim_t, 2, device=dev)[: self.dim_t // 2].float() / self.dim_t
        self.dim_spatial_range.copy_(sr)
        self.dim_temporal_range.copy_(tr)

    def forward(self, n_views: int, t: int, h: int, w: int, fps: Tensor | None) -> Tensor:
        """Angles [V*t*h*w, head_dim] (fp32) for a (V*t, h, w) token grid; fps [B] or None (base fps)."""
        if max(h, w, t) > self.seq.numel():
            raise ValueError(f"token grid t={t}, h={h}, w={w} exceeds the RoPE table ({self.seq.numel()})")
        freq_h = 1.0 / (self.theta_h**self.dim_spatial_range)
        freq_w = 1.0 / (self.theta_w**self.dim_spatial_range)
        freq_t = 1.0 / (self.theta_t**self.dim_temporal_range)
        ang_h = torch.outer(self.seq[:h], freq_h)
        ang_w = torch.outer(self.seq[:w], freq_w)
        pos_t = self.seq[:t] if fps is None else self.seq[:t] / fps[:1] * self.base_fps
        ang_t = torch.outer(pos_t, freq_t)
        parts = [
            repeat(ang_t, "t d -> t h w d", h=h, w=w),
            repeat(ang_h, "h d -> t h w d", t=t, w=w),
            repeat(ang_w, "w d -> t h w d", t=t, h=h),
        ]
        ang = torch.cat(parts * 2, dim=-1)  # [t, h, w, head_dim]: (t, h, w) twice, rotate-half pairs i and i + d/2
        ang = repeat(ang, "t h w d -> (v t h w) d", v=n_views)  # every view restarts at t = 0
        return ang.float()


def rope_table(angles: Tensor) -> Tensor:
    """Angles [N, d] -> [2, N, d] fp32 (cos, sin): computed once per forward and shared by every block's q and k
    (before, each block evaluated both twice; BENCHMARKS.md §9 counted the transcendentals in the q/k kernel)."""
    angles = angles.float()
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate-half RoPE. x [B, heads, N, d]; table [2, N, d] (fp32 cos, sin; rope_table). Computed in fp32, returned
    in x's dtype."""
    cos, sin = table[0], table[1]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[len(positions), dim] table [sin(p * w_k) | cos(p * w_k)], w_k = 10000^(-k / (dim/2)), in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(positions.to(torch.float64), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)


class SinCosPosEmb3D(nn.Module):
    """The fixed (not learned, not in the checkpoint) sin-cos table [t | h | w] added to x at every block."""

    def __init__(self, dim: int, len_h: int, len_w: int, len_t: int, ratios: tuple[float, float, float]):
        super().__init__()
        self.dim_t, self.dim_h, self.dim_w = axis_split(dim)
        self.lens = (len_h, len_w, len_t)
        self.ratios = ratios
        self._cache: dict[tuple, Tensor] = {}

    def forward(self, n_views: int, t: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Table [V*t*h*w, dim] in `dtype` (computed in float64, rounded through fp32 as upstream)."""
        len_h, len_w, len_t = self.lens
        if h > len_h or w > len_w or t > len_t:
            raise ValueError(f"token grid t={t}, h={h}, w={w} exceeds the position table ({len_t}, {len_h}, {len_w})")
        key = (n_views, t, h, w, dtype, str(device))
        if key not in self._cache:
            emb_h = sincos_1d(self.dim_h, torch.arange(h) / self.ratios[0])
            emb_w = sincos_1d(self.dim_w, torch.arange(w) / self.ratios[1])
            emb_t = sincos_1d(self.dim_t, torch.arange(t) / self.ratios[2])
            emb = torch.cat(
                [
                    repeat(emb_t, "t d -> t h w d", h=h, w=w),
                    repeat(emb_h, "h d -> t h w d", t=t, w=w),
                    repeat(emb_w, "w d -> t h w d", t=t, h=h),
                ],
                dim=-1,
            ).float()
            emb = rearrange(emb, "t h w d -> (t h w) d")
            self._cache = {key: repeat(emb, "n d -> (v n) d", v=n_views).to(device=device, dtype=dtype)}
        return self._cache[key]


def timestep_sinusoid(t: Tensor, dim: int) -> Tensor:
    """[B] -> [B, dim]: [cos(t f_k) | sin(t f_k)], f_k = exp(-ln(10000) k / (dim/2)) (cos first), fp32 math."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1).to(t.dtype)
