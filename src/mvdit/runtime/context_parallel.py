"""Context parallelism for inference, applied from outside the model: the processes of a group share one sample's
token sequence (views x frames x patches). Each keeps a contiguous slice of the tokens; for the joint self-attention
it either trades tokens for heads with all-to-alls (mode "ulysses": all tokens of H/P heads, 4 N D / P values moved
per rank and block) or gathers every slice's keys and values ("allgather": 2 N D values per block; any process
count). A rank does 1/P of the attention and GEMM work; the weights are replicated. Every rank ends each forward with
the whole network output, so the sampler runs unchanged and in lockstep on every rank.

`install`/`enable` reach the network only through its seams: a forward pre-hook passes this rank's `TokenSlice`, each
self-attention's `attention_fn` becomes a `ShardedAttention`, and a forward hook on the final layer gathers the output.
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

from mvdit.model.network import TokenSlice

# traceable by torch.compile (graph-friendly collectives); all_gather_tensor is renamed in torch 2.13
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
MODES = ("auto", "ulysses", "allgather")  # auto: ulysses from 4 processes on, where their count divides the heads


@dataclass
class ContextParallel:
    """A process group seen by `install`: rank, world, mode and the collectives of the sharded forward."""

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


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n tokens; the first n % world ranks hold one token more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def shard_sizes(n: int, world: int) -> tuple[int, ...]:
    """Every rank's share of n tokens, in rank order."""
    return tuple(b - a for a, b in (shard_bounds(n, r, world) for r in range(world)))


def uses_ulysses(mode: str, world: int, num_heads: int) -> bool:
    """Whether self-attention trades tokens for heads; auto: from 4 processes on, where their count divides the
    heads (at 2 both move the same bytes and the all-gather computes 1 % faster)."""
    ulysses = {"auto": world >= 4 and num_heads % world == 0, "ulysses": True, "allgather": False}[mode]
    if ulysses and num_heads % world:
        raise ValueError(
            f"ulysses context parallelism needs {world} processes to divide {num_heads} heads; use allgather"
        )
    return ulysses


class ShardedAttention:
    """The self-attention function under context parallelism (installed as `Attention.attention_fn`): q, k, v
    [B, H, n, d] of this rank's n tokens -> the output of its tokens, by `inner` (the function it replaced: SDPA, or
    FP8 attention) over all keys and values."""

    def __init__(self, sharding: Sharding, inner):
        self.sharding, self.inner = sharding, inner

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        comm, sizes = self.sharding.comm, self.sharding.sizes
        if self.sharding.ulysses:  # all tokens of H/P heads; back to this rank's tokens of all heads
            q, k, v = comm.heads_to_tokens(torch.stack([q, k, v]), sizes).unbind(0)
            return comm.tokens_to_heads(self.inner(q, k, v), sizes)
        k, v = comm.all_gather(torch.stack([k, v]), 3, sizes).unbind(0)
        return self.inner(q, k, v)


class Sharding:
    """Context parallelism installed on one MultiviewDiT: a forward pre-hook hands the network this rank's
    TokenSlice (and records every rank's share for the collectives), each self-attention gets a ShardedAttention,
    and a forward hook on the final layer gathers every rank's output tokens. `remove` undoes all three."""

    def __init__(self, net: nn.Module, comm):
        self.net, self.comm = net, comm
        self.ulysses = uses_ulysses(comm.mode, comm.world, net.cfg.num_heads)
        self.sizes: tuple[int, ...] = ()
        self.attentions = [
            sub.block.attn for blk in net.blocks.values() for sub in blk.blocks if sub.kind == "self_attn"
        ]
        self.replaced = [a.__dict__.get("attention_fn") for a in self.attentions]  # None: the class default
        for a in self.attentions:
            a.attention_fn = ShardedAttention(self, a.attention_fn)
        self.handles = [
            net.register_forward_pre_hook(self.slice_tokens, with_kwargs=True),
            net.final_layer.register_forward_hook(self.gather_tokens),
        ]

    def slice_tokens(self, net: nn.Module, args: tuple, kwargs: dict):
        x = kwargs["x"] if "x" in kwargs else args[0]
        self.sizes = shard_sizes(net.num_tokens(tuple(x.shape)), self.comm.world)
        start = sum(self.sizes[: self.comm.rank])
        return args, kwargs | {"token_slice": TokenSlice(start, start + self.sizes[self.comm.rank])}

    def gather_tokens(self, _module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        return self.comm.all_gather(out, 1, self.sizes)  # every process ends with the whole output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for a, fn in zip(self.attentions, self.replaced, strict=True):
            if fn is None:
                del a.attention_fn
            else:
                a.attention_fn = fn


def install(net: nn.Module, comm) -> Sharding | None:
    """Share the token sequence of `net` (a MultiviewDiT, or a model holding one as `.net`) over the ranks of `comm`
    (a ContextParallel, or a stand-in with rank, world, mode and its collectives). Install after fp8.apply: the
    sharded self-attention wraps whatever attention function is in place. One rank: nothing to install (None)."""
    net = getattr(net, "net", net)
    disable(net)
    return Sharding(net, comm) if comm.world > 1 else None


def enable(net: nn.Module, group: dist.ProcessGroup | None = None, mode: str = "auto") -> ContextParallel:
    """Share the token sequence of `net` (a MultiviewDiT, or a model holding one as `.net`) over `group`."""
    cp = ContextParallel.of(group, mode)
    install(net, cp)
    return cp


def disable(net: nn.Module) -> None:
    """Undo `install`/`enable` (nothing if context parallelism is not installed)."""
    for m in getattr(net, "net", net).modules():
        fn = m.__dict__.get("attention_fn")
        if isinstance(fn, ShardedAttention):
            fn.sharding.remove()
            return


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
