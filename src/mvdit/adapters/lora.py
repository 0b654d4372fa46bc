"""LoRA adapters on the DiT's attention projections and MLP, through peft (`LoraConfig` + `inject_adapter_in_model`).

Pure functions and small classes; nothing here starts processes or shards. The training script adds the adapters
before `parallelize` (FSDP2 per block then root works unchanged: the frozen base and the trainable
adapters of a block share one FSDP group; with bf16 compute every tensor is all-gathered in bf16).

Parameter names (a target module X, e.g. `net.blocks.block0.blocks.0.block.attn.to_q.0`):

- in the model after `add_lora` (peft's layout): `X.base_layer.weight` (frozen), `X.lora_A.default.weight` [r, in]
  and `X.lora_B.default.weight` [out, r] (trainable);
- in adapter files and `adapter_state_dict` (peft's saved-adapter layout, adapter name dropped): `X.lora_A.weight`,
  `X.lora_B.weight`; the settings are in the safetensors metadata (`mvdit_lora`, JSON);
- after `merge_state_dict`: the plain upstream name `X.weight` = base + (alpha / rank) * B @ A, so the result loads
  strictly into a plain `DiffusionModel` (and upstream) like any post-trained checkpoint.

Meta-device builds: `add_lora` on a meta model creates meta adapters. After `to_empty`, either call
`init_lora(model, generator)` (unsharded model) or load a full state dict made by `lora_init_state_dict` (sharded
model, e.g. through `broadcast_full_state`); both apply peft's default init (A kaiming-uniform with
a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B zeros) from a CPU generator, so every device gets the same values.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mvdit.assets.checkpoint import (
    WRAPPER_FRAGMENTS,
    CheckpointError,
    CheckpointMismatchError,
    _short,
    load_into,
    load_model,
    unwrap_state_dict,
)
from mvdit.assets.files import atomic_write
from mvdit.model.config import NetConfig

ADAPTER = "default"  # peft's adapter name inside the model
DEFAULT_TARGETS = ("to_q.0", "to_k.0", "to_v.0", "to_out.0", "layer1", "layer2")
FORMAT = "mvdit-lora/1"
META_KEY = "mvdit_lora"  # safetensors metadata key holding the settings (JSON)
_PARTS = ("lora_A", "lora_B")


class LoraError(ValueError):
    """Invalid LoRA settings or a model that cannot take the requested adapters."""


@dataclass(frozen=True)
class LoraSettings:
    """rank r, alpha (scaling alpha / r), dropout on the adapter input, and the target Linear modules.

    A target matches a module whose full name equals it or ends with "." + target; every target must match at least
    one nn.Linear. The default adapts q, k, v, out of self- and cross-attention and both MLP layers of every block.
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise LoraError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise LoraError(f"lora targets must be a non-empty list of module names, got {self.targets!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def matches(self, module_name: str) -> bool:
        return any(module_name == t or module_name.endswith("." + t) for t in self.targets)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": float(self.alpha), "dropout": float(self.dropout), "targets": self.targets}

    @classmethod
    def from_dict(cls, d: Mapping) -> LoraSettings:
        """From an experiment's `lora:` block or a file's metadata; unknown keys are an error (`enabled` is skipped)."""
        d = {k: v for k, v in d.items() if k != "enabled"}
        unknown = sorted(set(d) - {"rank", "alpha", "dropout", "targets"})
        if unknown:
            raise LoraError(f"unknown lora settings: {', '.join(unknown)} (allowed: rank, alpha, dropout, targets)")
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)


# ------------------------------------------------------------------------------------------------------- names


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _file_name(name: str) -> str:
    """Model or file name of an adapter tensor -> the file name (`X.lora_A.weight`)."""
    for part in _PARTS:
        name = name.replace(f".{part}.{ADAPTER}.", f".{part}.")
    return name


def _strip(name: str) -> str:
    """Drop the fragments FSDP1, activation checkpointing and torch.compile insert into parameter names."""
    for frag in WRAPPER_FRAGMENTS:
        name = name.replace(frag, "")
    return name


def _split(name: str) -> tuple[str, str]:
    """`X.lora_A.weight` -> (X, "lora_A")."""
    for part in _PARTS:
        tail = f".{part}.weight"
        if name.endswith(tail):
            return name[: -len(tail)], part
    raise LoraError(f"{name} is not a LoRA weight name (expected <module>.lora_A.weight or <module>.lora_B.weight)")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: peft LoRA layer} in module order."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (what the optimizer, grad clipping and EMA see)."""
    return [p for n, p in model.named_parameters() if is_lora_key(n)]


def target_modules(model: nn.Module, s: LoraSettings) -> list[str]:
    """Full names of the nn.Linear modules `s` adapts; every target must match at least one Linear."""
    names, seen = [], set()
    for name, m in model.named_modules():
        if not s.matches(name):
            continue
        if not isinstance(m, nn.Linear):
            raise LoraError(f"lora target {name} is a {type(m).__name__}, not an nn.Linear: name its Linear instead")
        names.append(name)
        seen.update(t for t in s.targets if name == t or name.endswith("." + t))
    unmatched = [t for t in s.targets if t not in seen]
    if unmatched:
        raise LoraError(f"lora targets match no module of the model: {', '.join(unmatched)}")
    return names


# ------------------------------------------------------------------------------------------------------- model


def add_lora(
    model: nn.Module,
    s: LoraSettings,
    base_dtype: torch.dtype | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Inject peft LoRA layers into the targets (in place) and freeze every other parameter.

    base_dtype casts the frozen parameters (e.g. bf16 on GPUs; buffers keep their dtype); adapters are kept in
    adapter_dtype (fp32 master weights). On a real device the adapters get peft's default init, from `generator`
    (deterministic, via `init_lora`) or else from torch's global RNG; on the meta device they stay on meta (see
    `init_lora` / `lora_init_state_dict`). Returns the model.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if lora_layers(model):
        raise LoraError("the model already has LoRA adapters")
    names = target_modules(model, s)
    cfg = LoraConfig(
        r=s.rank,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=names,  # full names: peft matches them exactly
        bias="none",
        init_lora_weights=True,
    )
    model = inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    with torch.no_grad():
        for name, p in model.named_parameters():
            lora = is_lora_key(name)
            p.requires_grad_(lora)
            dtype = adapter_dtype if lora else base_dtype
            if dtype is not None and p.dtype != dtype:
                p.data = p.data.to(dtype)
    model.lora_settings = s
    if generator is not None and not any(p.is_meta for p in lora_parameters(model)):
        init_lora(model, generator)
    return model


def settings_of(model: nn.Module) -> LoraSettings:
    s = getattr(model, "lora_settings", None)
    if s is None:
        raise LoraError("the model has no LoRA adapters: call mvdit.adapters.lora.add_lora first")
    return s


def _init_pair(out_features: int, in_features: int, rank: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """peft's default init drawn on a CPU generator: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5))."""
    bound = 1.0 / math.sqrt(in_features)
    a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=gen)
    return a, torch.zeros(out_features, rank)


@torch.no_grad()
def init_lora(model: nn.Module, generator: torch.Generator) -> None:
    """Deterministic peft default init of every adapter of an unsharded model (e.g. after `to_empty`), in module
    order; gives the same values as `lora_init_state_dict` with a generator in the same state."""
    for layer in lora_layers(model).values():
        a_w, b_w = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        a, b = _init_pair(b_w.shape[0], a_w.shape[1], a_w.shape[0], generator)
        a_w.copy_(a)
        b_w.copy_(b)


def lora_init_state_dict(
    plain_sd: Mapping[str, Tensor],
    s: LoraSettings,
    generator: torch.Generator,
    adapter_dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """A plain state dict (upstream names) -> the full state dict of the model after `add_lora`: target weights
    renamed to `X.base_layer.weight` and freshly initialised adapters added (what `broadcast_full_state` loads)."""
    out: dict[str, Tensor] = {}
    for name, t in plain_sd.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and t.dim() == 2 and s.matches(module) and not is_lora_key(name):
            a, b = _init_pair(t.shape[0], t.shape[1], s.rank, generator)
            out[f"{module}.base_layer.weight"] = t
            out[f"{module}.lora_A.{ADAPTER}.weight"] = a.to(adapter_dtype)
            out[f"{module}.lora_B.{ADAPTER}.weight"] = b.to(adapter_dtype)
        elif name.endswith(".bias") and s.matches(name.removesuffix(".bias")):
            out[f"{name.removesuffix('.bias')}.base_layer.bias"] = t
        else:
            out[name] = t
    return out


def _full(t: Tensor) -> Tensor:
    """A DTensor's full value (collective: every rank must call), else the tensor; detached, on the CPU."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def adapter_state_dict(model_or_sd: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Only the adapter tensors, under the file names `X.lora_A.weight` / `X.lora_B.weight` (CPU tensors).

    From a model, sharded (DTensor) adapters are gathered: a collective, so call it on every rank. From a state dict
    (e.g. `full_state_dict(model)`), wrapper fragments are stripped and non-adapter keys dropped.
    """
    if isinstance(model_or_sd, nn.Module):
        items = [(n, p) for n, p in model_or_sd.named_parameters() if is_lora_key(n)]
        items = [(n, _full(p)) for n, p in items]
    else:
        items = [(n, t) for n, t in model_or_sd.items() if is_lora_key(n)]
    return {_file_name(_strip(n)): t.detach() for n, t in items}


# ------------------------------------------------------------------------------------------------------- files


def save_adapter(
    path: str | os.PathLike, sd: Mapping[str, Tensor], s: LoraSettings, metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write adapter tensors (from `adapter_state_dict`) as safetensors, settings in the metadata."""
    from safetensors.torch import save_file

    other = [k for k in sd if not is_lora_key(k)]
    if other:
        raise LoraError(f"save_adapter got non-adapter tensors: {_short(other)} (pass adapter_state_dict(...))")
    tensors = {_file_name(k): v.detach().to("cpu").contiguous() for k, v in sd.items()}
    for k in tensors:
        _split(k)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta |= {"format": FORMAT, META_KEY: json.dumps(s.to_dict(), sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], LoraSettings, dict[str, str]]:
    """(tensors, settings, metadata) of an adapter file written by `save_adapter`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter {path} does not exist: run the LoRA training that writes it")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for foreign or truncated files
        raise CheckpointError(f"adapter {path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if META_KEY not in meta:
        raise CheckpointError(f"adapter {path} has no LoRA settings in its metadata ({META_KEY}): not an mvdit adapter")
    try:
        s = LoraSettings.from_dict(json.loads(meta[META_KEY]))
    except (LoraError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"adapter {path}: unreadable LoRA settings in its metadata: {e}") from e
    return sd, s, meta


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> LoraSettings:
    """Strictly load an adapter file into a model prepared with `add_lora` (unsharded): the file's settings must
    equal the model's, and its tensor names and shapes must be exactly the model's adapters."""
    sd, s, _ = read_adapter(path)
    own = settings_of(model)
    if any(hasattr(p, "device_mesh") for p in lora_parameters(model)):
        raise LoraError("load_adapter needs an unsharded model: load the adapter before parallelize")
    if s != own:
        diff = [
            f"{k} {v!r} in the file vs {own.to_dict()[k]!r}" for k, v in s.to_dict().items() if own.to_dict()[k] != v
        ]
        raise CheckpointMismatchError(f"adapter {path} was made with other LoRA settings ({'; '.join(diff)})")
    params = {_file_name(n): p for n, p in model.named_parameters() if is_lora_key(n)}
    missing = [k for k in params if k not in sd]
    unexpected = [k for k in sd if k not in params]
    wrong = [
        f"{k} {list(sd[k].shape)} vs model {list(p.shape)}"
        for k, p in params.items()
        if k in sd and sd[k].shape != p.shape
    ]
    if missing or unexpected or wrong:
        parts = [f"missing {len(missing)}: {_short(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)}: {_short(unexpected)}"] if unexpected else []
        parts += [f"wrong shape {len(wrong)}: {_short(wrong, 4)}"] if wrong else []
        raise CheckpointMismatchError(f"adapter {path} does not match the model's adapters ({'; '.join(parts)})")
    for k, p in params.items():
        p.copy_(sd[k].to(p.dtype))
    return s


# ------------------------------------------------------------------------------------------------------- merge


def merge_state_dict(
    sd: Mapping[str, Tensor],
    s: LoraSettings,
    adapters: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, Tensor]:
    """Fold the adapters into plain upstream names: `X.weight` = base + (alpha / rank) * B @ A, computed in fp32.

    sd: a full state dict of a LoRA model (`X.base_layer.weight` + adapters) or a plain one (`X.weight`);
    adapters: adapter tensors (either naming) used instead of those in sd (e.g. the EMA adapters). Every adapted
    module needs both A and B and every adapter must find its base weight. Merged weights are returned in `dtype`
    (None: the base weight's dtype; fp32 by default, since bf16 rounds small updates away); other tensors unchanged.
    """
    sd = unwrap_state_dict(dict(sd))
    lora = {_file_name(k): v for k, v in (adapters if adapters is not None else sd).items() if is_lora_key(k)}
    other = [k for k in adapters or {} if not is_lora_key(k)]
    if other:
        raise LoraError(f"merge_state_dict: adapters hold non-adapter tensors: {_short(other)}")
    pairs: dict[str, dict[str, Tensor]] = {}
    for k, v in lora.items():
        module, part = _split(k)
        pairs.setdefault(module, {})[part] = v
    incomplete = [m for m, p in pairs.items() if len(p) != 2]
    if incomplete:
        raise LoraError(f"merge_state_dict: adapters without both lora_A and lora_B: {_short(incomplete)}")
    bad_rank = [m for m, p in pairs.items() if p["lora_A"].shape[0] != s.rank or p["lora_B"].shape[1] != s.rank]
    if bad_rank:
        raise LoraError(f"merge_state_dict: adapters of another rank than {s.rank}: {_short(bad_rank)}")
    out: dict[str, Tensor] = {}
    used, no_adapter = set(), []
    for name, t in sd.items():
        if is_lora_key(name):
            continue
        plain = name.replace(".base_layer.", ".")
        module = plain.removesuffix(".weight")
        if plain.endswith(".weight") and module in pairs:
            a, b = pairs[module]["lora_A"], pairs[module]["lora_B"]
            if (b.shape[0], a.shape[1]) != tuple(t.shape):
                raise LoraError(
                    f"merge_state_dict: adapter of {module} is {b.shape[0]}x{a.shape[1]}, base {list(t.shape)}"
                )
            out[plain] = (t.float() + s.scaling * (b.float() @ a.float())).to(dtype or t.dtype)
            used.add(module)
        else:
            if name.endswith(".base_layer.weight"):
                no_adapter.append(module)
            out[plain] = t
    if no_adapter:
        raise LoraError(f"merge_state_dict: adapted modules without adapter tensors: {_short(no_adapter)}")
    orphans = sorted(set(pairs) - used)
    if orphans:
        raise LoraError(f"merge_state_dict: adapters whose base weight is not in the state dict: {_short(orphans)}")
    return out


# ------------------------------------------------------------------------------------------------------- loading


def load_model_with_adapter(
    cfg: NetConfig,
    base_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    merge: bool = False,
    allow_pickle: bool = False,
    reinit: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> nn.Module:
    """Base checkpoint (strict) + adapter file (strict) -> a model for inference, everything in `dtype`.

    merge=False keeps peft's LoRA layers (base and adapter applied separately); merge=True returns a plain model
    with the merged weights (`merge_state_dict`), the same as loading the merged checkpoint.
    """
    model, _ = load_model(
        cfg, base_path, device=device, dtype=dtype, reinit=reinit, ignore=ignore, allow_pickle=allow_pickle
    )
    ad, s, _ = read_adapter(adapter_path)
    if merge:
        merged = merge_state_dict(model.state_dict(), s, adapters=ad, dtype=torch.float32)
        load_into(model, merged, source=f"{base_path} + {adapter_path}")
        return model
    add_lora(model, s, adapter_dtype=dtype)
    load_adapter(model, adapter_path)
    return model
