"""Reading streams in tests: the batches of a world of ranks, step by step, and exact comparison."""
from __future__ import annotations

import dataclasses

import torch

from pipeline.data import StreamOptions, open_stream

OPTIONS = {f.name for f in dataclasses.fields(StreamOptions)}


def open_(url, **kw):
    """`open_stream` with small defaults (32-px images, 16 tokens, a window of 20, G = 16, seed 3);
    StreamOptions fields may be given as keywords."""
    options = dict(image_size=32, context_length=16, shuffle_buffer=20)
    options.update({k: kw.pop(k) for k in list(kw) if k in OPTIONS})
    kw.setdefault("global_batch", 16)
    kw.setdefault("seed", 3)
    return open_stream(url, options=StreamOptions(**options), **kw)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def global_batches(url, world_size, steps, num_workers=0, state=None, **kw):
    """The rank-major concatenation of all ranks' batches, step by step, plus each rank's final state."""
    ranks = [open_(url, rank=r, world_size=world_size, num_workers=num_workers, state=state, **kw)
             for r in range(world_size)]
    per_rank = [take(s, steps) for s in ranks]
    batches = [{name: _cat([p[t][name] for p in per_rank]) for name in ("key", "image", "text", "source")}
               for t in range(steps)]
    return batches, [s.state_dict() for s in ranks]


def _cat(parts):
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else sum(parts, [])


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["source"] == y["source"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])
