"""Distributed training set-up applied from outside the model: process group and device mesh, FSDP2 sharding per
transformer block then the root, activation checkpointing, and full/sharded state dicts for checkpoints.
"""

from __future__ import annotations

import datetime
import functools
import os
import types
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
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from mvdit.checkpoint import unwrap_state_dict
from mvdit.network import DiffusionModel


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


SDPA_OPS = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def selective_checkpoint_context():
    """Selective checkpointing policy: keep the outputs of self-attention (query and key of the same length: the
    costly part, ~0.6 GB per 7B block at 76,320 tokens), recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    ops = {getattr(torch.ops.aten, n).default for n in SDPA_OPS if hasattr(torch.ops.aten, n)}

    def policy(ctx, op, *args, **kwargs):
        if op in ops and args[0].shape[-2] == args[1].shape[-2]:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


_COMPILED: dict[str, object] = {}


def _selective_forward(block: nn.Module, *args, compiled: bool = False):
    """Block.forward (or its one compiled graph) under the selective policy, checkpointed as a function inside
    __call__: FSDP2's hooks stay outside the recomputed region (the composable checkpoint's recompute reruns them
    under the policy's dispatch mode and fails: 'profiler._record_function_enter_new ... not found in storage')."""
    fn = type(block).forward
    if compiled:
        fn = _COMPILED.setdefault("block", torch.compile(fn, dynamic=False))
    return torch_checkpoint(fn, block, *args, use_reentrant=False, context_fn=selective_checkpoint_context())


def checkpoint_activations(block: nn.Module, mode: str, compiled: bool = False) -> None:
    """Recompute `block`'s activations in backward, applied from outside before fully_shard. "full": torch's
    composable checkpoint (module hooks; parameter names unchanged); "selective": keep the self-attention outputs,
    recompute the rest (the one forward replacement left, see _selective_forward); "none"."""
    from torch.distributed._composable import checkpoint

    if mode == "full":
        checkpoint(block)
    elif mode == "selective":
        block.forward = types.MethodType(functools.partial(_selective_forward, compiled=compiled), block)
    elif mode != "none":
        raise ValueError(f"activation_checkpointing must be none, full or selective, got {mode!r}")


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
            block.compile(dynamic=False)  # one graph shared by every block (regional compilation)
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
