"""Loss library, one process: LOSSES.md test vectors, gradcheck (dense and tiled), tiled = dense,
dtype behaviour, argument and hyper-parameter errors, embedding metrics."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import LossConfig, MixNegativesConfig, TemperaturesConfig
from pipeline.losses import (
    LOSS_NAMES,
    default_temperature,
    embedding_metrics,
    get_loss,
    hyper_parameters,
    uses_bias,
    uses_sample_ids,
)
from pipeline.losses.cwcl import CwclLoss
from pipeline.losses.dcl import DclwLoss
from pipeline.losses.metrics import alignment, log_mean_gaussian
from pipeline.losses.tiled import pairwise_reduce

F64 = torch.float64


def unit(angles) -> torch.Tensor:
    a = torch.tensor(angles, dtype=F64)
    return torch.stack([a.cos(), a.sin()], 1)


def s(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


U = unit([0.0, 0.6, 1.5])
V = unit([0.2, 0.4, 1.9])
Y = torch.tensor([0, 0, 1])
E = unit([0, 2 * math.pi / 3, 4 * math.pi / 3])
E1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64)
E2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=F64)

# (name, hyper, image, text, call keywords, expected) — the table in LOSSES.md
VECTORS = [
    ("clip", {}, U, V, dict(logit_scale=s(1 / 0.07)), 0.238967681578),
    ("clip", {}, U, V, dict(logit_scale=s(0.0)), 1.098612288668),
    ("siglip", {}, E1, E2, dict(logit_scale=s(10), logit_bias=s(-10)), 10.000090797798),
    ("supcon", {}, U, V, dict(logit_scale=s(10), labels=Y), 0.818658253975),
    ("supcon", {}, U, V, dict(logit_scale=s(10), labels=torch.tensor([0, 1, 2])), 0.515611442188),
    ("supcon", {}, U, V, dict(logit_scale=s(10)), 0.515611442188),        # no labels: each pair its own class
    ("tcl", dict(k1=5000, k2=1), U, V, dict(logit_scale=s(10), labels=Y), 0.974151115411),
    ("dcl", {}, U, V, dict(logit_scale=s(10)), -1.464940904353),
    ("dcl", {}, E, E, dict(logit_scale=s(10)), -15 + math.log(4)),
    ("hcl", dict(beta=1.0, tau_plus=0.1), U, V, dict(logit_scale=s(2)), 1.116530133716),
    ("hcl", dict(beta=0.0, tau_plus=0.0), U, V, dict(logit_scale=s(2)), 1.006301565404),
    ("cwcl", {}, U, V, dict(logit_scale=s(1 / 0.07), weights_from=U), 4.319392084889),
]


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("name, hyper, image, text, kwargs, expected", VECTORS,
                         ids=[f"{v[0]}-{i}" for i, v in enumerate(VECTORS)])
def test_vectors(name, hyper, image, text, kwargs, expected, tiled):
    loss = get_loss(name, tiled=tiled, tile_size=2, **hyper)
    assert loss(image, text, **kwargs).item() == pytest.approx(expected, abs=1e-10)


def test_metric_vectors():
    assert alignment(U, V).item() == pytest.approx(0.079203900210, abs=1e-11)
    assert log_mean_gaussian(E, E, torch.arange(3)).item() == pytest.approx(-6.0, abs=1e-11)
    metrics = embedding_metrics(U, V)
    assert metrics["alignment"].item() == pytest.approx(0.079203900210, abs=1e-6)
    assert "tolerance" not in metrics


def test_clip_gap_is_clip_plus_geometry():
    """clip_gap against its definition written out with pdist-free brute-force pair loops."""
    def unif(x):
        vals = [math.exp(-2 * float((x[i] - x[j]).pow(2).sum())) for i in range(len(x)) for j in range(len(x)) if i < j]
        return math.log(sum(vals) / len(vals))

    def xunif(a, b):
        vals = [math.exp(-2 * float((a[i] - b[j]).pow(2).sum()))
                for i in range(len(a)) for j in range(len(b)) if i != j]
        return math.log(sum(vals) / len(vals))

    scale = s(1 / 0.07)
    base = 0.238967681578 + 0.5 * (unif(U) + unif(V)) + 0.079203900210
    assert get_loss("clip_gap")(U, V, logit_scale=scale).item() == pytest.approx(base, abs=1e-10)
    with_cross = get_loss("clip_gap", cross_uniformity=True, tiled=True, tile_size=2)(U, V, logit_scale=scale)
    assert with_cross.item() == pytest.approx(base + xunif(U, V), abs=1e-10)


def test_cwcl_with_identity_weights_is_clip():
    class IdentityWeights(CwclLoss):
        factors = staticmethod(lambda a: torch.eye(len(a), dtype=a.dtype))

    x, y = random_pairs(6, 4, seed=1)
    expected = get_loss("clip")(x, y, logit_scale=s(7.0))
    got = IdentityWeights()(x, y, logit_scale=s(7.0), weights_from=x)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)


def test_tcl_reduces_to_supcon():
    x, y = random_pairs(6, 4, seed=2)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    supcon = get_loss("supcon")(x, y, logit_scale=s(5.0), labels=labels)
    tcl = get_loss("tcl", k1=0.0, k2=1.0)(x, y, logit_scale=s(5.0), labels=labels)
    assert tcl.item() == pytest.approx(supcon.item(), abs=1e-12)


def test_supcon_against_loop_definition():
    """supcon with repeated labels against a per-anchor loop over LOSSES.md's formula."""
    x, y = random_pairs(5, 3, seed=3)
    labels = torch.tensor([1, 0, 1, 1, 2])
    z, zl, scale = torch.cat([x, y]), torch.cat([labels, labels]), 4.0
    terms = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        lse = torch.logsumexp(torch.stack([scale * z[i] @ z[a] for a in others]), 0)
        positives = [p for p in others if zl[p] == zl[i]]
        terms.append(-sum(scale * z[i] @ z[p] - lse for p in positives) / len(positives))
    expected = torch.stack(terms).mean()
    got = get_loss("supcon", tiled=True, tile_size=3)(x, y, logit_scale=s(scale), labels=labels)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)


# ---- gradients -------------------------------------------------------------------------------------

def random_pairs(n: int, d: int, seed: int, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    y = F.normalize(x + 0.8 * torch.randn(n, d, generator=g, dtype=F64), dim=1)
    return x.to(dtype), y.to(dtype)


# per loss: (hyper, scale) for the gradient and dtype checks; labels and weights added by `call_args`
SETUPS = {
    "clip": ({}, 1 / 0.07),
    "siglip": ({}, 10.0),
    "supcon": ({}, 10.0),
    "tcl": (dict(k1=50.0, k2=2.0), 10.0),
    "dcl": ({}, 10.0),
    "dclw": (dict(sigma=0.5), 10.0),
    "hcl": (dict(beta=1.0, tau_plus=0.1), 2.0),
    "cwcl": ({}, 1 / 0.07),
    "clip_gap": (dict(cross_uniformity=True), 1 / 0.07),
    "cacr": ({}, 5.0),
    "mochi": (dict(n=4, s=3, s_prime=2, seed=1), 10.0),
    "polyview": ({}, 10.0),      # one caption per row here; several: test_losses_family_ii.py
    # γ = 1: u_i = g_i, so the value is F itself and gradcheck holds (γ < 1 differentiates the paper's estimator
    # τ·∇g/u, not the value: test_isogclr.py's loop reference); the scale is unused
    "isogclr": (dict(gamma=1.0, tau_init=0.1), 1.0),
}
EXTRA = [("hcl", dict(beta=2.0, tau_plus=0.9), 8.0)]     # the clamp at M·e^{−1/t} is active here


def test_every_loss_has_a_setup():
    assert set(SETUPS) == set(LOSS_NAMES)


def per_sample(name: str, rows) -> dict:
    """`sample_ids` (the image's and the caption's id) of global rows `rows`, for a loss with per-sample state."""
    rows = torch.as_tensor(list(rows))
    return {"sample_ids": torch.stack([rows, rows + 10**6], 1)} if uses_sample_ids(name) else {}


def call_args(name: str, n: int, scale: float, dtype=F64) -> dict:
    g = torch.Generator().manual_seed(7)
    kwargs = dict(logit_scale=torch.tensor(scale, dtype=dtype, requires_grad=not uses_sample_ids(name)),
                  labels=torch.randint(0, 3, (n,), generator=g), **per_sample(name, range(n)))
    if uses_bias(name):
        kwargs["logit_bias"] = torch.tensor(-3.0, dtype=dtype, requires_grad=True)
    if name == "cwcl":
        kwargs["weights_from"] = F.normalize(torch.randn(n, 5, generator=g, dtype=F64), dim=1).to(dtype)
    return kwargs


CASES = [(name, *SETUPS[name]) for name in sorted(SETUPS)] + EXTRA


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("name, hyper, scale", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_gradcheck(name, hyper, scale, tiled):
    x, y = random_pairs(5, 3, seed=4)
    kwargs = call_args(name, 5, scale)
    loss = get_loss(name, tiled=tiled, tile_size=2, **hyper)
    if name == "dclw":
        loss = frozen_dclw_weights(loss, x, y)
    leaves = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad}

    def f(image, text, *params):
        return loss(image, text, **{**kwargs, **dict(zip(leaves, params))})
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), y.requires_grad_(), *leaves.values()))


def frozen_dclw_weights(loss: DclwLoss, x: torch.Tensor, y: torch.Tensor) -> DclwLoss:
    """dclw's weights carry no gradient, so finite differences must hold them at their value at (x, y):
    returns a copy of `loss` whose weights are those constants, after checking that the weights
    indeed contribute no gradient (dclw and the frozen copy have the same analytic gradient there)."""
    class Frozen(type(loss)):
        def positive_weights(self, p):
            return weights

    weights = 2 - 5 * torch.softmax((x * y).sum(1) / loss.sigma, 0)
    frozen = Frozen(sigma=loss.sigma, tiled=loss.tiled, tile_size=loss.tile_size)
    torch.testing.assert_close(loss(x, y, logit_scale=s(10.0)), frozen(x, y, logit_scale=s(10.0)), rtol=1e-12, atol=0)
    grads = []
    for fn in (loss, frozen):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(a, b, logit_scale=s(10.0)), (a, b)))
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)
    return frozen


@pytest.mark.parametrize("name, hyper, scale", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_tiled_equals_dense(name, hyper, scale):
    """Values and gradients of the tiled form equal the dense form on a batch of several uneven tiles."""
    results = []
    for tiled in (False, True):
        x, y = (t.requires_grad_() for t in random_pairs(37, 8, seed=5))
        kwargs = call_args(name, 37, scale)
        value = get_loss(name, tiled=tiled, tile_size=8, **hyper)(x, y, **kwargs)
        leaves = [x, y] + [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        results.append((value, torch.autograd.grad(value, leaves)))
    (dense, dense_grads), (tiled, tiled_grads) = results
    torch.testing.assert_close(tiled, dense, rtol=1e-12, atol=1e-12)
    for a, b in zip(tiled_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("name, hyper, scale", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bf16_inputs(name, hyper, scale, tiled):
    """bf16 embeddings: fp32 logits, finite value close to the fp32 one, finite bf16 gradients."""
    x, y = random_pairs(16, 8, seed=6, dtype=torch.float32)
    loss = get_loss(name, tiled=tiled, tile_size=5, **hyper)
    reference = loss(x, y, **call_args(name, 16, scale, torch.float32))
    xb, yb = x.bfloat16().requires_grad_(), y.bfloat16().requires_grad_()
    kwargs = call_args(name, 16, scale, torch.float32)
    value = loss(xb, yb, **kwargs)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(reference.item(), rel=0.03, abs=0.03)
    value.backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all() and torch.isfinite(yb.grad).all()
    assert uses_sample_ids(name) or torch.isfinite(kwargs["logit_scale"].grad)


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_no_nan_at_extremes(name, tiled):
    """Coincident embeddings, scale 100 (the clamp), one label for all: finite values and gradients."""
    x = F.normalize(torch.ones(6, 4), dim=1).requires_grad_()
    y = F.normalize(torch.ones(6, 4), dim=1).requires_grad_()
    kwargs = call_args(name, 6, 100.0, torch.float32)
    kwargs["labels"] = torch.zeros(6, dtype=torch.long)
    hyper = dict(SETUPS[name][0], **({"tau_plus": 0.9} if name == "hcl" else {}))
    value = get_loss(name, tiled=tiled, tile_size=4, **hyper)(x, y, **kwargs)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert uses_sample_ids(name) or torch.isfinite(kwargs["logit_scale"].grad)


# ---- the kernel on its own --------------------------------------------------------------------------

def shifted_softplus(x, cols, shift):
    """A term with a parameter and a column-dependent part, as the losses' terms have."""
    return F.softplus(x + shift) - 0.1 * torch.arange(cols.start, cols.stop, dtype=x.dtype)


@pytest.mark.parametrize("row, col", [("lse", None), ("lse", "lse"), ("sum", None), ("sum", "sum"), ("lse", "sum"),
                                      ("sum", "lse")])
def test_kernel_reductions_gradcheck(row, col):
    """Every row/column reduction pair: tiled (uneven tiles) passes gradcheck and equals dense."""
    a = torch.randn(4, 3, dtype=F64, requires_grad=True)
    b = torch.randn(7, 3, dtype=F64, requires_grad=True)
    shift = torch.tensor(0.3, dtype=F64, requires_grad=True)

    def reduced(tile_size):
        def f(a, b, shift):
            rows, cols = pairwise_reduce(a, b, shifted_softplus, shift, row=row, col=col, tile_size=tile_size)
            return rows if cols is None else (rows, cols)
        return f
    assert torch.autograd.gradcheck(reduced(3), (a, b, shift))
    tiled, dense = reduced(3)(a, b, shift), reduced(None)(a, b, shift)
    for t, d in zip(torch.utils._pytree.tree_leaves(tiled), torch.utils._pytree.tree_leaves(dense)):
        torch.testing.assert_close(t, d, rtol=1e-12, atol=1e-12)


def test_kernel_tiles_hold_at_most_tile_squared_terms_however_many_rows():
    """With more rows than tile_size the column tiles narrow: every tile, forward and backward, holds at most
    tile_size² terms (the working set does not grow with the batch; here 37 rows, tiles 2 wide), and the result
    still equals dense."""
    a = torch.randn(37, 3, dtype=F64, requires_grad=True)
    b = torch.randn(29, 3, dtype=F64, requires_grad=True)
    shift = torch.tensor(0.3, dtype=F64, requires_grad=True)
    seen = []

    def recorded(x, cols, shift):
        seen.append(x.shape)
        return shifted_softplus(x, cols, shift)
    got = pairwise_reduce(a, b, recorded, shift, row="lse", col="lse", tile_size=10)
    torch.autograd.backward(got, (torch.ones(37, dtype=F64), torch.ones(29, dtype=F64)))
    assert {cols for _, cols in seen} == {2, 1} and all(rows * cols <= 100 for rows, cols in seen), seen
    assert sum(cols for _, cols in seen) == 2 * 29                 # forward and backward cover every column once
    tiled_grads = [t.grad.clone() for t in (a, b, shift)]
    for t in (a, b, shift):
        t.grad = None
    want = pairwise_reduce(a, b, shifted_softplus, shift, row="lse", col="lse")
    torch.autograd.backward(want, (torch.ones(37, dtype=F64), torch.ones(29, dtype=F64)))
    for g, d in zip((*got, *tiled_grads), (*want, a.grad, b.grad, shift.grad)):
        torch.testing.assert_close(g, d, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile_size", [None, 4])
def test_kernel_scale_equals_scaled_rows(tile_size):
    """`scale=s` gives the values and gradients (s's included) of the rows scaled by s before the kernel."""
    a, b = torch.randn(9, 3, dtype=F64, requires_grad=True), torch.randn(7, 3, dtype=F64, requires_grad=True)
    shift = torch.tensor(0.3, dtype=F64, requires_grad=True)
    s = torch.tensor(2.5, dtype=F64, requires_grad=True)
    out = []
    for scaled in (True, False):
        rows, kw = (a, dict(scale=s)) if scaled else (s * a, {})
        got = pairwise_reduce(rows, b, shifted_softplus, shift, row="lse", col="sum", tile_size=tile_size, **kw)
        grads = torch.autograd.grad(got[0].sum() + (got[1] ** 2).sum(), (a, b, shift, s))
        out.append((*got, *grads))
    for g, w in zip(*out):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_kernel_fully_left_out_row_has_zero_gradient():
    """A row whose every pair is left out reduces to −inf and passes back 0, not NaN."""
    a, b = torch.randn(3, 2, requires_grad=True), torch.randn(5, 2, requires_grad=True)

    def drop_row_0(x, cols):
        return x.masked_fill(torch.tensor([True, False, False]).unsqueeze(1), -math.inf)
    rows, _ = pairwise_reduce(a, b, drop_row_0, tile_size=2)
    assert rows[0] == -math.inf and torch.isfinite(rows[1:]).all()
    rows[1:].sum().backward()
    assert torch.isfinite(a.grad).all() and (a.grad[0] == 0).all() and torch.isfinite(b.grad).all()


# ---- registry and argument errors --------------------------------------------------------------------

def test_model_side_defaults():
    assert default_temperature("clip") == 0.07
    assert default_temperature("siglip") == 0.1 and uses_bias("siglip")
    assert all(default_temperature(n) == 0.1 for n in ("supcon", "dcl", "dclw", "tcl"))
    assert default_temperature("hcl") == 0.5
    assert [n for n in LOSS_NAMES if uses_bias(n)] == ["siglip"]


def test_config_hyper_parameters_are_taken_by_some_loss():
    """Every hyper-parameter field of LossConfig is a real hyper-parameter of at least one loss."""
    config_fields = set(LossConfig().hyper()) | {"k1", "k2", "sigma", "beta", "tau_plus", "cross_uniformity",
                                                    "symmetric"}
    assert {f.name for f in dataclasses.fields(LossConfig)} >= config_fields
    mixing = {f.name for f in dataclasses.fields(MixNegativesConfig)}      # mochi: loss.mix_negatives.*
    assert mixing == {"n", "s", "s_prime"}
    temperatures = {f.name for f in dataclasses.fields(TemperaturesConfig)}  # isogclr: loss.temperatures.*
    assert temperatures == set(hyper_parameters("isogclr"))
    taken = {h for name in LOSS_NAMES for h in hyper_parameters(name)}
    assert config_fields | mixing | temperatures | {"seed"} == taken       # mochi's seed: the run's


@pytest.mark.parametrize("name, hyper, match", [
    ("dcl", dict(k1=3.0), "does not take k1; it takes no hyper-parameters"),
    ("clip", dict(k1=3.0), "does not take k1; it takes symmetric"),
    ("tcl", dict(sigma=0.5), "does not take sigma; it takes k1, k2"),
    ("hcl", dict(beta=1.0, k2=1.0), "does not take k2"),
])
def test_unknown_hyper_is_type_error(name, hyper, match):
    with pytest.raises(TypeError, match=match):
        get_loss(name, **hyper)


@pytest.mark.parametrize("name, hyper, match", [
    ("nope", {}, "unknown loss 'nope': expected one of clip, siglip"),
    ("tcl", dict(k1=-1.0), "k1 and k2 must be finite and >= 0"),
    ("dclw", dict(sigma=0.0), "sigma must be a positive number"),
    ("hcl", dict(tau_plus=1.0), r"tau_plus must be in \[0, 1\)"),
    ("hcl", dict(beta=-1.0), "beta must be finite and >= 0"),
    ("clip_gap", dict(cross_uniformity="yes"), "cross_uniformity must be true or false"),
    ("clip", dict(tile_size=0), "tile_size must be a positive int"),
])
def test_bad_hyper_value_is_value_error(name, hyper, match):
    with pytest.raises(ValueError, match=match):
        get_loss(name, **hyper)


@pytest.mark.parametrize("name, image, text, kwargs, match", [
    ("clip", U, V[:2], dict(logit_scale=s(1.0)), "same shape"),
    ("clip", U, V, dict(logit_scale=torch.ones(2)), "logit_scale must be a scalar"),
    ("clip", U, V, dict(logit_scale=s(1.0), logit_bias=s(0.0)), "takes no logit_bias"),
    ("siglip", U, V, dict(logit_scale=s(1.0)), "logit_bias is required"),
    ("cwcl", U, V, dict(logit_scale=s(1.0)), "requires weights_from"),
    ("cwcl", U, V, dict(logit_scale=s(1.0), weights_from=U[:2]), r"weights_from must be \(3, D'\)"),
    ("clip", U, V, dict(logit_scale=s(1.0), weights_from=U), "takes no weights_from"),
    ("supcon", U, V, dict(logit_scale=s(1.0), labels=torch.tensor([0.0, 1.0, 1.0])), "labels must be an integer"),
    ("supcon", U, V, dict(logit_scale=s(1.0), labels=torch.tensor([0, 1])), r"shape \(3,\)"),
    ("clip", U[:1], V[:1], dict(logit_scale=s(1.0)), "at least 2 pairs in the global batch"),
])
def test_bad_call_is_value_error(name, image, text, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_loss(name)(image, text, **kwargs)


# ---- metrics -----------------------------------------------------------------------------------------

def test_tolerance_against_pair_loop():
    x, y = random_pairs(7, 4, seed=8, dtype=torch.float32)
    labels = torch.tensor([0, 1, 0, 0, 2, 1, 3])
    pairs = [(i, j) for i in range(7) for j in range(7) if i != j and labels[i] == labels[j]]
    expected = sum(float(x[i] @ x[j] + y[i] @ y[j]) for i, j in pairs) / (2 * len(pairs))
    metrics = embedding_metrics(x, y, labels)
    assert metrics["tolerance"].item() == pytest.approx(expected, abs=1e-6)
    assert metrics["uniformity_image"].item() == pytest.approx(log_mean_gaussian(x, x, torch.arange(7)).item())
    assert "tolerance" not in embedding_metrics(x, y, torch.arange(7))   # no pair shares a label


# ---- duplicate captions ------------------------------------------------------------------------------
# Caption ids of a 9-pair batch: pairs 0, 3, 7 share a caption, so do 2 and 5; the rest are unique.
DUP_IDS = torch.tensor([10, 11, 12, 10, 13, 12, 14, 10, 15])
DUP_LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 2, 0, 1])        # pair 0 and 7 share a label too


def reference_loss(name: str, hyper: dict, u, v, s, b, ids, labels):
    """LOSSES.md written out densely in float64, each pair of another pair with the same caption taken out
    of the negatives (a positive by label stays a positive). Independent of the library's code."""
    n = len(u)
    dup = (ids[:, None] == ids[None, :]) & ~torch.eye(n, dtype=torch.bool)
    if name in ("clip", "clip_gap"):
        logits = (s * u @ v.T).masked_fill(dup, -math.inf)
        pos = logits.diagonal()
        return 0.5 * ((logits.logsumexp(1) - pos).mean() + (logits.logsumexp(0) - pos).mean())
    if name == "siglip":
        x = s * u @ v.T + b
        z = 2 * torch.eye(n, dtype=F64) - 1
        return F.softplus(-z * x).masked_fill(dup, 0).sum() / n
    z = torch.cat([u, v])
    pair = torch.arange(2 * n) % n
    dup2 = dup[pair][:, pair]
    d = z @ z.T
    me = torch.eye(2 * n, dtype=torch.bool)
    partner = pair[:, None] == pair[None, :]
    if name in ("supcon", "tcl"):
        y = torch.cat([labels, labels])
        same = y[:, None] == y[None, :]
        positives = same & ~me
        allowed = ~me & ~(dup2 & ~same)
        if name == "supcon":
            log_den = (s * d).masked_fill(~allowed, -math.inf).logsumexp(1)
        else:
            k1, k2 = hyper["k1"], hyper["k2"]
            terms = torch.where(same, torch.logaddexp(s * d, math.log(k1) - d), math.log(k2) + s * d)
            log_den = terms.masked_fill(~allowed, -math.inf).logsumexp(1)
        per = [-(s * d[a][positives[a]] - log_den[a]).mean() for a in range(2 * n) if positives[a].any()]
        return torch.stack(per).mean()
    negatives = ~partner & ~dup2
    positive = s * (z * torch.cat([v, u])).sum(1)
    if name in ("dcl", "dclw"):
        w = torch.ones(n, dtype=F64)
        if name == "dclw":
            w = 2 - n * torch.softmax((u * v).sum(1).detach() / hyper["sigma"], 0)
        return ((s * d).masked_fill(~negatives, -math.inf).logsumexp(1) - w.repeat(2) * positive).mean()
    if name == "hcl":
        beta, tau = hyper["beta"], hyper["tau_plus"]
        m = negatives.sum(1).to(F64)
        x = (s * d).masked_fill(~negatives, -math.inf)
        omega = torch.softmax(beta * x, 1)
        reweighted = (omega * x.exp()).sum(1)
        ng = torch.maximum(m / (1 - tau) * (reweighted - tau * positive.exp()), m * math.exp(-s))
        return (-(positive - torch.log(positive.exp() + ng))).mean()
    raise KeyError(name)


# loss family II: float64 references (duplicates too) in test_losses_family_ii.py
OWN_REFERENCES = {"cacr", "mochi", "polyview", "isogclr"}     # isogclr's: test_isogclr.py
MASKED = [n for n in sorted(SETUPS) if n != "cwcl" and n not in OWN_REFERENCES]


def dup_batch():
    u, v = random_pairs(9, 4, seed=8)
    v[7] = v[0]                           # a duplicate caption is also an identical text embedding
    return u, v


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("name", MASKED)
def test_duplicate_mask_matches_a_float64_reference(name, tiled):
    hyper, scale = SETUPS[name]
    u, v = dup_batch()
    s, b = torch.tensor(scale, dtype=F64), torch.tensor(-3.0, dtype=F64)
    labels = DUP_LABELS if name in ("supcon", "tcl") else None
    a, t = u.clone().requires_grad_(), v.clone().requires_grad_()
    want = reference_loss(name, hyper, a, t, s, b, DUP_IDS, labels if labels is not None else torch.arange(9))
    if name == "clip_gap":                # the geometry terms are not negatives: added as they are
        plain = get_loss("clip_gap", **hyper)(a, t, logit_scale=s) - get_loss("clip")(a, t, logit_scale=s)
        want = want + plain
    want_grads = torch.autograd.grad(want, (a, t))
    a, t = u.clone().requires_grad_(), v.clone().requires_grad_()
    kwargs = dict(logit_scale=s, labels=labels, caption_ids=DUP_IDS)
    if uses_bias(name):
        kwargs["logit_bias"] = b
    got = get_loss(name, tiled=tiled, tile_size=4, **hyper)(a, t, **kwargs)
    assert got.item() == pytest.approx(want.item(), abs=1e-10)
    unmasked = get_loss(name, **hyper)(u, v, **{k: x for k, x in kwargs.items() if k != "caption_ids"})
    assert abs(unmasked.item() - got.item()) > 1e-3                 # the planted duplicates matter
    for g, w in zip(torch.autograd.grad(got, (a, t)), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_distinct_captions_leave_every_loss_unchanged(name, tiled):
    hyper, scale = SETUPS[name]
    u, v = random_pairs(9, 4, seed=8)
    kwargs = call_args(name, 9, scale)
    loss = get_loss(name, tiled=tiled, tile_size=4, **hyper)
    values = []
    for ids in (None, torch.arange(100, 109)):
        a, t = u.clone().requires_grad_(), v.clone().requires_grad_()
        value = loss(a, t, **kwargs, **({} if ids is None else {"caption_ids": ids}))
        values.append((value.detach(), *torch.autograd.grad(value, (a, t))))
    for x, y in zip(*values):
        assert torch.equal(x, y)


def test_cwcl_takes_no_duplicate_mask():
    """cwcl's weights already treat pairs with like references as positives: the ids change nothing."""
    u, v = dup_batch()
    kwargs = call_args("cwcl", 9, 1 / 0.07)
    loss = get_loss("cwcl")
    assert torch.equal(loss(u, v, **kwargs), loss(u, v, **kwargs, caption_ids=DUP_IDS))


def test_bad_caption_ids_are_named():
    u, v = dup_batch()
    with pytest.raises(ValueError, match=r"caption_ids must be an integer tensor of shape \(9,\)"):
        get_loss("clip")(u, v, logit_scale=1.0, caption_ids=DUP_IDS[:5])


def masked_rank_results(rank: int, world: int) -> dict:
    """Every masked loss on this rank's rows of the duplicate batch (9 → 8 pairs: 4 per rank at W = 2;
    duplicates across the two ranks)."""
    u, v = dup_batch()
    n = 8 // world
    rows = slice(rank * n, (rank + 1) * n)
    out = {}
    for name in MASKED:
        hyper, scale = SETUPS[name]
        for tiled in (False, True):
            a, t = u[:8][rows].clone().requires_grad_(), v[:8][rows].clone().requires_grad_()
            kwargs = dict(logit_scale=torch.tensor(scale, dtype=F64), labels=DUP_LABELS[:8][rows],
                          caption_ids=DUP_IDS[:8][rows], **per_sample(name, range(8)[rows]))
            if uses_bias(name):
                kwargs["logit_bias"] = torch.tensor(-3.0, dtype=F64)
            value = get_loss(name, tiled=tiled, tile_size=3, **hyper)(a, t, **kwargs)
            out[name, tiled] = (value.detach(), *torch.autograd.grad(value, (a, t)))
    return out


@pytest.mark.slow
def test_duplicate_mask_gives_equal_gradients_with_one_and_two_ranks():
    """Mean over 2 ranks of the values, and the rows' gradients (each rank's own, scaled by 1/W as the
    parameter averaging of DDP / DeepSpeed does), equal the single-process ones."""
    from tests.helpers.dist import run_world
    single = masked_rank_results(0, 1)
    ranks = run_world(masked_rank_results, 2)
    for key, (value, gu, gv) in single.items():
        torch.testing.assert_close(torch.stack([r[key][0] for r in ranks]).mean(), value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.cat([r[key][1] for r in ranks]) / 2, gu, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.cat([r[key][2] for r in ranks]) / 2, gv, rtol=1e-9, atol=1e-12)
