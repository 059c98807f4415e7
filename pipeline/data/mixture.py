"""Weighted mixtures of sources: which source every row of every global batch comes from.

`data.sources: [{name, urls, weight, resampled, on_end}]` mixes several datasets; a plain
`data.train_urls` is the mixture of one source named "train". Row r of the run (row j of global
batch t is r = t·G + j) comes from the source whose share of [0, 1) holds

    u_r = frac(β + r·α),    α = 1/φ (the golden ratio), β seeded,

computed exactly in 64-bit fixed point. This Kronecker sequence is equidistributed with the lowest
discrepancy known: over any run of R rows each source's count is within a few rows of R·share, so
every global batch holds its sources in proportion to their weights (e.g. 0.6/0.3/0.1 of 256 rows
gives 153–154/76–77/25–26). The assignment depends on the row index and the seed only: not on the
world size, the loader processes or a resume.

A source read by epochs with `on_end: stop` ends the data stream at the first batch whose planned
draws from it would pass its sample count (one pass over it; planned draws, so every rank stops at
the same step). `restart` (the default) goes on with the next epoch, reshuffled.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Sequence

import numpy as np

from pipeline.config import Config, DataConfig, SourceConfig, register_check
from pipeline.data.order import SourceSpec

DEFAULT_SOURCE = "train"                   # the name of the one source of `data.train_urls`
_GOLDEN = 0x9E3779B97F4A7C15               # 2^64 / φ
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class MixturePlan:
    """Row index → source index, for sources with these weights and this seed."""

    def __init__(self, weights: Sequence[float], seed: int):
        total = float(sum(weights))
        self.shares = [w / total for w in weights]
        cumulative = np.cumsum(self.shares)[:-1]
        self._bounds = np.array([min(int(c * 2**64), 2**64 - 1) for c in cumulative], dtype=np.uint64)
        self._beta = np.uint64(int.from_bytes(hashlib.sha256(f"{seed}/mixture".encode()).digest()[:8], "little"))

    def sources(self, first_row: int, n: int) -> np.ndarray:
        """Source index of rows first_row … first_row + n − 1."""
        rows = np.arange(first_row, first_row + n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            u = self._beta + rows * np.uint64(_GOLDEN)          # mod 2^64: the fraction in fixed point
        return np.searchsorted(self._bounds, u, side="right")

    def counts(self, first_row: int, n: int) -> np.ndarray:
        """Rows per source among those n rows."""
        return np.bincount(self.sources(first_row, n), minlength=len(self.shares))


def config_sources(d: DataConfig) -> list[SourceConfig]:
    """The sources of a data section: `data.sources`, or `data.train_urls` as the one source "train"."""
    return list(d.sources) if d.sources else [SourceConfig(DEFAULT_SOURCE, list(d.train_urls))]


def expected_epochs(source: SourceSpec, share: float, global_batch: int, steps: int) -> float:
    """Passes over `source` in `steps` global batches."""
    return steps * global_batch * share / max(source.total, 1)


def stop_step(source: SourceSpec, share: float, global_batch: int) -> int:
    """About how many global batches a source with `on_end: stop` lasts."""
    return math.floor(source.total / (share * global_batch) + 1e-9)      # 96 / (0.3·32) is 10, not 9.99…


def source_problems(sources: Sequence[SourceConfig], resampled: bool) -> list[str]:
    """What is wrong with a list of sources: names unique and usable as tags and state keys, URLs
    given, weights positive, `on_end: stop` only for a source read by epochs (`resampled` is the
    default of a source that does not say)."""
    problems = []
    names = [s.name for s in sources]
    for i, s in enumerate(sources):
        key = f"data.sources[{i}]"
        if not _NAME.match(s.name):
            problems.append(f"{key}.name = {s.name!r}: expected a name of letters, digits, '_', '.' or '-' "
                            "(it names the TensorBoard tags data/<name>/...)")
        elif names.count(s.name) > 1:
            problems.append(f"{key}.name = {s.name!r}: expected a name no other source has")
        if not s.urls:
            problems.append(f"{key}.urls = []: expected shard URLs or a dataset folder")
        if not (s.weight > 0 and math.isfinite(s.weight)):
            problems.append(f"{key}.weight = {s.weight!r}: expected a positive number (the source's share of "
                            "every batch is weight / sum of weights)")
        if s.on_end == "stop" and (resampled if s.resampled is None else s.resampled):
            problems.append(f"{key}.on_end = 'stop' with resampled: a resampled source never ends; expected "
                            "on_end: restart, or resampled: false")
    return problems


@register_check
def check_data_config(cfg: Config) -> list[str]:
    """Either `data.train_urls` or `data.sources`, and sources that `source_problems` accepts."""
    d = cfg.data
    problems = []
    if d.sources and d.train_urls:
        problems.append(f"data.train_urls (from {cfg.origin('data.train_urls')}) and data.sources (from "
                        f"{cfg.origin('data.sources')}) are both set: expected one (train_urls is one source)")
    if d.streams < 0:
        problems.append(cfg.problem("data.streams", "0 (chosen from the global batch) or a positive count"))
    if d.shuffle_buffer < 1:
        problems.append(cfg.problem("data.shuffle_buffer", "at least 1 (1 means no shuffling)"))
    origin = cfg.origin("data.sources")
    problems += [f"{p} (from {origin})" for p in source_problems(d.sources, d.resampled)]
    return problems
