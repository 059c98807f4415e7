"""Evaluation sets on disk: WebDataset shards plus, for classification, class names and templates.

The layout is the local one CLIP_benchmark also reads: a folder per set with ``*.tar`` shards
(``KEY.png|jpg|webp`` + ``KEY.json`` / ``KEY.txt``), and beside them ``classnames.txt`` (one class a
line, line i is label i) and ``zeroshot_classification_templates.txt`` (one template a line, ``{c}``
standing for the class name). The kind of a set follows from what it holds:

- ``zeroshot``: classnames.txt present; each sample's ``.json`` carries ``{"label": int}``;
- ``relation``: each sample's ``.json`` carries ``{"swapped": caption}``, its ``.txt`` the true caption;
- ``retrieval``: each sample's ``.txt`` holds one caption a line (several captions per image).
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator, Optional

from pipeline import storage
from pipeline.data import BadSample, DataError, Sample, resolve_shards, validate_sample
from pipeline.data.shards import read_shard
from pipeline.layout import CLASSNAMES, TEMPLATES


class EvalSetError(ValueError):
    """An evaluation set that is missing or malformed; the message names the set and the problem."""


@dataclass
class EvalSet:
    name: str
    url: str
    kind: str
    shards: list[str]
    classnames: Optional[list[str]] = None
    templates: Optional[list[str]] = None

    def samples(self) -> Iterator[Sample]:
        for shard in self.shards:
            yield from _read_shard(shard)


def open_eval_set(eval_dir: str, name: str) -> EvalSet:
    """Find a set's shards and text files and decide its kind; raise EvalSetError when unusable."""
    url = storage.join(eval_dir, name)
    try:
        shards = [shard.url for shard in resolve_shards(url)]
    except DataError as e:
        raise EvalSetError(f"eval set {name!r}: {e} (is data.eval_dir = {eval_dir} right?)") from None
    names = set(storage.listdir(url))
    if CLASSNAMES in names:
        classnames = _read_lines(storage.join(url, CLASSNAMES))
        templates = _read_lines(storage.join(url, TEMPLATES)) if TEMPLATES in names else ["{c}"]
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise EvalSetError(f"eval set {name!r}: templates without a {{c}} placeholder: {bad[:3]}")
        return EvalSet(name, url, "zeroshot", shards, classnames, templates)
    first = next(_read_shard(shards[0]), None)
    if first is None:
        raise EvalSetError(f"eval set {name!r}: the first shard {shards[0]} holds no samples")
    kind = "relation" if first.meta and "swapped" in first.meta else "retrieval"
    return EvalSet(name, url, kind, shards)


def list_eval_sets(eval_dir: str) -> list[str]:
    """Names of the sub-folders of `eval_dir` (candidate eval sets)."""
    fs, path = storage.filesystem(eval_dir)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))


def _read_lines(url: str) -> list[str]:
    with storage.open_url(url, "r", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _read_shard(url: str) -> Iterator[Sample]:
    """The samples of an eval shard, checked like training samples (captions optional); an eval set
    must be whole, so a bad sample is an error naming it, not a skip that would change the metric."""
    for raw in read_shard(url):
        try:
            yield validate_sample(raw.key, raw.members, url, caption_required=False)
        except BadSample as e:
            raise EvalSetError(f"{url}: sample {raw.key!r}: {e} (members: {sorted(raw.members)})") from None
