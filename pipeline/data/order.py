"""The order in which a source's samples are read: rounds of raw positions, split at sample granularity.

A source is a list of shards with known sample counts (the manifest's, or counted once by reading
them, `shards.with_counts`). Laid end to end in some shard order they form one sequence of T raw
positions (samples, good or bad). Each of the S virtual streams reads that sequence in *rounds*:

* epochs (the default): in epoch e every stream uses the same shard order, a permutation seeded by
  (seed, source, e), and stream s reads positions [⌊s·T/S⌋, ⌊(s+1)·T/S⌋) of it. The streams split
  the epoch exactly, whatever the shard count: 1 shard and 8 streams gives each stream an eighth of
  it, 10,000 shards give each 1,250 shards (plus at most two partial ones). Every sample comes once
  per epoch.
* resampled: stream s's k-th round is ⌈T/S⌉ positions starting at a random position of its own
  random shard order, seeded by (seed, source, s, k) and wrapping around: sampling with
  replacement, no epochs.

A position inside a round is one integer (the offset from the round's start), so a reader's place
is (round, offset): `RoundReader` opens the shard holding that offset, skips to it, and reads on.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Optional, Union

import numpy as np

from pipeline.data.shards import DataError, Lost, RawSample, Shard, iter_raw


@dataclass(frozen=True)
class SourceSpec:
    """A resolved source: its shards with their sample counts, its weight and how it is read."""
    name: str
    shards: tuple[Shard, ...]              # every shard has `samples` set
    weight: float = 1.0
    resampled: bool = False
    on_end: str = "restart"                # "restart": the next epoch; "stop": the data stream ends

    @cached_property
    def total(self) -> int:
        """Raw positions in one pass over the source (good and bad samples)."""
        return sum(s.samples for s in self.shards)

    @cached_property
    def fingerprint(self) -> str:
        text = "\n".join(f"{s.name}:{s.samples}" for s in self.shards)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Round:
    """`length` consecutive raw positions from `start` (wrapping) of the shards laid out in `order`."""
    order: tuple[int, ...]                 # shard indices
    ends: np.ndarray                       # cumulative sample counts along `order`
    start: int
    length: int


def round_of(source: SourceSpec, seed: int, sid: int, num_streams: int, k: int) -> Round:
    """Stream `sid`'s k-th round of `source` (see the module docstring)."""
    total = source.total
    if source.resampled:
        key = f"{seed}/{source.name}/resampled/{sid}/{k}"
        start, length = random.Random(key + "/start").randrange(total), math.ceil(total / num_streams)
    else:
        key = f"{seed}/{source.name}/epoch/{k}"
        start = sid * total // num_streams
        length = (sid + 1) * total // num_streams - start
    order = list(range(len(source.shards)))
    random.Random(key).shuffle(order)
    ends = np.cumsum([source.shards[i].samples for i in order], dtype=np.int64)
    return Round(tuple(order), ends, start, length)


def locate(source: SourceSpec, rnd: Round, offset: int) -> tuple[Shard, int, int]:
    """The shard holding position `offset` of round `rnd`, the offset inside that shard, and how many
    positions from there on belong to both that shard and the round."""
    position = (rnd.start + offset) % source.total
    i = int(np.searchsorted(rnd.ends, position, side="right"))
    begin = int(rnd.ends[i - 1]) if i else 0
    shard = source.shards[rnd.order[i]]
    inside = position - begin
    return shard, inside, min(shard.samples - inside, rnd.length - offset)


class RoundReader:
    """The raw items of one round from an offset: samples, and `Lost` items for positions a broken or
    short shard did not deliver (their count is the positions skipped). None at the round's end."""

    def __init__(self, source: SourceSpec, rnd: Round, offset: int = 0):
        self.source, self.round, self.offset = source, rnd, offset
        self._it: Optional[Iterator[Union[RawSample, Lost]]] = None
        self._shard: Optional[Shard] = None
        self._left = 0                     # positions still to read from the open shard

    def next(self) -> Union[RawSample, Lost, None]:
        if self._it is None:
            if self.offset >= self.round.length:
                return None
            self._shard, inside, self._left = locate(self.source, self.round, self.offset)
            self._it = iter_raw(self._shard, inside)
        item = next(self._it, None)
        if isinstance(item, RawSample):
            self._advance(1)
            return item
        left = self._left                  # the shard ended early or broke: the rest of its part is lost
        lost = item or Lost("short_shard", left, self._shard.name,
                            f"the manifest counts {self._shard.samples} samples; the tar holds fewer")
        self._advance(left)
        return Lost(lost.reason, left, lost.shard, lost.error)

    def _advance(self, n: int) -> None:
        self.offset += n
        self._left -= n
        if self._left <= 0:
            self.close()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


def check_sizes(sources: tuple[SourceSpec, ...], num_streams: int, global_batch: int) -> None:
    """Refuse data that cannot fill the streams or even one global batch, naming the source."""
    for s in sources:
        if s.total == 0:
            raise DataError(f"source {s.name!r}: its {len(s.shards)} shards hold no samples; expected tars of "
                            "samples KEY.jpg + KEY.txt")
        if not s.resampled and s.total < num_streams:
            raise DataError(f"source {s.name!r} has {s.total} samples, fewer than the {num_streams} virtual streams "
                            "that split each epoch; use data.resampled=true for it, fewer streams (data.streams), "
                            "or more data")
    total = sum(s.total for s in sources)
    if total < global_batch:
        raise DataError(f"the data holds {total} samples ({', '.join(f'{s.name}: {s.total}' for s in sources)}), "
                        f"fewer than one global batch of {global_batch}: lower train.global_batch or add data")
