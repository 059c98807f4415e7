"""Rank/world helpers and the collectives the losses use, with exact gradients.

Everything here also works without an initialised process group (world size 1): the collectives
are then the identity. Gradient convention: the objective being differentiated is the SUM of the
ranks' losses (DDP and DeepSpeed then average parameter gradients over ranks), so the backward of
a gather sums the incoming gradients on the rank that owns the rows, and the backward of an
all-reduce is an all-reduce.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor


def is_initialized() -> bool:
    """True when a torch.distributed process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_distributed() -> bool:
    """True when there is more than one rank to talk to."""
    return get_world_size() > 1


def local_rows(n_local: int) -> slice:
    """Where this rank's `n_local` rows sit in a rank-major gathered tensor."""
    start = get_rank() * n_local
    return slice(start, start + n_local)


def _check_same_shape(x: Tensor) -> None:
    """Every rank must gather the same shape; say which ranks differ instead of hanging or crashing."""
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        sizes = [tuple(s.tolist()) for s in shapes]
        raise ValueError(f"all_gather: the ranks passed tensors of different shapes {sizes} (by rank); every rank "
                         f"must pass the same local batch size (drop or pad the partial last batch)")


def _gather(x: Tensor) -> Tensor:
    """Rank-major concatenation of every rank's `x` along dim 0 (no autograd)."""
    _check_same_shape(x)
    out = x.new_empty((get_world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous())
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.n = x.shape[0]
        return _gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank holds a gradient for all rows; the owner of a row receives their sum.
        grad = grad.contiguous()
        if dist.get_backend() == "gloo":
            # gloo's reduce-scatter first copies its whole input (N rows); summing this buffer, autograd's
            # own and read by no other node, in place and keeping our rows costs n rows instead
            dist.all_reduce(grad)
            return grad[local_rows(ctx.n)].clone()
        out = grad.new_empty((ctx.n, *grad.shape[1:]))
        dist.reduce_scatter_single(out, grad)
        return out


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Gather `x` (rank-major along dim 0) keeping gradients: backward sums each row's gradient
    over all ranks onto the rank that owns the row. Unequal shapes across ranks raise ValueError."""
    return _AllGatherWithGrad.apply(x) if is_distributed() else x


def all_gather(x: Tensor) -> Tensor:
    """Gather `x` (rank-major along dim 0) without gradient, e.g. labels."""
    return _gather(x.detach()) if is_distributed() else x.detach()


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def all_reduce_sum(x: Tensor) -> Tensor:
    """Elementwise sum over ranks, differentiable (backward: all-reduce of the gradients)."""
    return _AllReduceSum.apply(x) if is_distributed() else x


def all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise max over ranks, without gradient."""
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_reduce_logsumexp(x: Tensor) -> Tensor:
    """Elementwise log Σ_ranks exp(x), stable and differentiable; -inf where every rank has -inf."""
    if not is_distributed():
        return x
    m = all_reduce_max(x)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m + all_reduce_sum(torch.exp(x - m)).log()


# ------------------------------------------------------------------------------ Python objects
def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if is_initialized():
        dist.barrier()


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank: one answer where ranks could see storage differently."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable `value`, by rank (a list of one without a process group)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, value)
    return out


# ------------------------------------------------------------------------------------ timeouts
class CollectiveTimeout(RuntimeError):
    """A collective waited longer than the process group's timeout: some rank never joined it."""


@contextmanager
def named_timeouts(where: str) -> Iterator[None]:
    """Turn a collective's timeout inside the block into an error naming this rank and `where` (e.g.
    the step), instead of the transport's bare message; each stuck rank reports its own position."""
    try:
        yield
    except RuntimeError as e:
        if "timed out" not in str(e).lower():
            raise
        raise CollectiveTimeout(
            f"rank {get_rank()} of {get_world_size()}: a collective timed out at {where} "
            f"(cluster.collective_timeout_s): another rank did not join it; each stuck rank reports where it "
            f"waited ({str(e).strip()[:200]})") from e
