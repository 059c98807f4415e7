"""The training step's forward and backward, with a gradient cache for batches larger than memory.

A contrastive loss couples every row of the batch, so a plain backward keeps the activations of the
whole batch alive. The gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup") makes activation memory grow with the chunk size instead:

1. pass 1 encodes the local batch chunk by chunk without a graph, saving the RNG state before each
   model call (dropout must draw the same masks again in pass 2);
2. the loss is computed once, in fp32, on the detached embeddings and the logit scale/bias; it
   gathers the other ranks' embeddings itself. Its gradient g = d loss / d embedding for every local
   row, and ds, db for the scale and bias, are cached;
3. pass 2 replays each call from its RNG state with a graph and back-propagates the surrogate
   Σ_rows e·g, whose parameter gradient is exactly the chain rule of the whole-batch loss.

The gradients must cross ranks once per optimizer step and the scale/bias gradient must arrive
exactly once, under DDP and every DeepSpeed ZeRO stage. Both follow from one arrangement of the
calls, identical in the two passes:

    image chunks but the last, text chunks but the last, then ONE call encoding the last image
    chunk and the last text chunk, whose surrogate Σ e·g + s·ds + b·db is the step's only
    "boundary" backward.

Earlier calls only accumulate gradients locally (DDP `no_sync`; a DeepSpeed engine brings its own
`Backward` that turns the accumulation boundary off); in the boundary backward every trainable
parameter, the scale and bias included,
receives gradient, so DDP (without `find_unused_parameters`) and ZeRO 1/2 reduce one complete set.
Towers listed in `model.locked_towers` are encoded in pass 1 only: their embeddings are final.

CoCa's captioning term (`caption`: a `CaptionLoss`) is per sample: the model calls pair each image chunk
with the text chunk of the same rows, pass 1 encodes them without the decoder, and pass 2 computes the
decoder's logits of each chunk with its RNG state restored and adds weight · (the chunk's part of the
caption loss) to that call's surrogate. Its only global quantity, the batch's number of target tokens, is
summed over ranks once before pass 1.

Hard negatives (`negatives`: k more text-tower inputs per row, text–text training) are encoded by the
text tower after the positives, as rows n … n(1+k) of its batch, chunked like them; the loss gets
them as `negatives=(n, k, D)` and their cached gradients flow back through the same replay.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.layout import TOWERS
from pipeline.losses.caption import CaptionLoss
from pipeline.models.coca import caption_targets
from pipeline.models.transformer import at_least_fp32


@dataclass
class StepOutput:
    """What the train loop logs after a step; every tensor is detached."""
    loss: Tensor                      # this rank's loss (fp32 scalar)
    image: Tensor                     # (N, D) fp32 image embeddings of this rank's rows
    text: Tensor                      # (N, D) fp32 text embeddings of this rank's rows
    logit_scale: Tensor               # s = exp(θ)
    logit_bias: Optional[Tensor]
    negatives: Optional[Tensor] = None   # (N, k, D) fp32 hard-negative embeddings, when the step had some
    contrastive: Optional[Tensor] = None  # with a caption term: the contrastive part of `loss`
    caption: Optional[Tensor] = None      # with a caption term: this rank's (unweighted) caption loss


# ---------------------------------------------------------------------------- backward strategies
class Backward:
    """How one micro-step's backward reaches the parameters; this base is plain autograd.

    A step makes several micro-steps (forward + backward) and marks the last one; gradients must be
    communicated across ranks only in the last (the "boundary"), and `optimizer.step()` comes after.
    """

    def micro_step(self, is_last: bool) -> ContextManager:
        """Context around one micro-step's forward and backward."""
        return nullcontext()

    def backward(self, loss: Tensor, is_last: bool) -> None:
        loss.backward()


class DDPBackward(Backward):
    """DDP: all-reduce only in the last micro-step; earlier ones accumulate under `no_sync`."""

    def __init__(self, ddp: DistributedDataParallel):
        self.ddp = ddp

    def micro_step(self, is_last: bool) -> ContextManager:
        return nullcontext() if is_last else self.ddp.no_sync()


def backward_strategy(model: nn.Module) -> Backward:
    """The strategy matching how `model` is wrapped: DDP, or a plain module. (A DeepSpeed engine's
    strategy comes with it: `pipeline.train.engine.DeepSpeedBackward`.)"""
    if hasattr(model, "set_gradient_accumulation_boundary"):      # plain autograd would bypass its reduction
        raise ValueError("forward_backward: this model manages its own gradients (a DeepSpeed engine?); pass "
                         "its Backward strategy, e.g. backward=pipeline.train.engine.DeepSpeedBackward(engine)")
    return DDPBackward(model) if isinstance(model, DistributedDataParallel) else Backward()


def locked_towers(model: nn.Module) -> frozenset[str]:
    """The towers the (possibly wrapped: DDP, DeepSpeed) dual encoder declares frozen."""
    inner = getattr(model, "module", model)
    locked = frozenset(getattr(inner, "locked_towers", ()))
    if not locked <= set(TOWERS):
        raise ValueError(f"model.locked_towers = {sorted(locked)}: expected a subset of {list(TOWERS)}")
    return locked


# ---------------------------------------------------------------------------------- the step
def forward_backward(model: nn.Module, images: Tensor, texts: Tensor, loss_fn: Callable[..., Tensor], *,
                     labels: Optional[Tensor] = None, chunk_size: int = 0, text_chunk_size: int = 0,
                     weights_from: Optional[str] = None, backward: Optional[Backward] = None,
                     negatives: Optional[Tensor] = None, caption_ids: Optional[Tensor] = None,
                     caption: Optional[CaptionLoss] = None, positives: Optional[Tensor] = None,
                     sample_ids: Optional[Tensor] = None) -> StepOutput:
    """Forward and backward of one step over this rank's batch; the caller then steps the optimizer.

    `model` is a dual encoder (plain, DDP, or a DeepSpeed engine with its `backward`) called as
    `model(image=..., text=...) -> {"image", "text", "logit_scale", "logit_bias"}`. `chunk_size` is
    the image chunk of the gradient cache, `text_chunk_size` the text one (0: the same); 0, or chunks
    covering the whole batch, is one plain forward and backward. `weights_from` ("image" or "text")
    passes that tower's detached embeddings to the loss (cwcl). `negatives` (n, k, ...) are k more
    text-tower inputs per row whose embeddings the loss gets as hard negatives; `caption_ids` go to the
    loss as they are (its duplicate mask). `positives` (n, k−1, ...) are captions 2..k of each row (text-tower
    inputs after the n first captions, row-major; the loss gets them as `positives=(n, k−1, D)`, polyview).
    `sample_ids` (n, 2) go to the loss as they are (its per-sample state, isogclr; the loss is called once).
    `caption` (a CoCa model) adds its weight × the captioning loss of
    `texts` given the images; image and text chunks are then the same rows. The parameter gradients equal
    those of a plain backward over the batch, dropout included (the cache replays each call's RNG).
    """
    n = _check_batch(images, texts, labels, chunk_size, text_chunk_size, weights_from, negatives)
    if caption_ids is not None and len(caption_ids) != n:
        raise ValueError(f"forward_backward: expected {n} caption ids (one per pair), got {len(caption_ids)}")
    if sample_ids is not None and len(sample_ids) != n:
        raise ValueError(f"forward_backward: expected {n} sample ids (one row per pair), got {len(sample_ids)}")
    if positives is not None:
        if negatives is not None or caption is not None:
            raise ValueError("forward_backward: several captions per row (positives) take no hard negatives and no "
                             "caption term")
        if positives.ndim < 2 or len(positives) != n or positives.shape[1] < 1 \
                or positives.shape[2:] != texts.shape[1:]:
            raise ValueError(f"forward_backward: positives must be ({n}, k-1, {', '.join(map(str, texts.shape[1:]))}),"
                             f" got {tuple(positives.shape)}")
        texts = torch.cat([texts, positives.flatten(0, 1)])
    if negatives is not None:
        texts = torch.cat([texts, negatives.flatten(0, 1)])
    image_chunk = chunk_size or n
    text_chunk = text_chunk_size or image_chunk
    cap = None
    if caption is not None:
        if negatives is not None or text_chunk != image_chunk:
            raise ValueError("forward_backward: a caption term pairs each image with its caption: no hard negatives, "
                             f"one chunk size for both towers (got {image_chunk} and {text_chunk})")
        cap = _Caption(caption, caption_targets(texts))      # the global token count: a collective, every rank
    backward = backward or backward_strategy(model)
    loss = _Loss(loss_fn, labels, weights_from, 0 if negatives is None else negatives.shape[1], caption_ids,
                 0 if positives is None else positives.shape[1], sample_ids)
    if image_chunk >= n and text_chunk >= len(texts):
        return _plain_step(model, images, texts, loss, backward, cap)
    locked = locked_towers(model)
    calls = plan_calls(n, image_chunk, text_chunk, locked, text_rows=len(texts)) if cap is None \
        else plan_paired_calls(n, image_chunk)
    return _cached_step(model, images, texts, loss, backward, calls, locked, cap)


@dataclass
class _Caption:
    """A step's caption term: the loss, this rank's targets and the global batch's token count."""
    loss: CaptionLoss
    targets: Tensor
    tokens: Optional[Tensor] = None

    def __post_init__(self) -> None:
        self.tokens = self.loss.tokens(self.targets)

    def __call__(self, logits: Tensor, rows: slice) -> Tensor:
        """The (unweighted) caption loss part of these rows."""
        return self.loss(logits, self.targets[rows], self.tokens)


def _plain_step(model: nn.Module, images: Tensor, texts: Tensor, loss: _Loss, backward: Backward,
                cap: Optional[_Caption] = None) -> StepOutput:
    with backward.micro_step(is_last=True):
        out = model(image=images, text=texts, **({"caption": True} if cap else {}))
        value = loss(out["image"], out["text"], out["logit_scale"], out["logit_bias"])
        captioning = cap(out["caption_logits"], slice(None)) if cap else None
        total = value + cap.loss.weight * captioning if cap else value
        backward.backward(total, is_last=True)
    return loss.output(total, out["image"], out["text"], out["logit_scale"], out["logit_bias"], value, captioning)


def _cached_step(model: nn.Module, images: Tensor, texts: Tensor, loss: _Loss, backward: Backward,
                 calls: list[Call], locked: frozenset[str], cap: Optional[_Caption] = None) -> StepOutput:
    inputs = {"image": images, "text": texts}
    rng, emb, scale, bias = _first_pass(model, inputs, calls)

    # The loss once, on fp32 leaves: d loss / d (every embedding row, scale, bias).
    leaves = {"image": emb["image"], "text": emb["text"], "logit_scale": scale, "logit_bias": bias}
    leaves = {k: at_least_fp32(x.detach()).requires_grad_() for k, x in leaves.items() if x is not None}
    value = loss(leaves["image"], leaves["text"], leaves["logit_scale"], leaves.get("logit_bias"))
    grads = dict(zip(leaves, torch.autograd.grad(value, list(leaves.values()), allow_unused=True)))

    # Pass 2: replay every call that has something to train; the last one is the boundary.
    captioning = []
    for call, state in zip(calls, rng):
        is_last = call is calls[-1]
        towers = [t for t in TOWERS if call.rows(t) is not None and t not in locked]
        if not towers and not is_last and cap is None:
            continue
        with backward.micro_step(is_last):
            state.restore()
            out = model(**call.inputs(inputs), **({"caption": True} if cap else {}))
            parts = [(out[t], grads[t][call.rows(t)]) for t in towers]
            if is_last:                       # the scale/bias gradient, delivered exactly once
                parts += [(out[k], grads[k]) for k in ("logit_scale", "logit_bias")
                          if out[k] is not None and out[k].requires_grad and grads.get(k) is not None]
            extra = None
            if cap is not None:               # this chunk's own part of the caption loss, with its graph
                extra = cap(out["caption_logits"], call.image)
                captioning.append(extra.detach())
                extra = cap.loss.weight * extra
            backward.backward(_surrogate(parts, call, extra), is_last)
    if cap is None:
        return loss.output(value, emb["image"], emb["text"], scale, bias)
    caption_value = torch.stack(captioning).sum()
    return loss.output(value.detach() + cap.loss.weight * caption_value, emb["image"], emb["text"], scale, bias,
                       value, caption_value)


def _first_pass(model: nn.Module, inputs: dict[str, Tensor], calls: list[Call]
                ) -> tuple[list[RngState], dict[str, Tensor], Tensor, Optional[Tensor]]:
    """Pass 1: every call without a graph, the RNG state before each saved for the replay.

    Returns the states, each tower's embeddings (in row order), the scale and the bias. Each call's
    rows are copied into one buffer per tower made at its first output and the call's output is
    dropped at once: holding every chunk's small output until a final concatenation scattered them
    between the chunks' freed activations, and the allocator kept all of it (+550 MB at 32k rows).
    """
    rng, emb, out = [], {}, {}
    with torch.no_grad():
        for call in calls:
            rng.append(RngState.capture())
            out = model(**call.inputs(inputs))
            for t in TOWERS:
                if (rows := call.rows(t)) is not None:
                    if t not in emb:
                        emb[t] = out[t].new_empty((len(inputs[t]), *out[t].shape[1:]))
                    emb[t][rows] = out[t]
    return rng, emb, out["logit_scale"], out["logit_bias"]


def _surrogate(parts: list[tuple[Tensor, Tensor]], call: Call, extra: Optional[Tensor] = None) -> Tensor:
    """Σ x·g over (output, cached gradient) pairs: its gradient w.r.t. the parameters is Σ g·dx/dθ; plus
    `extra`, a term of the loss computed in this call with its graph (the caption term)."""
    total = sum((at_least_fp32(x) * g).sum() for x, g in parts)
    if extra is not None:
        total = total + extra
    if not isinstance(total, Tensor) or not total.requires_grad:
        raise ValueError(
            f"gradient cache: model call {call} produced nothing that requires a gradient; a tower "
            "without trainable parameters must be listed in model.locked_towers")
    return total


# ------------------------------------------------------------------------------ the call plan
@dataclass(frozen=True)
class Call:
    """One model call of the gradient cache: the rows of the image and/or text batch it encodes."""
    image: Optional[slice] = None
    text: Optional[slice] = None

    def rows(self, tower: str) -> Optional[slice]:
        return getattr(self, tower)

    def inputs(self, batch: dict[str, Tensor]) -> dict[str, Optional[Tensor]]:
        return {t: None if self.rows(t) is None else batch[t][self.rows(t)] for t in TOWERS}

    def __str__(self) -> str:
        return ", ".join(f"{f.name} rows {s.start}:{s.stop}" for f in fields(self)
                         if (s := getattr(self, f.name)) is not None) or "scale/bias only"


def plan_calls(n: int, image_chunk: int, text_chunk: int, locked: frozenset[str] = frozenset(),
               text_rows: Optional[int] = None) -> list[Call]:
    """The model calls of both passes, in order: image chunks but the last, text chunks but the
    last, then one call with the last chunk of every trainable tower (the boundary). A locked
    tower's chunks are all separate calls (pass 1 only). The text tower has `text_rows` rows
    (default n; more with hard negatives)."""
    last: dict[str, slice] = {}
    calls = []
    for tower, size, rows in (("image", image_chunk, n), ("text", text_chunk, text_rows or n)):
        chunks = [slice(i, min(i + size, rows)) for i in range(0, rows, size)]
        if tower not in locked:
            last[tower] = chunks.pop()
        calls += [Call(**{tower: rows}) for rows in chunks]
    return calls + [Call(**last)]


def plan_paired_calls(n: int, chunk: int) -> list[Call]:
    """The calls with a caption term: each chunk's images and texts in one call (the decoder needs both);
    the last is the boundary."""
    return [Call(image=slice(i, min(i + chunk, n)), text=slice(i, min(i + chunk, n))) for i in range(0, n, chunk)]


# ------------------------------------------------------------------------------------- helpers
@dataclass
class RngState:
    """The CPU and (when in use) CUDA generator states: what dropout draws from."""
    cpu: Tensor
    cuda: Optional[Tensor]

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


@dataclass
class _Loss:
    """The loss call of a step: fp32 inputs whatever the towers' dtype, labels, weights and caption ids
    bound; the text tower's rows after the first n are the k hard negatives of each row, row-major (or, with
    `positives`, its captions 2..k)."""
    fn: Callable[..., Tensor]
    labels: Optional[Tensor]
    weights_from: Optional[str]
    negatives: int = 0                # k
    caption_ids: Optional[Tensor] = None
    positives: int = 0                # k − 1 further captions per row
    sample_ids: Optional[Tensor] = None

    def split(self, image: Tensor, text: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(first captions (n, D), hard negatives (n, k, D) or further captions (n, k−1, D), or None) of the
        text tower's rows."""
        n = len(image)
        per_row = self.negatives or self.positives
        return text[:n], (text[n:].view(n, per_row, -1) if per_row else None)

    def __call__(self, image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
        image, (text, negatives) = at_least_fp32(image), self.split(image, at_least_fp32(text))
        weights = {"image": image, "text": text}[self.weights_from].detach() if self.weights_from else None
        extra = {} if negatives is None else {"positives" if self.positives else "negatives": negatives}
        if self.caption_ids is not None:
            extra["caption_ids"] = self.caption_ids
        if self.sample_ids is not None:
            extra["sample_ids"] = self.sample_ids
        return self.fn(image, text, logit_scale=at_least_fp32(scale),
                       logit_bias=None if bias is None else at_least_fp32(bias),
                       labels=self.labels, weights_from=weights, **extra)

    def output(self, value: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
               contrastive: Optional[Tensor] = None, caption: Optional[Tensor] = None) -> StepOutput:
        """The step's detached, fp32 output."""
        text, negatives = self.split(image, text.detach().float())
        negatives = None if self.positives else negatives
        return StepOutput(value.detach(), image.detach().float(), text, scale.detach(), _detach(bias), negatives,
                          _detach(contrastive), _detach(caption))


def _check_batch(images: Tensor, texts: Tensor, labels: Optional[Tensor], chunk_size: int,
                 text_chunk_size: int, weights_from: Optional[str], negatives: Optional[Tensor] = None) -> int:
    n = len(images)
    if n == 0 or len(texts) != n:
        raise ValueError(f"forward_backward: expected the same non-zero number of images and texts, "
                         f"got {len(images)} images and {len(texts)} texts")
    if negatives is not None and (negatives.ndim < 2 or len(negatives) != n or negatives.shape[1] < 1
                                  or negatives.shape[2:] != texts.shape[1:]):
        raise ValueError(f"forward_backward: negatives must be ({n}, k, {', '.join(map(str, texts.shape[1:]))}) "
                         f"with k >= 1 (k text inputs per row), got {tuple(negatives.shape)}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"forward_backward: expected {n} labels (one per pair), got {len(labels)}")
    if chunk_size < 0 or text_chunk_size < 0:
        raise ValueError(f"forward_backward: chunk sizes must be 0 (off) or positive, got chunk_size="
                         f"{chunk_size}, text_chunk_size={text_chunk_size}")
    if weights_from not in (None, *TOWERS):
        raise ValueError(f"forward_backward: weights_from = {weights_from!r}; expected None, 'image' or 'text'")
    return n


def _detach(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.detach()
