"""The released inference's sampler: Karras-schedule deterministic Euler (diffusers EDMEulerScheduler, no churn). It
takes a denoise callable, not a model. (The RES sampler of upstream's training code, which only the reference vectors
use, is in mvdit.refvec.parity.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def karras_sigmas(num_steps: int, sigma_min: float = 0.0002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """[N + 1] fp32: Karras schedule evaluated in fp32 as diffusers does (sigma_0 = 79.999985), then a final 0."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, torch.zeros(1)])


def init_noise_sigma(sigma_max: float = 80.0) -> float:
    """The Euler scheduler scales unit noise by sqrt(sigma_max^2 + 1), not sigma_max."""
    return (sigma_max**2 + 1) ** 0.5


def euler_step(x_in: Tensor, x0: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x_in + (x_in - x0) / sigma * (sigma_next - sigma), in fp32, returned in x_in's dtype."""
    xf = x_in.float()
    return (xf + (xf - x0.float()) / sigma * (sigma_next - sigma)).to(x_in.dtype)


StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def sample_euler(
    step_fn: StepFn,
    noise: Tensor,
    sigmas: Tensor,
    sigma_max: float = 80.0,
    callback: Callable[[int, dict], None] | None = None,
) -> Tensor:
    """Deterministic Euler from unit `noise` over `sigmas` ([N + 1], ending in 0).

    step_fn(x, sigma) -> (x_in, x0): the state after any condition replacement and the denoised estimate.
    """
    x = noise * init_noise_sigma(sigma_max)
    for i in range(len(sigmas) - 1):
        x_in, x0 = step_fn(x, sigmas[i])
        x = euler_step(x_in, x0, sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i, {"x_in": x_in, "x0": x0, "x_next": x})
    return x
