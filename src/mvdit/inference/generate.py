"""Multiview Video2World generation as the released pipeline runs it: condition latents from the input frames,
per-view text embeddings, Karras-schedule Euler sampling with classifier-free guidance. Pure: the network, the
condition latent and the text embeddings come in as arguments (the sampling session sets them up).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mvdit.constants import CAMERAS
from mvdit.model.edm import Condition, condition_indicator, inference_x0, num_condition_latent_frames
from mvdit.model.sampler import karras_sigmas, sample_euler

FRAME_REPEAT_CAMERAS = ("back_left", "back_right")  # the release marks these views (value 10, divided by 10)


def pad_condition_video(views: list[Tensor], num_frames: int) -> Tensor:
    """Per-view pixels [3, N, H, W] (N input frames) -> [1, 3, V*num_frames, H, W], each view zero-padded at the end
    (zero = mid-grey), as upstream pads the conditioning frames to the 57-frame chunk.
    """
    out = []
    for v in views:
        pad = torch.zeros(v.shape[0], num_frames - v.shape[1], *v.shape[2:], dtype=v.dtype, device=v.device)
        out.append(torch.cat([v, pad], dim=1))
    return torch.cat(out, dim=1)[None]


def frame_repeat_for(cameras: list[str], value: float) -> Tensor | None:
    """[1, V] conditioner output: value / 10 on back_left/back_right; None when value < 0 (upstream's -1)."""
    if value < 0:
        return None
    return torch.tensor([[value / 10.0 if c in FRAME_REPEAT_CAMERAS else 0.0 for c in cameras]])


def text_context(embs: Tensor, text_len: int) -> Tensor:
    """Per-view embeddings [V, L, 1024] (padding rows zero) -> [1, V*text_len, 1024], truncated or zero-padded."""
    v, length, d = embs.shape
    out = embs.new_zeros(v, text_len, d)
    out[:, : min(length, text_len)] = embs[:, :text_len]
    return out.reshape(1, v * text_len, d)


def generate(
    net: torch.nn.Module,
    gt_latent: Tensor,
    text: Tensor,
    cameras: list[str],
    num_input_frames: int,
    steps: int = 35,
    guidance: float = 7.0,
    seed: int = 1,
    compat: str = "fixed",
    fps: float = 24.0,
    frame_repeat: float = 10.0,
    batch_guidance: bool = False,
    progress: bool = True,
    step_callback: Callable[[int], None] | None = None,
) -> Tensor:
    """gt_latent [1, 16, V*T, h, w] (normalised x sigma_data, of the padded input); text [1, V*L, 1024].

    Initial noise comes from a CPU torch generator seeded with `seed` (the same on every device); the condition
    augmentation noise from numpy RandomState(seed), as upstream. Returns the latent [1, 16, V*T, h, w] (fp32).
    """
    dev, dtype = gt_latent.device, gt_latent.dtype
    v = len(cameras)
    t = gt_latent.shape[2] // v
    n_cond = min(num_condition_latent_frames(num_input_frames, compat), t)
    aug = np.random.RandomState(seed).standard_normal(tuple(gt_latent.shape)).astype(np.float32)
    fr = frame_repeat_for(cameras, frame_repeat)
    cond = Condition(
        gt_latent=gt_latent,
        indicator=condition_indicator(v, t, n_cond, dtype=dtype, device=dev),
        crossattn_emb=text.to(dev, dtype),
        n_views=v,
        fps=torch.tensor([fps], device=dev, dtype=dtype),
        padding_mask=torch.zeros(1, 1, *gt_latent.shape[-2:], device=dev, dtype=dtype),
        frame_repeat=None if fr is None else fr.to(dev, dtype),
        augment_noise=torch.from_numpy(aug).to(dev, dtype),
        view_indices=torch.tensor([CAMERAS.index(c) for c in cameras], device=dev),
    )
    noise = torch.randn(gt_latent.shape, generator=torch.Generator().manual_seed(seed)).to(dev, dtype)
    sigmas = karras_sigmas(steps).to(dev)
    bar = tqdm(
        total=steps, desc="sampling", unit="step", disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 10
    )

    def step(x: Tensor, sigma: Tensor):
        r = inference_x0(net, x, sigma, cond, guidance, compat, batch_guidance)
        return r["x_in"], r["x0"]

    def done(i: int, _state: dict) -> None:
        bar.update(1)
        if step_callback is not None:
            step_callback(i)

    with torch.no_grad():
        out = sample_euler(step, noise, sigmas, callback=done)
    bar.close()
    return out.float()


def inference_dtype(device: torch.device, precision: str) -> torch.dtype:
    """bf16 on a GPU where infer.precision asks for it (fp8 keeps bf16 around its FP8 kernels); fp32 otherwise (the
    CPU has no fast bf16 kernels)."""
    return torch.bfloat16 if (device.type == "cuda" and precision in ("bf16", "fp8")) else torch.float32


def full_grid_views(views: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Views by camera name -> six arrays in CAMERAS order, black where a camera was not generated."""
    ref = next(iter(views.values()))
    return [views.get(c, np.zeros_like(ref)) for c in CAMERAS]
