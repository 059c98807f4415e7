"""The gradient cache gives the parameter update of one plain backward over the whole batch.

Every test compares one SGD step (Adam would hide a wrong gradient scale) taken through
`forward_backward` with chunks against one taken by plain autograd. Without dropout the reference
encodes the whole batch in one call. With dropout the random masks depend on which rows a call
encodes, so the reference makes the same model calls in the order the cache documents (image
chunks but the last, text chunks but the last, then both last chunks in one call) from the same seed,
keeping their graphs, and backpropagates one loss: only a replay of each call's RNG state in pass 2
can match it.
"""
from __future__ import annotations

import copy
import functools
import math
import weakref
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.gradcache import Backward, Call, StepOutput, forward_backward, plan_calls
from pipeline.losses import get_loss
from tests.helpers.compare import max_abs_diff

LR = 1.0           # parameter differences after one step are then gradient differences
TOL = 1e-5
IMAGE_SHAPE = (3, 4, 4)
VOCAB, CONTEXT, DIM = 50, 5, 16


# ------------------------------------------------------------------------------ test fixtures
class ToyDual(nn.Module):
    """A small dual encoder with DualEncoder's forward contract: dropout in both towers, optional
    gradient checkpointing, logit bias and locked text tower. It records the rows of every call."""

    def __init__(self, *, dropout: float = 0.0, bias: bool = False, grad_checkpointing: bool = False,
                 lock_text: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.image_tower = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(IMAGE_SHAPE), 32), nn.GELU(),
                                         nn.Dropout(dropout), nn.Linear(32, DIM))
        self.token_embed = nn.Embedding(VOCAB, 32)
        self.text_head = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(32, DIM))
        # shape (1,), not (): DeepSpeed 0.19 cannot broadcast a 0-dim parameter (ZeRO 0-2 refuse it)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
        self.logit_bias = nn.Parameter(torch.tensor([-3.0])) if bias else None
        self.grad_checkpointing = grad_checkpointing
        self.locked_towers: set[str] = set()
        if lock_text:
            self.token_embed.requires_grad_(False)
            self.text_head.requires_grad_(False)
            self.locked_towers.add("text")
        self.calls: list[tuple[int, int, bool]] = []          # (image rows, text rows, with graph)

    def _image(self, images: Tensor) -> Tensor:
        x = images.to(self.image_tower[1].weight.dtype)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.image_tower, x, use_reentrant=False)
        return self.image_tower(x)

    def _text(self, tokens: Tensor) -> Tensor:
        with torch.no_grad() if "text" in self.locked_towers else torch.enable_grad():
            return self.text_head(self.token_embed(tokens).mean(dim=1))

    def forward(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None) -> dict:
        self.calls.append((0 if image is None else len(image), 0 if text is None else len(text),
                           torch.is_grad_enabled()))
        return {"image": None if image is None else F.normalize(self._image(image).float(), dim=-1),
                "text": None if text is None else F.normalize(self._text(text).float(), dim=-1),
                "logit_scale": self.logit_scale.float().exp(),
                "logit_bias": None if self.logit_bias is None else self.logit_bias.float()}


def batch(n: int, seed: int = 1, classes: int = 0) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g) if classes else None
    return torch.randn(n, *IMAGE_SHAPE, generator=g), torch.randint(0, VOCAB, (n, CONTEXT), generator=g), labels


clip_loss, siglip_loss, supcon_loss, cwcl_loss = (get_loss(name) for name in ("clip", "siglip", "supcon", "cwcl"))


# ----------------------------------------------------------------------------- the references
Rows = tuple[Optional[slice], Optional[slice]]


def reference_step(model: nn.Module, images: Tensor, texts: Tensor, loss_fn: Callable, *,
                   calls: Optional[list[Rows]] = None, world: int = 1, seed: int = 0,
                   labels: Optional[Tensor] = None,
                   weights_from: Optional[str] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One plain step: each rank's rows (`len / world` of them, drawn with seed + rank) encoded with a
    graph by `calls` (default: one call), one loss over the whole batch, one backward, SGD.
    `weights_from` names the tower whose detached embeddings weight the loss (cwcl).

    Returns the loss and the parameters after the step."""
    n = len(images) // world
    calls = calls or [(slice(0, n), slice(0, n))]
    emb: dict[str, list[tuple[int, Tensor]]] = {"image": [], "text": []}
    for r in range(world):
        torch.manual_seed(seed + r)
        local = {"image": images[r * n:(r + 1) * n], "text": texts[r * n:(r + 1) * n]}
        for rows in calls:
            out = model(**{t: None if s is None else local[t][s] for t, s in zip(emb, rows)})
            for t, s in zip(emb, rows):
                if s is not None:
                    emb[t].append((r * n + s.start, out[t]))
    full = {t: torch.cat([e for _, e in sorted(parts, key=lambda p: p[0])]) for t, parts in emb.items()}
    out = model()
    loss = loss_fn(full["image"], full["text"], logit_scale=out["logit_scale"], logit_bias=out["logit_bias"],
                   labels=labels, weights_from=full[weights_from].detach() if weights_from else None)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return loss.detach(), params(model)


def cached_step(model: nn.Module, images: Tensor, texts: Tensor, loss_fn: Callable, *, seed: int = 0,
                **kw) -> tuple[StepOutput, dict[str, Tensor]]:
    """One step through the gradient cache, then SGD."""
    torch.manual_seed(seed)
    out = forward_backward(model, images, texts, loss_fn, **kw)
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return out, params(model)


def params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().float().clone() for k, v in model.named_parameters()}


# ----------------------------------------------------------------------------------- the tests
def test_plan_of_calls():
    """Documented order: image chunks but the last, text chunks but the last, both last together."""
    assert plan_calls(10, 4, 3) == [Call(image=slice(0, 4)), Call(image=slice(4, 8)), Call(text=slice(0, 3)),
                                    Call(text=slice(3, 6)), Call(text=slice(6, 9)),
                                    Call(image=slice(8, 10), text=slice(9, 10))]
    # a locked tower's chunks are separate calls, none of them in the boundary call
    assert plan_calls(6, 4, 4, frozenset({"text"})) == [Call(image=slice(0, 4)), Call(text=slice(0, 4)),
                                                        Call(text=slice(4, 6)), Call(image=slice(4, 6))]


@pytest.mark.parametrize("chunk, text_chunk", [(4, 0), (5, 0), (5, 3), (12, 5), (1, 1)],
                         ids=["divides", "not-dividing", "different-sizes", "text-only-chunked", "singletons"])
def test_matches_plain_backward(chunk, text_chunk):
    images, texts, _ = batch(12)
    model = ToyDual()
    ref_loss, ref = reference_step(copy.deepcopy(model), images, texts, clip_loss)
    out, got = cached_step(model, images, texts, clip_loss, chunk_size=chunk, text_chunk_size=text_chunk)
    assert max_abs_diff(got, ref) <= TOL
    assert abs(out.loss.item() - ref_loss.item()) <= TOL
    assert out.image.shape == out.text.shape == (12, DIM) and not out.image.requires_grad


def test_plain_step_when_chunk_size_is_zero():
    images, texts, _ = batch(8)
    model = ToyDual(dropout=0.3)
    _, ref = reference_step(copy.deepcopy(model), images, texts, clip_loss)
    _, got = cached_step(model, images, texts, clip_loss, chunk_size=0)
    assert max_abs_diff(got, ref) <= TOL
    assert model.calls == [(8, 8, True)]                    # one forward with a graph, nothing else


CALLS_10_4_3 = [(slice(0, 4), None), (slice(4, 8), None), (None, slice(0, 3)), (None, slice(3, 6)),
                (None, slice(6, 9)), (slice(8, 10), slice(9, 10))]


@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain-towers", "grad-checkpointing"])
def test_dropout_masks_are_replayed(grad_checkpointing):
    images, texts, _ = batch(10)
    model = ToyDual(dropout=0.5, grad_checkpointing=grad_checkpointing)
    _, ref = reference_step(copy.deepcopy(model), images, texts, clip_loss, calls=CALLS_10_4_3, seed=3)
    _, other_masks = reference_step(copy.deepcopy(model), images, texts, clip_loss, calls=CALLS_10_4_3, seed=4)
    assert max_abs_diff(other_masks, ref) > 100 * TOL             # the masks matter at this tolerance
    _, got = cached_step(model, images, texts, clip_loss, seed=3, chunk_size=4, text_chunk_size=3)
    assert max_abs_diff(got, ref) <= TOL


def test_logit_scale_and_bias_get_their_gradient_once():
    """With 4 chunks per tower, a scale/bias gradient taken once per chunk would be 4x too large."""
    images, texts, _ = batch(12)
    model = ToyDual(bias=True)
    reference = copy.deepcopy(model)
    reference_step(reference, images, texts, siglip_loss)
    cached_step(model, images, texts, siglip_loss, chunk_size=3)
    for name in ("logit_scale", "logit_bias"):
        want, got = getattr(reference, name).grad.item(), getattr(model, name).grad.item()
        assert abs(want) * (4 - 1) > 100 * TOL                 # 4x the gradient is far outside the tolerance
        assert got == pytest.approx(want, abs=TOL), name


def test_labels_reach_the_loss():
    images, texts, labels = batch(12, classes=3)
    model = ToyDual()
    _, ref = reference_step(copy.deepcopy(model), images, texts, supcon_loss, labels=labels)
    _, got = cached_step(model, images, texts, supcon_loss, labels=labels, chunk_size=5)
    assert max_abs_diff(got, ref) <= TOL


def test_caption_ids_reach_the_loss():
    """The duplicate mask through the cache: the loss sees the ids once, as a plain backward would."""
    images, texts, _ = batch(12)
    ids = torch.tensor([0, 1, 2, 0, 3, 4, 2, 5, 6, 0, 7, 8])
    model = ToyDual()
    _, ref = reference_step(copy.deepcopy(model), images, texts, functools.partial(clip_loss, caption_ids=ids))
    _, unmasked = reference_step(copy.deepcopy(model), images, texts, clip_loss)
    _, got = cached_step(model, images, texts, clip_loss, caption_ids=ids, chunk_size=5)
    assert max_abs_diff(got, ref) <= TOL < 100 * max_abs_diff(unmasked, ref)


def test_weights_from_a_locked_tower():
    """cwcl weighted by the frozen text tower's embeddings (the LiT setting it was made for)."""
    images, texts, _ = batch(12)
    model = ToyDual(lock_text=True)
    _, ref = reference_step(copy.deepcopy(model), images, texts, cwcl_loss, weights_from="text")
    _, got = cached_step(model, images, texts, cwcl_loss, weights_from="text", chunk_size=5)
    assert max_abs_diff(got, ref) <= TOL


def test_locked_tower_is_encoded_once_and_final():
    images, texts, _ = batch(10)
    model = ToyDual(dropout=0.5, lock_text=True)
    _, ref = reference_step(copy.deepcopy(model), images, texts, clip_loss, seed=5,
                            calls=[(slice(0, 4), None), (slice(4, 8), None), (None, slice(0, 4)),
                                   (None, slice(4, 8)), (None, slice(8, 10)), (slice(8, 10), None)])
    _, got = cached_step(model, images, texts, clip_loss, seed=5, chunk_size=4)
    assert max_abs_diff(got, ref) <= TOL
    assert model.token_embed.weight.grad is None
    with_graph = [(i, t) for i, t, grad in model.calls if grad]
    assert with_graph == [(4, 0), (4, 0), (2, 0)]             # pass 2 never encodes the locked texts


class Recorder(Backward):
    """Plain autograd that records which micro-steps were marked as the boundary."""

    def __init__(self):
        self.marks: list[bool] = []

    def backward(self, loss: Tensor, is_last: bool) -> None:
        self.marks.append(is_last)
        super().backward(loss, is_last)


def test_one_boundary_backward_per_step():
    images, texts, _ = batch(10)
    recorder = Recorder()
    forward_backward(ToyDual(), images, texts, clip_loss, chunk_size=4, text_chunk_size=3, backward=recorder)
    assert recorder.marks == [False] * 5 + [True]


class PassOneWatcher(ToyDual):
    """ToyDual that keeps weak references to the embeddings pass 1 returns and, at each pass-2 call,
    counts how many are still alive."""

    def __init__(self):
        super().__init__()
        self.pass_one: list[weakref.ref] = []
        self.alive_in_pass_two: list[int] = []

    def forward(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None) -> dict:
        if torch.is_grad_enabled():
            self.alive_in_pass_two.append(sum(ref() is not None for ref in self.pass_one))
        out = super().forward(image, text)
        if not torch.is_grad_enabled():
            self.pass_one += [weakref.ref(out[t]) for t in ("image", "text") if out[t] is not None]
        return out


def test_pass_one_outputs_are_freed_before_pass_two():
    """Pass 2 needs only the concatenated embeddings: holding every call's own output as well would
    keep a second (N, D) copy per tower alive while the chunks' activations are built."""
    model = PassOneWatcher()
    images, texts, _ = batch(12)
    forward_backward(model, images, texts, clip_loss, chunk_size=4)
    assert len(model.pass_one) == 6                       # 3 image + 3 text chunks in 5 calls
    assert model.alive_in_pass_two == [0] * 5


def test_real_dual_encoder_with_dropout_and_checkpointing():
    from pipeline.config import ModelConfig
    from pipeline.models import build_model
    model = build_model(ModelConfig(name="tiny", dropout=0.2, grad_checkpointing=True),
                        image_size=16, context_length=8, vocab_size=64)
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    texts = torch.randint(1, 64, (10, 8), generator=torch.Generator().manual_seed(1))
    _, ref = reference_step(copy.deepcopy(model), images, texts, clip_loss, calls=CALLS_10_4_3, seed=7)
    _, got = cached_step(model, images, texts, clip_loss, seed=7, chunk_size=4, text_chunk_size=3)
    assert max_abs_diff(got, ref) <= TOL


def test_real_dual_encoder_with_patch_dropout():
    """The cache's replay keeps the patches pass 1 kept: the cached step equals the plain one."""
    from pipeline.config import ModelConfig, TowerConfig
    from pipeline.models import build_model
    model = build_model(ModelConfig(name="tiny", image=TowerConfig(patch_dropout=0.5)),
                        image_size=16, context_length=8, vocab_size=64)
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    texts = torch.randint(1, 64, (10, 8), generator=torch.Generator().manual_seed(1))
    _, ref = reference_step(copy.deepcopy(model), images, texts, clip_loss, calls=CALLS_10_4_3, seed=7)
    _, other_patches = reference_step(copy.deepcopy(model), images, texts, clip_loss, calls=CALLS_10_4_3, seed=8)
    assert max_abs_diff(other_patches, ref) > 100 * TOL                # the kept patches matter at this tolerance
    _, got = cached_step(model, images, texts, clip_loss, seed=7, chunk_size=4, text_chunk_size=3)
    assert max_abs_diff(got, ref) <= TOL


def test_real_dual_encoder_with_locked_text_tower():
    from pipeline.config import ModelConfig, TowerConfig
    from pipeline.models import build_model
    model = build_model(ModelConfig(name="tiny", text=TowerConfig(lock=True)),
                        image_size=16, context_length=8, vocab_size=64)
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    texts = torch.randint(1, 64, (10, 8), generator=torch.Generator().manual_seed(1))
    _, ref = reference_step(copy.deepcopy(model), images, texts, clip_loss)
    _, got = cached_step(model, images, texts, clip_loss, chunk_size=3)
    assert max_abs_diff(got, ref) <= TOL
    assert all(p.grad is None for p in model.text_tower.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(texts=torch.zeros(3, CONTEXT, dtype=torch.long)), "same non-zero number of images and texts"),
    (dict(labels=torch.zeros(3)), "expected 4 labels"),
    (dict(chunk_size=-1), "chunk sizes must be 0"),
    (dict(weights_from="audio"), "weights_from"),
])
def test_bad_input_is_named(kwargs, message):
    images, texts, _ = batch(4)
    call = dict(model=ToyDual(), images=images, texts=texts, loss_fn=clip_loss) | kwargs
    with pytest.raises(ValueError, match=message):
        forward_backward(**call)


def test_frozen_tower_not_declared_locked_is_an_error():
    model = ToyDual()
    model.text_head.requires_grad_(False)
    model.token_embed.requires_grad_(False)
    images, texts, _ = batch(6)
    with pytest.raises(ValueError, match="locked_towers"):
        forward_backward(model, images, texts, clip_loss, chunk_size=2)


def polyview_reference(model: nn.Module, images: Tensor, texts: Tensor, more: Tensor, ids: Optional[Tensor] = None
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """One plain step of polyview with k captions per row: every caption encoded in one call, then SGD."""
    k1 = more.shape[1]
    out = model(image=images, text=torch.cat([texts, more.flatten(0, 1)]))
    n = len(images)
    loss = get_loss("polyview")(out["image"], out["text"][:n], positives=out["text"][n:].view(n, k1, -1),
                                caption_ids=ids, logit_scale=out["logit_scale"])
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return loss.detach(), params(model)


def test_several_captions_per_row_through_the_cache():
    """k = 3 captions per row (polyview): the cache's step equals a plain one, chunks across the extra
    captions' rows, duplicate captions (ids (n, k)) included; the output's text is caption 1 only."""
    images, texts, _ = batch(10)
    more = torch.randint(0, VOCAB, (10, 2, CONTEXT), generator=torch.Generator().manual_seed(3))
    ids = torch.arange(30).view(10, 3)
    ids[7, 2] = ids[1, 0]
    model = ToyDual()
    ref_loss, ref = polyview_reference(copy.deepcopy(model), images, texts, more, ids)
    _, unmasked = polyview_reference(copy.deepcopy(model), images, texts, more)
    out, got = cached_step(model, images, texts, get_loss("polyview", tiled=True, tile_size=7), positives=more,
                           caption_ids=ids, chunk_size=4, text_chunk_size=7)
    assert max_abs_diff(got, ref) <= TOL < 100 * max_abs_diff(unmasked, ref)
    assert abs(out.loss.item() - ref_loss.item()) <= TOL
    assert out.text.shape == (10, DIM) and out.negatives is None
    with pytest.raises(ValueError, match="positives must be"):
        forward_backward(model, images, texts, clip_loss, positives=more[:3])
