"""The multiview video DiT of Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview (upstream
`MultiviewVideoExtendGeneralDIT`), written as plain modules with the released checkpoint's parameter names.

Views are stacked view-major on the time axis: latent frame index v * T + t. Self-attention is joint over every
view and frame; cross-attention lets each view see only its own text tokens.

The modules are pure: context parallelism, compilation, activation checkpointing, FP8 and benchmark variants are
applied from outside (mvdit.runtime: context_parallel, compile, activation_checkpointing, fp8) through the attention
functions of `Attention`, `MultiviewDiT.forward`'s `token_slice`, module hooks and `nn.Module.compile`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from mvdit.model.config import NetConfig
from mvdit.model.posemb import RopePosition3D, SinCosPosEmb3D, apply_rope, rope_table, timestep_sinusoid


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm computed in fp32 (as TransformerEngine does), returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters, eps 1e-6."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class PatchEmbed(nn.Module):
    """[B, C, T, H, W] -> [B, T, H/p, W/p, D]; patch features ordered (c, r, m, n) with c slowest."""

    def __init__(self, in_planes: int, dim: int, patch: int, patch_t: int = 1):
        super().__init__()
        self.proj = nn.Sequential(
            Rearrange("b c (t r) (h m) (w n) -> b t h w (c r m n)", r=patch_t, m=patch, n=patch),
            nn.Linear(in_planes * patch * patch * patch_t, dim, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Timesteps(nn.Module):
    """c_noise [B] -> sinusoid [B, D] (cos first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, timesteps: Tensor) -> Tensor:
        return timestep_sinusoid(timesteps, self.dim)


class TimestepEmbedding(nn.Module):
    """AdaLN-LoRA timestep MLP: sinusoid [B, D] -> modulation bias [B, 3D] shared by every sub-block."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, emb: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


def adaln_modulation(dim: int, lora_dim: int, n_chunks: int) -> nn.Sequential:
    return nn.Sequential(
        nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, n_chunks * dim, bias=False)
    )


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over heads [B, h, N, d] by torch's fused kernel: the default attention function."""
    return F.scaled_dot_product_attention(q, k, v)


def qk_norm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, rope: Tensor | None, num_heads: int
) -> tuple[Tensor, Tensor]:
    """Projected queries [B, N, D] and keys [B, M, D] -> per-head RMSNorm (and RoPE, table [2, N, head_dim]) ->
    heads [B, h, N, d] and [B, h, M, d]: the default q/k function."""
    q = rms_norm(rearrange(q, "b n (h d) -> b h n d", h=num_heads), q_weight)
    k = rms_norm(rearrange(k, "b n (h d) -> b h n d", h=num_heads), k_weight)
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    return q, k


@dataclass(frozen=True)
class TokenSlice:
    """The contiguous run [start, stop) of the (v t h w) token sequence that one forward computes (default: all).
    Whoever passes one to MultiviewDiT.forward also supplies the rest: an attention function that reaches the other
    tokens' keys and values, and a forward hook on the final layer that returns the whole sequence's output."""

    start: int
    stop: int


@dataclass(frozen=True)
class ViewRuns:
    """Which view's text each query token cross-attends to: (first, last + 1, view) runs of the tokens at hand (local
    indices), and the number of views the text context is split into."""

    n_views: int
    runs: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, n_views: int, n_tokens: int, start: int = 0, stop: int | None = None) -> ViewRuns:
        """The runs of tokens [start, stop) of a view-major sequence of n_tokens (default: all of them)."""
        stop = n_tokens if stop is None else stop
        per_view = n_tokens // n_views
        runs = []
        for v in range(start // per_view, (stop - 1) // per_view + 1):
            a, b = max(start, v * per_view), min(stop, (v + 1) * per_view)
            runs.append((a - start, b - start, v))
        return cls(n_views, tuple(runs))

    @property
    def whole(self) -> bool:
        """Every view present, complete and in order: the runs are one batched attention."""
        per = self.runs[0][1] - self.runs[0][0]
        return len(self.runs) == self.n_views and all(r == (v * per, (v + 1) * per, v) for v, r in enumerate(self.runs))


class Attention(nn.Module):
    """Multi-head attention with per-head q/k RMSNorm, no biases. Parameter names match upstream
    (`to_q.0` Linear, `to_q.1` norm weight, ...). Self-attention applies RoPE; cross-attention is per view.

    Two pure functions are replaceable per instance from outside (fp8, context parallelism, benchmark variants):
    attention_fn (q, k, v) [B, h, N, d] -> [B, h, N, d], default torch's SDPA; qk_fn, default qk_norm_rope.
    """

    attention_fn = staticmethod(sdpa)
    qk_fn = staticmethod(qk_norm_rope)

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.to_q = nn.Sequential(nn.Linear(dim, dim, bias=False), RMSNorm(head_dim))
        self.to_k = nn.Sequential(nn.Linear(context_dim, dim, bias=False), RMSNorm(head_dim))
        self.to_v = nn.Sequential(nn.Linear(context_dim, dim, bias=False))
        self.to_out = nn.Sequential(nn.Linear(dim, dim, bias=False))

    def forward(
        self, x: Tensor, context: Tensor | None = None, rope: Tensor | None = None, views: ViewRuns | None = None
    ) -> Tensor:
        """x [B, N, D]; context [B, M, Dc] (None: self-attention); rope [2, N, head_dim] (cos, sin) or None. With
        views, the context holds views.n_views equal groups and each run of queries attends only to its view's."""
        ctx = x if context is None else context
        v = rearrange(self.to_v[0](ctx), "b n (h d) -> b h n d", h=self.num_heads)
        wq, wk = self.to_q[1].weight, self.to_k[1].weight
        q, k = self.qk_fn(self.to_q[0](x), self.to_k[0](ctx), wq, wk, rope, self.num_heads)
        if views is None or views.n_views == 1:
            out = self.attention_fn(q, k, v)
        elif views.whole:
            g = views.n_views
            q, k, v = (rearrange(t, "b h (g n) d -> (b g) h n d", g=g) for t in (q, k, v))
            out = rearrange(self.attention_fn(q, k, v), "(b g) h n d -> b h (g n) d", g=g)
        else:  # a slice of the sequence: each run of queries against its view's keys and values
            per = ctx.shape[1] // views.n_views
            out = torch.cat(
                [
                    self.attention_fn(q[:, :, a:b], k[:, :, g * per : (g + 1) * per], v[:, :, g * per : (g + 1) * per])
                    for a, b, g in views.runs
                ],
                dim=2,
            )
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.attn = Attention(dim, context_dim, num_heads)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(F.gelu(self.layer1(x)))


class SubBlock(nn.Module):
    """One of FA / CA / MLP: x + gate * f(LN(x) * (1 + scale) + shift), modulated by the timestep."""

    def __init__(self, kind: str, cfg: NetConfig):
        super().__init__()
        d = cfg.model_channels
        self.kind = kind
        if kind == "mlp":
            self.block = MLP(d, int(d * cfg.mlp_ratio))
        else:
            ctx_dim = d if kind == "self_attn" else cfg.crossattn_emb_channels
            self.block = AttentionBlock(d, ctx_dim, cfg.num_heads)
        self.adaLN_modulation = adaln_modulation(d, cfg.adaln_lora_dim, 3)

    def forward(
        self,
        x: Tensor,
        emb: Tensor,
        lora: Tensor,
        context: Tensor,
        rope: Tensor,
        views: ViewRuns,
    ) -> Tensor:
        shift, scale, gate = (self.adaLN_modulation(emb) + lora).unsqueeze(1).chunk(3, dim=-1)
        h = layer_norm(x) * (1 + scale) + shift
        if self.kind == "self_attn":
            h = self.block.attn(h, rope=rope)
        elif self.kind == "cross_attn":
            h = self.block.attn(h, context, views=views)
        else:
            h = self.block(h)
        return x + gate * h


class Block(nn.Module):
    """Self-attention over all views, per-view cross-attention to text, MLP."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.blocks = nn.ModuleList([SubBlock(k, cfg) for k in ("self_attn", "cross_attn", "mlp")])

    def forward(self, x, emb, lora, context, rope, pos_emb, views: ViewRuns) -> Tensor:
        x = x + pos_emb  # upstream re-adds the fixed sin-cos table at the start of every block
        for sub in self.blocks:
            x = sub(x, emb, lora, context, rope, views)
        return x


class FinalLayer(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        d, p = cfg.model_channels, cfg.patch_spatial
        self.linear = nn.Linear(d, p * p * cfg.patch_temporal * cfg.out_channels, bias=False)
        self.adaLN_modulation = adaln_modulation(d, cfg.adaln_lora_dim, 2)

    def forward(self, x: Tensor, emb: Tensor, lora: Tensor) -> Tensor:
        d = x.shape[-1]
        shift, scale = (self.adaLN_modulation(emb) + lora[:, : 2 * d]).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(layer_norm(x) * (1 + scale) + shift)


class MultiviewDiT(nn.Module):
    """The network F_theta. forward() returns the raw EDM network output for an input already scaled by c_in."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.model_channels, cfg.patch_spatial
        len_h, len_w, len_t = cfg.max_img_h // p, cfg.max_img_w // p, cfg.max_frames // cfg.patch_temporal
        self.x_embedder = PatchEmbed(cfg.input_planes, d, p, cfg.patch_temporal)
        self.pos_embedder = RopePosition3D(
            cfg.head_dim,
            len_h,
            len_w,
            len_t,
            (cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio, cfg.rope_t_extrapolation_ratio),
            cfg.base_fps,
        )
        self.extra_pos_embedder = SinCosPosEmb3D(
            d,
            len_h,
            len_w,
            len_t,
            (
                cfg.extra_h_extrapolation_ratio,
                cfg.extra_w_extrapolation_ratio,
                cfg.extra_t_extrapolation_ratio,
            ),
        )
        self.t_embedder = nn.Sequential(Timesteps(d), TimestepEmbedding(d))
        self.blocks = nn.ModuleDict({f"block{i}": Block(cfg) for i in range(cfg.num_blocks)})
        self.final_layer = FinalLayer(cfg)
        self.affline_norm = RMSNorm(d)
        self.view_embeddings = nn.Embedding(cfg.n_views, cfg.view_condition_dim)
        if cfg.add_repeat_frame_embedding:
            self.repeat_frame_embedding = nn.Linear(1, cfg.view_condition_dim)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fresh initialisation (upstream: xavier-uniform Linear, N(0, 1) embedding, ones for norms)."""

        def fill(t: Tensor, sample) -> None:  # draw on the CPU generator so every device gets the same values
            t.copy_(sample(torch.empty(t.shape)))

        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = (6.0 / (m.in_features + m.out_features)) ** 0.5
                fill(m.weight, lambda e, b=bound: e.uniform_(-b, b, generator=generator))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                fill(m.weight, lambda e: e.normal_(generator=generator))
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        self.pos_embedder.reset_buffers()

    def num_tokens(self, shape: tuple[int, ...]) -> int:
        """N, the length of the token sequence for an input x of shape [B, C, V*T, H, W]."""
        p, pt = self.cfg.patch_spatial, self.cfg.patch_temporal
        return (shape[2] // pt) * (shape[3] // p) * (shape[4] // p)

    def view_planes(self, b: int, view_indices: Tensor, frame_repeat: Tensor | None, dtype) -> Tensor:
        """[B, V, Dv]: the view embedding rows of the views present, plus the repeat-frame embedding of frame_repeat."""
        emb = repeat(self.view_embeddings(view_indices).to(dtype), "v d -> b v d", b=b)
        if self.cfg.add_repeat_frame_embedding:
            if frame_repeat is None:
                frame_repeat = torch.zeros(b, len(view_indices), device=emb.device, dtype=dtype)
            emb = emb + self.repeat_frame_embedding(frame_repeat.to(dtype)[..., None])
        return emb

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        crossattn_emb: Tensor,
        condition_video_input_mask: Tensor | None = None,
        fps: Tensor | None = None,
        padding_mask: Tensor | None = None,
        frame_repeat: Tensor | None = None,
        n_views: int | None = None,
        view_indices: Tensor | None = None,
        token_slice: TokenSlice | None = None,
    ) -> Tensor:
        """x [B, C, V*T, H, W] (c_in-scaled); timesteps [B] = 0.25 ln sigma; crossattn_emb [B, V*L, Dc];
        condition_video_input_mask [B, 1, V*T, H, W]; fps [B]; padding_mask [B, 1, H', W'] at any resolution;
        frame_repeat [B, V] (already divided by 10). Returns F [B, C_out, V*T, H, W].

        n_views defaults to the configured count. view_indices [V] names the view-embedding row of each view present
        (a rig with fewer cameras keeps each camera's own row, e.g. [0, 1, 2, 4, 5]); default 0..V-1.
        token_slice: run the blocks on these tokens only (see TokenSlice); default all of them.
        """
        b, _, vt, h, w = x.shape
        n_views = n_views or self.cfg.n_views
        if vt % n_views:
            raise ValueError(f"latent time axis {vt} is not a multiple of n_views={n_views}")
        if n_views > self.cfg.n_views:
            raise ValueError(f"{n_views} views requested but the model has {self.cfg.n_views} view embeddings")
        t = vt // n_views
        dtype, dev = x.dtype, x.device
        if condition_video_input_mask is None:
            condition_video_input_mask = torch.zeros(b, 1, vt, h, w, dtype=dtype, device=dev)
        planes = [x, condition_video_input_mask.to(dtype)]
        if self.cfg.concat_padding_mask:
            if padding_mask is None:
                padding_mask = torch.zeros(b, 1, h, w, dtype=dtype, device=dev)
            pm = F.interpolate(padding_mask.to(dtype), size=(h, w), mode="nearest")
            planes.append(repeat(pm, "b c h w -> b c t h w", t=vt))
        x = torch.cat(planes, dim=1)
        if view_indices is None:
            view_indices = torch.arange(n_views, device=dev)
        if len(view_indices) != n_views or int(view_indices.max()) >= self.cfg.n_views:
            raise ValueError(f"view_indices {view_indices.tolist()} do not fit {n_views} views of {self.cfg.n_views}")
        views = self.view_planes(b, view_indices.to(dev), frame_repeat, dtype)
        views = repeat(views, "b v d -> b d v t h w", t=t, h=h, w=w)
        x = rearrange(x, "b c (v t) h w -> b c v t h w", v=n_views)
        x = rearrange(torch.cat([x, views], dim=1), "b c v t h w -> b c (v t) h w")

        x = self.x_embedder(x)  # [B, V*T', H', W', D]
        _, tp, hp, wp, _ = x.shape
        x = rearrange(x, "b t h w d -> b (t h w) d")
        emb = self.t_embedder[0](timesteps.to(dtype))  # the raw sinusoid drives AdaLN, not the MLP output
        lora = self.t_embedder[1](emb)
        emb = self.affline_norm(emb)
        rope = rope_table(self.pos_embedder(n_views, tp // n_views, hp, wp, fps))  # once, not in every block
        pos_emb = self.extra_pos_embedder(n_views, tp // n_views, hp, wp, dtype, dev)
        context = crossattn_emb.to(dtype)
        n = x.shape[1]
        runs = ViewRuns.of(n_views, n)
        if token_slice is not None:  # compute only these tokens (context parallelism: this process's share)
            lo, hi = token_slice.start, token_slice.stop
            x, rope, pos_emb = x[:, lo:hi], rope[:, lo:hi], pos_emb[lo:hi]
            runs = ViewRuns.of(n_views, n, lo, hi)
        for blk in self.blocks.values():
            x = blk(x, emb, lora, context, rope, pos_emb, runs)
        x = self.final_layer(x, emb, lora)
        if x.shape[1] != n:
            raise ValueError(
                f"the final layer returned {x.shape[1]} of {n} tokens: a token_slice needs a hook that gathers"
            )
        p, pt = self.cfg.patch_spatial, self.cfg.patch_temporal
        return rearrange(x, "b (t h w) (p1 p2 r c) -> b c (t r) (h p1) (w p2)", t=tp, h=hp, w=wp, p1=p, p2=p, r=pt)


class FourierFeatures(nn.Module):
    """sqrt(2) * cos(x * freqs + phases) with fixed random buffers (persistent, in the checkpoint)."""

    def __init__(self, n: int = 128):
        super().__init__()
        self.register_buffer("freqs", 2 * torch.pi * torch.randn(n))
        self.register_buffer("phases", 2 * torch.pi * torch.rand(n))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float().ger(self.freqs.float()).add(self.phases.float())
        return (y.cos() * 2**0.5).to(x.dtype)


class LogVarHead(nn.Sequential):
    """Learned log-variance u(c_noise) of the uncertainty-weighted loss: Fourier features -> Linear(128 -> 1)."""

    def __init__(self, n: int = 128):
        super().__init__(FourierFeatures(n), nn.Linear(n, 1, bias=False))


class DiffusionModel(nn.Module):
    """What a checkpoint holds: the network under `net.*` and the log-variance head under `logvar.*`."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.net = MultiviewDiT(cfg)
        self.logvar = LogVarHead()

    @property
    def cfg(self) -> NetConfig:
        return self.net.cfg

    def forward(self, **net_kwargs) -> tuple[Tensor, Tensor]:
        """(F, u): the network output and the log-variance at its timesteps, in one call (one FSDP root)."""
        return self.net(**net_kwargs), self.logvar(net_kwargs["timesteps"])
