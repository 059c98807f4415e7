"""Duplicate masking for text pairs: two ids a row (query, positive); rows sharing either are not each
other's negatives, hard negatives stay negatives; the same at one and two ranks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import get_loss
from pipeline.losses.base import duplicate_groups

F64 = torch.float64
N, K, D = 8, 2, 5
# (query id, positive id) per row: rows 0 and 3 ask the same query (different positives), rows 2 and 6
# have the same positive (different queries); the rest are unique
IDS = torch.tensor([[1, 100], [2, 101], [3, 102], [1, 103], [4, 104], [5, 105], [6, 102], [7, 107]])


def batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, v, h = (F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1)
               for shape in ((N, D), (N, D), (N, K, D)))
    v[6] = v[2]                       # the same positive text is the same embedding
    return u, v, h


def reference(u, v, h, s, b, name: str, symmetric: bool = True) -> torch.Tensor:
    """Dense float64: query i against every positive and every hard negative; the positives of rows sharing
    its query or positive are left out (written from the rule, not from the library's code)."""
    share = (IDS[:, None, 0] == IDS[None, :, 0]) | (IDS[:, None, 1] == IDS[None, :, 1])
    dup = share & ~torch.eye(N, dtype=torch.bool)
    dup_all = torch.cat([dup, torch.zeros(N, N * K, dtype=torch.bool)], 1)     # hard negatives: never masked
    cands = torch.cat([v, h.reshape(-1, D)])
    x = s * u @ cands.T
    if name == "siglip":
        z = -torch.ones(N, N + N * K, dtype=F64)
        z[:, :N] += 2 * torch.eye(N, dtype=F64)
        return F.softplus(-z * (x + b)).masked_fill(dup_all, 0).sum() / N
    x = x.masked_fill(dup_all, -math.inf)
    pos = x[:, :N].diagonal()
    forward = (x.logsumexp(1) - pos).mean()
    if not symmetric:
        return forward
    return 0.5 * (forward + (x[:, :N].logsumexp(0) - pos).mean())


def test_groups_join_rows_sharing_any_id_transitively():
    ids = torch.tensor([[1, 10], [2, 11], [1, 12], [3, 12], [4, 13], [4, 14]])
    assert duplicate_groups(ids).tolist() == [0, 1, 0, 0, 4, 4]          # 0–2 by query, 2–3 by positive
    assert duplicate_groups(torch.tensor([7, 8, 7, 9])).tolist() == [0, 1, 0, 3]   # one id a row, as before


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("name, symmetric", [("clip", True), ("clip", False), ("siglip", None)])
def test_text_pair_mask_with_hard_negatives_matches_a_float64_reference(name, symmetric, tiled):
    u, v, h = batch()
    s, b = torch.tensor(7.0, dtype=F64), torch.tensor(-3.0, dtype=F64)
    hyper = {} if symmetric is None else {"symmetric": symmetric}
    loss = get_loss(name, tiled=tiled, tile_size=5, **hyper)
    extra = {"logit_bias": b} if name == "siglip" else {}
    args = [x.clone().requires_grad_() for x in (u, v, h)]
    got = loss(args[0], args[1], logit_scale=s, negatives=args[2], caption_ids=IDS, **extra)
    want_args = [x.clone().requires_grad_() for x in (u, v, h)]
    want = reference(*want_args, s, b, name, symmetric is not False)
    assert got.item() == pytest.approx(want.item(), abs=1e-10)
    unmasked = loss(u, v, logit_scale=s, negatives=h, **extra)
    assert abs(unmasked.item() - got.item()) > 1e-3                    # the shared queries/positives matter
    for g, w in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, want_args)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def rank_results(rank: int, world: int) -> dict:
    """clip, siglip and supcon with hard negatives and (query, positive) ids on this rank's rows."""
    u, v, h = batch()
    n = N // world
    rows = slice(rank * n, (rank + 1) * n)
    out = {}
    for name in ("clip", "siglip", "supcon"):
        extra = {"logit_bias": torch.tensor(-3.0, dtype=F64)} if name == "siglip" else {}
        args = [x[rows].clone().requires_grad_() for x in (u, v, h)]
        value = get_loss(name, tiled=True, tile_size=3)(args[0], args[1], logit_scale=torch.tensor(7.0, dtype=F64),
                                                        negatives=args[2], caption_ids=IDS[rows], **extra)
        out[name] = (value.detach(), *torch.autograd.grad(value, args))
    return out


@pytest.mark.slow
def test_text_pair_mask_is_the_same_at_one_and_two_ranks():
    """Duplicates across the two ranks (rows 0/3 on rank 0, 2/6 across): the mean of the ranks' values and
    their rows' gradients (÷ W, as DeepSpeed averages) equal the single process's."""
    from tests.helpers.dist import run_world
    single = rank_results(0, 1)
    ranks = run_world(rank_results, 2)
    for name, (value, *grads) in single.items():
        torch.testing.assert_close(torch.stack([r[name][0] for r in ranks]).mean(), value, rtol=1e-10, atol=1e-12)
        for i, g in enumerate(grads):
            torch.testing.assert_close(torch.cat([r[name][1 + i] for r in ranks]) / 2, g, rtol=1e-9, atol=1e-12)
