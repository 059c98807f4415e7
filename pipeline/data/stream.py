"""The streaming reader: deterministic, world-size- and worker-independent, exactly resumable, mixed.

Design — S virtual streams over K sources:
* The data is read by S *virtual streams* (S fixed for a run: `data.streams`, or chosen from the
  global batch G alone). Global batch t is the concatenation, in stream order, of G/S rows from
  every stream; row j of stream s is row r = t·G + s·G/S + j of the run, and the mixture plan
  (`mixture.MixturePlan`) says which source row r comes from.
* Stream s reads each source through its own `SourceStream`: the source's rounds (`order`: epochs
  split among the streams at sample granularity, or resampled rounds), shuffled in *windows* of
  `shuffle_buffer` × the source's share raw positions (crossing shard boundaries, not round
  boundaries) permuted by (seed, source, s, window): a stream holds about `shuffle_buffer` samples
  whatever the number of sources, and each source's window lasts about as many steps. Within an
  epoch every sample of the stream's part comes once.
* Rank r of W owns the contiguous block of streams [r·S/W, (r+1)·S/W): the rank-major
  concatenation of all ranks' rows is exactly that batch, whatever W (W must divide S). Loader
  processes split a rank's block into contiguous sub-blocks and return one chunk per step each,
  in order, so the number of loader processes changes nothing either.
* A source stream's position is (round, window, the window's start and end offsets, entries taken). On
  resume the window is re-read (raw bytes, no decoding) and the taken entries skipped: the
  state is a few numbers per stream and source plus the bad-sample counts, a few kilobytes of JSON.
* Augmentation randomness is seeded by (seed, source, s, window, index in window): decoded pixels
  depend on the sample's place in the sequence, not on who decodes it.

Corrupt samples and broken shards are skipped and counted by reason, good and bad alike when they
are consumed (so the bad fraction is that of what was read); past `max_bad_fraction` the stream
raises DataError naming the worst shards. A source stream that finds no usable sample in a whole
round raises too, so bad data never turns into a hang.
"""
from __future__ import annotations

import ctypes
import functools
import os
import random
import signal
import sys
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from pipeline import storage
from pipeline.config import Config, DataConfig, SourceConfig, register_check
from pipeline.data.mixture import DEFAULT_SOURCE, MixturePlan, config_sources, source_problems
from pipeline.data.order import RoundReader, SourceSpec, check_sizes, round_of
from pipeline.data.samples import BadSample, Sample, caption_id, sample_ids, shard_name, validate_sample
from pipeline.data.shards import DataError, Lost, dataset_dir, resolve_shards, with_counts
from pipeline.data.text_pairs import FORMAT as TEXT_PAIRS
from pipeline.data.text_pairs import TextPairRows
from pipeline.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_url
from pipeline.data.transforms import decode_image, to_tensor
from pipeline.distributed import all_gather_objects
from pipeline.log import get_logger

log = get_logger(__name__)

STATE_VERSION = 2
MAX_AUTO_STREAMS = 8
MIN_SAMPLES_FOR_FRACTION = 100            # the bad fraction is judged once this many samples were seen
MAX_BAD_SHARDS_KEPT = 20                  # per stream and source, in the state
PR_SET_PDEATHSIG = 1                      # prctl(2) option: a signal for this process when its parent dies
IMAGE_TEXT = "image_text"                 # `data.format` of image-caption samples


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the sequence of samples: the sources, the seed, S, the window."""
    sources: tuple[SourceSpec, ...]
    seed: int
    num_streams: int
    buffer: int

    @functools.cached_property
    def plan(self) -> MixturePlan:
        return MixturePlan([s.weight for s in self.sources], self.seed)


def run_streams(cfg: Config, state: Optional[dict] = None) -> int:
    """S of a run: `data.streams`, else a resumed stream's, else chosen from the global batch and the
    largest worker count of `cluster.num_workers` that divides it (0 when none does)."""
    if cfg.data.streams or state:
        return cfg.data.streams or state["num_streams"]
    c, g = cfg.cluster, cfg.train.global_batch
    counts = [w for w in range(c.min_workers, c.max_workers + 1) if g % w == 0]
    return choose_num_streams(g, counts[-1]) if counts else 0


def world_sizes(cfg: Config, num_streams: int) -> list[int]:
    """The worker counts of `cluster.num_workers` that can read `num_streams` streams (W divides S):
    the sizes an elastic run trains on, and the one a fixed run asks for when it fits."""
    c = cfg.cluster
    return [w for w in range(c.min_workers, c.max_workers + 1) if num_streams and num_streams % w == 0]


def layout_world_sizes(num_streams: int) -> list[int]:
    """Every worker count that can read `num_streams` virtual streams: its divisors."""
    return [w for w in range(1, num_streams + 1) if num_streams % w == 0]


@register_check
def check_worker_counts(cfg: Config) -> list[str]:
    """`cluster.num_workers` that the data layout cannot split (every rank reads whole virtual streams)."""
    s = run_streams(cfg)
    if not s or world_sizes(cfg, s):
        return []                          # no divisor at all: the config's own batch check says so
    return [f"cluster.num_workers = {cfg.cluster.num_workers} (from {cfg.origin('cluster.num_workers')}): no worker "
            f"count there divides data.streams = {s}; each rank reads whole virtual streams. Worker counts this "
            f"data layout allows: {layout_world_sizes(s)}"]


def choose_num_streams(global_batch: int, world_size: int) -> int:
    """Default S from G and W: the largest multiple of W dividing G, up to max(8, W).

    Runs whose S agree have the same batches; S is stored in the state, so a resumed run keeps it.
    """
    if global_batch % world_size:
        raise DataError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
    options = [s for s in range(world_size, max(MAX_AUTO_STREAMS, world_size) + 1, world_size) if global_batch % s == 0]
    return max(options)


# --------------------------------------------------------------------------------- one sample
@dataclass
class Row:
    """A decoded sample, one row of a batch."""
    key: str
    image: np.ndarray                      # (H, W, 3) uint8
    caption: str                           # as stored (several lines where a sample has several captions)
    text: str                              # the line that is tokenised
    meta: Optional[dict]
    label: int = -1                        # its class (KEY.cls or the JSON's "label"); −1: none
    source: str = DEFAULT_SOURCE
    more: list[str] = field(default_factory=list)   # data.captions_per_image = k > 1: captions 2..k of the row
    shard: str = ""                        # its shard's name: with `source` and `key`, the sample's stable id


def choose_captions(lines: Sequence[str], k: int, rng: random.Random) -> list[str]:
    """k of a sample's caption lines: k distinct ones at random when it has k or more; when it has fewer, all
    of them in a shuffled order, repeated in that cycle up to k (every caption used, none left out)."""
    if len(lines) >= k:
        return rng.sample(list(lines), k)
    order = rng.sample(list(lines), len(lines))
    return [order[i % len(order)] for i in range(k)]


def decode_row(sample: Sample, size: int, rng: random.Random, captions: int = 1) -> Row:
    """The one seam from a validated sample to a row: decode with the train transform, pick one
    caption line at random (`captions` = k > 1: k of them, `choose_captions`)."""
    image = decode_image(sample.image, size, rng)
    lines = sample.caption_lines()
    chosen = [rng.choice(lines)] if captions == 1 else choose_captions(lines, captions, rng)
    return Row(sample.key, image, sample.caption, chosen[0], sample.meta,
               -1 if sample.label is None else sample.label, more=chosen[1:], shard=sample.shard)


@dataclass(frozen=True)
class ImageTextRows:
    """The seam between the stream and a sample format: how raw members become a checked sample
    (`validate`), a decoded row (`decode`, with the sample's own seeded rng) and rows a batch (`collate`).
    This one is image-caption samples; `text_pairs.TextPairRows` is the other (`data.format`)."""
    image_size: int = 64
    captions_per_image: int = 1            # k > 1: each row carries k captions (batch "more_text", polyview)

    def validate(self, key: str, members: dict[str, bytes], shard: str) -> Sample:
        return validate_sample(key, members, shard)

    def decode(self, sample: Sample, rng: random.Random) -> Row:
        return decode_row(sample, self.image_size, rng, self.captions_per_image)

    def collate(self, rows: Sequence[Row], tokenizer: Tokenizer) -> dict[str, Any]:
        return collate(rows, tokenizer)


Codec = Union[ImageTextRows, TextPairRows]


@dataclass
class Bad:
    """Raw positions of a window that cannot be used, counted when the window reaches them."""
    reason: str
    shard: str
    count: int = 1


# -------------------------------------------------------------------------------------- reading
class SourceStream:
    """One source as one virtual stream reads it: rounds, windows, position, usable and bad counts."""

    def __init__(self, spec: StreamSpec, source: SourceSpec, sid: int, codec: Codec, state: Optional[dict] = None):
        self.spec, self.source, self.sid, self.codec = spec, source, sid, codec
        state = state or {"round": 0, "window": -1, "start": 0, "end": 0, "taken": 0, "ok": 0, "bad": {},
                          "bad_shards": {}}
        self.round, self.window_index = int(state["round"]), int(state["window"])
        self.start, self.end, self.taken = int(state["start"]), int(state["end"]), int(state["taken"])
        self.window_size = max(1, round(spec.buffer * source.weight / sum(s.weight for s in spec.sources)))
        self.ok = int(state["ok"])
        self.bad = Counter(state["bad"])
        self.bad_shards = Counter(state["bad_shards"])
        self._window: list[Union[Sample, Bad]] = []
        self._reader: Optional[RoundReader] = None
        self._dry_rounds = 0                           # rounds ended since the last usable sample
        self._last_error = ""
        if self.window_index >= 0:                     # resume: rebuild the current window (counted before)
            self._reader = self._open(self.round, self.start)
            self._window = self._read_window(self.end - self.start)

    def state(self) -> dict:
        return {"round": self.round, "window": self.window_index, "start": self.start, "end": self.end,
                "taken": self.taken,
                "ok": self.ok, "bad": dict(self.bad),
                "bad_shards": dict(self.bad_shards.most_common(MAX_BAD_SHARDS_KEPT))}

    def take(self) -> Row:
        """The next usable sample, decoded; bad entries on the way are counted as they are consumed."""
        while True:
            if self.taken >= len(self._window):
                self._next_window()
                continue
            entry, index = self._window[self.taken], self.taken
            self.taken += 1
            if isinstance(entry, Bad):
                self._count_bad(entry.reason, entry.shard, entry.count)
                continue
            rng = random.Random(f"{self.spec.seed}/aug/{self.source.name}/{self.sid}/{self.window_index}/{index}")
            try:
                row = self.codec.decode(entry, rng)
            except BadSample as e:
                self._count_bad(e.reason, entry.shard)
                continue
            self.ok += 1
            self._dry_rounds = 0
            row.source = self.source.name
            return row

    def _open(self, k: int, offset: int) -> RoundReader:
        return RoundReader(self.source, round_of(self.source, self.spec.seed, self.sid, self.spec.num_streams, k),
                           offset)

    def _next_window(self) -> None:
        if self._reader is None:
            self._reader = self._open(self.round, self.start)
        if self._reader.offset >= self._reader.round.length:       # the round is read: the next one
            self._reader.close()
            self.round += 1
            self._dry_rounds += 1
            self._check_dry()
            self._reader = self._open(self.round, 0)
        self.window_index += 1
        self.start = self._reader.offset
        self.taken = 0
        self._window = self._read_window(self.window_size)
        self.end = self._reader.offset

    def _check_dry(self) -> None:
        """A whole round (a whole epoch's part; S rounds when resampled) without a usable sample."""
        limit = self.spec.num_streams if self.source.resampled else 1
        if self._dry_rounds > limit:
            raise DataError(f"source {self.source.name!r}, virtual stream {self.sid}: no usable sample in a whole "
                            f"{'round' if self.source.resampled else 'epoch'} of its shards; bad samples so far: "
                            f"{dict(self.bad)}; shards: {', '.join(self.bad_shards)}"
                            f"{'; last error: ' + self._last_error if self._last_error else ''}. Expected readable "
                            "tars of samples KEY.jpg + KEY.txt (or, for data.format text_pairs, KEY.query.txt + "
                            "KEY.pos.txt)")

    def _read_window(self, size: int) -> list[Union[Sample, Bad]]:
        """`size` raw positions (or a few more, a broken shard's) from the reader, not past the round's end,
        permuted."""
        entries: list[Union[Sample, Bad]] = []
        covered = 0
        while covered < size:
            item = self._reader.next()
            if item is None:
                break
            if isinstance(item, Lost):
                entries.append(Bad(item.reason, item.shard, item.count))
                covered += item.count
                self._last_error = item.error
                continue
            covered += 1
            try:
                entries.append(self.codec.validate(item.key, item.members, item.shard))
            except BadSample as e:
                entries.append(Bad(e.reason, shard_name(item.shard)))
        random.Random(f"{self.spec.seed}/window/{self.source.name}/{self.sid}/{self.window_index}").shuffle(entries)
        return entries

    def _count_bad(self, reason: str, shard: str, n: int = 1) -> None:
        self.bad[reason] += n
        self.bad_shards[shard] += n

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


class VirtualStream:
    """One virtual stream: its rows of each global batch, each from the source the mixture plan names."""

    def __init__(self, spec: StreamSpec, sid: int, rows: int, codec: Codec, state: Optional[dict] = None):
        self.spec, self.sid, self.rows = spec, sid, rows
        self.plan = spec.plan
        state = state or {}
        self.sources = [SourceStream(spec, s, sid, codec, state.get(s.name)) for s in spec.sources]

    def take(self, step: int) -> list[Row]:
        """This stream's rows of global batch `step` (0-based)."""
        first = step * self.rows * self.spec.num_streams + self.sid * self.rows
        return [self.sources[i].take() for i in self.plan.sources(first, self.rows)]

    def state(self) -> dict:
        return {s.source.name: s.state() for s in self.sources}

    def close(self) -> None:
        for s in self.sources:
            s.close()


# -------------------------------------------------------------------------------------- batches
def collate(rows: Sequence[Row], tokenizer: Tokenizer) -> dict[str, Any]:
    """Rows → the batch dict: key, image, text, caption, caption_id (equal ids: identical captions),
    sample_id (n, 2: the stable ids of the image and of its caption, `sample_ids`), source, and label / meta
    when the shards carry them. Rows with k > 1 captions add "more_text"
    (n, k−1, L), the tokens of captions 2..k, and their caption_id is (n, k)."""
    batch: dict[str, Any] = {
        "key": [r.key for r in rows],
        "image": to_tensor([r.image for r in rows]),
        "text": tokenizer([r.text for r in rows]),
        "caption": [r.caption for r in rows],
        "caption_id": torch.tensor([caption_id(r.text) for r in rows], dtype=torch.long),
        "source": [r.source for r in rows],
        "sample_id": torch.tensor([sample_ids(r.source, r.shard, r.key, r.text) for r in rows], dtype=torch.long),
    }
    if rows and rows[0].more:
        more = tokenizer([t for r in rows for t in r.more])
        batch["more_text"] = more.view(len(rows), len(rows[0].more), -1)
        batch["caption_id"] = torch.tensor([[caption_id(t) for t in (r.text, *r.more)] for r in rows],
                                           dtype=torch.long)
    metas = [r.meta for r in rows]
    if any(m is not None for m in metas):
        batch["meta"] = metas
    if any(r.label >= 0 for r in rows):
        batch["label"] = torch.tensor([r.label for r in rows], dtype=torch.long)     # −1: a row without a label
    return batch


def concat(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batches of consecutive stream blocks → one batch, in block order."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for name in dict.fromkeys(k for p in parts for k in p):      # label and meta: only some blocks may carry them
        values = [p[name] if name in p else _absent(name, len(p["key"])) for p in parts]
        out[name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else sum(values, [])
    return out


def _absent(name: str, rows: int) -> Any:
    """What a block without `name` contributes: rows without a label, or without metadata."""
    return torch.full((rows,), -1, dtype=torch.long) if name == "label" else [None] * rows


class _Producer(torch.utils.data.IterableDataset):
    """Yields, per step, one chunk per loader process: its block of streams, G/S rows each.

    With loader processes, each takes a contiguous sub-block of the rank's streams; torch's
    DataLoader returns their chunks round-robin, i.e. in block order, one per process per step.
    """

    def __init__(self, spec: StreamSpec, blocks: list[list[int]], states: dict[int, Optional[dict]], step: int,
                 rows_per_stream: int, codec: Codec, tokenizer_json: str, context_length: int):
        self.spec, self.blocks, self.states, self.step = spec, blocks, states, step
        self.rows, self.codec = rows_per_stream, codec
        self.tokenizer_json, self.context_length = tokenizer_json, context_length

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[int, dict]]]:
        from tokenizers import Tokenizer as HFTokenizer
        info = torch.utils.data.get_worker_info()
        block = self.blocks[info.id if info is not None else 0]
        tokenizer = Tokenizer(HFTokenizer.from_str(self.tokenizer_json), self.context_length)
        streams = [VirtualStream(self.spec, sid, self.rows, self.codec, self.states.get(sid)) for sid in block]
        step = self.step
        try:
            while True:
                rows = [r for vs in streams for r in vs.take(step)]
                yield self.codec.collate(rows, tokenizer), {vs.sid: vs.state() for vs in streams}
                step += 1
        finally:
            for vs in streams:
                vs.close()


def die_with_parent(parent: int, worker_id: int) -> None:
    """In a loader process: be killed when the process that started it dies, however it dies (SIGKILL
    included), so no loader outlives its training worker. Linux only; elsewhere torch's own check of
    the parent (every few seconds) remains."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:                         # the parent died before the request took effect
        os._exit(0)


@dataclass
class Exhausted:
    """Why the stream ended: a source with `on_end: stop` had been read once."""
    source: str
    step: int
    drawn: int
    total: int

    def __str__(self) -> str:
        return (f"source {self.source!r} (on_end: stop) ends the data after {self.step} global batches: "
                f"{self.drawn} of its {self.total} samples drawn, the next batch would pass them")


@dataclass
class _Position:
    """The parts of a rank's position that are not per stream: the step and the planned draws per source."""
    step: int = 0
    drawn: dict[str, int] = field(default_factory=dict)


class Stream:
    """The batches of one rank; iterate for batches, `state_dict()` for the position after the last one.

    Endless unless a source with `on_end: stop` runs out: iteration then ends (`exhausted` says why)
    at the same step on every rank.
    """

    def __init__(self, spec: StreamSpec, *, global_batch: int, rank: int, world_size: int, num_workers: int,
                 codec: Codec, tokenizer: Tokenizer, max_bad_fraction: float, state: Optional[dict]):
        self.spec, self.global_batch, self.rank, self.world_size = spec, global_batch, rank, world_size
        self.codec, self.tokenizer, self.max_bad_fraction = codec, tokenizer, max_bad_fraction
        per_rank = spec.num_streams // world_size
        self.stream_ids = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.num_workers = min(num_workers, per_rank)
        if num_workers > per_rank:
            log.warning("data.num_workers = %d but rank %d owns %d virtual streams: using %d loader processes "
                        "(raise data.streams for more)", num_workers, rank, per_rank, per_rank)
        self.position = _Position(int(state["step"]), dict(state["drawn"])) if state else _Position()
        self._states: dict[int, Optional[dict]] = {
            sid: (state["streams"][str(sid)] if state else None) for sid in self.stream_ids}
        self.exhausted: Optional[Exhausted] = None
        # the iteration in progress, weakly: a strong reference would make a cycle (it refers to the
        # stream), freed only by the cyclic collector, possibly inside a forked loader process
        self._active: Optional[weakref.ref] = None

    @property
    def step(self) -> int:
        return self.position.step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on (a new iterator continues after the last batch taken)."""
        self.close()
        batches = self._batches()
        self._active = weakref.ref(batches)
        return batches

    def _batches(self) -> Iterator[dict[str, Any]]:
        loaders = max(self.num_workers, 1)
        blocks = [self.stream_ids[i * len(self.stream_ids) // loaders:(i + 1) * len(self.stream_ids) // loaders]
                  for i in range(loaders)]
        producer = _Producer(self.spec, blocks, dict(self._states), self.step,
                             self.global_batch // self.spec.num_streams, self.codec, self.tokenizer.to_json(),
                             self.tokenizer.context_length)
        if self.num_workers == 0:
            chunks = iter(producer)
        else:
            chunks = iter(torch.utils.data.DataLoader(
                producer, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                worker_init_fn=functools.partial(die_with_parent, os.getpid())))
        try:
            while not self._runs_out():
                parts = [next(chunks) for _ in range(loaders)]
                for _, states in parts:
                    self._states.update(states)
                self._advance()
                self._check_bad()
                yield concat([batch for batch, _ in parts])
        finally:
            del chunks                                 # shuts the loader processes down now

    def close(self) -> None:
        """Stop the loader processes of the current iteration (a later `iter` starts new ones)."""
        batches = self._active() if self._active is not None else None
        if batches is not None:
            batches.close()
        self._active = None

    def _runs_out(self) -> bool:
        """Whether the next batch would draw a `stop` source past one pass over it (the same on every rank)."""
        counts = self.spec.plan.counts(self.step * self.global_batch, self.global_batch)
        for source, n in zip(self.spec.sources, counts):
            drawn = self.position.drawn.get(source.name, 0)
            if source.on_end == "stop" and drawn + n > source.total:
                self.exhausted = Exhausted(source.name, self.step, drawn, source.total)
                log.info("%s", self.exhausted)
                return True
        return False

    def _advance(self) -> None:
        counts = self.spec.plan.counts(self.step * self.global_batch, self.global_batch)
        for source, n in zip(self.spec.sources, counts):
            self.position.drawn[source.name] = self.position.drawn.get(source.name, 0) + int(n)
        self.position.step += 1

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch taken: JSON-serialisable, this rank's streams only.

        Resuming with the same world size needs each rank's own state; with another world size,
        the states of all ranks merged (`merge_states`, or `gather_state` under torch.distributed).
        """
        return {"version": STATE_VERSION, "step": self.step, "seed": self.spec.seed,
                "global_batch": self.global_batch, "num_streams": self.spec.num_streams, "buffer": self.spec.buffer,
                "sources": [{"name": s.name, "data": s.fingerprint, "resampled": s.resampled, "weight": s.weight,
                             "on_end": s.on_end} for s in self.spec.sources],        # a list: JSON keys get sorted
                "drawn": dict(self.position.drawn),
                "streams": {str(sid): st for sid, st in self._states.items() if st is not None}}

    def stats(self) -> dict[str, Any]:
        """Usable and bad samples of this rank so far: in all, bad ones by reason and by shard, and per
        source ("sources": name → {"ok", "bad": {reason: n}})."""
        ok, bad, shards = 0, Counter(), Counter()
        per_source = {s.name: {"ok": 0, "bad": Counter()} for s in self.spec.sources}
        for st in self._states.values():
            for name, sub in (st or {}).items():
                ok += sub["ok"]
                bad.update(sub["bad"])
                shards.update(sub["bad_shards"])
                per_source[name]["ok"] += sub["ok"]
                per_source[name]["bad"].update(sub["bad"])
        total_bad = sum(bad.values())
        return {"ok": ok, "bad": dict(bad), "bad_total": total_bad,
                "bad_fraction": total_bad / max(ok + total_bad, 1), "bad_shards": dict(shards.most_common(10)),
                "sources": {k: {"ok": v["ok"], "bad": dict(v["bad"])} for k, v in per_source.items()}}

    def _check_bad(self) -> None:
        s = self.stats()
        if s["ok"] + s["bad_total"] >= MIN_SAMPLES_FOR_FRACTION and s["bad_fraction"] > self.max_bad_fraction:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["bad"].items()))
            shards = ", ".join(f"{k} ({v})" for k, v in s["bad_shards"].items())
            raise DataError(f"rank {self.rank}: {s['bad_fraction']:.1%} of samples are bad ({reasons}), over "
                            f"data.max_bad_fraction = {self.max_bad_fraction:g}; worst shards: {shards}")


# --------------------------------------------------------------------------------------- states
def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The states of all ranks (each rank's `state_dict()`) → one state any world size can resume from."""
    if not states:
        raise DataError("merge_states: no states given")
    first = {k: v for k, v in states[0].items() if k != "streams"}
    merged = dict(first, streams={})
    for st in states:
        rest = {k: v for k, v in st.items() if k != "streams"}
        if rest != first:
            raise DataError(f"merge_states: ranks disagree on the stream settings or step: {first} vs {rest}")
        merged["streams"].update(st["streams"])
    return merged


def gather_state(stream: Stream) -> dict[str, Any]:
    """All ranks' states merged; a collective under torch.distributed: call it on every rank."""
    states = all_gather_objects(stream.state_dict())
    return states[0] if len(states) == 1 else merge_states(states)


def _check_state(state: dict[str, Any], spec: StreamSpec, global_batch: int, needed: Sequence[int]) -> None:
    if state.get("version") != STATE_VERSION:
        raise DataError(f"cannot resume the data stream: its state has version {state.get('version')!r}, this reader "
                        f"writes version {STATE_VERSION} (the sample order changed with it); start the run anew "
                        "(train.resume=never, or another run_dir)")
    expected = {"seed": spec.seed, "global_batch": global_batch, "num_streams": spec.num_streams,
                "buffer": spec.buffer, "sources": [s.name for s in spec.sources]}
    saved_sources = {s["name"]: s for s in state["sources"]}
    saved = dict(state, sources=list(saved_sources))
    names = {"global_batch": "train.global_batch", "buffer": "data.shuffle_buffer", "num_streams": "data.streams",
             "sources": "the source names, in order"}
    wrong = [f"{names.get(k, k)}: saved {saved.get(k)!r}, now {v!r}" for k, v in expected.items() if saved.get(k) != v]
    for s in spec.sources:
        old = saved_sources.get(s.name, {})
        if old.get("data") != s.fingerprint:
            wrong.append(f"the shard list (names, counts) of source {s.name!r} changed")
        if old.get("resampled") != s.resampled:
            wrong.append(f"resampled of source {s.name!r}: saved {old.get('resampled')!r}, now {s.resampled!r}")
    if wrong:
        raise DataError("cannot resume the data stream: the state was saved with other settings (" + "; ".join(wrong)
                        + "); resume with the same ones")
    changed = [f"{s.name} {saved_sources[s.name]['weight']} → {s.weight}" for s in spec.sources
               if saved_sources[s.name]["weight"] != s.weight]
    if changed:
        log.warning("the mixture's weights changed since the state was saved (%s): every source resumes where it "
                    "was, and the batches from here on follow the new weights", ", ".join(changed))
    missing = [sid for sid in needed if str(sid) not in state["streams"]]
    if missing and state["step"] > 0:
        raise DataError(f"cannot resume the data stream: the state has no position for virtual streams {missing}; "
                        f"it holds streams {sorted(int(s) for s in state['streams'])}. Save every rank's state "
                        "(pipeline.data.gather_state, or merge_states of all ranks' state_dict())")


# ------------------------------------------------------------------------------------- opening
@dataclass(frozen=True)
class StreamOptions:
    """How samples are read and decoded; `data.*` of a run config (`from_config`)."""
    image_size: int = 64
    context_length: int = 77
    tokenizer: Tokenizer | str | None = None   # a Tokenizer, a tokenizer.json URL, or None: beside the data
    shuffle_buffer: int = 1000
    resampled: bool = False                    # the default of every source that does not say
    max_bad_fraction: float = 0.01
    allow_pipe: bool = False
    streams: int = 0                           # virtual streams S; 0: chosen from the global batch
    format: str = IMAGE_TEXT                   # or "text_pairs": queries, positives, hard negatives
    hard_negatives: int = 0                    # text pairs: hard negatives per row in a batch
    captions_per_image: int = 1                # image-caption samples: captions per row in a batch

    @classmethod
    def from_config(cls, d: DataConfig) -> StreamOptions:
        return cls(image_size=d.image_size, context_length=d.context_length, tokenizer=d.tokenizer,
                   shuffle_buffer=d.shuffle_buffer, resampled=d.resampled, max_bad_fraction=d.max_bad_fraction,
                   allow_pipe=d.allow_pipe, streams=d.streams, format=d.format, hard_negatives=d.hard_negatives,
                   captions_per_image=d.captions_per_image)


def row_codec(o: StreamOptions) -> Codec:
    """The sample format's codec (`ImageTextRows` is the seam's documentation)."""
    if o.format == IMAGE_TEXT:
        if isinstance(o.captions_per_image, bool) or not isinstance(o.captions_per_image, int) \
                or o.captions_per_image < 1:
            raise DataError(f"data.captions_per_image = {o.captions_per_image!r}: expected an integer >= 1")
        return ImageTextRows(o.image_size, o.captions_per_image)
    if o.format == TEXT_PAIRS:
        if o.hard_negatives < 0:
            raise DataError(f"data.hard_negatives = {o.hard_negatives}: expected 0 or more per row")
        return TextPairRows(o.hard_negatives)
    raise DataError(f"data.format = {o.format!r}: expected {IMAGE_TEXT!r} or {TEXT_PAIRS!r}")


Urls = Union[str, Sequence[str]]


def open_stream(urls: Urls | Sequence[SourceConfig], *, global_batch: int, rank: int = 0, world_size: int = 1,
                seed: int = 0, num_workers: int = 0, state: Optional[dict | Sequence[dict]] = None,
                options: StreamOptions = StreamOptions()) -> Stream:
    """The shuffled, augmented, resumable batches of rank `rank` of `world_size`: local batches of
    global_batch / world_size rows (see the module docstring).

    `urls` are the shards of one source (a URL, brace pattern, dataset folder, manifest.json, or a
    list of these), or a list of `SourceConfig` for a weighted mixture.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size = {world_size})")
    o = options
    if o.shuffle_buffer < 1:
        raise DataError(f"shuffle_buffer = {o.shuffle_buffer}: expected at least 1 (1 means no shuffling)")
    if o.streams < 0:
        raise DataError(f"data.streams = {o.streams}: expected 0 (chosen from the global batch) or a positive count")
    sources = as_sources(urls)
    problems = source_problems(sources, o.resampled)
    if problems:
        raise DataError("; ".join(problems))
    specs = tuple(resolve_source(s, o) for s in sources)
    tok = _tokenizer(o.tokenizer, sources[0].urls, o.context_length)
    if isinstance(state, (list, tuple)):
        state = merge_states(state)
    num_streams = o.streams or (state["num_streams"] if state else choose_num_streams(global_batch, world_size))
    if num_streams % world_size or global_batch % num_streams:
        raise DataError(f"{num_streams} virtual streams (data.streams), global_batch {global_batch}, world_size "
                        f"{world_size}: the world size must divide the streams and the streams the global batch; "
                        f"compatible world sizes: {layout_world_sizes(num_streams)}")
    check_sizes(specs, num_streams, global_batch)
    spec = StreamSpec(specs, seed, num_streams, o.shuffle_buffer)
    per_rank = num_streams // world_size
    if state is not None:
        _check_state(state, spec, global_batch, range(rank * per_rank, (rank + 1) * per_rank))
        if state["step"] == 0:
            state = None
    return Stream(spec, global_batch=global_batch, rank=rank, world_size=world_size, num_workers=num_workers,
                  codec=row_codec(o), tokenizer=tok, max_bad_fraction=o.max_bad_fraction, state=state)


def open_train_stream(cfg: Config, *, rank: int = 0, world_size: int = 1, state: Optional[dict] = None,
                      tokenizer: Optional[Tokenizer] = None) -> Stream:
    """`open_stream` with every setting from a run config (`data.sources`, or `data.train_urls`);
    `tokenizer` (an imported model's) replaces the data's."""
    options = StreamOptions.from_config(cfg.data)
    if tokenizer is not None:
        options = replace(options, tokenizer=tokenizer)
    return open_stream(config_sources(cfg.data), global_batch=cfg.train.global_batch, rank=rank,
                       world_size=world_size, seed=cfg.seed, num_workers=cfg.data.num_workers, state=state,
                       options=options)


def data_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer `open_train_stream` reads the run's data with: `data.tokenizer`, else the one beside the
    first source's shards."""
    return _tokenizer(StreamOptions.from_config(cfg.data).tokenizer, as_sources(config_sources(cfg.data))[0].urls,
                      cfg.data.context_length)


def as_sources(urls: Urls | Sequence[SourceConfig]) -> list[SourceConfig]:
    """Sources as given, or the URLs of one source as the source named "train"."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if items and all(isinstance(u, SourceConfig) for u in items):
        return items
    if any(isinstance(u, SourceConfig) for u in items):
        raise DataError("open_stream: expected URLs or a list of SourceConfig, not both")
    return [SourceConfig(DEFAULT_SOURCE, [str(u) for u in items])]


def resolve_source(source: SourceConfig, options: StreamOptions) -> SourceSpec:
    """A source's shards, with their sample counts, and its reading mode."""
    shards = with_counts(resolve_shards(source.urls, allow_pipe=options.allow_pipe))
    resampled = options.resampled if source.resampled is None else source.resampled
    return SourceSpec(source.name, tuple(shards), source.weight, resampled, source.on_end)


def _tokenizer(tokenizer: Tokenizer | str | None, urls: Urls, context_length: int) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is None:
        where = dataset_dir(urls)
        if where is None or not storage.exists(tokenizer_url(where)):
            raise DataError(f"no tokenizer.json beside the shards at {urls}: set data.tokenizer to a tokenizer.json "
                            "(the one `contrast data synth/pack` wrote beside the training manifest)")
        tokenizer = where
    return load_tokenizer(tokenizer, context_length)
