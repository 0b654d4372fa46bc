"""Samplers: the released inference's Karras-schedule deterministic Euler (diffusers EDMEulerScheduler, no churn),
and the RES 2nd-order multistep sampler of upstream's training code. Each takes a denoise callable, not a model.
"""

from __future__ import annotations

import math
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


def res_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """[N + 1] float64 schedule of the RES sampler, from sigma_max down to sigma_min (no final 0)."""
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + i / num_steps * (min_inv - max_inv)) ** rho


def _phi1(z: float) -> float:
    return math.expm1(z) / z


def _phi2(z: float) -> float:
    return (_phi1(z) - 1) / z


def sample_res_2ab(
    x0_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    sigmas: Tensor,
    callback: Callable[[int, dict], None] | None = None,
) -> Tensor:
    """RES "2ab": exponential 2nd-order Adams-Bashforth in log-sigma, then a final denoise at sigmas[-1].

    x0_fn(x fp32, sigma fp32) -> x0. The state is float64 after the first step; the result is fp32.
    """
    sig = [float(s) for s in sigmas]
    x = noise * sig[0]
    prev_x0 = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        x0 = x0_fn(x.float(), torch.tensor(s, dtype=torch.float32)).double()
        if callback is not None:
            callback(i, {"x_in": x.float(), "sigma": s, "x0": x0})
        if prev_x0 is None:
            x = (s_next / s) * x.double() + (1 - s_next / s) * x0
        else:
            h = math.log(s / s_next)
            c2 = math.log(s / sig[i - 1]) / h
            b1 = _phi1(-h) - _phi2(-h) / c2
            b2 = _phi2(-h) / c2
            x = math.exp(-h) * x + h * (b1 * x0 + b2 * prev_x0)
        prev_x0 = x0
    x0 = x0_fn(x.float(), torch.tensor(sig[-1], dtype=torch.float32))
    if callback is not None:
        callback(len(sig) - 1, {"x_in": x.float(), "sigma": sig[-1], "x0": x0.double()})
    return x0.float()
