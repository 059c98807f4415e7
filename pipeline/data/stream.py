"""The streaming reader: deterministic, world-size- and worker-independent, exactly resumable.

Design — S virtual streams:
* The data is read by S *virtual streams* (S fixed for a run: `data.streams`, or chosen from the
  global batch G alone). Stream s walks an infinite sequence of shards: in epoch e it reads
  shards perm_e[s], perm_e[s+S], … of a permutation seeded by (seed, e) — or, in resampled mode, a
  shard drawn by (seed, s, k) for its k-th shard. Streams keep their own epoch count.
* Each stream shuffles in *windows*: it reads the next `shuffle_buffer` raw samples (crossing shard
  boundaries, not epoch boundaries), permutes the usable ones by (seed, s, window), and emits them
  in that order. Within a stream, every sample of an epoch comes out once before the next epoch.
* Global batch t is the concatenation, in stream order, of the next G/S samples of every stream.
  Rank r of W owns the contiguous block of streams [r·S/W, (r+1)·S/W): the rank-major
  concatenation of all ranks' rows is exactly that batch, whatever W (W must divide S). Loader
  processes split a rank's block into contiguous sub-blocks and return one chunk per step each,
  in order, so the number of workers changes nothing either.
* A stream's position is (window w, the raw position where w starts, samples taken from w). On
  resume the window is re-read from its start (raw bytes, no decoding) and the taken ones skipped,
  so the state is a few numbers per stream plus the bad-sample counts: JSON of a few kilobytes.
* Augmentation randomness is seeded by (seed, s, w, index in window): decoded pixels depend on the
  sample's place in the sequence, not on who decodes it.

Corrupt samples and broken shards are skipped and counted by reason; past `max_bad_fraction` the
stream raises DataError naming the worst shards. A stream whose shards yield nothing for a whole
epoch raises too, so bad data never turns into a hang.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from pipeline import storage
from pipeline.config import Config, DataConfig, register_check
from pipeline.data.samples import BadSample, Sample, shard_name, validate_sample
from pipeline.data.shards import DataError, Lost, RawSample, Shard, dataset_dir, iter_raw, resolve_shards
from pipeline.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_url
from pipeline.data.transforms import decode_image, to_tensor
from pipeline.distributed import all_gather_objects
from pipeline.log import get_logger

log = get_logger(__name__)

STATE_VERSION = 1
MAX_AUTO_STREAMS = 8
MIN_SAMPLES_FOR_FRACTION = 100            # the bad fraction is judged once this many samples were seen
MAX_BAD_SHARDS_KEPT = 20                  # per stream, in the state


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the sequence of samples: the data, the seed, S, the window, the mode."""
    shards: tuple[Shard, ...]
    seed: int
    num_streams: int
    buffer: int
    resampled: bool

    @property
    def fingerprint(self) -> str:
        text = "\n".join(f"{s.name}:{s.samples}" for s in self.shards)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def shards_per_epoch(self, sid: int) -> int:
        return len(range(sid, len(self.shards), self.num_streams))

    def shard_of(self, sid: int, k: int) -> Shard:
        """The k-th shard of stream `sid`'s infinite sequence."""
        n = len(self.shards)
        if self.resampled:
            return self.shards[random.Random(f"{self.seed}/resampled/{sid}/{k}").randrange(n)]
        epoch, i = divmod(k, self.shards_per_epoch(sid))
        return self.shards[_permutation(self.seed, n, epoch)[sid + i * self.num_streams]]

    def epoch_end(self, sid: int, k: int) -> Optional[int]:
        """The index of the first shard of the next epoch after stream `sid`'s k-th shard (None: no epochs)."""
        if self.resampled:
            return None
        n = self.shards_per_epoch(sid)
        return (k // n + 1) * n

    def dry_limit(self, sid: int) -> int:
        """Shards read in a row with no usable sample before the stream gives up (a whole epoch)."""
        return 2 * len(self.shards) + 8 if self.resampled else self.shards_per_epoch(sid)


@lru_cache(maxsize=8)
def _permutation(seed: int, n: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}/epoch/{epoch}").shuffle(order)
    return tuple(order)


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


def decode_row(sample: Sample, size: int, rng: random.Random) -> Row:
    """Decode with the train transform and pick one caption line at random."""
    return Row(sample.key, decode_image(sample.image, size, rng), sample.caption,
               rng.choice(sample.caption_lines()), sample.meta)


# -------------------------------------------------------------------------------------- reading
class RawReader:
    """Raw samples of a stream from a position (its k-th shard, offset), losses as `Lost` items."""

    def __init__(self, spec: StreamSpec, sid: int, k: int, offset: int):
        self.spec, self.sid, self.k, self.offset = spec, sid, k, offset
        self._it: Optional[Iterator[Union[RawSample, Lost]]] = None
        self._empty_in_a_row = 0
        self._last_error = ""

    def next(self, stop: Optional[int] = None) -> Union[RawSample, Lost, None]:
        """The next item, or None at shard index `stop` (the end of an epoch)."""
        while True:
            if stop is not None and self.k >= stop:
                return None
            if self._it is None:
                self._it = iter_raw(self.spec.shard_of(self.sid, self.k), self.offset)
            item = next(self._it, None)
            if item is None:                           # end of this shard
                self._empty_in_a_row = self._empty_in_a_row + 1 if self.offset == 0 else 0
                if self._empty_in_a_row > self.spec.dry_limit(self.sid):
                    raise DataError(f"virtual stream {self.sid}: {self._empty_in_a_row} shards in a row gave no "
                                    f"samples, empty or unreadable (last: {self.spec.shard_of(self.sid, self.k).url}"
                                    f"{'; ' + self._last_error if self._last_error else ''}); expected readable tars "
                                    "of samples KEY.jpg + KEY.txt")
                self._next_shard()
                continue
            if isinstance(item, RawSample):
                self.offset += 1
                self._empty_in_a_row = 0
            else:
                self._last_error = item.error
            return item

    def _next_shard(self) -> None:
        self.close()
        self.k += 1
        self.offset = 0

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


class VirtualStream:
    """One virtual stream: its shard sequence, window shuffle, decoding, position and bad counts."""

    def __init__(self, spec: StreamSpec, sid: int, image_size: int, state: Optional[dict] = None):
        self.spec, self.sid, self.image_size = spec, sid, image_size
        state = state or {"window": -1, "start": [0, 0], "taken": 0, "ok": 0, "bad": {}, "bad_shards": {}}
        self.window_index = int(state["window"])
        self.start = list(state["start"])
        self.taken = int(state["taken"])
        self.ok = int(state["ok"])
        self.bad = Counter(state["bad"])
        self.bad_shards = Counter(state["bad_shards"])
        self._window: list[Sample] = []
        self._reader: Optional[RawReader] = None
        self._shard_of_last_good = self.start[0]
        if self.window_index >= 0:                     # resume: rebuild the current window, counted before
            self._reader = RawReader(spec, sid, *self.start)
            self._window = self._read_window(count=False)

    def state(self) -> dict:
        return {"window": self.window_index, "start": list(self.start), "taken": self.taken, "ok": self.ok,
                "bad": dict(self.bad), "bad_shards": dict(self.bad_shards.most_common(MAX_BAD_SHARDS_KEPT))}

    def take(self, n: int) -> list[Row]:
        """The next n usable samples of this stream, decoded."""
        out: list[Row] = []
        while len(out) < n:
            if self.taken >= len(self._window):
                self._next_window()
                continue
            sample = self._window[self.taken]
            rng = random.Random(f"{self.spec.seed}/aug/{self.sid}/{self.window_index}/{self.taken}")
            self.taken += 1
            try:
                out.append(decode_row(sample, self.image_size, rng))
            except BadSample as e:
                self._count_bad(e.reason, sample.shard)
                continue
            self.ok += 1
            self._shard_of_last_good = self._reader.k
        return out

    def _next_window(self) -> None:
        if self._reader is None:
            self._reader = RawReader(self.spec, self.sid, *self.start)
        elif self._reader.k - self._shard_of_last_good > self.spec.dry_limit(self.sid):
            dry = self._reader.k - self._shard_of_last_good
            raise DataError(f"virtual stream {self.sid}: no usable sample in {dry} "
                            f"shards in a row (a whole epoch); bad samples so far: {dict(self.bad)}; "
                            f"shards: {', '.join(self.bad_shards)}")
        self.window_index += 1
        self.start = [self._reader.k, self._reader.offset]
        self.taken = 0
        self._window = self._read_window(count=True)

    def _read_window(self, count: bool) -> list[Sample]:
        """Read `buffer` raw positions from `start` (not past the epoch's end), permute the usable ones."""
        entries: list[Sample] = []
        stop = self.spec.epoch_end(self.sid, self.start[0])
        for _ in range(self.spec.buffer):
            item = self._reader.next(stop)
            if item is None:
                break
            if isinstance(item, Lost):
                if count:
                    self._count_bad(item.reason, item.shard, item.count)
                continue
            try:
                entries.append(validate_sample(item.key, item.members, item.shard))
            except BadSample as e:
                if count:
                    self._count_bad(e.reason, shard_name(item.shard))
        random.Random(f"{self.spec.seed}/window/{self.sid}/{self.window_index}").shuffle(entries)
        return entries

    def _count_bad(self, reason: str, shard: str, n: int = 1) -> None:
        self.bad[reason] += n
        self.bad_shards[shard] += n

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


# -------------------------------------------------------------------------------------- batches
def collate(samples: Sequence[Row], tokenizer: Tokenizer) -> dict[str, Any]:
    """Rows → the batch dict: key, image, text, caption, and label / meta when the shards carry them."""
    batch: dict[str, Any] = {
        "key": [s.key for s in samples],
        "image": to_tensor([s.image for s in samples]),
        "text": tokenizer([s.text for s in samples]),
        "caption": [s.caption for s in samples],
    }
    metas = [s.meta for s in samples]
    if any(m is not None for m in metas):
        batch["meta"] = metas
        labels = [class_label(m) for m in metas]
        if any(y >= 0 for y in labels):
            batch["label"] = torch.tensor(labels, dtype=torch.long)     # −1: a row without a label
    return batch


def class_label(meta: Optional[dict]) -> int:
    """A sample's class (`{"label": k}`, k ≥ 0 in its .json), or −1 when it has none."""
    y = meta.get("label") if isinstance(meta, dict) else None
    return y if isinstance(y, int) and not isinstance(y, bool) and y >= 0 else -1


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
    """Yields, per step, one chunk per loader process: its block of streams, G/S samples each.

    With loader processes, each takes a contiguous sub-block of the rank's streams; torch's
    DataLoader returns their chunks round-robin, i.e. in block order, one per process per step.
    """

    def __init__(self, spec: StreamSpec, blocks: list[list[int]], states: dict[int, Optional[dict]],
                 rows_per_stream: int, image_size: int, tokenizer_json: str, context_length: int):
        self.spec, self.blocks, self.states = spec, blocks, states
        self.rows, self.image_size = rows_per_stream, image_size
        self.tokenizer_json, self.context_length = tokenizer_json, context_length

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[int, dict]]]:
        from tokenizers import Tokenizer as HFTokenizer
        info = torch.utils.data.get_worker_info()
        block = self.blocks[info.id if info is not None else 0]
        tokenizer = Tokenizer(HFTokenizer.from_str(self.tokenizer_json), self.context_length)
        streams = [VirtualStream(self.spec, sid, self.image_size, self.states.get(sid)) for sid in block]
        try:
            while True:
                samples = [s for vs in streams for s in vs.take(self.rows)]
                yield collate(samples, tokenizer), {vs.sid: vs.state() for vs in streams}
        finally:
            for vs in streams:
                vs.close()


class Stream:
    """The batches of one rank; iterate for batches, `state_dict()` for the position after the last one."""

    def __init__(self, spec: StreamSpec, *, global_batch: int, rank: int, world_size: int, num_workers: int,
                 image_size: int, tokenizer: Tokenizer, max_bad_fraction: float, state: Optional[dict]):
        self.spec, self.global_batch, self.rank, self.world_size = spec, global_batch, rank, world_size
        self.image_size, self.tokenizer, self.max_bad_fraction = image_size, tokenizer, max_bad_fraction
        per_rank = spec.num_streams // world_size
        self.stream_ids = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.num_workers = min(num_workers, per_rank)
        if num_workers > per_rank:
            log.warning("data.num_workers = %d but rank %d owns %d virtual streams: using %d loader processes "
                        "(raise data.streams for more)", num_workers, rank, per_rank, per_rank)
        self.step = int(state["step"]) if state else 0
        self._states: dict[int, Optional[dict]] = {
            sid: (state["streams"][str(sid)] if state else None) for sid in self.stream_ids}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on (a new iterator continues after the last batch taken)."""
        loaders = max(self.num_workers, 1)
        blocks = [self.stream_ids[i * len(self.stream_ids) // loaders:(i + 1) * len(self.stream_ids) // loaders]
                  for i in range(loaders)]
        producer = _Producer(self.spec, blocks, dict(self._states), self.global_batch // self.spec.num_streams,
                             self.image_size, self.tokenizer.to_json(), self.tokenizer.context_length)
        if self.num_workers == 0:
            chunks = iter(producer)
        else:
            chunks = iter(torch.utils.data.DataLoader(producer, batch_size=None, num_workers=self.num_workers,
                                                      prefetch_factor=2))
        while True:
            parts = [next(chunks) for _ in range(loaders)]
            for _, states in parts:
                self._states.update(states)
            self.step += 1
            self._check_bad()
            yield concat([batch for batch, _ in parts])

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch taken: JSON-serialisable, this rank's streams only.

        Resuming with the same world size needs each rank's own state; with another world size,
        the states of all ranks merged (`merge_states`, or `gather_state` under torch.distributed).
        """
        return {"version": STATE_VERSION, "step": self.step, "seed": self.spec.seed,
                "global_batch": self.global_batch, "num_streams": self.spec.num_streams,
                "buffer": self.spec.buffer, "resampled": self.spec.resampled, "data": self.spec.fingerprint,
                "streams": {str(sid): st for sid, st in self._states.items() if st is not None}}

    def stats(self) -> dict[str, Any]:
        """Usable and bad samples of this rank so far, bad ones by reason and by shard."""
        ok, bad, shards = 0, Counter(), Counter()
        for st in self._states.values():
            if st is not None:
                ok += st["ok"]
                bad.update(st["bad"])
                shards.update(st["bad_shards"])
        total_bad = sum(bad.values())
        return {"ok": ok, "bad": dict(bad), "bad_total": total_bad,
                "bad_fraction": total_bad / max(ok + total_bad, 1), "bad_shards": dict(shards.most_common(10))}

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
    expected = {"version": STATE_VERSION, "seed": spec.seed, "global_batch": global_batch,
                "num_streams": spec.num_streams, "buffer": spec.buffer, "resampled": spec.resampled,
                "data": spec.fingerprint}
    names = {"seed": "seed", "global_batch": "train.global_batch", "buffer": "data.shuffle_buffer",
             "resampled": "data.resampled", "num_streams": "data.streams", "data": "the shard list (names, counts)"}
    wrong = [f"{names.get(k, k)}: saved {state.get(k)!r}, now {v!r}" for k, v in expected.items() if state.get(k) != v]
    if wrong:
        raise DataError("cannot resume the data stream: the state was saved with other settings (" + "; ".join(wrong)
                        + "); resume with the same ones")
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
    resampled: bool = False
    max_bad_fraction: float = 0.01
    allow_pipe: bool = False
    streams: int = 0                           # virtual streams S; 0: chosen from the global batch

    @classmethod
    def from_config(cls, d: DataConfig) -> StreamOptions:
        return cls(image_size=d.image_size, context_length=d.context_length, tokenizer=d.tokenizer,
                   shuffle_buffer=d.shuffle_buffer, resampled=d.resampled, max_bad_fraction=d.max_bad_fraction,
                   allow_pipe=d.allow_pipe, streams=d.streams)


def open_stream(urls: str | Sequence[str], *, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                num_workers: int = 0, state: Optional[dict | Sequence[dict]] = None,
                options: StreamOptions = StreamOptions()) -> Stream:
    """The endless, shuffled, augmented, resumable batches of rank `rank` of `world_size` over the shards
    at `urls`: local batches of global_batch / world_size rows (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size = {world_size})")
    o = options
    shards = tuple(resolve_shards(urls, allow_pipe=o.allow_pipe))
    tok = _tokenizer(o.tokenizer, urls, o.context_length)
    if isinstance(state, (list, tuple)):
        state = merge_states(state)
    if o.streams < 0:
        raise DataError(f"data.streams = {o.streams}: expected 0 (chosen from the global batch) or a positive count")
    num_streams = o.streams or (state["num_streams"] if state else choose_num_streams(global_batch, world_size))
    if num_streams % world_size or global_batch % num_streams:
        raise DataError(f"{num_streams} virtual streams (data.streams), global_batch {global_batch}, world_size "
                        f"{world_size}: the world size must divide the streams and the streams the global batch; "
                        f"compatible world sizes: {[w for w in range(1, num_streams + 1) if num_streams % w == 0]}")
    if not o.resampled and len(shards) < num_streams:
        raise DataError(f"{len(shards)} shards for {num_streams} virtual streams: each stream reads whole shards, so "
                        f"some would get none. Use data.resampled=true, fewer streams (data.streams), or more shards "
                        f"(contrast data pack --shard-size smaller)")
    if o.shuffle_buffer < 1:
        raise DataError(f"shuffle_buffer = {o.shuffle_buffer}: expected at least 1 (1 means no shuffling)")
    spec = StreamSpec(shards, seed, num_streams, o.shuffle_buffer, o.resampled)
    per_rank = num_streams // world_size
    if state is not None:
        _check_state(state, spec, global_batch, range(rank * per_rank, (rank + 1) * per_rank))
        if state["step"] == 0:
            state = None
    return Stream(spec, global_batch=global_batch, rank=rank, world_size=world_size, num_workers=num_workers,
                  image_size=o.image_size, tokenizer=tok, max_bad_fraction=o.max_bad_fraction, state=state)


def open_train_stream(cfg: Config, *, rank: int = 0, world_size: int = 1, state: Optional[dict] = None,
                      tokenizer: Optional[Tokenizer] = None) -> Stream:
    """`open_stream` with every setting from a run config; `tokenizer` (an imported model's) replaces the data's."""
    options = StreamOptions.from_config(cfg.data)
    if tokenizer is not None:
        options = replace(options, tokenizer=tokenizer)
    return open_stream(cfg.data.train_urls, global_batch=cfg.train.global_batch, rank=rank, world_size=world_size,
                       seed=cfg.seed, num_workers=cfg.data.num_workers, state=state, options=options)


def _tokenizer(tokenizer: Tokenizer | str | None, urls: str | Sequence[str], context_length: int) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is None:
        where = dataset_dir(urls)
        if where is None or not storage.exists(tokenizer_url(where)):
            raise DataError(f"no tokenizer.json beside the shards at {urls}: set data.tokenizer to a tokenizer.json "
                            "(the one `contrast data synth/pack` wrote beside the training manifest)")
        tokenizer = where
    return load_tokenizer(tokenizer, context_length)
