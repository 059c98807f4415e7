"""Row and column reductions of a pairwise term matrix, dense or tiled with O(tile²) memory.

Every loss in this package is built from reductions of a matrix of per-pair terms

    t_ij = term(s·a_i·b_j, j, *params)      (−inf marks a pair that is left out)

over the columns j (a log-sum-exp or a sum per row) and, for the symmetric InfoNCE losses, over
the rows i as well. The rows a are this rank's, the columns b all ranks', so column reductions
are partial and the caller combines them across ranks. The losses pass the logit scale s as `scale`:
each tile is multiplied by it before the term, so the term sees the logit s·a_i·b_j (most terms only
leave pairs out), and no scaled copy of a (rows × dim, with its gradient) is ever made.

`pairwise_reduce` computes them densely (plain autograd; memory O(rows × cols)) or in column
tiles with one custom autograd function: the forward keeps a running log-sum-exp (or sum) per
row and drops each tile; the backward recomputes each tile, turns it into dL/dt in place and
differentiates the term on it (at most two tiles live). A tile holds at most tile_size² terms:
with more rows than tile_size the tiles get narrower (`tile_width`), so the working set stays
O(tile²) however large the batch, with as many tiles as a square tiling and whole rows in each
(the terms see their rows' full state). Both forms give the same values and gradients; the dense
one is the reference in tests.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

Term = Callable[..., Tensor]     # term(dots (rows × tile), cols: slice, *params) -> terms (rows × tile)
REDUCTIONS = ("lse", "sum")


def pairwise_reduce(a: Tensor, b: Tensor, term: Term, *params: Tensor, row: str = "lse",
                    col: Optional[str] = None, tile_size: Optional[int] = None,
                    scale: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Reduce t = term(s·(a @ bᵀ), ...) over columns (`row`) and optionally over rows (`col`).

    `row` / `col` are "lse" (log Σ exp) or "sum". `scale` is s (a scalar tensor; none: 1). `params`
    are further tensors the term uses (the logit bias) and that need gradients. With `tile_size` the
    columns are processed in tiles of at most tile_size² terms and nothing of size rows × cols is
    ever stored. Returns (row_values, col_values or None).
    """
    if row not in REDUCTIONS or col not in (*REDUCTIONS, None):
        raise ValueError(f"pairwise_reduce: row/col reductions must be one of {REDUCTIONS}, got {row!r}/{col!r}")
    if scale is not None:                              # s is the scaled term's first parameter
        term, params = _scaled(term), (scale, *params)
    if tile_size is None:
        t = term(a @ b.T, slice(0, b.shape[0]), *params)
        return _reduce(t, row, 1), (None if col is None else _reduce(t, col, 0))
    row_out, col_out = _TiledPairwise.apply(term, row, col, tile_size, a, b, *params)
    return row_out, (None if col is None else col_out)


def _scaled(term: Term) -> Term:
    """term(s·x, cols, *params) as a term of (x, cols, s, *params): a tile's worth of scaling."""
    def scaled(x: Tensor, cols: slice, s: Tensor, *params: Tensor) -> Tensor:
        return term(s * x, cols, *params)
    return scaled


def tile_width(rows: int, tile_size: int) -> int:
    """Columns per tile: tile_size, narrowed so that a tile of `rows` rows holds at most tile_size² terms
    (one column at the least: beyond tile_size² rows a tile is one column of all of them)."""
    return max(1, min(tile_size, tile_size * tile_size // max(rows, 1)))


def _reduce(t: Tensor, op: str, dim: int) -> Tensor:
    return torch.logsumexp(t, dim) if op == "lse" else t.sum(dim)


def _reductions_grad(t: Tensor, row: str, col: Optional[str], row_out: Tensor, col_out: Tensor,
                     grad_row: Tensor, grad_col: Tensor) -> Tensor:
    """dL/dt for one tile from the gradients of its row and column reductions, written over t."""
    col_part = None if col is None else _reduce_grad(t.clone(), col, 0, col_out, grad_col)
    grad = _reduce_grad(t, row, 1, row_out, grad_row)
    return grad if col_part is None else grad.add_(col_part)


def _reduce_grad(t: Tensor, op: str, dim: int, out: Tensor, grad: Tensor) -> Tensor:
    """d(reduction)/dt times the incoming gradient, computed in place over t."""
    if op == "sum":
        return t.copy_(grad.unsqueeze(dim).expand_as(t))
    # softmax weights exp(t − lse); an all-left-out line has lse = −inf, clamp it so 0 (not NaN) results
    out = out.clamp_min(torch.finfo(out.dtype).min).unsqueeze(dim)
    return t.sub_(out).exp_().mul_(grad.unsqueeze(dim))


class _TiledPairwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, term: Term, row: str, col: Optional[str], tile_size: int, a: Tensor, b: Tensor, *params: Tensor):
        row_out = a.new_full((a.shape[0],), -torch.inf if row == "lse" else 0.0)
        col_out = a.new_zeros(b.shape[0] if col else 0)
        for cols in _tiles(b.shape[0], tile_width(a.shape[0], tile_size)):
            t = term(a @ b[cols].T, cols, *params)
            part = _reduce(t, row, 1)
            row_out = torch.logaddexp(row_out, part) if row == "lse" else row_out + part
            if col:
                col_out[cols] = _reduce(t, col, 0)
        ctx.save_for_backward(a, b, row_out, col_out, *params)
        ctx.setup = (term, row, col, tile_size)
        return row_out, col_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_row: Tensor, grad_col: Tensor):
        a, b, row_out, col_out, *params = ctx.saved_tensors
        term, row, col, tile_size = ctx.setup
        p_leaf = [p.detach().requires_grad_() for p in params]
        grad_a, grad_b = torch.zeros_like(a), torch.empty_like(b)
        grad_p = [torch.zeros_like(p) for p in params]
        for cols in _tiles(b.shape[0], tile_width(a.shape[0], tile_size)):
            dots = (a @ b[cols].T).requires_grad_()           # the tile, recomputed
            with torch.enable_grad():
                t = term(dots, cols, *p_leaf)
            # dL/dt overwrites t's values (autograd needs only t's graph), so a tile costs two buffers
            grad_t = _reductions_grad(t.detach(), row, col, row_out, col_out[cols], grad_row, grad_col[cols])
            grad_dots, *grads = torch.autograd.grad(t, (dots, *p_leaf), grad_t, allow_unused=True)
            del t, grad_t, dots                                # (grad_dots may share their storage)
            grad_a.addmm_(grad_dots, b[cols])                  # d(a·bᵀ)/da = G·b
            torch.mm(grad_dots.T, a, out=grad_b[cols])         # d(a·bᵀ)/db = Gᵀ·a
            for acc, g in zip(grad_p, grads):
                if g is not None:
                    acc += g
            del grad_dots
        return (None, None, None, None, grad_a, grad_b, *grad_p)


def _tiles(n: int, tile_size: int):
    for start in range(0, n, tile_size):
        yield slice(start, min(start + tile_size, n))


def pairwise_topk(a: Tensor, b: Tensor, term: Term, k: int, tile_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(values, column indices), each (rows × k), of the k largest terms of each row of term(a @ bᵀ, ...),
    largest first, ties to the lower column (so the answer does not depend on the tiling); −inf values are
    left-out pairs. A selection: no gradient. Memory O(rows × k + tile²)."""
    with torch.no_grad():
        values = a.new_empty(a.shape[0], 0)
        index = torch.empty(a.shape[0], 0, dtype=torch.long, device=a.device)
        # at least k wide: memory is rows × k anyway, and narrower tiles would re-sort the kept k too often
        width = b.shape[0] if tile_size is None else max(k, tile_width(a.shape[0], tile_size))
        for cols in _tiles(b.shape[0], width):
            values = torch.cat([values, term(a @ b[cols].T, cols)], 1)
            here = torch.arange(cols.start, cols.stop, device=a.device).expand(a.shape[0], -1)
            index = torch.cat([index, here], 1)
            # stable: among equal values the running ones (lower columns, already in order) stay first
            order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
            values, index = values.gather(1, order), index.gather(1, order)
    return values, index
