"""What every loss shares: input checks, the gather of the global batch, the pairwise reductions.

A loss subclasses `ContrastiveLoss` and writes `compute(pairs)`, its formula over this rank's rows
(`pairs.u`, `pairs.v`) against every rank's rows (`pairs.U`, `pairs.V`, gathered with gradient).
It returns a value whose mean over ranks is the loss of the global batch. V (with any hard negatives
and further positives) is gathered in one collective; U only when a loss first reads it (clip and
siglip never do: their image→text block is (s·u)·Vᵀ, and its columns give text→image), so a loss
holds no gathered copy it does not use. Every rank runs the same formula, so they all gather U or
none does, in the same order.

Hard negatives (`negatives=`, (n, k, D): k extra candidates per row, e.g. passages that look relevant
but are not) are gathered with the rows and laid out row-major after every rank's positives:
global row r's j-th hard negative is column N + r·k + j of `pairs.candidates` = [V; H]. They are
only ever columns (negatives for every anchor), never anchors, never anyone's positive, so a row's
pairing survives the gather whatever the world size.

Duplicate captions: given `caption_ids` (equal ids = identical captions; or (n, m) ids, e.g. a text
pair's query and positive, where sharing any one makes two pairs duplicates), the ids of the whole
global batch are gathered once and grouped (`duplicate_groups`), and `Pairs.duplicates(cols)` /
`Views.duplicates(cols)` give, for one tile of columns, where a column is *another* pair with the
row's caption. Every loss leaves those entries out of its negatives inside its pairwise term (−inf
in a log-sum-exp, 0 in a sum), so the dense and tiled forms, and the gradient cache (which calls
the loss once), mask alike.
Hard-negative columns are never masked: they are their own row's negatives by construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from pipeline.distributed import (
    all_gather,
    all_gather_with_grad,
    all_reduce_sum,
    get_world_size,
    is_distributed,
    local_rows,
)
from pipeline.losses.tiled import Term, pairwise_reduce


@dataclass
class Pairs:
    """One rank's view of the global batch, in the compute dtype (float32, or float64 if given)."""
    u: Tensor                   # (n, D) this rank's image embeddings
    v: Tensor                   # (n, D) this rank's text embeddings
    V: Tensor                   # (N, D) all ranks' text embeddings, rank-major, with gradient
    rows: Tensor                # (n,) global index of each local row
    scale: Tensor               # the logit scale s (scalar)
    bias: Optional[Tensor]      # the logit bias b (scalar) for losses that use one
    labels: Tensor              # (n,) class of each local pair; a class of its own when it has no label
    all_labels: Tensor          # (N,)
    weights: Optional[Tensor]   # (n, D') `weights_from` rows, detached
    all_weights: Optional[Tensor]
    H: Optional[Tensor] = None  # (N·k, D) all ranks' hard negatives, row-major by owner row, with gradient
    x: Optional[Tensor] = None  # (n, k−1, D) this rank's further positives (captions 2..k of each row; polyview)
    X: Optional[Tensor] = None  # (N·(k−1), D) all ranks' further positives, row-major by owner row, with gradient

    @property
    def candidates(self) -> Tensor:
        """The columns every text-side reduction runs over: all positives V, then all hard negatives H."""
        return self.V if self.H is None else torch.cat([self.V, self.H])
    ids: Optional[Tensor] = None        # (n,) duplicate group of each local pair, when duplicates are masked
    all_ids: Optional[Tensor] = None    # (N,)
    sample_ids: Optional[Tensor] = None      # (n, 2) stable ids of each local pair's image and caption (isogclr)
    all_sample_ids: Optional[Tensor] = None  # (N, 2)
    _U: Optional[Tensor] = field(default=None, repr=False)

    @property
    def U(self) -> Tensor:
        """(N, D) all ranks' image embeddings, rank-major, with gradient: gathered on first use."""
        if self._U is None:
            self._U = all_gather_with_grad(self.u)
        return self._U

    @property
    def N(self) -> int:
        """Pairs in the global batch."""
        return self.V.shape[0]

    def duplicates(self, cols: slice) -> Optional[Tensor]:
        """(n × cols) True where candidate column j in `cols` is another pair with local pair i's caption."""
        return duplicate_mask(self.ids, self.rows, self.all_ids, cols, self.N)


@dataclass
class Views:
    """The 2N anchors Z = [u_1..u_N, v_1..v_N] of supcon, tcl, dcl and hcl, seen from one rank."""
    z: Tensor                   # (2n, D) this rank's anchors: [u; v]
    Z: Tensor                   # (2N, D) all anchors: [U; V]
    me: Tensor                  # (2n,) index in Z of each local anchor itself
    partner: Tensor             # (2n,) index in Z of its other view (u_i <-> v_i)
    labels: Tensor              # (2n,)
    all_labels: Tensor          # (2N,)
    ids: Optional[Tensor] = None
    all_ids: Optional[Tensor] = None

    @staticmethod
    def of(p: Pairs) -> Views:
        """The views of `p`; hard negatives join Z after [U; V] as columns with labels of their own
        (no anchor's class), so they are negatives for every anchor and positives of none."""
        n = p.N
        Z, all_labels = torch.cat([p.U, p.V]), torch.cat([p.all_labels, p.all_labels])
        if p.H is not None:
            Z = torch.cat([Z, p.H])
            fresh = all_labels.max() + 1 + torch.arange(p.H.shape[0], device=all_labels.device)
            all_labels = torch.cat([all_labels, fresh])
        twice = (lambda x: None if x is None else torch.cat([x, x]))  # noqa: E731
        return Views(z=torch.cat([p.u, p.v]), Z=Z,
                     me=torch.cat([p.rows, p.rows + n]), partner=torch.cat([p.rows + n, p.rows]),
                     labels=torch.cat([p.labels, p.labels]), all_labels=all_labels,
                     ids=twice(p.ids), all_ids=twice(p.all_ids))

    def duplicates(self, cols: slice) -> Optional[Tensor]:
        """(2n × cols) True where anchor column c in `cols` is a view of another pair with the caption of
        the row anchor's pair (both views of a duplicate pair are left out; the anchor's own pair never;
        hard-negative columns, after the 2N views, never)."""
        if self.ids is None:
            return None
        n = self.all_ids.shape[0] // 2
        return duplicate_mask(self.ids, self.me % n, self.all_ids, cols, n)

    @property
    def partner_z(self) -> Tensor:
        n = self.z.shape[0] // 2
        return torch.cat([self.z[n:], self.z[:n]])


def gather_rows(v: Tensor, *blocks: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """All ranks' rows of v and of each (n, k, D) block (hard negatives, further positives), rank-major,
    with gradient, in one collective; a block comes back flat (N·k, D), each row's k in a block at row·k
    (None stays None)."""
    d = v.shape[1]
    given = [b for b in blocks if b is not None]
    if not is_distributed() or not given:
        return (all_gather_with_grad(v), *(None if b is None else b.reshape(-1, d) for b in blocks))
    parts = [v] + [b.reshape(b.shape[0], -1) for b in given]
    V, *flat = all_gather_with_grad(torch.cat(parts, 1)).split([d, *(b.shape[1] * d for b in given)], 1)
    flat = iter(f.reshape(-1, d) for f in flat)
    return (V, *(None if b is None else next(flat) for b in blocks))


def duplicate_groups(ids: Tensor, across_columns: bool = False) -> Tensor:
    """(N,) group of each pair of the global batch from its ids, (N,) or (N, m): pairs sharing an id in
    any column are in one group, transitively (a text pair's query or positive). With `across_columns`
    an id matches in any other column too (the k captions of a row, polyview). Groups are numbered
    from 0 (the smallest member's index), so no group is negative."""
    columns = ids.reshape(ids.shape[0], -1)
    if across_columns:             # one id space, every (row, column) entry scattered at once
        inverses = [torch.unique(columns, return_inverse=True)[1].reshape(columns.shape)]
    else:
        inverses = [torch.unique(columns[:, c], return_inverse=True)[1][:, None] for c in range(columns.shape[1])]
    groups = torch.arange(ids.shape[0], device=ids.device)
    while True:
        merged = groups
        for inverse in inverses:       # every pair takes the smallest group among those sharing this id
            spread = merged[:, None].expand_as(inverse)
            smallest = groups.new_full((int(inverse.max()) + 1,), ids.shape[0])
            smallest = smallest.scatter_reduce(0, inverse.flatten(), spread.flatten(), "amin")
            merged = smallest[inverse].amin(1)
        if torch.equal(merged, groups):
            return groups
        groups = merged


def duplicate_mask(ids: Optional[Tensor], pair: Tensor, all_ids: Optional[Tensor], cols: slice,
                   pairs: int) -> Optional[Tensor]:
    """(rows × cols) True where column j (a global index in `cols`, belonging to pair j mod `pairs`) has
    the row's group id but is not the row's own pair `pair`; None when no ids are given. Columns past
    `all_ids` (hard negatives) are never masked."""
    if ids is None:
        return None
    col_ids = torch.arange(cols.start, cols.stop, device=pair.device)
    col_groups = all_ids[cols]
    col_groups = torch.cat([col_groups, col_groups.new_full((len(col_ids) - len(col_groups),), -1)])
    return (ids.unsqueeze(1) == col_groups.unsqueeze(0)) & (pair.unsqueeze(1) != (col_ids % pairs).unsqueeze(0))


def caption_counts(ids: Tensor, all_ids: Tensor) -> Tensor:
    """How many pairs of the global batch (`all_ids`) have each of `ids` as their caption id."""
    unique, counts = torch.unique(all_ids, return_counts=True)
    return counts[torch.searchsorted(unique, ids)]


def mask(t: Tensor, where: Optional[Tensor], value: float = -math.inf) -> Tensor:
    """t with `value` where `where` is True (−inf leaves a pair out of a log-sum-exp, 0 out of a sum)."""
    return t if where is None else t.masked_fill(where, value)


def leave_out(t: Tensor, cols: slice, *index: Tensor) -> Tensor:
    """Set t[i, j] = −inf where column j (a global index inside `cols`) equals index[i], for each index."""
    col_ids = torch.arange(cols.start, cols.stop, device=t.device)
    for idx in index:
        t = t.masked_fill(col_ids == idx.unsqueeze(1), -math.inf)
    return t


def class_labels(labels: Optional[Tensor], n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """This rank's and every rank's class labels. A row without a label (none given, or −1) is a class
    of its own. The labels are gathered on every call, labelled or not, so that ranks whose batches
    differ in labels still call the same collectives (a data-dependent gather would hang them)."""
    mine = torch.full((n,), -1, dtype=torch.long, device=device) if labels is None else labels.long()
    everyone = all_gather(mine)
    own = -1 - torch.arange(len(everyone), device=device)
    everyone = torch.where(everyone < 0, own, everyone)
    return everyone[local_rows(n)], everyone


def global_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean of `values[keep]` over all ranks' kept rows, scaled so that the mean over ranks of the
    returned partials is that global mean (the count is all-reduced before it divides)."""
    count = all_reduce_sum(keep.sum().to(values.dtype).detach())
    return torch.where(keep, values, 0).sum() * get_world_size() / count.clamp_min(1)


class ContrastiveLoss(nn.Module):
    """Base of every loss: `loss(image, text, *, logit_scale, logit_bias=None, labels=None, weights_from=None,
    negatives=None)`.

    `labels` are used by the losses that define positives by class (supcon, tcl) and ignored by
    the others, so a training loop may always pass them. Negatives are every rank's rows, plus every
    rank's hard negatives when `negatives` (n, k, D) is given (the same k on every rank).
    For text–text training `image` is the query side and `text` the passage side.
    """
    name = ""                   # the registry name
    default_temperature = 0.1   # τ = 1/s the model starts from for this loss
    uses_bias = False           # siglip: the model learns a logit bias and must pass it
    uses_weights = False        # cwcl: `weights_from` is required
    masks_duplicates = True     # whether `caption_ids` take duplicate captions out of the negatives
    fixed_temperature = False   # cacr: the scale is a hyper-parameter; loss.learn_temperature must be false
    multi_positive = False      # polyview: takes several captions per image (`positives=`)
    uses_sample_ids = False     # isogclr: per-sample state keyed by `sample_ids=` (required)

    def __init__(self, tiled: bool = False, tile_size: int = 1024) -> None:
        super().__init__()
        if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 1:
            raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
        self.tiled = bool(tiled)
        self.tile_size = tile_size

    def extra_repr(self) -> str:
        return f"tiled={self.tiled}, tile_size={self.tile_size}" if self.tiled else "tiled=False"

    def pairwise(self, a: Tensor, b: Tensor, term: Term, *params: Tensor, row: str = "lse",
                 col: Optional[str] = None, scale: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """`pairwise_reduce` in this loss's mode (tiled or dense)."""
        return pairwise_reduce(a, b, term, *params, row=row, col=col, scale=scale,
                               tile_size=self.tile_size if self.tiled else None)

    def forward(self, image: Tensor, text: Tensor, *, logit_scale: Tensor | float,
                logit_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                weights_from: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
                caption_ids: Optional[Tensor] = None, positives: Optional[Tensor] = None,
                sample_ids: Optional[Tensor] = None) -> Tensor:
        """The loss; with `caption_ids` (one integer per pair, equal for identical captions, or (n, m) integers
        per pair where sharing any one makes two pairs duplicates) pairs with the same caption are not each
        other's negatives. Pass them on every rank or on none. `positives` (n, k−1, D): captions 2..k of each
        row, for a loss that takes several (`multi_positive`; `text` is caption 1), the same k on every rank.
        `sample_ids` (n, 2): stable integer ids of each pair's image and caption, for a loss that keeps state
        per sample (`uses_sample_ids`), required by it and refused by the others."""
        return self.compute(self._pairs(image, text, logit_scale, logit_bias, labels, weights_from, negatives,
                                        caption_ids, positives, sample_ids))

    def compute(self, p: Pairs) -> Tensor:
        raise NotImplementedError

    def _pairs(self, image, text, logit_scale, logit_bias, labels, weights_from, negatives=None,
               caption_ids=None, positives=None, sample_ids=None) -> Pairs:
        """Check the call, cast to the compute dtype and gather all ranks' rows."""
        name = f"loss {self.name!r}"
        if image.ndim != 2 or image.shape != text.shape:
            raise ValueError(f"{name}: image and text must both be (N, D) with the same shape, "
                             f"got {tuple(image.shape)} and {tuple(text.shape)}")
        n = image.shape[0]
        if n == 0:
            raise ValueError(f"{name}: empty local batch")
        # logits in fp32 (fp64 kept for exact tests) whatever the towers' dtype
        dtype = torch.promote_types(torch.promote_types(image.dtype, text.dtype), torch.float32)
        scale = torch.as_tensor(logit_scale, dtype=dtype, device=image.device)
        if scale.numel() != 1:
            raise ValueError(f"{name}: logit_scale must be a scalar, got shape {tuple(scale.shape)}")
        if self.uses_bias and logit_bias is None:
            raise ValueError(f"{name}: logit_bias is required (the model must learn a bias for this loss)")
        if not self.uses_bias and logit_bias is not None:
            raise ValueError(f"{name}: takes no logit_bias (it would get no gradient); pass None")
        bias = None if logit_bias is None else torch.as_tensor(logit_bias, dtype=dtype, device=image.device)
        if bias is not None and bias.numel() != 1:
            raise ValueError(f"{name}: logit_bias must be a scalar, got shape {tuple(bias.shape)}")
        if labels is not None and (labels.shape != (n,) or labels.is_floating_point()):
            raise ValueError(f"{name}: labels must be an integer tensor of shape ({n},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if self.uses_weights != (weights_from is not None):
            need = "requires" if self.uses_weights else "takes no"
            raise ValueError(f"{name}: {need} weights_from")
        if weights_from is not None and (weights_from.ndim != 2 or weights_from.shape[0] != n):
            raise ValueError(f"{name}: weights_from must be ({n}, D'), got {tuple(weights_from.shape)}")
        if negatives is not None and (negatives.ndim != 3 or negatives.shape[0] != n
                                      or negatives.shape[2] != image.shape[1] or negatives.shape[1] < 1):
            raise ValueError(f"{name}: negatives must be ({n}, k, {image.shape[1]}) with k >= 1 hard negatives per "
                             f"row, got {tuple(negatives.shape)}")
        if caption_ids is not None and (caption_ids.ndim not in (1, 2) or caption_ids.shape[0] != n
                                        or caption_ids.is_floating_point()):
            raise ValueError(f"{name}: caption_ids must be an integer tensor of shape ({n},) or ({n}, m), "
                             f"got {caption_ids.dtype} {tuple(caption_ids.shape)}")

        if positives is not None and not self.multi_positive:
            raise ValueError(f"{name}: takes one caption per image (positives= is for polyview; "
                             f"data.captions_per_image: 1)")
        if positives is not None and (positives.ndim != 3 or positives.shape[0] != n
                                      or positives.shape[2] != image.shape[1] or positives.shape[1] < 1):
            raise ValueError(f"{name}: positives must be ({n}, k-1, {image.shape[1]}) with k >= 2 captions per "
                             f"row, got {tuple(positives.shape)}")
        if self.uses_sample_ids != (sample_ids is not None):
            need = "requires" if self.uses_sample_ids else "takes no"
            raise ValueError(f"{name}: {need} sample_ids (per-sample state, isogclr)")
        if sample_ids is not None and (sample_ids.shape != (n, 2) or sample_ids.is_floating_point()):
            raise ValueError(f"{name}: sample_ids must be an integer tensor of shape ({n}, 2) (each pair's image id "
                             f"and caption id), got {sample_ids.dtype} {tuple(sample_ids.shape)}")
        u, v = image.to(dtype), text.to(dtype)
        x = None if positives is None else positives.to(dtype)
        V, H, X = gather_rows(v, None if negatives is None else negatives.to(dtype), x)
        if V.shape[0] < 2:
            raise ValueError(f"{name}: needs at least 2 pairs in the global batch, got {V.shape[0]}")
        mine = local_rows(n)
        rows = torch.arange(mine.start, mine.stop, device=image.device)
        labels, all_labels = class_labels(labels, n, image.device)
        weights = all_weights = None
        if weights_from is not None:
            weights = weights_from.detach().to(dtype)
            all_weights = all_gather(weights)
        ids = all_ids = None
        if caption_ids is not None and self.masks_duplicates:
            all_ids = duplicate_groups(all_gather(caption_ids.to(image.device)), across_columns=self.multi_positive)
            ids = all_ids[rows]
        return Pairs(u=u, v=v, V=V, rows=rows,
                     scale=scale.reshape(()), bias=None if bias is None else bias.reshape(()),
                     labels=labels, all_labels=all_labels, weights=weights, all_weights=all_weights,
                     ids=ids, all_ids=all_ids, H=H, x=x, X=X, sample_ids=sample_ids,
                     all_sample_ids=None if sample_ids is None else all_gather(sample_ids.long().to(image.device)))
