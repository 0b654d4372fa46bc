"""EDM preconditioning and the video-conditioned denoiser (upstream's multiview Video2World model, inference and
training paths). Pure functions of tensors; the network enters as a module argument, never as state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from einops import repeat
from torch import Tensor, nn

from mvdit.constants import SIGMA_DATA, TEMPORAL_COMPRESSION, latent_frames

AUGMENT_SIGMA = 0.001  # inference: the condition frames enter as "clean at sigma = 0.001"


def edm_scalings(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """c_skip, c_out, c_in, c_noise for noise level sigma (any shape, computed in sigma's dtype)."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2**0.5
    c_in = 1 / s2**0.5
    c_noise = 0.25 * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def num_condition_latent_frames(num_input_frames: int, compat: str = "fixed") -> int:
    """Conditioned latent frames per view for N input pixel frames.

    The causal tokenizer maps 1 + 8k pixel frames to 1 + k latent frames (fixed: 1 -> 1, 9 -> 2). The released
    pipeline ("head") reduces N modulo the latent chunk length, so 9 gives 1 (fixed upstream in PR #42).
    """
    if num_input_frames < 1:
        raise ValueError(f"num_input_frames must be >= 1, got {num_input_frames}")
    if compat == "head":
        return num_input_frames // 57 * 8 + int(num_input_frames % 8 == 1)
    if compat != "fixed":
        raise ValueError(f"compat must be 'fixed' or 'head', got {compat!r}")
    if (num_input_frames - 1) % TEMPORAL_COMPRESSION:
        raise ValueError(f"num_input_frames must be 1 + 8k, got {num_input_frames}")
    return latent_frames(num_input_frames)


def condition_indicator(n_views: int, t: int, n_cond: int, batch: int = 1, dtype=torch.float32, device=None) -> Tensor:
    """[B, 1, V*T, 1, 1]: 1 on the first n_cond latent frames of every view."""
    if not 0 <= n_cond <= t:
        raise ValueError(f"n_cond={n_cond} condition frames do not fit {t} latent frames per view")
    per_view = (torch.arange(t, device=device) < n_cond).to(dtype)
    return repeat(per_view, "t -> b 1 (v t) 1 1", b=batch, v=n_views).contiguous()


def augment_condition(gt_latent: Tensor, noise: Tensor, aug_sigma: Tensor, sigma: Tensor) -> Tensor:
    """(g + a e) c_in(a) / c_in(sigma): after the network's c_in(sigma) the condition frames carry c_in(a) (g + a e)."""
    c_in_aug = edm_scalings(aug_sigma)[2]
    c_in = edm_scalings(sigma)[2]
    return (gt_latent + aug_sigma * noise) * c_in_aug * (1.0 / c_in)


@dataclass
class Condition:
    """Everything the denoiser needs besides the noisy latent. Latent-shaped tensors are [B, C, V*T, H, W]."""

    gt_latent: Tensor  # condition latent g (only its conditioned frames matter)
    indicator: Tensor  # [B, 1, V*T, 1, 1]
    crossattn_emb: Tensor  # [B, V*L, Dc]
    n_views: int
    fps: Tensor | None = None
    padding_mask: Tensor | None = None
    frame_repeat: Tensor | None = None  # [B, V], already / 10
    augment_noise: Tensor | None = None  # e of the condition augmentation (zeros if None)
    augment_sigma: float = AUGMENT_SIGMA
    uncond_crossattn_emb: Tensor | None = None  # None: all zeros (the released guidance)
    view_indices: Tensor | None = None  # [V] view-embedding row of each view present; None: 0..V-1

    @property
    def input_mask(self) -> Tensor:
        b, _, vt, h, w = self.gt_latent.shape
        return self.indicator.expand(b, 1, vt, h, w).to(self.gt_latent.dtype)

    def uncond(self) -> Condition:
        text = self.uncond_crossattn_emb
        return replace(self, crossattn_emb=torch.zeros_like(self.crossattn_emb) if text is None else text)

    def both_branches(self) -> Condition:
        """The conditional and unconditional branch stacked as a batch of two (for one batched forward)."""

        def two(t: Tensor | None) -> Tensor | None:
            return None if t is None else torch.cat([t, t])

        u = self.uncond()
        return replace(
            self,
            gt_latent=two(self.gt_latent),
            indicator=two(self.indicator),
            crossattn_emb=torch.cat([self.crossattn_emb, u.crossattn_emb]),
            fps=two(self.fps),
            padding_mask=two(self.padding_mask),
            frame_repeat=two(self.frame_repeat),
        )

    def noise(self) -> Tensor:
        return torch.zeros_like(self.gt_latent) if self.augment_noise is None else self.augment_noise


def run_net(net: nn.Module, x: Tensor, sigma: Tensor, cond: Condition):
    """net(c_in(sigma) x, c_noise(sigma), ...) for a scalar or per-sample sigma (F, or (F, u) for a DiffusionModel)."""
    _, _, c_in, c_noise = edm_scalings(sigma)
    b = x.shape[0]
    return net(
        x=(x * bcast(c_in, x)).to(x.dtype),  # fp32 scalings must not promote a bf16 latent
        timesteps=c_noise.reshape(-1).expand(b) if c_noise.numel() == 1 else c_noise.reshape(b),
        crossattn_emb=cond.crossattn_emb,
        condition_video_input_mask=cond.input_mask,
        fps=cond.fps,
        padding_mask=cond.padding_mask,
        frame_repeat=cond.frame_repeat,
        n_views=cond.n_views,
        view_indices=cond.view_indices,
    )


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Scalar or per-sample [B] values shaped to broadcast against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.numel() > 1 else v.reshape([1] * x.ndim)


def train_denoise(
    net: nn.Module, x_sigma: Tensor, sigma: Tensor, cond: Condition, aug_sigma=None, sigma_data: float = SIGMA_DATA
) -> dict[str, Tensor]:
    """Training-side denoise of one branch (the training loss's and the RES sampler's): condition frames replaced
    by the augmented latent, x0 pinned to g there. Scalar or per-sample [B] sigma and aug_sigma.

    Returns aug_latent_scaled (the augmented condition latent), xt (input before c_in), net_out (F), net_x0_pred
    (c_skip xt + c_out F), x0, eps = (x_sigma - x0) / sigma, and logvar (u [B, 1]) when `net` is a DiffusionModel.
    """
    a = torch.as_tensor(cond.augment_sigma if aug_sigma is None else aug_sigma, dtype=sigma.dtype)
    ind = cond.indicator.to(x_sigma.dtype)
    aug = augment_condition(cond.gt_latent, cond.noise(), bcast(a, x_sigma), bcast(sigma, x_sigma))
    xt = ind * aug + (1 - ind) * x_sigma
    c_skip, c_out, _, _ = edm_scalings(sigma, sigma_data)
    net_out = run_net(net, xt, sigma, cond)
    logvar = None
    if isinstance(net_out, tuple):  # a DiffusionModel: F and u in one call (the FSDP root)
        net_out, logvar = net_out
    net_x0_pred = bcast(c_skip, xt) * xt + bcast(c_out, xt) * net_out
    x0 = ind * cond.gt_latent + (1 - ind) * net_x0_pred
    return {
        "aug_latent_scaled": aug,
        "logvar": logvar,
        "xt": xt,
        "net_out": net_out,
        "net_x0_pred": net_x0_pred,
        "x0": x0,
        "eps": (x_sigma - x0) / bcast(sigma, x0),
    }


def inference_x0(
    net: nn.Module,
    x: Tensor,
    sigma: Tensor,
    cond: Condition,
    guidance: float,
    compat: str = "fixed",
    batch_guidance: bool = False,
) -> dict[str, Tensor]:
    """One step of the released pipeline before its Euler update (upstream MV2W + diffusers EDMEulerScheduler).

    While augment_sigma < sigma, the conditioned frames of the state are replaced by the augmented condition latent
    and the guided network output is replaced there so that x0 = g ("fixed"; "head" keeps the release's inverted
    formula, whose x0 there is g + c_skip (1 - c_out) x_in). Returns x_in, F_cond, F_uncond, model_output and x0.
    batch_guidance runs both guidance branches as one batch-2 forward (upstream: two calls; same result).
    """
    active = cond.augment_sigma < float(sigma)
    m = cond.indicator.to(x.dtype) * float(active)
    a = torch.as_tensor(cond.augment_sigma, dtype=sigma.dtype)
    x_in = m * augment_condition(cond.gt_latent, cond.noise(), a, sigma) + (1 - m) * x
    if batch_guidance:
        f_cond, f_uncond = run_net(net, torch.cat([x_in, x_in]), sigma, cond.both_branches()).chunk(2)
    else:
        f_cond = run_net(net, x_in, sigma, cond)
        f_uncond = run_net(net, x_in, sigma, cond.uncond())
    f = f_cond + guidance * (f_cond - f_uncond)
    c_skip, c_out, _, _ = edm_scalings(sigma)
    g = cond.gt_latent
    if compat == "head":
        pinned = g / c_out - c_skip * x_in
    elif compat == "fixed":
        pinned = (g - c_skip * x_in) / c_out
    else:
        raise ValueError(f"compat must be 'fixed' or 'head', got {compat!r}")
    model_output = m * pinned + (1 - m) * f
    x0 = c_skip * x_in + c_out * model_output
    return {"x_in": x_in, "F_cond": f_cond, "F_uncond": f_uncond, "model_output": model_output, "x0": x0}
