"""Evaluation sets on disk, in CLIP_benchmark's local WebDataset layout or in our first one.

CLIP_benchmark's layout (what ``clip_benchmark eval --dataset wds/NAME --dataset_root SET`` reads, and
what `contrast data synth` and `contrast data pack --clip-benchmark` write)::

    SET/test/0.tar … N-1.tar, SET/test/nshards.txt     the scored split; exactly the N shards nshards.txt names
    SET/train/…                                       optional, the same way: the linear probe's training split
    SET/dataset_type.txt                              classification (also when absent) or retrieval
    SET/classnames.txt                                classification: line i names class i
    SET/zeroshot_classification_templates.txt         one template a line, {c} standing for the class name

Our first layout has the shards (and manifest.json) directly in ``SET/``, labels in ``KEY.json``; it
keeps working. Samples are ``KEY.jpg|png|webp`` with a label (``KEY.cls``, or ``"label"`` in
``KEY.json``) or captions (``KEY.txt``, one a line). The kind of a set follows from what it holds:

- ``zeroshot``: classnames.txt present, or dataset_type.txt says classification;
- ``relation``: each sample's ``.json`` carries ``{"swapped": caption}``, its ``.txt`` the true caption
  (CLIP_benchmark sees a retrieval set: it does not read the ``.json``);
- ``retrieval``: otherwise; each sample's ``.txt`` holds one caption a line. This is also CLIP_benchmark's
  captioning layout (``--task captioning`` reads it, e.g. its wds form of mscoco_captions, several references
  an image): a captioning model captions every set with captions (`tasks.captioning`), so it needs no kind.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator, Optional

from pipeline import storage
from pipeline.data import BadSample, DataError, Sample, resolve_shards, validate_sample
from pipeline.data.evalsets import CLASSIFICATION, RETRIEVAL, TemplateError, check_templates, read_lines
from pipeline.data.shards import read_shard
from pipeline.layout import (
    CLASSNAMES,
    DATASET_TYPE,
    EVAL_TEST,
    EVAL_TRAIN,
    MANIFEST,
    NSHARDS,
    TEMPLATES,
    eval_split_url,
)

DEFAULT_TEMPLATES = ["{c}"]                # a classification set without a templates file: the bare class name


class EvalSetError(ValueError):
    """An evaluation set that is missing or malformed; the message names the set and the problem."""


@dataclass
class EvalSet:
    name: str
    url: str
    kind: str
    shards: list[str]                      # the scored split (test/)
    classnames: Optional[list[str]] = None
    templates: Optional[list[str]] = None
    train_shards: Optional[list[str]] = None   # the linear probe's training split (train/), when the set has one

    def samples(self) -> Iterator[Sample]:
        """The scored split's samples, in shard order."""
        for shard in self.shards:
            yield from _read_shard(shard)

    def train_samples(self) -> Iterator[Sample]:
        """The training split's samples (none when the set has no train/)."""
        for shard in self.train_shards or []:
            yield from _read_shard(shard)


def open_eval_set(eval_dir: str, name: str) -> EvalSet:
    """Find a set's splits and text files and decide its kind; raise EvalSetError when unusable."""
    url = storage.join(eval_dir, name)
    names = set(storage.listdir(url))
    if not names:
        raise EvalSetError(f"eval set {name!r}: nothing at {url} (is data.eval_dir = {eval_dir} right?)")
    benchmark = EVAL_TEST in names
    shards = _split_shards(name, eval_split_url(url, EVAL_TEST) if benchmark else url)
    train = _split_shards(name, eval_split_url(url, EVAL_TRAIN)) if benchmark and EVAL_TRAIN in names else None
    dataset_type = next(iter(read_lines(storage.join(url, DATASET_TYPE))), "").lower() if DATASET_TYPE in names \
        else ""
    if dataset_type not in ("", CLASSIFICATION, RETRIEVAL):
        raise EvalSetError(f"eval set {name!r}: {DATASET_TYPE} says {dataset_type!r}; expected {CLASSIFICATION} or "
                           f"{RETRIEVAL} (multi-label sets are not supported)")
    if CLASSNAMES in names or dataset_type == CLASSIFICATION:
        if CLASSNAMES not in names:
            raise EvalSetError(f"eval set {name!r}: a classification set needs {CLASSNAMES} (line i names class i) "
                               f"in {url}")
        classnames = read_lines(storage.join(url, CLASSNAMES))
        if not classnames or "" in classnames:
            raise EvalSetError(f"eval set {name!r}: {storage.join(url, CLASSNAMES)} is empty or has a blank line; "
                               "expected one class name a line (line i names class i)")
        templates = read_lines(storage.join(url, TEMPLATES)) if TEMPLATES in names else DEFAULT_TEMPLATES
        try:
            templates = check_templates(templates, f"eval set {name!r} {TEMPLATES}")
        except TemplateError as e:
            raise EvalSetError(str(e)) from None
        return EvalSet(name, url, "zeroshot", shards, classnames, templates, train)
    first = next(_read_shard(shards[0]), None)
    if first is None:
        raise EvalSetError(f"eval set {name!r}: the first shard {shards[0]} holds no samples")
    kind = "relation" if first.meta and "swapped" in first.meta else "retrieval"
    return EvalSet(name, url, kind, shards)


def is_eval_set(url: str) -> bool:
    """Whether a whole set is at `url`: its test split's nshards.txt (CLIP_benchmark's layout) or its
    manifest.json (ours), each written after the shards."""
    return storage.exists(storage.join(eval_split_url(url, EVAL_TEST), NSHARDS)) or \
        storage.exists(storage.join(url, MANIFEST))


def list_eval_sets(eval_dir: str) -> list[str]:
    """Names of the sub-folders of `eval_dir` (candidate eval sets)."""
    fs, path = storage.filesystem(eval_dir)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))


def _split_shards(name: str, url: str) -> list[str]:
    try:
        return [shard.url for shard in resolve_shards(url)]
    except DataError as e:
        raise EvalSetError(f"eval set {name!r}: {e}") from None


def _read_shard(url: str) -> Iterator[Sample]:
    """The samples of an eval shard, checked like training samples (captions optional); an eval set
    must be whole, so a bad sample is an error naming it, not a skip that would change the metric."""
    for raw in read_shard(url):
        try:
            yield validate_sample(raw.key, raw.members, url, caption_required=False)
        except BadSample as e:
            raise EvalSetError(f"{url}: sample {raw.key!r}: {e} (members: {sorted(raw.members)})") from None
