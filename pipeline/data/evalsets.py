"""Writing evaluation sets in CLIP_benchmark's local WebDataset layout (`synth` and `pack` share it).

A set is a folder: ``test/`` (and optionally ``train/``) holds shards ``0.tar`` … ``N-1.tar`` with
``nshards.txt`` (and our ``manifest.json``); beside them ``dataset_type.txt``, and for classification
``classnames.txt`` (line i names class i, the label stored in ``KEY.cls``) and
``zeroshot_classification_templates.txt`` (one template a line, ``{c}`` standing for the class name).
CLIP_benchmark reads such a folder with ``--dataset wds/NAME --dataset_root SET``; `pipeline.eval.sets`
reads it too.
"""
from __future__ import annotations

from typing import Optional, Sequence

from pipeline import storage
from pipeline.data.shards import ShardWriter
from pipeline.layout import CLASSNAMES, DATASET_TYPE, TEMPLATES, eval_split_url

CLASSIFICATION, RETRIEVAL = "classification", "retrieval"      # the dataset types CLIP_benchmark knows here
PLACEHOLDER = "{c}"


class TemplateError(ValueError):
    """Zero-shot templates that cannot be used; the message names where they came from."""


def check_templates(templates: Sequence[str], where: str) -> list[str]:
    """The templates as a list; TemplateError when there are none or one lacks the ``{c}`` placeholder."""
    templates = list(templates)
    if not templates:
        raise TemplateError(f"{where}: no templates; expected one a line, each with {PLACEHOLDER} for the class name")
    bad = [t for t in templates if PLACEHOLDER not in t]
    if bad:
        raise TemplateError(f"{where}: templates without a {PLACEHOLDER} placeholder: {bad[:3]}")
    return templates


def read_lines(url: str) -> list[str]:
    """A text file's lines, stripped, without trailing blank lines (blank lines inside are kept, as
    CLIP_benchmark keeps them: in classnames.txt line i is class i, so dropping one would shift labels)."""
    lines = [line.strip() for line in storage.read_bytes(url).decode("utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def split_writer(set_url: str, split: str, shard_size: int) -> ShardWriter:
    """A writer of one split (``test`` or ``train``) of a set: numbered shards, then manifest and nshards.txt."""
    return ShardWriter(eval_split_url(set_url, split), shard_size, numbered=True)


def write_set_files(set_url: str, dataset_type: str, classnames: Optional[Sequence[str]] = None,
                    templates: Optional[Sequence[str]] = None) -> None:
    """``dataset_type.txt``, and for classification ``classnames.txt`` and the templates file."""
    if dataset_type not in (CLASSIFICATION, RETRIEVAL):
        raise ValueError(f"dataset type {dataset_type!r}: expected {CLASSIFICATION} or {RETRIEVAL}")
    if dataset_type == CLASSIFICATION:
        if not classnames:
            raise ValueError(f"{set_url}: a classification set needs its class names")
        bad = [c for c in classnames if not c.strip() or "\n" in c]
        if bad:
            raise ValueError(f"{set_url}: class names must be one non-blank line each, got {bad[:3]}")
        _write_lines(storage.join(set_url, CLASSNAMES), classnames)
        _write_lines(storage.join(set_url, TEMPLATES), check_templates(templates or [], f"{set_url} templates"))
    _write_lines(storage.join(set_url, DATASET_TYPE), [dataset_type])


def _write_lines(url: str, lines: Sequence[str]) -> None:
    storage.write_bytes(url, "".join(line + "\n" for line in lines).encode("utf-8"))
