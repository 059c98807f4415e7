"""The evaluation tasks: embed a set with a frozen dual encoder, then score it with `metrics`.

A set's kind (see `sets`) picks its task; every task returns a flat dict of floats. Zero-shot sets
also get a linear probe on the same frozen image features: fitted on the set's train/ split and scored
on its test/ split when it has one (CLIP_benchmark's layout), else on a stratified split of the test set.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from pipeline.data import Sample
from pipeline.data.transforms import decode_image, to_tensor
from pipeline.eval import metrics
from pipeline.eval.sets import EvalSet, EvalSetError
from pipeline.log import get_logger
from pipeline.models import Published

log = get_logger(__name__)


class Encoder:
    """A frozen published dual encoder (with its tokenizer), encoding in batches.

    Images get the training pipeline's eval transform: resize the short side, centre-crop to the
    model's input size, CLIP normalisation.
    """

    def __init__(self, model: Published, batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size

    @torch.no_grad()
    def images(self, images: Iterable[bytes]) -> torch.Tensor:
        out = [self.model.encode_image(self.pixels(batch)) for batch in _batches(images, self.batch_size)]
        return torch.cat(out).float()

    def pixels(self, images: list[bytes]) -> torch.Tensor:
        """Encoded images → the model's (N, 3, S, S) input (the eval transform)."""
        return to_tensor([decode_image(data, self.model.image_size) for data in images])

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = [self.model.encode_text(self.model.tokenizer(batch)) for batch in _batches(texts, self.batch_size)]
        return torch.cat(out).float()


def run_task(encoder: Encoder, eval_set: EvalSet, probe_train_fraction: float, seed: int = 0) -> dict[str, float]:
    """Evaluate one set with the task its kind names."""
    samples = list(eval_set.samples())
    if not samples:
        raise EvalSetError(f"eval set {eval_set.name!r} at {eval_set.url} holds no samples")
    if eval_set.kind == "zeroshot":
        return zeroshot(encoder, eval_set, samples, probe_train_fraction, seed)
    if eval_set.kind == "retrieval":
        return retrieval(encoder, eval_set, samples)
    return relation(encoder, eval_set, samples)


def zeroshot(encoder: Encoder, eval_set: EvalSet, samples: list[Sample], probe_train_fraction: float,
             seed: int) -> dict[str, float]:
    """Class names × templates → averaged class embeddings; argmax of image · class; plus a linear probe."""
    classnames, templates = eval_set.classnames, eval_set.templates
    labels = class_labels(eval_set, samples)
    image_emb = encoder.images(s.image for s in samples)
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    class_emb = metrics.class_embeddings(encoder.texts(prompts), len(classnames))
    out = metrics.zeroshot_metrics(image_emb, class_emb, labels)
    train = probe_training_split(encoder, eval_set)
    try:                                   # a probe needs 2+ classes to fit: without them it is skipped, not an error
        if train is None:
            out["linear_probe_acc1"] = metrics.linear_probe_accuracy(image_emb.numpy(), labels.numpy(),
                                                                     probe_train_fraction, seed)
        else:
            out["linear_probe_acc1"] = metrics.fit_linear_probe(*train, image_emb.numpy(), labels.numpy())
    except ValueError as e:
        log.warning("eval set %s: linear probe skipped: %s", eval_set.name, e)
    return out


def probe_training_split(encoder: Encoder, eval_set: EvalSet) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Image features and labels of the set's train/ split (what the probe is fitted on); None without one."""
    if not eval_set.train_shards:
        return None
    train = list(eval_set.train_samples())
    if not train:
        raise EvalSetError(f"eval set {eval_set.name!r}: its train/ split holds no samples")
    labels = class_labels(eval_set, train)
    return encoder.images(s.image for s in train).numpy(), labels.numpy()


def class_labels(eval_set: EvalSet, samples: list[Sample]) -> torch.Tensor:
    """The samples' class indices (KEY.cls or "label" in KEY.json), each checked against the class names."""
    missing = [s.key for s in samples if s.label is None]
    if missing:
        raise EvalSetError(f"eval set {eval_set.name!r}: sample {missing[0]!r} (and {len(missing) - 1} more) has no "
                           "class label: expected KEY.cls or a \"label\" in KEY.json")
    labels = torch.tensor([s.label for s in samples])
    if labels.min() < 0 or labels.max() >= len(eval_set.classnames):
        raise EvalSetError(f"eval set {eval_set.name!r}: labels span [{labels.min()}, {labels.max()}] but "
                           f"{len(eval_set.classnames)} class names are listed")
    return labels


def captions_of(eval_set: EvalSet, samples: list[Sample]) -> tuple[list[str], list[int]]:
    """Every caption line of every sample, and the index of the sample each belongs to."""
    texts, owner = [], []
    for i, s in enumerate(samples):
        captions = s.caption_lines()
        if not captions:
            raise EvalSetError(f"eval set {eval_set.name!r}: sample {s.key!r} has no caption (.txt)")
        texts.extend(captions)
        owner.extend([i] * len(captions))
    return texts, owner


def retrieval(encoder: Encoder, eval_set: EvalSet, samples: list[Sample]) -> dict[str, float]:
    """Every caption line of every image is a candidate text; recall@1/5/10 both ways."""
    texts, owner = captions_of(eval_set, samples)
    image_emb = encoder.images(s.image for s in samples)
    return metrics.retrieval_metrics(image_emb, encoder.texts(texts), torch.tensor(owner))


def relation(encoder: Encoder, eval_set: EvalSet, samples: list[Sample]) -> dict[str, float]:
    """Does the image prefer its true caption over the one with the two objects swapped?"""
    true = [(s.caption or "").strip() for s in samples]
    swapped = [_field(eval_set, s, "swapped") for s in samples]
    image_emb = encoder.images(s.image for s in samples)
    return {"accuracy": metrics.relation_accuracy(image_emb, encoder.texts(true), encoder.texts(swapped))}


def has_captions(eval_set: EvalSet) -> bool:
    """Whether the set's first sample has a caption (.txt): what the `captioning` task scores against."""
    first = next(eval_set.samples(), None)
    return first is not None and bool(first.caption_lines())


@torch.no_grad()
def captioning(encoder: Encoder, eval_set: EvalSet, max_len: int = 0, strategy: str = "greedy",
               limit: int = 0) -> dict[str, float]:
    """A captioning model (`Published.can_caption`) captions the set's images (the first `limit`; 0: all):
    `caption_exact_match`, `caption_bleu4`, `caption_cider` against each image's caption lines
    (`metrics.caption_metrics`), and `caption_token_acc`: the decoder's argmax next token, given the image and
    the true tokens before it, equal to the true one, over every token of each image's first caption."""
    published = encoder.model
    samples = list(eval_set.samples())[: limit or None]
    references = [captions_of(eval_set, [s])[0] for s in samples]
    generated, correct, total = [], 0, 0
    for rows in _batches(list(range(len(samples))), encoder.batch_size):
        images = encoder.pixels([samples[i].image for i in rows])
        generated += published.generate(images, max_len, strategy)
        tokens = published.tokenizer([references[i][0] for i in rows])
        _, image_tokens = published.model.image_features(images)
        predicted = published.model.next_token_logits(image_tokens, tokens[:, :-1]).argmax(-1)
        targets = tokens[:, 1:]
        counted = targets != published.tokenizer.pad_id
        correct += int((predicted == targets)[counted].sum())
        total += int(counted.sum())
    out = {f"caption_{k}": v for k, v in metrics.caption_metrics(generated, references).items()}
    out["caption_token_acc"] = correct / max(total, 1)
    return out


def _field(eval_set: EvalSet, sample: Sample, name: str) -> Any:
    if not sample.meta or name not in sample.meta:
        raise EvalSetError(f"eval set {eval_set.name!r}: sample {sample.key!r} has no {name!r} in its .json")
    return sample.meta[name]


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
