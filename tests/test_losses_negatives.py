"""Hard negatives and Matryoshka, one process: every loss against a float64 reference written as loops over
its definition (hard negatives are extra columns, never anchors or positives), tiled = dense,
gradcheck, the one-directional InfoNCE, and the Matryoshka sum over truncated renormalised embeddings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import LOSS_NAMES, get_loss, uses_bias
from tests.test_losses import SETUPS, per_sample

F64 = torch.float64
N, K, D = 4, 2, 3


def unit(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1)


def batch(seed: int = 0, n: int = N, k: int = K, d: int = D):
    """Queries u, positives v close to them, hard negatives h (n, k, d) close to the positives."""
    g = torch.Generator().manual_seed(seed)
    u = unit(torch.randn(n, d, generator=g, dtype=F64))
    v = unit(u + 0.7 * torch.randn(n, d, generator=g, dtype=F64))
    h = unit(v.unsqueeze(1) + 0.9 * torch.randn(n, k, d, generator=g, dtype=F64))
    return u, v, h


def lse(values: list) -> torch.Tensor:
    return torch.logsumexp(torch.stack(values), 0)


# ------------------------------------------------------------------- references, loops over the definitions
def ref_clip(u, v, h, s, symmetric=True):
    flat = h.reshape(-1, u.shape[1])
    cands = list(v) + list(flat)
    q2d = torch.stack([lse([s * u[i] @ c for c in cands]) - s * u[i] @ v[i] for i in range(len(u))]).mean()
    if not symmetric:
        return q2d
    d2q = torch.stack([lse([s * v[i] @ x for x in u]) - s * u[i] @ v[i] for i in range(len(u))]).mean()
    return 0.5 * (q2d + d2q)


def ref_siglip(u, v, h, s, b):
    flat = h.reshape(-1, u.shape[1])
    total = 0
    for i in range(len(u)):
        total = total - F.logsigmoid(s * u[i] @ v[i] + b)
        total = total - sum(F.logsigmoid(-(s * u[i] @ v[j] + b)) for j in range(len(v)) if j != i)
        total = total - sum(F.logsigmoid(-(s * u[i] @ x + b)) for x in flat)
    return total / len(u)


def views(u, v, h, labels):
    """Anchors [u; v] with their partner index; columns [u; v; h] with labels (h: a class each, unseen)."""
    n = len(u)
    z = torch.cat([u, v])
    cols = torch.cat([u, v, h.reshape(-1, u.shape[1])])
    col_labels = torch.cat([labels, labels, 1000 + torch.arange(h.shape[0] * h.shape[1])])
    partner = list(range(n, 2 * n)) + list(range(n))
    return z, cols, col_labels, partner


def ref_dcl(u, v, h, s, labels, weights=None):
    z, cols, _, partner = views(u, v, h, labels)
    w = torch.ones(len(u), dtype=F64) if weights is None else weights
    terms = []
    for i in range(len(z)):
        negatives = [s * z[i] @ cols[j] for j in range(len(cols)) if j not in (i, partner[i])]
        terms.append(lse(negatives) - w[i % len(u)] * s * z[i] @ z[partner[i]])
    return torch.stack(terms).mean()


def ref_supcon(u, v, h, s, labels):
    z, cols, col_labels, _ = views(u, v, h, labels)
    zl = torch.cat([labels, labels])
    terms = []
    for i in range(len(z)):
        others = [a for a in range(len(cols)) if a != i]
        denominator = lse([s * z[i] @ cols[a] for a in others])
        positives = [p for p in others if col_labels[p] == zl[i]]
        terms.append(-sum(s * z[i] @ cols[p] - denominator for p in positives) / len(positives))
    return torch.stack(terms).mean()


def ref_tcl(u, v, h, s, labels, k1, k2):
    z, cols, col_labels, _ = views(u, v, h, labels)
    zl = torch.cat([labels, labels])
    terms = []
    for i in range(len(z)):
        others = [a for a in range(len(cols)) if a != i]
        positives = [p for p in others if col_labels[p] == zl[i]]
        parts = [s * z[i] @ cols[p] for p in positives] + [math.log(k1) - z[i] @ cols[p] for p in positives]
        parts += [math.log(k2) + s * z[i] @ cols[a] for a in others if col_labels[a] != zl[i]]
        log_d = lse(parts)
        terms.append(-sum(s * z[i] @ cols[p] - log_d for p in positives) / len(positives))
    return torch.stack(terms).mean()


def ref_hcl(u, v, h, s, labels, beta, tau_plus):
    z, cols, _, partner = views(u, v, h, labels)
    t = 1 / s
    terms = []
    for i in range(len(z)):
        negs = [j for j in range(len(cols)) if j not in (i, partner[i])]
        m = len(negs)
        weights = torch.softmax(torch.stack([beta * z[i] @ cols[j] / t for j in negs]), 0)
        reweighted = sum(w * torch.exp(z[i] @ cols[j] / t) for w, j in zip(weights, negs))
        pos = torch.exp(z[i] @ z[partner[i]] / t)
        ng = torch.maximum(m / (1 - tau_plus) * (reweighted - tau_plus * pos), m * torch.exp(torch.tensor(-1 / t)))
        terms.append(-torch.log(pos / (pos + ng)))
    return torch.stack(terms).mean()


def ref_cwcl(u, v, h, s, a):
    flat = h.reshape(-1, u.shape[1])
    w = (a @ a.T + 1) / 2
    cands = list(v) + list(flat)
    q2d = torch.stack([lse([s * u[i] @ c for c in cands])
                       - sum(w[i, j] * s * u[i] @ v[j] for j in range(len(v))) / w[i].sum() for i in range(len(u))])
    d2q = torch.stack([lse([s * v[i] @ x for x in u])
                       - sum(w[i, j] * s * v[i] @ u[j] for j in range(len(u))) / w[i].sum() for i in range(len(u))])
    return 0.5 * (q2d.mean() + d2q.mean())


LABELS = torch.tensor([0, 1, 0, 2])


def reference(name: str, u, v, h, hyper: dict, s: float, extra: dict):
    if name == "clip":
        return ref_clip(u, v, h, s, **hyper)
    if name == "siglip":
        return ref_siglip(u, v, h, s, extra["logit_bias"])
    if name == "supcon":
        return ref_supcon(u, v, h, s, LABELS)
    if name == "tcl":
        return ref_tcl(u, v, h, s, LABELS, **hyper)
    if name == "dcl":
        return ref_dcl(u, v, h, s, LABELS)
    if name == "dclw":
        x = (u * v).sum(1) / hyper["sigma"]
        return ref_dcl(u, v, h, s, LABELS, weights=2 - len(u) * torch.softmax(x, 0))
    if name == "hcl":
        return ref_hcl(u, v, h, s, LABELS, **hyper)
    if name == "cwcl":
        return ref_cwcl(u, v, h, s, extra["weights_from"])
    raise KeyError(name)


REFERENCED = [("clip", {}, 1 / 0.07), ("clip", dict(symmetric=False), 20.0), ("siglip", {}, 10.0),
              ("supcon", {}, 10.0), ("tcl", dict(k1=50.0, k2=2.0), 10.0), ("dcl", {}, 10.0),
              ("dclw", dict(sigma=0.5), 10.0), ("hcl", dict(beta=1.0, tau_plus=0.1), 2.0),
              ("hcl", dict(beta=2.0, tau_plus=0.9), 8.0), ("cwcl", {}, 1 / 0.07)]


def extras(name: str, n: int = N) -> dict:
    out = per_sample(name, range(n))
    if uses_bias(name):
        out["logit_bias"] = torch.tensor(-3.0, dtype=F64)
    if name == "cwcl":
        out["weights_from"] = unit(torch.randn(n, 5, generator=torch.Generator().manual_seed(3), dtype=F64))
    return out


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("name, hyper, scale", REFERENCED, ids=[f"{c[0]}-{i}" for i, c in enumerate(REFERENCED)])
def test_hard_negatives_against_float64_reference(name, hyper, scale, tiled):
    u, v, h = batch()
    extra = extras(name)
    loss = get_loss(name, tiled=tiled, tile_size=3, **hyper)
    got = loss(u, v, logit_scale=torch.tensor(scale, dtype=F64), labels=LABELS, negatives=h, **extra)
    want = reference(name, u, v, h, hyper, scale, extra)
    assert got.item() == pytest.approx(want.item(), abs=1e-10)
    # and the hard negatives matter: the same call without them differs
    without = loss(u, v, logit_scale=torch.tensor(scale, dtype=F64), labels=LABELS, **extra)
    assert abs(without.item() - got.item()) > 1e-4


def test_clip_gap_hard_negatives_change_only_its_clip_part():
    u, v, h = batch(1)
    s = torch.tensor(1 / 0.07, dtype=F64)
    gap, clip = get_loss("clip_gap"), get_loss("clip")
    with_h = gap(u, v, logit_scale=s, negatives=h) - clip(u, v, logit_scale=s, negatives=h)
    without = gap(u, v, logit_scale=s) - clip(u, v, logit_scale=s)
    assert with_h.item() == pytest.approx(without.item(), abs=1e-12)


def test_one_directional_infonce_is_mnrl():
    """symmetric=False is −mean_i log softmax over [V; H] of row i: sentence-transformers' MNRL."""
    u, v, h = batch(2)
    s = 20.0
    logits = s * u @ torch.cat([v, h.reshape(-1, D)]).T
    mnrl = F.cross_entropy(logits, torch.arange(N))
    got = get_loss("clip", symmetric=False)(u, v, logit_scale=torch.tensor(s, dtype=F64), negatives=h)
    assert got.item() == pytest.approx(mnrl.item(), abs=1e-12)


def test_a_hard_negative_equal_to_the_positive_counts_as_a_negative():
    """Pairing is by position: row 0's hard negative set to its own positive doubles that column's mass."""
    u, v, h = batch(3)
    h = h.clone()
    h[0, 0] = v[0]
    s = 5.0
    got = get_loss("clip", symmetric=False)(u, v, logit_scale=torch.tensor(s, dtype=F64), negatives=h)
    assert got.item() == pytest.approx(ref_clip(u, v, h, s, symmetric=False).item(), abs=1e-12)
    row0 = lse([s * u[0] @ c for c in list(v) + list(h.reshape(-1, D))]) - s * u[0] @ v[0]
    assert row0.item() > math.log(2) - 1e-9


ALL_CASES = [(name, *SETUPS[name]) for name in sorted(LOSS_NAMES)]


GRADCHECKED = [c for c in ALL_CASES if c[0] != "dclw"]    # dclw's weights are detached: finite differences differ


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("name, hyper, scale", GRADCHECKED, ids=[c[0] for c in GRADCHECKED])
def test_gradcheck_with_negatives(name, hyper, scale, tiled):
    u, v, h = batch(4, n=3, k=2, d=3)
    extra = extras(name, 3)
    loss = get_loss(name, tiled=tiled, tile_size=2, **hyper)
    s = torch.tensor(scale, dtype=F64, requires_grad=True)

    def f(u, v, h, s):
        return loss(u, v, logit_scale=s, labels=torch.tensor([0, 1, 0]), negatives=h, **extra)
    assert torch.autograd.gradcheck(f, (u.requires_grad_(), v.requires_grad_(), h.requires_grad_(), s))


@pytest.mark.parametrize("name, hyper, scale", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_tiled_equals_dense_with_negatives(name, hyper, scale):
    results = []
    for tiled in (False, True):
        u, v, h = (t.requires_grad_() for t in batch(5, n=23, k=3, d=8))
        labels = torch.randint(0, 4, (23,), generator=torch.Generator().manual_seed(0))
        value = get_loss(name, tiled=tiled, tile_size=7, **hyper)(
            u, v, logit_scale=torch.tensor(scale, dtype=F64), labels=labels, negatives=h, **extras(name, 23))
        results.append((value, torch.autograd.grad(value, (u, v, h))))
    (dense, dense_grads), (tiled, tiled_grads) = results
    torch.testing.assert_close(tiled, dense, rtol=1e-12, atol=1e-12)
    for a, b in zip(tiled_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_negatives_shape_is_checked():
    u, v, h = batch()
    with pytest.raises(ValueError, match=r"negatives must be \(4, k, 3\)"):
        get_loss("clip")(u, v, logit_scale=1.0, negatives=h[:2])
    with pytest.raises(ValueError, match="k >= 1"):
        get_loss("clip")(u, v, logit_scale=1.0, negatives=h[:, :0])


# ------------------------------------------------------------------------------------------ Matryoshka
@pytest.mark.parametrize("name", ["clip", "siglip", "dcl"])
def test_matryoshka_sums_over_truncated_renormalised_embeddings(name):
    u, v, h = batch(6, n=5, k=2, d=8)
    extra = extras(name, 5)
    s = torch.tensor(10.0, dtype=F64)
    dims = [8, 4, 2]
    got = get_loss(name, matryoshka_dims=dims)(u, v, logit_scale=s, negatives=h, **extra)
    hyper = {}
    want = sum(reference(name, unit(u[:, :d]), unit(v[:, :d]), unit(h[..., :d]), hyper, 10.0,
                         {**extra, "logit_bias": extra.get("logit_bias")}) if name != "dcl"
               else ref_dcl(unit(u[:, :d]), unit(v[:, :d]), unit(h[..., :d]), 10.0, torch.arange(5))
               for d in dims)
    assert got.item() == pytest.approx(want.item(), abs=1e-10)


def test_matryoshka_gradient_reaches_only_the_prefixes_used():
    u, v, h = (t.requires_grad_() for t in batch(7, n=4, k=1, d=6))
    loss = get_loss("clip", matryoshka_dims=[3, 2])
    loss(u, v, logit_scale=torch.tensor(5.0, dtype=F64), negatives=h).backward()
    for t in (u, v, h):
        assert (t.grad[..., 3:] == 0).all() and (t.grad[..., :3] != 0).any()


def test_matryoshka_wrapper_is_a_loss_for_the_model_side():
    loss = get_loss("siglip", matryoshka_dims=[4])
    assert loss.name == "siglip" and loss.uses_bias and not loss.uses_weights


@pytest.mark.parametrize("dims, match", [([], None), ([0, 4], "distinct positive"), ([4, 4], "distinct positive"),
                                         ([64], "only 8 dimensions")])
def test_matryoshka_dims_are_checked(dims, match):
    u, v, _ = batch(8, d=8)
    if match is None:                       # empty: no wrapper at all
        assert get_loss("clip", matryoshka_dims=dims).name == "clip"
        return
    with pytest.raises(ValueError, match=match):
        get_loss("clip", matryoshka_dims=dims)(u, v, logit_scale=1.0)
