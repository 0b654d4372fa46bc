"""Context parallelism for inference, applied from outside the model: the processes of a group share one sample's
token sequence (views x frames x patches). Each keeps a contiguous slice of the tokens; for the joint self-attention
it either trades tokens for heads with all-to-alls (mode "ulysses": all tokens of H/P heads, 4 N D / P values moved
per rank and block) or gathers every slice's keys and values ("allgather": 2 N D values per block; any process
count). A rank does 1/P of the attention and GEMM work; the weights are replicated. Every rank ends each forward with
the whole network output, so the sampler runs unchanged and in lockstep on every rank.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# traceable by torch.compile (graph-friendly collectives); all_gather_tensor is renamed in torch 2.13
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
MODES = ("auto", "ulysses", "allgather")  # auto: ulysses from 4 processes on, where their count divides the heads


@dataclass
class ContextParallel:
    """What `MultiviewDiT.context_parallel` expects: rank, world and an all-gather along any dimension."""

    group: dist.ProcessGroup
    rank: int
    world: int
    mode: str = "auto"

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None, mode: str = "auto") -> ContextParallel:
        if mode not in MODES:
            raise ValueError(f"context-parallel mode must be one of {', '.join(MODES)}, got {mode!r}")
        group = group or dist.group.WORLD
        return cls(group, dist.get_rank(group), dist.get_world_size(group), mode)

    def all_gather(self, x: Tensor, dim: int, sizes: tuple[int, ...]) -> Tensor:
        """x holds sizes[rank] entries along dim; returns the sum(sizes) entries of all ranks in rank order.
        Uneven shares are padded to the largest for the collective and trimmed after it."""
        top = max(sizes)
        if x.shape[dim] < top:
            pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, top - x.shape[dim]]
            x = F.pad(x, pad)
        out = _all_gather(x.contiguous(), gather_dim=dim, group=self.group)
        if min(sizes) == top:
            return out
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(out.split(top, dim=dim), sizes, strict=True)], dim=dim)

    def heads_to_tokens(self, x: Tensor, sizes: tuple[int, ...]) -> Tensor:
        """[S, B, H, n, d] (this rank's n tokens, all heads) -> [S, B, H/P, N, d] (all tokens, this rank's heads)."""
        n = sizes[self.rank]
        send = rearrange(x, "s b (p h) n d -> (p n) s b h d", p=self.world).contiguous()
        recv = funcol.all_to_all_single(send, list(sizes), [n] * self.world, group=self.group)
        return rearrange(recv, "n s b h d -> s b h n d")

    def tokens_to_heads(self, x: Tensor, sizes: tuple[int, ...]) -> Tensor:
        """[B, H/P, N, d] -> [B, H, n, d]: the inverse of heads_to_tokens (for one tensor)."""
        n = sizes[self.rank]
        send = rearrange(x, "b h n d -> n b h d").contiguous()
        recv = funcol.all_to_all_single(send, [n] * self.world, list(sizes), group=self.group)
        return rearrange(recv, "(p n) b h d -> b (p h) n d", p=self.world)


def enable(net: nn.Module, group: dist.ProcessGroup | None = None, mode: str = "auto") -> ContextParallel:
    """Share the token sequence of `net` (a MultiviewDiT, or a model holding one as `.net`) over `group`."""
    cp = ContextParallel.of(group, mode)
    getattr(net, "net", net).context_parallel = cp
    return cp


def disable(net: nn.Module) -> None:
    getattr(net, "net", net).context_parallel = None


@dataclass
class Processes:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_processes(device: str) -> Processes:
    """One process, or torchrun's group (NCCL, one GPU per local rank; gloo on the CPU). `device` is the requested
    device type ("cuda", "cuda:1", "cpu"); under torchrun a CUDA device becomes cuda:<LOCAL_RANK>."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world == 1:
        return Processes(0, 1, 0, dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=int(os.environ.get("MVDIT_DIST_TIMEOUT", "1800")))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    return Processes(dist.get_rank(), world, local_rank, dev)


def peer_failed(e: BaseException) -> bool:
    """Whether `e` is what a collective raises because another process of the run died (gloo: its connection
    closed; NCCL: the communicator was aborted): that process has said what went wrong."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")
    )


def rank_tag() -> str:
    """' [rank N]' for the other processes of a context-parallel run (the main process speaks plainly)."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f" [rank {rank}]"


def finish() -> None:
    """Leave the process group (if one was started), so that torchrun sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(t: Tensor | None, shape, dtype: torch.dtype, procs: Processes) -> Tensor:
    """Rank 0's tensor on every rank (others pass None and give the shape and dtype to receive)."""
    if procs.world == 1:
        return t
    buf = t.contiguous() if procs.main else torch.empty(tuple(shape), dtype=dtype, device=procs.device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
        raise ValueError(f"broadcast of {tuple(buf.shape)} {buf.dtype}, expected {tuple(shape)} {dtype}")
    dist.broadcast(buf, src=0)
    return buf


def gather_floats(value: float, procs: Processes) -> list[float]:
    """One number from every rank (e.g. peak memory), on every rank."""
    if procs.world == 1:
        return [value]
    t = torch.tensor([value], dtype=torch.float64, device=procs.device)
    out = [torch.empty_like(t) for _ in range(procs.world)]
    dist.all_gather(out, t)
    return [float(o.item()) for o in out]
