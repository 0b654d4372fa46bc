"""Compilation of the transformer blocks, applied from outside the model. Every block shares one graph (regional
compilation: the blocks have the same code and shapes), so the first block pays the compile and the rest reuse it.
"""

from __future__ import annotations

import torch
from torch import nn

_COMPILED: dict[type, object] = {}


def compile_block(block: nn.Module) -> None:
    """torch.compile one block in place (`nn.Module.compile`: parameter names unchanged)."""
    block.compile(dynamic=False)


def compile_blocks(net: nn.Module) -> None:
    """torch.compile every transformer block of `net` in place (measured 1.14x per 7B forward on an H100,
    BENCHMARKS.md). The first call pays the compilation (about 20 s on an H100)."""
    for block in net.blocks.values():
        compile_block(block)


def compiled_forward(block_type: type):
    """The compiled unbound `forward` of a block class, one per class: for wrappers (selective activation
    checkpointing) that call the forward as a function inside their own region."""
    if block_type not in _COMPILED:
        _COMPILED[block_type] = torch.compile(block_type.forward, dynamic=False)
    return _COMPILED[block_type]
