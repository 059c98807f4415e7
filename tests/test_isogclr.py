"""isogclr (individualized temperatures): float64 vectors, a loop reference of the paper's update over two steps,
the state written once per step, and (slow) the per-sample table across 1, 2 and 4 ranks and a resume at
another world size."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, load_config
from pipeline.losses import get_loss
from pipeline.losses.sample_table import SampleTable

F64 = torch.float64
HYPER = dict(gamma=0.8, rho=8.0, tau_init=0.05, eta=0.03, beta_u=0.9, tau_min=0.005, tau_max=1.0, grad_clip=5.0)


def batch(n: int, seed: int, k: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, 4, generator=g, dtype=F64), dim=1)
    v = F.normalize(u + 0.7 * torch.randn(n, 4, generator=g, dtype=F64), dim=1)
    h = F.normalize(torch.randn(n, k, 4, generator=g, dtype=F64), dim=-1) if k else None
    return u, v, h


def ids_of(samples) -> torch.Tensor:
    """(n, 2) ids: image id 1000 + s, caption id 2000 + s (large and negative ids work the same)."""
    s = torch.as_tensor(samples)
    return torch.stack([1000 + s, -(2000 + s) * 7919], 1)


# ---- the float64 loop reference --------------------------------------------------------------------

def ref_step(u, v, h, ids, dup, state, hp):
    """One step by the definitions, anchor by anchor: (value, surrogate whose gradient is the paper's estimator
    τ_i·∇g_i/u_i, the new state). `state` maps an id to [τ, u, m] (u itself, not its log), `dup` a group per row."""
    n = len(u)
    cand = v if h is None else torch.cat([v, h.reshape(-1, u.shape[1])])
    value, surrogate, new = 0.0, 0.0, {}
    for side in ("image", "text"):
        for i in range(n):
            key = int(ids[i, 0 if side == "image" else 1])
            tau, u_old, m = state.get(key, [hp["tau_init"], None, 0.0])      # u: None before the first visit
            anchor, cols = (u[i], cand) if side == "image" else (v[i], u)
            terms = [anchor @ cols[j] - (u[i] @ v[i]) for j in range(len(cols))
                     if j != i and not (j < n and dup[j] == dup[i])]
            g = sum(torch.exp(t / tau) for t in terms) / len(terms)
            u_new = float(g.detach()) if u_old is None else (1 - hp["gamma"]) * u_old + hp["gamma"] * float(g.detach())
            value += tau * (math.log(u_new) + hp["rho"]) / n
            surrogate = surrogate + tau * g / u_new / n
            weighted = sum(float(torch.exp(t / tau)) * float(t) / tau for t in (t.detach() for t in terms)) / len(terms)
            grad = math.log(u_new) + hp["rho"] - weighted / u_new
            m_new = (1 - hp["beta_u"]) * m + hp["beta_u"] * max(-hp["grad_clip"], min(hp["grad_clip"], grad))
            new[key] = [min(hp["tau_max"], max(hp["tau_min"], tau - hp["eta"] * m_new)), u_new, m_new]
    return value, surrogate, new


def table_as_dict(loss) -> dict:
    t = loss.table
    return {int(k): [float(r[0]), math.exp(float(r[1])), float(r[2])] for k, r in zip(t.keys, t.values)}


def test_each_row_knows_its_side():
    u, v, _ = batch(3, seed=2)
    loss = get_loss("isogclr", **HYPER)
    run_step(loss, u, v, None, ids_of(range(3)), None)
    loss.after_step()
    sides = dict(zip(loss.table.keys.tolist(), loss.table.values[:, 3].tolist()))
    assert sides == {**{1000 + s: 0.0 for s in range(3)}, **{-(2000 + s) * 7919: 1.0 for s in range(3)}}


def run_step(loss, u, v, h, ids, cap):
    a, b = u.clone().requires_grad_(), v.clone().requires_grad_()
    extra = {} if h is None else {"negatives": h.clone().requires_grad_()}
    value = loss(a, b, logit_scale=1.0, sample_ids=ids, caption_ids=cap, **extra)
    grads = torch.autograd.grad(value, (a, b, *extra.values()))
    return value.detach(), grads


# ---- vectors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
def test_vector_two_orthogonal_pairs(tiled):
    """u = v = (e1, e2), first step: every anchor has one negative at h = −1, g = e^{−1/τ}, u = g (a first
    visit), so F = τ·(−1/τ + ρ) and L = 2F = −1.84 at τ = 0.01, ρ = 8 (from u = 0 it was u = γg and L = 2τ·ln γ
    − 1.84 = −1.844462871). G = −1/τ + ρ + 1/τ = ρ = 8 clips to 5: m = 4.5, τ − 0.03·4.5 < τ_min: τ = 0.005."""
    e = torch.eye(2, dtype=F64)
    loss = get_loss("isogclr", tiled=tiled, tile_size=1, tau_init=0.01)
    value = loss(e, e, logit_scale=1.0, sample_ids=ids_of([0, 1]))
    assert value.item() == pytest.approx(2 * (-1 + 0.08), abs=1e-12)
    assert value.item() == pytest.approx(-1.84, abs=1e-12)
    loss.after_step()
    assert loss.table.values[:, 0].tolist() == [0.005] * 4
    assert loss.table.values[:, 1].tolist() == pytest.approx([-100.0] * 4, abs=1e-12)
    assert loss.table.values[:, 2].tolist() == pytest.approx([4.5] * 4, abs=1e-12)
    assert {k: v.tolist() for k, v in loss.temperatures().items()} == {"image": [0.005] * 2, "text": [0.005] * 2}


@pytest.mark.parametrize("tiled", [False, True], ids=["dense", "tiled"])
@pytest.mark.parametrize("negatives", [0, 2], ids=["pairs", "hard-negatives"])
def test_two_steps_against_the_loop_reference(tiled, negatives):
    """Value, gradient (the paper's estimator) and the new table after each of two steps; step 2 repeats some
    samples (their state carried) and brings new ones; duplicate captions (rows 1 and 4) are left out."""
    loss = get_loss("isogclr", tiled=tiled, tile_size=3, **HYPER)
    state: dict = {}
    for step, samples in enumerate(([0, 1, 2, 3, 4, 5, 6], [5, 2, 7, 0, 8, 9, 3])):
        u, v, h = batch(7, seed=10 + step, k=negatives)
        ids, dup = ids_of(samples), torch.tensor([0, 1, 2, 3, 1, 5, 6])
        value, grads = run_step(loss, u, v, h, ids, dup)
        a, b = u.clone().requires_grad_(), v.clone().requires_grad_()
        hh = None if h is None else h.clone().requires_grad_()
        ref_value, surrogate, new = ref_step(a, b, hh, ids, dup, state, HYPER)
        ref_grads = torch.autograd.grad(surrogate, (a, b, *([] if hh is None else [hh])))
        assert value.item() == pytest.approx(ref_value, abs=1e-12)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        loss.after_step()
        state.update(new)
        got = table_as_dict(loss)
        assert set(got) == set(state)
        for key, row in state.items():
            assert got[key] == pytest.approx(row, rel=1e-10, abs=1e-14)


def test_state_is_written_once_per_step_not_per_call():
    """Two forwards before `after_step` (a gradient check, a second chunk) see the same state and give the same
    value; the write then changes the next step's value."""
    u, v, _ = batch(6, seed=3)
    loss = get_loss("isogclr", **HYPER)
    first, _ = run_step(loss, u, v, None, ids_of(range(6)), None)
    again, _ = run_step(loss, u, v, None, ids_of(range(6)), None)
    assert torch.equal(first, again) and len(loss.table) == 0
    loss.after_step()
    assert len(loss.table) == 12
    later, _ = run_step(loss, u, v, None, ids_of(range(6)), None)
    assert not torch.isclose(later, first)


def test_the_table_keeps_the_last_row_of_a_repeated_id():
    table = SampleTable([1.0, 2.0])
    table.write(torch.tensor([5, 3, 5]), torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=F64))
    assert sorted(table.keys.tolist()) == [3, 5]
    assert table.lookup(torch.tensor([5, 4, 3])).tolist() == [[0.5, 0.6], [1.0, 2.0], [0.3, 0.4]]


def test_bad_calls_and_config_are_named():
    u, v, _ = batch(4, seed=1)
    with pytest.raises(ValueError, match="requires sample_ids"):
        get_loss("isogclr")(u, v, logit_scale=1.0)
    with pytest.raises(ValueError, match="takes no sample_ids"):
        get_loss("clip")(u, v, logit_scale=1.0, sample_ids=ids_of(range(4)))
    with pytest.raises(ValueError, match=r"sample_ids must be an integer tensor of shape \(4, 2\)"):
        get_loss("isogclr")(u, v, logit_scale=1.0, sample_ids=torch.arange(4))
    with pytest.raises(ValueError, match=r"isogclr: gamma must be a number in \(0, 1\]"):
        get_loss("isogclr", gamma=0.0)
    with pytest.raises(ValueError, match=r"tau_init must be a number in \[tau_min, tau_max\]"):
        get_loss("isogclr", tau_init=2.0)
    with pytest.raises(ConfigError, match="learns a temperature per sample.*loss.learn_temperature: false"):
        load_config(None, ["loss.name=isogclr"])
    with pytest.raises(ConfigError, match="does not take rho"):
        load_config(None, ["loss.temperatures.rho=6"])
    cfg = load_config(None, ["loss.name=isogclr", "loss.learn_temperature=false", "loss.temperatures.rho=6"])
    assert get_loss(cfg.loss.name, **cfg.loss.hyper()).rho == 6.0
    with pytest.raises(ConfigError, match="it trains on data.format: image_text, not 'text_pairs'"):
        load_config(None, ["loss.name=isogclr", "loss.learn_temperature=false", "data.format=text_pairs"])
    with pytest.raises(ConfigError, match="drop loss.matryoshka_dims"):
        load_config(None, ["loss.name=isogclr", "loss.learn_temperature=false", "loss.matryoshka_dims=[2]"])


# ---- across ranks, and a resume at another world size ------------------------------------------------

STEPS = ([0, 1, 2, 3, 4, 5, 6, 7], [5, 2, 7, 0, 8, 9, 3, 1], [4, 8, 6, 9, 0, 1, 2, 3])   # step 3: samples 0–3 move
CAPTIONS = torch.tensor([0, 1, 2, 3, 1, 5, 6, 7])                                       # rows 1 and 4 duplicates


def world_steps(rank: int, world: int, tiled: bool, shards=None) -> dict:
    """Steps 1 and 2 on this rank's rows of the global batches, then a fresh loss resumes from `shards` (every
    saved rank's table; None: this world's own) and takes step 3 (dense or tiled). Values, row gradients and the
    resumed table's values of step 3's ids."""
    from pipeline.distributed import all_gather_objects
    n = 8 // world
    rows = slice(rank * n, (rank + 1) * n)

    def step(loss, k):
        u, v, h = batch(8, seed=20 + k, k=1)
        return run_step(loss, u[rows], v[rows], h[rows], ids_of(STEPS[k])[rows], CAPTIONS[rows])
    loss = get_loss("isogclr", tiled=tiled, tile_size=3, **HYPER)
    out = {}
    for k in (0, 1):
        out[k] = step(loss, k)
        loss.after_step()
    own = loss.sample_state()
    resumed = get_loss("isogclr", tiled=tiled, tile_size=3, **HYPER)
    resumed.load_sample_state(all_gather_objects(own) if shards is None else shards)
    ids = ids_of(STEPS[2])
    ids = torch.cat([ids[:, 0], ids[:, 1]])
    out["saved"], out["resumed"] = loss.table.lookup(ids), resumed.table.lookup(ids)
    out[2] = step(resumed, 2)
    return dict(out=out, shard=own)


def check_world(ranks: list, single: dict, world: int) -> None:
    for k in (0, 1, 2):
        value = torch.stack([r["out"][k][0] for r in ranks]).mean()
        torch.testing.assert_close(value, single[k][0], rtol=1e-10, atol=1e-12)
        for g in range(3):                # image, text, hard-negative rows: each rank's own, scaled by 1/W
            got = torch.cat([r["out"][k][1][g] for r in ranks]) / world
            torch.testing.assert_close(got, single[k][1][g], rtol=1e-9, atol=1e-12)
    for r in ranks:
        torch.testing.assert_close(r["out"]["saved"], single["saved"], rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_ranks_and_resume_at_another_world_size(tiled=True):
    """1, 2 and 4 ranks give the single process's values and gradients over three steps of carried state; the
    table written by 2 ranks resumes on 2 and on 4, the one written by 4 on 1, to the saved values bit for bit;
    samples 0–3, on rank 0 of 2 before the resume and on rank 1 after, keep their temperatures. Tiled (the
    harnesses of test_losses.py check tiled = dense)."""
    from tests.helpers.dist import run_world
    single = world_steps(0, 1, tiled)["out"]
    two = run_world(world_steps, 2, tiled)                            # resumes on 2 from its own shards
    check_world(two, single, 2)
    four = run_world(world_steps, 4, tiled, [r["shard"] for r in two])
    check_world(four, single, 4)
    one = world_steps(0, 1, tiled, [r["shard"] for r in four])["out"]
    for resumed, saved in ((two, two), (four, two), ([{"out": one}], four)):     # what was saved, read back
        for r in resumed:
            assert torch.equal(r["out"]["resumed"], saved[0]["out"]["saved"])
    moved = single["saved"][4:8, 0]                                 # step 3 rows 4–7: samples 0–3, images
    assert (moved != HYPER["tau_init"]).all()                        # learned, not the initial value
    assert sum(len(r["shard"]["keys"]) for r in two) == 20            # 10 samples × (image, caption), each once


# ---- in the run: the train loop's step, its checkpoint, its TensorBoard ------------------------------

LOG_LINE = {"train/loss": 0.0, "perf/samples_per_s": 1.0, "perf/step_time_s": 1.0, "perf/data_wait_fraction": 0.0,
            "train/lr": 0.0, "train/temperature": 1.0, "train/grad_norm": 0.0, "perf/peak_memory_gb": 0.0,
            "data/bad_samples": 0.0}


def _loop_steps(rank: int, world: int, run_dir: str) -> dict:
    """Two `train_step`s of the loop (real DeepSpeed engine, tiny model, gradient cache in chunks of 2) on this
    rank's rows, then the run's checkpoint with the loss's state, and the TensorBoard histograms of its temperatures.
    Also the state of a plain loss fed each step's embeddings, written once per step (the reference)."""
    from pipeline.config import load_config
    from pipeline.data import train_tokenizer
    from pipeline.train.checkpoint import TrainState, save_checkpoint
    from pipeline.train.engine import Engine
    from pipeline.train.interrupts import Boundary
    from pipeline.train.loop import make_loss, train_step
    from pipeline.train.metrics import TrainLogger, temperature_histograms
    from tests.test_train_engine import _tiny
    cfg = load_config(None, ["eval.schedule='off'", f"run_dir={run_dir}", "loss.name=isogclr", "seed=7",
                             "loss.learn_temperature=false", "train.global_batch=8", f"cluster.num_workers={world}",
                             "gradcache.chunk_size=2", "train.lr=1e-3", "loss.duplicates=off", "train.log_every=1"])
    torch.manual_seed(0)
    engine = Engine(cfg, _tiny(loss="isogclr"), world)
    loss_fn, weights_from = make_loss(cfg)
    reference = get_loss("isogclr")
    state, boundary, logger = TrainState(), Boundary(run_dir, notices=False), TrainLogger(cfg, rank)
    g = torch.Generator().manual_seed(0)
    n = 8 // world
    for step in range(2):
        rows = torch.tensor(STEPS[step][rank * n:(rank + 1) * n])
        batch = {"image": torch.randn(n, 3, 32, 32, generator=g), "text": torch.randint(1, 100, (n, 16), generator=g),
                 "sample_id": ids_of(rows)}
        out, _, _ = train_step(engine, batch, loss_fn, weights_from, state, cfg, boundary)
        reference(out.image.double(), out.text.double(), logit_scale=1.0, sample_ids=ids_of(rows))
        reference.after_step()
        logger.log(state.step, LOG_LINE, temperature_histograms(loss_fn))
    logger.close()
    save_checkpoint(engine, cfg, state, {}, train_tokenizer(["a red square"], 100, 16), loss_fn.sample_state())
    return dict(state=loss_fn.sample_state(), reference=reference.sample_state())


@pytest.mark.slow
def test_the_run_steps_checkpoints_and_logs_the_temperatures(tmp_path):
    """Through the loop's `train_step` the table is the one a plain loss gets from each step's embeddings (the
    gradient cache's chunks write it once per step); the checkpoint of 2 ranks holds every rank's shard and a
    resume on 1 rank reads all of it; TensorBoard has the temperatures' histograms of images and of captions
    at each logged step."""
    from pipeline.config import load_config
    from pipeline.train.checkpoint import find_resume
    from tests.helpers.dist import run_world
    from tests.helpers.tensorboard import histograms
    ranks = run_world(_loop_steps, 2, str(tmp_path))
    for r in ranks:
        assert torch.equal(r["state"]["keys"], r["reference"]["keys"]) and len(r["state"]["keys"]) > 0
        torch.testing.assert_close(r["state"]["values"], r["reference"]["values"], rtol=1e-4, atol=1e-6)
    cfg = load_config(None, [f"run_dir={tmp_path}", "loss.name=isogclr", "loss.learn_temperature=false"])
    resumed = get_loss("isogclr")
    resumed.load_sample_state(find_resume(cfg).sample_state())
    every = SampleTable([0.0] * 4)
    every.load_shards(r["state"] for r in ranks)
    assert torch.equal(resumed.table.keys, every.keys) and torch.equal(resumed.table.values, every.values)
    assert len(every) == 2 * 10                                        # 10 samples seen, image and caption
    seen = histograms(str(tmp_path / "tensorboard"))
    for side in ("image", "text"):
        (first, h1), (last, h2) = seen[f"train/sample_temperature/{side}"]
        counts = [sum(c for _, _, c in h) for h in (h1, h2)]
        assert (first, last) == (1, 2) and counts == [8, 10]            # samples 8, 9 are new at step 2
        taus = resumed.temperatures()[side]
        assert h2[0][0] == pytest.approx(float(taus.min())) and h2[-1][1] == pytest.approx(float(taus.max()))


def test_the_gradient_cache_equals_a_plain_step_and_writes_the_state_once():
    """Two steps through the gradient cache (image chunks of 3, text chunks of 2, so the loss's inputs come from
    several calls) give the parameters and the table of two plain steps over the whole batch."""
    import copy

    from pipeline.gradcache import forward_backward
    from tests.test_gradcache import LR, ToyDual, params
    from tests.test_gradcache import batch as toy_batch
    images, texts, _ = toy_batch(8)
    plain_model = ToyDual()
    cached_model, initial = copy.deepcopy(plain_model), params(plain_model)
    plain, cached = get_loss("isogclr", **HYPER), get_loss("isogclr", tiled=True, tile_size=3, **HYPER)
    for samples in STEPS[:2]:
        ids = ids_of(samples)
        for model, loss, chunks in ((plain_model, plain, {}), (cached_model, cached, dict(chunk_size=3,
                                                                                          text_chunk_size=2))):
            forward_backward(model, images, texts, loss, sample_ids=ids, **chunks)
            torch.optim.SGD(model.parameters(), lr=LR).step()
            model.zero_grad()
            loss.after_step()
    got, want = params(cached_model), params(plain_model)
    assert any((want[k] - initial[k]).abs().max() > 1e-3 for k in want)                  # it trained
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert torch.equal(cached.table.keys, plain.table.keys) and len(plain.table) == 20
    # float32 towers: G's two terms (~100 each at τ = 0.05) cancel, so m agrees to ~1e-5 absolute
    torch.testing.assert_close(cached.table.values, plain.table.values, rtol=1e-5, atol=1e-4)


def test_the_table_adds_new_ids_and_overwrites_known_ones():
    g = torch.Generator().manual_seed(0)
    table, want = SampleTable([0.0]), {}
    for _ in range(5):
        ids = torch.randint(-50, 50, (12,), generator=g)
        rows = torch.rand(12, 1, generator=g, dtype=F64)
        table.write(ids, rows)
        want.update({int(i): float(r) for i, r in zip(ids, rows)})              # later rows win, as in a dict
    assert dict(zip(table.keys.tolist(), table.values[:, 0].tolist())) == want and len(table) == len(want)
    shard = table.state_dict()                                        # the checkpoint's shard: ascending ids
    assert shard["keys"].tolist() == sorted(want)
    assert shard["values"][:, 0].tolist() == [want[k] for k in sorted(want)]
    first = sorted(want)[:2]
    assert table.local(torch.tensor([51, *first])).flatten().tolist() == [0.0, *(want[k] for k in first)]


def test_a_write_touches_the_batch_not_the_table():
    """New ids go into the storage's spare rows and known ones are overwritten in place: the write does not copy
    the table (O(batch)); the storage doubles only when full."""
    table = SampleTable([0.0])
    table.write(torch.arange(600), torch.zeros(600, 1, dtype=F64))
    storage = table.values.data_ptr()
    table.write(torch.arange(300, 1000), torch.ones(700, 1, dtype=F64))         # 300 known, 400 new: room left
    assert table.values.data_ptr() == storage and len(table) == 1000
    assert table.local(torch.tensor([0, 299, 300, 999])).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    table.write(torch.arange(1000, 1100), torch.ones(100, 1, dtype=F64))         # full: the storage grows
    assert table.values.data_ptr() != storage and len(table) == 1100
