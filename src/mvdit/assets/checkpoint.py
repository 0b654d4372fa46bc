"""Checkpoint loading: safe reads (`weights_only=True`) and strict key/shape matching against the model.

Our files use upstream's names and key layout (`net.*`, `logvar.*`, no wrapper prefixes), so the released
`model.pt`, our `iter_*_reg_model.pt` / `iter_*_ema_model.pt`, and upstream's own loaders all read each other.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mvdit.model.config import NetConfig
from mvdit.model.network import DiffusionModel

log = logging.getLogger(__name__)

# Wrapper fragments that FSDP, activation checkpointing and torch.compile insert into parameter names.
WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
CONTAINER_KEYS = ("model", "state_dict", "ema", "module")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file and the fix."""


class CheckpointMismatchError(CheckpointError):
    """Names or shapes that differ between a checkpoint and the model."""


def _short(names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Read a `.pt` state dict with `torch.load(weights_only=True)` (mmap where possible).

    allow_pickle=True (an explicit user opt-in) falls back to a full unpickle for trusted legacy files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: run the download/train rule that makes it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty: delete it and re-run the rule that writes it")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise CheckpointError(
                f"checkpoint {path} holds pickled objects other than tensors; refusing to unpickle it (unsafe). "
                "If you trust the file, set allow_pickle: true in the experiment"
            ) from e
        log.warning("unpickling %s without weights_only (allow_pickle is set)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file (truncated or corrupt?): delete it and re-run "
            f"the rule that writes it ({type(e).__name__})"
        ) from e
    sd = unwrap_state_dict(obj, path)
    return sd


def unwrap_state_dict(obj: object, path: Path | str = "<memory>") -> dict[str, Tensor]:
    """Plain {name: tensor}: unwraps {"model": {...}}-style containers and strips wrapper fragments."""
    while isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in CONTAINER_KEYS:
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"checkpoint {path} is not a state dict (got {type(obj).__name__}): point to model.pt")
    out = {}
    for k, v in obj.items():
        for frag in WRAPPER_FRAGMENTS:
            k = k.replace(frag, "")
        out[k] = v
    return out


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str = "<checkpoint>",
    reinit: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> LoadReport:
    """Strictly copy `state_dict` into `model`.

    Every model tensor must be present with the right shape and every checkpoint tensor must be used, except:
    names matching a `reinit` pattern keep the model's (fresh) values when missing or mis-shaped, and checkpoint
    names matching an `ignore` pattern are dropped. TransformerEngine `_extra_state` entries are always ignored.
    Both exceptions are logged by name. Anything else raises CheckpointMismatchError naming the keys.
    """
    reinit, ignore = list(reinit), list(ignore)
    own = model.state_dict()
    report = LoadReport()
    missing, mismatched = [], []
    for name, ref in own.items():
        if name not in state_dict or tuple(state_dict[name].shape) != tuple(ref.shape):
            if any(fnmatch.fnmatchcase(name, p) for p in reinit):
                report.reinitialised.append(name)
            elif name not in state_dict:
                missing.append(name)
            else:
                mismatched.append(f"{name} {list(state_dict[name].shape)} vs model {list(ref.shape)}")
    unexpected = []
    for name in state_dict:
        if name in own:
            continue
        if name.endswith("._extra_state") or any(fnmatch.fnmatchcase(name, p) for p in ignore):
            report.ignored.append(name)
        else:
            unexpected.append(name)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if mismatched:
            parts.append(f"wrong shape {len(mismatched)}: {_short(mismatched, 4)}")
        raise CheckpointMismatchError(
            f"checkpoint {source} does not match the model ({'; '.join(parts)}): pick the model preset the "
            "checkpoint was made with, or list intentional changes under reinit:/ignore_keys: in the experiment"
        )
    with torch.no_grad():
        for name, ref in own.items():
            if name in report.reinitialised:
                continue
            ref.copy_(state_dict[name].to(ref.dtype))
            report.loaded.append(name)
    for name in report.reinitialised:
        log.warning("re-initialised (not loaded from %s): %s", source, name)
    for name in report.ignored:
        log.info("ignored checkpoint tensor from %s: %s", source, name)
    return report


def build_model(
    cfg: NetConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> DiffusionModel:
    """Build on the meta device and materialise on `device` in `dtype`.

    seed: initialise every weight deterministically (CPU generator, so the same on any device); None leaves the
    weights uninitialised for a caller that loads every tensor next.
    """
    with torch.device("meta"):
        model = DiffusionModel(cfg).to(dtype)
    model = model.to_empty(device=device)
    model.net.pos_embedder.reset_buffers()
    if seed is not None:
        init_model(model, torch.Generator().manual_seed(seed))
    return model


@torch.no_grad()
def init_model(model: DiffusionModel, gen: torch.Generator) -> None:
    """Fresh initialisation: upstream's recipe for the network, FourierFeatures buffers, xavier for the logvar head."""
    model.net.init_weights(gen)
    ff = model.logvar[0]
    ff.freqs.copy_(2 * torch.pi * torch.randn(ff.freqs.shape, generator=gen))
    ff.phases.copy_(2 * torch.pi * torch.rand(ff.phases.shape, generator=gen))
    w = model.logvar[1].weight
    bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5
    w.copy_(torch.empty(w.shape).uniform_(-bound, bound, generator=gen))


def load_model(
    cfg: NetConfig,
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    reinit: Iterable[str] = (),
    ignore: Iterable[str] = (),
    allow_pickle: bool = False,
) -> tuple[DiffusionModel, LoadReport]:
    """Build the model for `cfg` and strictly load a checkpoint file into it."""
    sd = load_file(path, allow_pickle=allow_pickle)
    reinit = list(reinit)
    model = build_model(cfg, device=device, dtype=dtype, seed=0 if reinit else None)
    report = load_into(model, sd, source=str(path), reinit=reinit, ignore=ignore)
    return model, report
