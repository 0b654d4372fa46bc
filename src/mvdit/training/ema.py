"""Power-EMA of the weights (EDM2's power function, as upstream's `FastEmaModelUpdater` with `ema_rate` s), one rule
for a full model's EMA (an unsharded-like copy of the model, sharded the same way) and for LoRA adapters' EMA.

The update runs on local shards only (no communication): the EMA is sharded exactly like the weights it follows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from mvdit.adapters.lora import LoraError, _file_name, _full, is_lora_key
from mvdit.assets.checkpoint import CheckpointMismatchError, _short


def ema_gamma(rate: float) -> float:
    """EDM2 power-EMA exponent: the largest real root of x^3 + 7x^2 + (16 - s^-2) x + (12 - s^-2)."""
    s2 = rate**-2
    roots = np.roots([1, 7, 16 - s2, 12 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_beta(it: int, gamma: float) -> float:
    """Decay after step `it` (0-based): 0 at it = 0 (the EMA becomes the weights), then (1 - 1/(it+1))^(gamma+1)."""
    return 0.0 if it == 0 else (1 - 1 / (it + 1)) ** (gamma + 1)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update_(ema: Iterable[Tensor], weights: Iterable[Tensor], beta: float) -> None:
    """ema = beta * ema + (1 - beta) * weights, in place, pairwise; fp32 EMA, weights cast to fp32; DTensors by
    their local shards."""
    e_loc = [_local(t) for t in ema]
    w_loc = [_local(t).float() for t in weights]
    torch._foreach_mul_(e_loc, beta)
    torch._foreach_add_(e_loc, w_loc, alpha=1 - beta)


class AdapterEma:
    """Power-EMA of the adapter parameters only (the frozen base is its own average), fp32, sharded like the model.

    Keys are the model's parameter names, so `state_dict()` goes into a DCP checkpoint as it is.
    """

    def __init__(self, model: nn.Module):
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if is_lora_key(n)}
        if not self.shadow:
            raise LoraError("AdapterEma: the model has no LoRA adapters")

    def update(self, model: nn.Module, beta: float) -> None:
        """shadow = beta * shadow + (1 - beta) * adapters (local shards; no communication)."""
        params = dict(model.named_parameters())
        ema_update_(self.shadow.values(), [params[n] for n in self.shadow], beta)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        missing = [k for k in self.shadow if k not in sd]
        unexpected = [k for k in sd if k not in self.shadow]
        if missing or unexpected:
            raise CheckpointMismatchError(f"EMA adapters: missing {_short(missing)}; unexpected {_short(unexpected)}")
        for k, t in self.shadow.items():
            if sd[k] is not t:
                t.copy_(sd[k])

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Full adapter tensors under file names (collective when sharded: call on every rank)."""
        return {_file_name(n): _full(t) for n, t in self.shadow.items()}


def update_ema(ema: nn.Module | AdapterEma, model: nn.Module, beta: float) -> None:
    """One EMA step after an optimizer step: the adapters' EMA, or a full model's EMA (a copy of the model in fp32
    with the same parameter order and sharding)."""
    if isinstance(ema, AdapterEma):
        ema.update(model, beta)
    else:
        ema_update_(ema.parameters(), model.parameters(), beta)
