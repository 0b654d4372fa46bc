"""Activation checkpointing of a transformer block, applied from outside the model before FSDP2 shards it: "full"
recomputes the block in backward, "selective" keeps the self-attention outputs (the costly part) and recomputes the
rest, "none" keeps everything.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from mvdit.runtime.compile import compiled_forward

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


def _selective_forward(block: nn.Module, *args, compiled: bool = False):
    """Block.forward (or its one compiled graph) under the selective policy, checkpointed as a function inside
    __call__: FSDP2's hooks stay outside the recomputed region (the composable checkpoint's recompute reruns them
    under the policy's dispatch mode and fails: 'profiler._record_function_enter_new ... not found in storage')."""
    fn = compiled_forward(type(block)) if compiled else type(block).forward
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
