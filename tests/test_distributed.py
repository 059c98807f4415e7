"""Losses across ranks (spawned gloo worlds): every loss, dense and tiled, gives the single-process
value (mean over ranks) and parameter gradients (averaged over ranks, as DDP/DeepSpeed do) on the
rank-major concatenation of the ranks' rows; plus the collectives' gradient routing, the embedding
metrics, and the error for unequal local batches. All checks of one world size run in one spawn."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import distributed as D
from pipeline.losses import LOSS_NAMES, embedding_metrics, get_loss, uses_bias
from tests.helpers.dist import run_world
from tests.test_losses import SETUPS, U, V, per_sample

N, D_IN, D_EMB = 12, 6, 4       # global batch divisible by 2, 3 and 4
RTOL = 1e-5


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(N, D_IN, generator=g, dtype=torch.float64),
                t=torch.randn(N, D_IN, generator=g, dtype=torch.float64),
                w_img=torch.randn(D_IN, D_EMB, generator=g, dtype=torch.float64),
                w_txt=torch.randn(D_IN, D_EMB, generator=g, dtype=torch.float64),
                labels=torch.tensor([0, 1, 2, 0, 1, 0, 3, 3, 1, 0, 2, 4]),
                reference=torch.randn(N, 5, generator=g, dtype=torch.float64))


def loss_results(rank: int, world: int) -> dict:
    """Value and gradients of every loss (dense and tiled) on this rank's rows of the global batch,
    the embeddings coming from two shared linear layers."""
    data = global_batch()
    n = N // world
    rows = slice(rank * n, (rank + 1) * n)
    results = {}
    for name in LOSS_NAMES:
        hyper, scale = SETUPS[name]
        for tiled in (False, True):
            w_img, w_txt = data["w_img"].clone().requires_grad_(), data["w_txt"].clone().requires_grad_()
            log_scale = torch.tensor(scale, dtype=torch.float64).log().requires_grad_()
            bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
            image = F.normalize(data["x"][rows] @ w_img, dim=1)
            text = F.normalize(data["t"][rows] @ w_txt, dim=1)
            kwargs = dict(logit_scale=log_scale.exp(), labels=data["labels"][rows], **per_sample(name, range(N)[rows]))
            if uses_bias(name):
                kwargs["logit_bias"] = bias
            if name == "cwcl":
                kwargs["weights_from"] = F.normalize(data["reference"][rows], dim=1)
            value = get_loss(name, tiled=tiled, tile_size=5, **hyper)(image, text, **kwargs)
            value.backward()
            results[name, tiled] = dict(value=value.detach(), w_img=w_img.grad, w_txt=w_txt.grad,
                                        log_scale=log_scale.grad if log_scale.grad is not None else torch.zeros(()),
                                        bias=bias.grad if bias.grad is not None else torch.zeros(()))
    image = F.normalize(data["x"][rows] @ data["w_img"], dim=1)
    text = F.normalize(data["t"][rows] @ data["w_txt"], dim=1)
    results["metrics"] = embedding_metrics(image, text, data["labels"][rows])
    return results


def collective_results(rank: int, world: int) -> dict:
    """Gradient routing of the collectives, and the unequal-batch error (raised on every rank)."""
    x = torch.full((2, 3), float(rank), requires_grad=True)
    gathered = D.all_gather_with_grad(x)
    (gathered * (rank + 1)).sum().backward()          # rank q weights every gathered row by q + 1
    y = torch.tensor([float(rank)], requires_grad=True)
    total = D.all_reduce_sum(y * y)
    (total * (rank + 1)).sum().backward()
    try:
        get_loss("clip")(torch.ones(2 + (rank == 0), 4), torch.ones(2 + (rank == 0), 4), logit_scale=1.0)
        unequal = None
    except ValueError as e:
        unequal = str(e)
    return dict(gathered=gathered.detach(), gather_grad=x.grad, reduce_grad=y.grad,
                lse=D.all_reduce_logsumexp(torch.tensor([float(rank), -torch.inf])), unequal=unequal)


def row_partials(rank: int, world: int) -> dict:
    """LOSSES.md's 3-pair fixtures with one pair per rank: value and gradient of the rank's row."""
    out = {}
    for name in LOSS_NAMES:
        hyper, scale = SETUPS[name]
        u, v = U[rank:rank + 1].clone().requires_grad_(), V[rank:rank + 1].clone().requires_grad_()
        kwargs = dict(logit_scale=torch.tensor(scale, dtype=torch.float64), labels=torch.tensor([[0, 0, 1][rank]]),
                      **per_sample(name, [rank]))
        if uses_bias(name):
            kwargs["logit_bias"] = torch.tensor(-3.0, dtype=torch.float64)
        if name == "cwcl":
            kwargs["weights_from"] = U[rank:rank + 1]
        value = get_loss(name, **hyper)(u, v, **kwargs)
        value.backward()
        out[name] = (value.detach(), u.grad, v.grad)
    return out


def world_checks(rank: int, world: int) -> dict:
    out = dict(losses=loss_results(rank, world), collectives=collective_results(rank, world))
    if world == 3:
        out["partials"] = row_partials(rank, world)
    return out


def close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_world(world):
    ranks = run_world(world_checks, world)
    reference = loss_results(0, 1)

    for key, expected in reference.items():
        if key == "metrics":
            for metric, value in expected.items():
                for r in ranks:
                    close(r["losses"]["metrics"][metric], value)
            continue
        for field, value in expected.items():
            mean = torch.stack([r["losses"][key][field] for r in ranks]).mean(0)
            try:
                close(mean, value)
            except AssertionError as e:
                raise AssertionError(f"{key} {field} at world size {world}: {e}") from None

    for rank, r in enumerate(ranks):
        c = r["collectives"]
        close(c["gathered"][:, 0], torch.arange(world).repeat_interleave(2).float())
        close(c["gather_grad"], torch.full((2, 3), world * (world + 1) / 2))      # Σ_q (q + 1)
        close(c["reduce_grad"], torch.tensor([2.0 * rank * world * (world + 1) / 2]))
        close(c["lse"], torch.tensor([torch.logsumexp(torch.arange(world).float(), 0), -torch.inf]))
        assert "different shapes" in c["unequal"] and "same local batch size" in c["unequal"]

    if world == 3:
        for name in LOSS_NAMES:
            hyper, scale = SETUPS[name]
            u, v = U.clone().requires_grad_(), V.clone().requires_grad_()
            kwargs = dict(logit_scale=torch.tensor(scale, dtype=torch.float64), labels=torch.tensor([0, 0, 1]),
                          **per_sample(name, range(3)))
            if uses_bias(name):
                kwargs["logit_bias"] = torch.tensor(-3.0, dtype=torch.float64)
            if name == "cwcl":
                kwargs["weights_from"] = U
            full = get_loss(name, **hyper)(u, v, **kwargs)
            full.backward()
            parts = [r["partials"][name] for r in ranks]
            close(torch.stack([p[0] for p in parts]).mean(), full.detach())
            close(torch.cat([p[1] for p in parts]) / world, u.grad)
            close(torch.cat([p[2] for p in parts]) / world, v.grad)


# ------------------------------------------------------------- labels on some ranks, not others
MIXED = torch.tensor([0, 1, 0, 1, 2, 2, -1, -1, -1, -1, -1, -1])     # rank 1 of 2 has no labels at all


def mixed_label_results(rank: int, world: int) -> dict:
    """supcon, clip and the embedding metrics when only rank 0's batch carries labels (rank 1 passes
    None): every rank must still call the same collectives."""
    data = global_batch()
    u, v = F.normalize(data["x"][:, :4], dim=-1), F.normalize(data["t"][:, :4], dim=-1)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    labels = MIXED[rows] if rank == 0 else None
    out = {name: float(get_loss(name)(u[rows], v[rows], logit_scale=torch.tensor(5.0), labels=labels))
           for name in ("supcon", "clip")}
    out["tolerance"] = float(embedding_metrics(u[rows], v[rows], labels)["tolerance"])
    return out


def test_ranks_that_disagree_on_labels_do_not_hang():
    """The rule: a row without a label is a class of its own (README 'Losses'). Two real ranks, one
    with labels and one without, finish (a hang fails the test at the timeout) and give the
    single-process values on the whole batch with that rule."""
    ranks = run_world(mixed_label_results, 2, timeout_s=120)
    data = global_batch()
    u, v = F.normalize(data["x"][:, :4], dim=-1), F.normalize(data["t"][:, :4], dim=-1)
    for name in ("supcon", "clip"):
        whole = float(get_loss(name)(u, v, logit_scale=torch.tensor(5.0), labels=MIXED))
        assert sum(r[name] for r in ranks) / 2 == pytest.approx(whole, rel=RTOL), name
    tolerance = float(embedding_metrics(u, v, MIXED)["tolerance"])
    assert ranks[0]["tolerance"] == ranks[1]["tolerance"] == pytest.approx(tolerance, rel=RTOL)


def stuck_collective(rank: int, world: int) -> str:
    """Rank 0 enters an all-reduce that rank 1 never joins, in a group whose timeout is 3 s."""
    import datetime
    import time
    group = torch.distributed.new_group(timeout=datetime.timedelta(seconds=3))
    if rank == 1:
        time.sleep(8)
        return ""
    try:
        with D.named_timeouts("step 7"):
            torch.distributed.all_reduce(torch.ones(1), group=group)
    except D.CollectiveTimeout as e:
        return str(e)
    return "no error"


def test_a_stuck_collective_fails_naming_the_rank_and_the_step():
    message = run_world(stuck_collective, 2, timeout_s=120)[0]
    assert message.startswith("rank 0 of 2: a collective timed out at step 7 (cluster.collective_timeout_s)"), message
