"""Loss family II (docs/losses-family-ii.md): each loss against a float64 reference written as loops over
its definition (with hard negatives and duplicate captions), the page's test vectors, and the 1 vs 2 vs 4
rank equality with hard negatives and duplicates (the plain 2/3/4-rank check is test_distributed.py's,
tiled = dense and gradcheck are test_losses.py's: the family's losses are in its SETUPS)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import get_loss

F64 = torch.float64


def unit(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1)


def angles(a) -> torch.Tensor:
    a = torch.tensor(a, dtype=F64)
    return torch.stack([a.cos(), a.sin()], 1)


U = angles([0.0, 0.6, 1.5])                          # LOSSES.md's fixtures
V = angles([0.2, 0.4, 1.9])
E = angles([0, 2 * math.pi / 3, 4 * math.pi / 3])


def batch(seed: int, n: int, k: int = 2, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    u = unit(torch.randn(n, d, generator=g, dtype=F64))
    v = unit(u + 0.7 * torch.randn(n, d, generator=g, dtype=F64))
    h = unit(v.unsqueeze(1) + 0.9 * torch.randn(n, k, d, generator=g, dtype=F64))
    return u, v, h


def lse(values: list) -> torch.Tensor:
    return torch.logsumexp(torch.stack(values), 0)


def dup_of(ids, i: int, j: int) -> bool:
    """Column pair j is another pair with pair i's caption."""
    return ids is not None and j != i and bool(ids[i] == ids[j])


# ------------------------------------------------------------------------------------------------- cacr
def cost(a, b):
    """‖a − b‖² on the sphere, as 2 − 2a·b (LOSSES.md: the form whose gradient the library takes)."""
    return 2 - 2 * a @ b


def expectation(anchor, points, t):
    """Σ_j π_j c(anchor, x_j) with π_j ∝ exp(−t·c(anchor, x_j)): the repulsion of one anchor."""
    if not points:
        return torch.zeros((), dtype=F64)
    costs = torch.stack([cost(anchor, x) for x in points])
    return (torch.softmax(-t * costs, 0) * costs).sum()


def ref_cacr(u, v, s, h=None, ids=None):
    """The definition with t⁻ = s/2, one positive per anchor; h (n, k, D) are more I→T negatives."""
    n, total = len(u), 0
    extra = [] if h is None else list(h.reshape(-1, u.shape[1]))
    for i in range(n):
        negatives_i2t = [v[j] for j in range(n) if j != i and not dup_of(ids, i, j)] + extra
        negatives_t2i = [u[j] for j in range(n) if j != i and not dup_of(ids, i, j)]
        repulsion = 0.5 * (expectation(u[i], negatives_i2t, s / 2) + expectation(v[i], negatives_t2i, s / 2))
        total = total + cost(u[i], v[i]) - repulsion
    return total / n


CACR_VECTORS = [   # (image, text, s, expected): the table of docs/losses-family-ii.md
    (E, E, 5.0, -3.0),                               # c_ii = 0, every negative at cost 3
    (U, V, 5.0, -0.510185772420),
    (U, V, 0.0, -1.084987366518),                     # s = 0: plain mean cost of the negatives
]


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("image, text, scale, expected", CACR_VECTORS)
def test_cacr_vectors(image, text, scale, expected, tiled):
    got = get_loss("cacr", tiled=tiled, tile_size=2)(image, text, logit_scale=torch.tensor(scale, dtype=F64))
    assert got.item() == pytest.approx(expected, abs=1e-10)
    assert ref_cacr(image, text, scale).item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("with_negatives", [False, True], ids=["pairs", "hard-negatives"])
@pytest.mark.parametrize("with_ids", [False, True], ids=["distinct", "duplicates"])
def test_cacr_against_float64_reference(tiled, with_negatives, with_ids):
    u, v, h = batch(0, 7)
    ids = torch.tensor([3, 4, 3, 5, 6, 4, 3]) if with_ids else None
    scale = torch.tensor(5.0, dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (u, v, h)]
    want = ref_cacr(*leaves[:2], 5.0, h=leaves[2] if with_negatives else None, ids=ids)
    want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
    leaves = [t.clone().requires_grad_() for t in (u, v, h)]
    kwargs = dict(logit_scale=scale, caption_ids=ids, negatives=leaves[2] if with_negatives else None)
    got = get_loss("cacr", tiled=tiled, tile_size=3)(*leaves[:2], **kwargs)
    got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if with_negatives or with_ids:                   # what was added or masked matters
        plain = get_loss("cacr")(u, v, logit_scale=scale)
        assert abs(plain.item() - got.item()) > 1e-4


def test_cacr_repulsion_weights_near_negatives_more():
    """Moving one negative closer to an anchor raises its weight: with a large t⁻ the repulsion is nearly
    the nearest negative's cost, with t⁻ → 0 the mean cost (the s = 0 vector)."""
    u, v, _ = batch(1, 5)
    sharp = get_loss("cacr")(u, v, logit_scale=torch.tensor(200.0, dtype=F64))
    nearest = 0
    for i in range(5):
        nearest = nearest + cost(u[i], v[i]) - 0.5 * (min(cost(u[i], v[j]) for j in range(5) if j != i)
                                                     + min(cost(v[i], u[j]) for j in range(5) if j != i))
    assert sharp.item() == pytest.approx((nearest / 5).item(), abs=1e-3)


def test_cacr_config_asks_for_a_fixed_temperature():
    from pipeline.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="set loss.learn_temperature: false"):
        load_config(None, ["loss.name=cacr"])
    assert load_config(None, ["loss.name=cacr", "loss.learn_temperature=false"]).loss.name == "cacr"


# ------------------------------------------------------------------------------------------------ mochi
def mochi_draws(seed: int, step: int, rows: int, s: int, s_prime: int) -> list[dict]:
    """The documented draw protocol: one generator seeded seed·1000003 + step; per direction (I→T, then
    T→I), for all global rows: member fractions of the pairs (rows, s, 2), α (rows, s), member fractions
    of the anchor mixes (rows, s'), β = ½·U (rows, s')."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return [dict(pair=torch.rand(rows, s, 2, generator=g, dtype=F64), alpha=torch.rand(rows, s, generator=g, dtype=F64),
                 anchor=torch.rand(rows, s_prime, generator=g, dtype=F64),
                 beta=0.5 * torch.rand(rows, s_prime, generator=g, dtype=F64)) for _ in range(2)]


def ref_mochi(u, v, s, n, s_mix, s_prime, seed=0, step=0, h=None, ids=None):
    """clip with each anchor's synthetic negatives, written as loops: hardest by (−dot, column), members
    picked as ⌊fraction·|Ñ|⌋."""
    rows = len(u)
    extra = [] if h is None else list(h.reshape(-1, u.shape[1]))
    draws = mochi_draws(seed, step, rows, s_mix, s_prime)
    total = 0
    for direction, (anchors, columns, more) in enumerate(((u, v, extra), (v, u, []))):
        for i in range(rows):
            q = anchors[i]
            negs = [(j, columns[j]) for j in range(rows) if j != i and not dup_of(ids, i, j)]
            negs += [(rows + m, x) for m, x in enumerate(more)]
            hardest = [x for _, x in sorted(negs, key=lambda t: (-float((q @ t[1]).detach()), t[0]))[:n]]
            d = {key: val[i] for key, val in draws[direction].items()}
            synth = []
            for k in range(s_mix):
                a, b = (hardest[int(f * len(hardest))] for f in d["pair"][k])
                synth.append(unit(d["alpha"][k] * a + (1 - d["alpha"][k]) * b))
            for k in range(s_prime):
                c = hardest[int(d["anchor"][k] * len(hardest))]
                synth.append(unit(d["beta"][k] * q + (1 - d["beta"][k]) * c))
            terms = [s * q @ x for _, x in negs] + [s * q @ columns[i]] + [s * q @ x for x in synth]
            total = total + (lse(terms) - s * u[i] @ v[i]) / (2 * rows)
    return total


MOCHI = dict(n=4, s=3, s_prime=2)


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("with_negatives", [False, True], ids=["pairs", "hard-negatives"])
@pytest.mark.parametrize("with_ids", [False, True], ids=["distinct", "duplicates"])
def test_mochi_against_float64_reference(tiled, with_negatives, with_ids):
    u, v, h = batch(2, 9)
    ids = torch.tensor([3, 4, 3, 5, 6, 4, 3, 7, 8]) if with_ids else None
    leaves = [t.clone().requires_grad_() for t in (u, v, h)]
    want = ref_mochi(*leaves[:2], 10.0, 4, 3, 2, seed=5, step=3, h=leaves[2] if with_negatives else None, ids=ids)
    want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
    loss = get_loss("mochi", tiled=tiled, tile_size=4, seed=5, **MOCHI)
    loss.at_step(3)
    leaves = [t.clone().requires_grad_() for t in (u, v, h)]
    got = loss(*leaves[:2], logit_scale=torch.tensor(10.0, dtype=F64), caption_ids=ids,
               negatives=leaves[2] if with_negatives else None)
    got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    clip = get_loss("clip")(u, v, logit_scale=torch.tensor(10.0, dtype=F64), caption_ids=ids,
                            negatives=h if with_negatives else None)
    assert got.item() > clip.item() + 1e-3                 # the synthetic negatives add to every LSE


def test_mochi_draws_follow_seed_and_step():
    u, v, _ = batch(3, 8)
    s = torch.tensor(10.0, dtype=F64)
    a, b = get_loss("mochi", seed=1, **MOCHI), get_loss("mochi", seed=1, **MOCHI)
    assert torch.equal(a(u, v, logit_scale=s), b(u, v, logit_scale=s))
    b.at_step(1)
    assert not torch.equal(a(u, v, logit_scale=s), b(u, v, logit_scale=s))
    assert not torch.equal(a(u, v, logit_scale=s), get_loss("mochi", seed=2, **MOCHI)(u, v, logit_scale=s))


@pytest.mark.parametrize("hyper, match", [(dict(n=0), "n must be an integer >= 1"),
                                          (dict(s=0, s_prime=0), "s \\+ s_prime must be at least 1"),
                                          (dict(s=-1), "s must be an integer >= 0")])
def test_mochi_bad_hyper(hyper, match):
    with pytest.raises(ValueError, match=match):
        get_loss("mochi", **hyper)


def family_rank_results(rank: int, world: int) -> dict:
    """cacr, mochi and polyview (dense and tiled) on this rank's rows of a 12-pair batch with hard negatives and
    duplicate captions across ranks: value and row gradients."""
    u, v, h = batch(4, 12)
    ids = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5, 6, 0, 7, 8])
    n = 12 // world
    rows = slice(rank * n, (rank + 1) * n)
    out = {}
    for name, hyper, scale in (("cacr", {}, 5.0), ("mochi", dict(seed=3, **MOCHI), 10.0)):
        for tiled in (False, True):
            loss = get_loss(name, tiled=tiled, tile_size=5, **hyper)
            leaves = [t[rows].clone().requires_grad_() for t in (u, v, h)]
            value = loss(leaves[0], leaves[1], negatives=leaves[2], caption_ids=ids[rows],
                         logit_scale=torch.tensor(scale, dtype=F64))
            out[name, tiled] = (value.detach(), *torch.autograd.grad(value, leaves))
    u, caps = multi_caption_batch(6, 12, 3)                  # polyview: 3 captions a row, shared across ranks
    cap_ids = torch.arange(36).view(12, 3)
    cap_ids[7, 2], cap_ids[10, 0] = cap_ids[1, 0], cap_ids[4, 1]
    for tiled in (False, True):
        loss = get_loss("polyview", tiled=tiled, tile_size=5)
        leaves = [t[rows].clone().requires_grad_() for t in (u, caps, h)]
        value = loss(leaves[0], leaves[1][:, 0], positives=leaves[1][:, 1:], negatives=leaves[2],
                     caption_ids=cap_ids[rows], logit_scale=torch.tensor(8.0, dtype=F64))
        out["polyview", tiled] = (value.detach(), *torch.autograd.grad(value, leaves))
    return out


@pytest.mark.slow
def test_one_two_and_four_ranks_agree_with_negatives_and_duplicates():
    """The mean of the ranks' values and their row gradients (÷ W, as parameter averaging does) equal the
    single process's, at 2 and 4 gloo ranks."""
    from tests.helpers.dist import run_world
    single = family_rank_results(0, 1)
    for world in (2, 4):
        ranks = run_world(family_rank_results, world)
        for key, (value, *grads) in single.items():
            torch.testing.assert_close(torch.stack([r[key][0] for r in ranks]).mean(), value, rtol=1e-10, atol=1e-12)
            for i, g in enumerate(grads):
                where = f"{key} at {world} ranks"
                torch.testing.assert_close(torch.cat([r[key][1 + i] for r in ranks]) / world, g, rtol=1e-9,
                                           atol=1e-12, msg=lambda m, where=where: f"{where}: {m}")


def test_mix_negatives_config():
    from pipeline.config import ConfigError, load_config
    from pipeline.train.loop import make_loss
    cfg = load_config(None, ["loss.name=mochi", "loss.mix_negatives.n=8", "loss.mix_negatives.s_prime=0", "seed=4"])
    fn, _ = make_loss(cfg)
    assert (fn.n, fn.s, fn.s_prime, fn.seed) == (8, 16, 0, 4)
    with pytest.raises(ConfigError, match="loss 'clip' does not take n"):
        load_config(None, ["loss.mix_negatives.n=8"])
    with pytest.raises(ConfigError, match="s \\+ s_prime must be at least 1"):
        load_config(None, ["loss.name=mochi", "loss.mix_negatives.s=0", "loss.mix_negatives.s_prime=0"])
    with pytest.raises(ConfigError, match="loss.mix_negatives.n = 'many'"):
        load_config(None, ["loss.name=mochi", "loss.mix_negatives.n=many"])


# --------------------------------------------------------------------------------------------- polyview
def ref_polyview(u, caps, s, ids=None, h=None):
    """MV-InfoNCE on the image-caption graph, by loops: per instance −log(2·Σ_a e^{s u_i·v_i^a} / (energy of the image's
    pairs + energy of each caption's pairs)). caps (n, k, D) are row i's k captions; ids (n, k) caption ids (rows
    sharing any caption are duplicates: not each other's negatives); h (n, m, D) more I→T negatives."""
    n, k = caps.shape[:2]

    def dup(i, j):
        return ids is not None and i != j and bool(set(ids[i].tolist()) & set(ids[j].tolist()))
    total = 0
    for i in range(n):
        positives = 2 * sum(torch.exp(s * u[i] @ caps[i, a]) for a in range(k))
        energy = sum(torch.exp(s * u[i] @ caps[j, a]) for j in range(n) if not dup(i, j) for a in range(k))
        energy = energy + sum(torch.exp(s * u[i] @ x) for x in ([] if h is None else h.reshape(-1, u.shape[1])))
        energy = energy + sum(torch.exp(s * caps[i, a] @ u[j]) for a in range(k) for j in range(n) if not dup(i, j))
        total = total - torch.log(positives / energy)
    return total / n


def multi_caption_batch(seed: int, n: int, k: int, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    u = unit(torch.randn(n, d, generator=g, dtype=F64))
    caps = unit(u.unsqueeze(1) + 0.8 * torch.randn(n, k, d, generator=g, dtype=F64))
    return u, caps


def polyview(u, caps, s, tiled=False, tile_size=3, ids=None, h=None):
    extra = caps[:, 1:] if caps.shape[1] > 1 else None
    return get_loss("polyview", tiled=tiled, tile_size=tile_size)(u, caps[:, 0], positives=extra, caption_ids=ids,
                                                                  negatives=h, logit_scale=torch.tensor(s, dtype=F64))


POLYVIEW_K1 = 0.238967752636     # U, V (k = 1), s = 1/0.07 (clip there: 0.238967681578, the directions nearly agree)
POLYVIEW_UVE = 0.339822333936    # U with captions (V_i, E_i), s = 10


def test_polyview_vectors():
    """docs/losses-family-ii.md's vectors. (1) images e1, e2, each with its own direction twice as captions: by
    hand 2P = 4e^s, D = (2e^s + 2) + 2(e^s + 1), so L = ln(1 + e^−s). (2) k = 1 on LOSSES.md's U, V at
    s = 1/0.07, from clip's two LSEs per row computed here with torch. (3) U with captions (V_i, E_i), s = 10."""
    eye = torch.eye(2, dtype=F64)
    for s in (0.0, math.log(3), 5.0):
        want = math.log1p(math.exp(-s))
        for tiled in (False, True):
            assert polyview(eye, eye.unsqueeze(1).repeat(1, 2, 1), s, tiled=tiled, tile_size=3).item() == \
                pytest.approx(want, abs=1e-12)
        assert ref_polyview(eye, eye.unsqueeze(1).repeat(1, 2, 1), s).item() == pytest.approx(want, abs=1e-12)
    s = 1 / 0.07
    logits = s * U @ V.T
    one = (torch.logaddexp(logits.logsumexp(1), logits.logsumexp(0)) - logits.diag() - math.log(2)).mean().item()
    assert one == pytest.approx(POLYVIEW_K1, abs=1e-10)
    assert polyview(U, V.unsqueeze(1), s).item() == pytest.approx(POLYVIEW_K1, abs=1e-10)
    caps = torch.stack([V, E], 1)
    assert ref_polyview(U, caps, 10.0).item() == pytest.approx(POLYVIEW_UVE, abs=1e-10)
    for tiled in (False, True):
        assert polyview(U, caps, 10.0, tiled=tiled, tile_size=2).item() == pytest.approx(POLYVIEW_UVE, abs=1e-10)


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("with_ids", [False, True], ids=["distinct", "duplicates"])
@pytest.mark.parametrize("with_negatives", [False, True], ids=["pairs", "hard-negatives"])
def test_polyview_against_float64_reference(tiled, k, with_ids, with_negatives):
    u, caps = multi_caption_batch(5, 7, k)
    h = batch(9, 7)[2] if with_negatives else None
    ids = torch.arange(7 * k).view(7, k) if with_ids else None
    if with_ids:
        ids[4, -1] = ids[0, 0]                # rows 0 and 4 share a caption, as do 2 and 6
        ids[6, 0] = ids[2, -1]
    leaves = [t.clone().requires_grad_() for t in (u, caps) + ((h,) if with_negatives else ())]
    want = ref_polyview(*leaves[:2], 6.0, ids=ids, h=leaves[2] if with_negatives else None)
    want_grads = torch.autograd.grad(want, leaves)
    leaves = [t.clone().requires_grad_() for t in (u, caps) + ((h,) if with_negatives else ())]
    got = polyview(*leaves[:2], 6.0, tiled=tiled, ids=ids, h=leaves[2] if with_negatives else None)
    got_grads = torch.autograd.grad(got, leaves)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert got.item() >= 0                    # a probability's −log
    if with_ids or with_negatives:
        assert abs(polyview(u, caps, 6.0).item() - got.item()) > 1e-4


def test_polyview_refusals():
    u, caps = multi_caption_batch(0, 4, 2)
    with pytest.raises(ValueError, match="takes one caption per image"):
        get_loss("clip")(u, caps[:, 0], positives=caps[:, 1:], logit_scale=10.0)
    with pytest.raises(ValueError, match=r"positives must be \(4, k-1, 4\)"):
        get_loss("polyview")(u, caps[:, 0], positives=caps[:2, 1:], logit_scale=10.0)


def _loop_steps_mochi(rank: int, world: int, run_dir: str) -> list:
    """Three steps of the train loop's `train_step` (a real DeepSpeed engine, tiny model, mochi) from a state
    at step 4; per step: the loss's value and embeddings the step logged."""
    from pipeline.config import load_config
    from pipeline.train.checkpoint import TrainState
    from pipeline.train.engine import Engine
    from pipeline.train.interrupts import Boundary
    from pipeline.train.loop import make_loss, train_step
    from tests.test_train_engine import _tiny
    cfg = load_config(None, ["eval.schedule='off'", f"run_dir={run_dir}", "loss.name=mochi", "seed=7",
                             "train.global_batch=8", "cluster.num_workers=1", "train.lr=1e-9", "loss.duplicates=off",
                             "loss.mix_negatives.n=4", "loss.mix_negatives.s=3", "loss.mix_negatives.s_prime=2"])
    torch.manual_seed(0)
    engine = Engine(cfg, _tiny(loss="mochi"), world)
    loss_fn, weights_from = make_loss(cfg)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=g), "text": torch.randint(1, 100, (8, 16), generator=g)}
    state, boundary, seen = TrainState(step=4), Boundary(run_dir, notices=False), []
    for _ in range(3):
        before = state.step
        out, _, _ = train_step(engine, batch, loss_fn, weights_from, state, cfg, boundary)
        seen.append((before, out.loss, out.image, out.text, out.logit_scale))
    return seen


@pytest.mark.slow
def test_the_train_loop_draws_mochi_mixing_at_each_step(tmp_path):
    """The loop calls `at_step(step)` before each step: every logged loss is mochi's value at that step's
    draws (seed 7) on the step's own embeddings, and not the value at a neighbouring step's draws."""
    from tests.helpers.dist import run_world
    (seen,) = run_world(_loop_steps_mochi, 1, str(tmp_path))
    assert [s[0] for s in seen] == [4, 5, 6]
    for step, value, image, text, scale in seen:
        loss = get_loss("mochi", n=4, s=3, s_prime=2, seed=7)
        values = {}
        for k in (step - 1, step, step + 1):
            loss.at_step(k)
            values[k] = loss(image, text, logit_scale=scale).item()
        assert value.item() == pytest.approx(values[step], abs=1e-5)
        assert min(abs(values[step] - values[k]) for k in (step - 1, step + 1)) > 1e-4
