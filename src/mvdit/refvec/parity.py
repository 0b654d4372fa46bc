"""Code that only the reference-vector checker runs: the guided training-side denoise and the RES "2ab" sampler
that upstream's reference vectors record (inference runs the released pipeline's Euler sampler, mvdit.model.sampler).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mvdit.model.edm import Condition, train_denoise


def guided_train_x0(net: nn.Module, x: Tensor, sigma: Tensor, cond: Condition, guidance: float):
    """x0_c + w (x0_c - x0_u) through the training-side denoise (what the RES sampler calls)."""
    c = train_denoise(net, x, sigma, cond)
    u = train_denoise(net, x, sigma, cond.uncond())
    return c["x0"] + guidance * (c["x0"] - u["x0"]), c, u


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
