"""The post-training loss of upstream's `video2world_multiview_7b_example` (uncertainty-weighted EDM loss with
random condition frames), with every random draw injectable so reference vectors can be replayed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mvdit.constants import SIGMA_DATA
from mvdit.model.edm import (
    Condition,
    bcast,
    condition_indicator,
    edm_scalings,
    loss_weight,
    train_denoise,
)
from mvdit.model.network import DiffusionModel
from mvdit.workflow.experiment import TrainCfg


@dataclass
class LossDraws:
    """The random values of one training step (upstream draws them in this order)."""

    text_keep: Tensor  # [B] 1 = keep the text, 0 = zero the whole embedding (all views)
    n_cond: int  # conditioned latent frames per view, shared by the batch
    epsilon: Tensor  # latent-shaped training noise
    sigma: Tensor  # [B] fp32
    aug_sigma: Tensor  # [B] fp32
    aug_noise: Tensor  # latent-shaped noise of the condition augmentation


@dataclass(frozen=True)
class LossConfig:
    p_mean: float = 0.0  # ln sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.0
    aug_p_mean: float = -3.0  # ln sigma_aug ~ N(aug_p_mean, aug_p_std^2)
    aug_p_std: float = 2.0
    max_cond_frames: int = 2  # n ~ U{min_cond_frames, ..., max_cond_frames}
    min_cond_frames: int = 0
    text_dropout: float = 0.2


def loss_config(t: TrainCfg) -> LossConfig:
    """The loss settings of an experiment's `train` section (upstream's 7B recipe unless the experiment says else)."""
    return LossConfig(
        p_mean=t.sigma_p_mean,
        p_std=t.sigma_p_std,
        text_dropout=t.text_dropout,
        max_cond_frames=t.max_cond_frames,
        min_cond_frames=t.min_cond_frames,
    )


def lognormal_sigma(standard_normal: Tensor, mean: float, std: float) -> Tensor:
    """exp of (mean + std z), with ln sigma rounded to fp32 before exp as upstream does."""
    return torch.exp((mean + std * standard_normal.double()).float())


def draw_loss_randomness(
    x0: Tensor, cfg: LossConfig, generator: torch.Generator | None = None, max_cond: int | None = None
) -> LossDraws:
    """Production draws from one seeded generator (on x0's device)."""
    b, dev = x0.shape[0], x0.device
    text_keep = (torch.rand(b, generator=generator, device=dev) >= cfg.text_dropout).float()
    top = cfg.max_cond_frames if max_cond is None else max_cond
    n_cond = int(torch.randint(min(cfg.min_cond_frames, top), top + 1, (1,), generator=generator, device=dev))
    epsilon = torch.randn(x0.shape, generator=generator, device=dev, dtype=torch.float32)
    sigma = lognormal_sigma(torch.randn(b, generator=generator, device=dev, dtype=torch.float64), cfg.p_mean, cfg.p_std)
    aug_z = torch.randn(b, generator=generator, device=dev, dtype=torch.float64)
    aug_sigma = lognormal_sigma(aug_z, cfg.aug_p_mean, cfg.aug_p_std)
    aug_noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=torch.float32)
    return LossDraws(text_keep, n_cond, epsilon, sigma, aug_sigma, aug_noise)


@dataclass
class LossOutput:
    loss: Tensor  # the optimised scalar: mean(lambda mse e^-u + u); can be negative
    edm_loss: Tensor  # mean(lambda mse): the plain weighted MSE
    mse_loss: Tensor  # mean(mse)
    logvar: Tensor  # [B, 1] u
    parts: dict[str, Tensor]  # intermediates named as in the reference vectors


def training_loss(
    model: DiffusionModel,
    x0: Tensor,
    text: Tensor,
    draws: LossDraws,
    n_views: int,
    fps: Tensor | None = None,
    padding_mask: Tensor | None = None,
    frame_repeat: Tensor | None = None,
    sigma_data: float = SIGMA_DATA,
    view_indices: Tensor | None = None,
) -> LossOutput:
    """x0 [B, 16, V*T, H, W] clean latent (normalised, x sigma_data); text [B, V*L, Dc] before dropout."""
    b, _, vt, _, _ = x0.shape
    dtype = x0.dtype
    sigma = draws.sigma.to(device=x0.device, dtype=dtype)
    aug_sigma = draws.aug_sigma.to(device=x0.device, dtype=dtype)
    text = text * draws.text_keep.to(text)[:, None, None]
    ind = condition_indicator(n_views, vt // n_views, draws.n_cond, batch=b, dtype=dtype, device=x0.device)
    eps = draws.epsilon.to(x0)
    xt = x0 + bcast(sigma, x0) * eps
    cond = Condition(
        x0,
        ind,
        text,
        n_views,
        fps=fps,
        padding_mask=padding_mask,
        frame_repeat=frame_repeat,
        augment_noise=draws.aug_noise.to(x0),
        view_indices=view_indices,
    )
    d = train_denoise(model, xt, sigma, cond, aug_sigma=aug_sigma, sigma_data=sigma_data)
    net_xt, net_out, net_x0_pred, x0_pred, logvar = d["xt"], d["net_out"], d["net_x0_pred"], d["x0"], d["logvar"]
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
    pred_mse = (x0 - x0_pred) ** 2
    weights = loss_weight(sigma, sigma_data)
    edm = bcast(weights, x0) * pred_mse
    u = bcast(logvar, x0)
    loss = (edm * torch.exp(-u) + u).mean()
    parts = {
        "sigma": sigma,
        "aug_sigma": aug_sigma,
        "c_skip": c_skip,
        "c_out": c_out,
        "c_in": c_in,
        "c_noise": c_noise,
        "c_in_aug": edm_scalings(aug_sigma, sigma_data)[2],
        "condition_video_indicator": ind,
        "condition_video_input_mask": cond.input_mask,
        "xt": xt,
        "aug_latent_scaled": d["aug_latent_scaled"],
        "net_xt": net_xt,
        "net_in": net_xt * bcast(c_in, x0),
        "net_out": net_out,
        "net_x0_pred": net_x0_pred,
        "x0_pred": x0_pred,
        "logvar": logvar,
        "weights_per_sigma": weights,
        "pred_mse": pred_mse,
    }
    return LossOutput(loss, edm.mean(), pred_mse.mean(), logvar, parts)
