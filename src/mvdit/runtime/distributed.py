"""Distributed training set-up applied from outside the model: process group and device mesh, FSDP2 sharding per
transformer block then the root (with activation checkpointing and compilation per block, from their own modules),
and full/sharded state dicts for checkpoints.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mvdit.assets.checkpoint import unwrap_state_dict
from mvdit.model.network import DiffusionModel
from mvdit.runtime.activation_checkpointing import checkpoint_activations
from mvdit.runtime.compile import compile_block


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(shard_group_size: int | None = None, hybrid: bool = False) -> Dist:
    """Process group from torchrun's environment (or a single local process), NCCL on GPUs, gloo on CPU.

    hybrid: a 2-D (replicate, shard) mesh for HSDP across nodes, sharding within groups of shard_group_size.
    """
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=int(os.environ.get("MVDIT_DIST_TIMEOUT", "1800")))
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world, local_rank = 0, 1, 0
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dev_type = "cuda" if cuda else "cpu"
    if hybrid and shard_group_size and world > shard_group_size:
        mesh = init_device_mesh(
            dev_type, (world // shard_group_size, shard_group_size), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(dev_type, (world,), mesh_dim_names=("shard",))
    return Dist(rank, world, local_rank, device, mesh)


def parallelize(
    model: DiffusionModel,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool | str = False,
    compile_blocks: bool = False,
) -> DiffusionModel:
    """Shard each transformer block, then the root (net + logvar). Master weights stay in their dtype (fp32);
    param_dtype (e.g. bf16) is the compute dtype, gradients are reduced in fp32.

    activation_checkpointing: "none"/False, "full"/True (recompute each block in backward), or "selective" (keep the
    self-attention outputs, recompute the rest). compile_blocks: torch.compile each block (selective +
    compiled reached 47 % MFU per 7B block on an H100, BENCHMARKS.md).
    """
    mode = {False: "none", True: "full"}.get(activation_checkpointing, activation_checkpointing)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
    for block in model.net.blocks.values():
        if compile_blocks and mode != "selective":
            compile_block(block)
        checkpoint_activations(block, mode, compiled=compile_blocks)
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on every rank's call; only rank 0 receives tensors. Collective."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap_state_dict(sd) if sd else {}


def sharded_state(model: nn.Module, ema: nn.Module, optim: torch.optim.Optimizer) -> dict:
    """The sharded training state for DCP: master weights, EMA and optimizer."""
    return {
        "model": get_model_state_dict(model),
        "ema": get_model_state_dict(ema),
        "optim": get_optimizer_state_dict(model, optim),
    }


def load_sharded_state(model: nn.Module, ema: nn.Module, optim: torch.optim.Optimizer, state: dict) -> None:
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, optim, state["optim"])


def broadcast_full_state(model: nn.Module, full_sd: dict | None) -> None:
    """Load a full state dict held by rank 0 into a sharded model (other ranks pass {}). The caller's dict is left
    untouched (torch replaces entries of the dict it is given with the sharded tensors).
    """
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, dict(full_sd or {}), options=opts)
