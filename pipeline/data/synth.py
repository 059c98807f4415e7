"""A procedural image-caption dataset on which contrastive learning measurably works, no download.

Coloured shapes (10 colours × 8 shapes) on grey backgrounds (plain, stripes, checker, noise), one
object ("a small red circle.") or two with a spatial relation ("a red circle left of a blue star.").
A fixed set of 16 colour-shape combinations (shape k with colours k and k+5) is never rendered in
the training shards; the `zeroshot_heldout` set asks for exactly those. Every sample is drawn from
its own seeded RNG, so the output depends only on (seed, split, index) — not on sharding or workers.
"""
from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.data.evalsets import CLASSIFICATION, RETRIEVAL, split_writer, write_set_files
from pipeline.data.samples import encode_label
from pipeline.data.shards import ShardWriter
from pipeline.data.tokenizer import Tokenizer, train_tokenizer
from pipeline.layout import DATASET_EVAL, DATASET_TRAIN, EVAL_TEST, TOKENIZER
from pipeline.log import get_logger, progress_bar

log = get_logger(__name__)

COLOURS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 50),
    "cyan": (30, 205, 225), "blue": (30, 60, 220), "purple": (140, 40, 190), "pink": (250, 135, 195),
    "white": (248, 248, 248), "black": (12, 12, 12),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "semicircle")
BACKGROUNDS = ("plain", "striped", "checkered", "noisy")
RELATIONS = ("left of", "right of", "above", "below")
COLOUR_NAMES = tuple(COLOURS)
# shape k is held out with colours k and k+5: each shape twice, each colour once or twice
HELD_OUT = frozenset((COLOUR_NAMES[(k + d) % len(COLOURS)], SHAPES[k]) for k in range(len(SHAPES)) for d in (0, 5))
ALL_COMBOS = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES)
SEEN = tuple(x for x in ALL_COMBOS if x not in HELD_OUT)
HELD = tuple(x for x in ALL_COMBOS if x in HELD_OUT)

ZEROSHOT_TEMPLATES = ("a photo of a {c}.", "a {c}.", "an image of a {c}.", "there is a {c} in the picture.")
SINGLE_PHRASES = ("a photo of a {o}.", "a {o}.", "an image of a {o}.", "there is a {o} in the picture.",
                  "a {z} {o}.", "a photo of a {z} {o}.", "a {o} on a {b} background.", "a {z} {o} on a {b} background.")
PAIR_PHRASES = ("a {a} {r} a {b}.", "a photo of a {a} {r} a {b}.", "an image of a {a} {r} a {b}.",
                "a {a} {r} a {b} on a {g} background.")
FLIPPED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CAPTIONING_SET = "captioning_heldout"      # held-out combinations, CAPTION_REFERENCES captions each (CoCa's task)
CAPTION_REFERENCES = 5                     # reference captions per image, as many as MS-COCO's
EVAL_SETS = ("zeroshot_seen", "zeroshot_heldout", "retrieval", "relation", CAPTIONING_SET)
SINGLE_FRACTION = 0.6                      # of training samples with one object (the rest: two)
JPEG_QUALITY = 90
PLANTED = "planted_noise.json"      # train/planted_noise.json: the planted noise by key


def classname(combo: tuple[str, str]) -> str:
    return f"{combo[0]} {combo[1]}"


@dataclass
class Obj:
    colour: str
    shape: str
    cx: float
    cy: float
    d: float                               # diameter in pixels


# ----------------------------------------------------------------------------------- rendering
@lru_cache(maxsize=4)
def _texture_bank(size: int, seed: int, per_kind: int = 24) -> dict[str, list[Image.Image]]:
    """Pre-rendered striped, checkered and noisy grey backgrounds (rendering noise per sample is slow)."""
    rng = np.random.default_rng([seed, size])
    yy, xx = np.mgrid[0:size, 0:size]
    bank: dict[str, list[Image.Image]] = {"striped": [], "checkered": [], "noisy": []}
    for _ in range(per_kind):
        g1, g2 = rng.integers(85, 175, size=2)
        period = int(rng.integers(max(size // 16, 2), max(size // 5, 3)))
        axis = xx if rng.random() < 0.5 else yy
        stripes = np.where((axis // period) % 2 == 0, g1, g2)
        checker = np.where(((xx // period) + (yy // period)) % 2 == 0, g1, g2)
        noise = np.clip(rng.integers(95, 165) + rng.normal(0, 18, size=(size, size)), 0, 255)
        for kind, grey in (("striped", stripes), ("checkered", checker), ("noisy", noise)):
            bank[kind].append(Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2), "RGB"))
    return bank


def _background(rng: random.Random, kind: str, size: int, seed: int) -> Image.Image:
    if kind == "plain":
        g = rng.randint(85, 175)
        return Image.new("RGB", (size, size), (g, g, g))
    return rng.choice(_texture_bank(size, seed)[kind]).copy()


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, ...]:
    return tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in rgb)


def _polygon(cx: float, cy: float, r: float, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(cx + r * x, cy + r * y) for x, y in points]


_STAR = [(math.cos(math.pi * (k / 5 - 0.5)) * (1 if k % 2 == 0 else 0.48),
          math.sin(math.pi * (k / 5 - 0.5)) * (1 if k % 2 == 0 else 0.48)) for k in range(10)]
_W = 0.36                                  # half-width of the cross's arms, relative to the radius
_CROSS = [(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1), (-_W, _W), (-1, _W),
          (-1, -_W), (-_W, -_W)]
_TRIANGLE = [(0, -1), (0.97, 0.75), (-0.97, 0.75)]
_DIAMOND = [(0, -1), (0.85, 0), (0, 1), (-0.85, 0)]


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, fill: tuple[int, ...]) -> None:
    r, cx, cy = obj.d / 2, obj.cx, obj.cy
    box = (cx - r, cy - r, cx + r, cy + r)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        s = 0.82 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif obj.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(0.38 * r)))
    elif obj.shape == "semicircle":                  # the upper half of a disc, centred on the object
        draw.pieslice((cx - r, cy - r / 2, cx + r, cy + 1.5 * r), 180, 360, fill=fill)
    else:
        points = {"triangle": _TRIANGLE, "diamond": _DIAMOND, "star": _STAR, "cross": _CROSS}[obj.shape]
        draw.polygon(_polygon(cx, cy, r, points), fill=fill)


def render(objects: list[Obj], background: str, size: int, rng: random.Random, seed: int) -> bytes:
    """The JPEG bytes of the objects drawn on a background."""
    img = _background(rng, background, size, seed)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        draw_object(draw, obj, _jitter(COLOURS[obj.colour], rng))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


# ------------------------------------------------------------------------------------- scenes
def _single(rng: random.Random, combo: tuple[str, str], size: int) -> tuple[Obj, str]:
    big = rng.random() < 0.5
    d = size * (rng.uniform(0.56, 0.76) if big else rng.uniform(0.34, 0.46))
    cx, cy = rng.uniform(d / 2, size - d / 2), rng.uniform(d / 2, size - d / 2)
    return Obj(*combo, cx, cy, d), "large" if big else "small"


def _pair(rng: random.Random, a: tuple[str, str], b: tuple[str, str], relation: str, size: int) -> list[Obj]:
    """Object a in one half of the image and b in the other, so that `a <relation> b` holds."""
    da, db = size * rng.uniform(0.3, 0.42), size * rng.uniform(0.3, 0.42)
    half = size / 2

    def place(d: float, first_half: bool) -> tuple[float, float]:
        along = rng.uniform(d / 2, half - d / 2) + (0 if first_half else half)
        across = rng.uniform(d / 2, size - d / 2)
        return along, across

    a_first = relation in ("left of", "above")
    (pa, qa), (pb, qb) = place(da, a_first), place(db, not a_first)
    if relation in ("left of", "right of"):
        return [Obj(*a, pa, qa, da), Obj(*b, pb, qb, db)]
    return [Obj(*a, qa, pa, da), Obj(*b, qb, pb, db)]


def _two_combos(rng: random.Random, pool: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], tuple[str, str]]:
    a = rng.choice(pool)
    b = rng.choice(pool)
    while b == a:
        b = rng.choice(pool)
    return a, b


def _pair_label(a: tuple[str, str], relation: str, b: tuple[str, str]) -> int:
    """One label per described scene; `b right of a` is the same scene as `a left of b`."""
    if relation in ("right of", "below"):
        a, b, relation = b, a, FLIPPED[relation]
    rel_bit = 0 if relation == "left of" else 1
    n = len(ALL_COMBOS)
    return n + (ALL_COMBOS.index(a) * 2 + rel_bit) * n + ALL_COMBOS.index(b)


def _train_scene(seed: int, index: int, size: int, captions: int = 1
                 ) -> tuple[list[Obj], str, str, dict, random.Random]:
    """A training pair's scene: (objects, background, caption, metadata, the RNG left for rendering).
    `captions` > 1: that many lines, the first as with one, the others the same scene in other phrasings
    (drawn from their own RNG stream, so the first line and the image do not change)."""
    rng = random.Random(f"{seed}/train/{index}")
    more = random.Random(f"{seed}/train/{index}/captions")
    bg = rng.choice(BACKGROUNDS)

    def lines(first: str, phrases: tuple[str, ...], **fields: str) -> str:
        others = [p for p in phrases if p != first]
        return "\n".join(p.format(**fields) for p in [first] + more.sample(others, min(captions - 1, len(others))))
    if rng.random() < SINGLE_FRACTION:
        combo = rng.choice(SEEN)
        obj, z = _single(rng, combo, size)
        caption = lines(rng.choice(SINGLE_PHRASES), SINGLE_PHRASES, o=classname(combo), z=z, b=bg)
        return [obj], bg, caption, {"label": ALL_COMBOS.index(combo)}, rng
    a, b = _two_combos(rng, SEEN)
    relation = rng.choice(RELATIONS)
    objects = _pair(rng, a, b, relation, size)
    if rng.random() < 0.3:                                    # the same scene described from b's side
        caption_a, caption_r, caption_b = b, FLIPPED[relation], a
    else:
        caption_a, caption_r, caption_b = a, relation, b
    caption = lines(rng.choice(PAIR_PHRASES), PAIR_PHRASES, a=classname(caption_a), r=caption_r,
                    b=classname(caption_b), g=bg)
    return objects, bg, caption, {"label": _pair_label(a, relation, b)}, rng


def train_sample(seed: int, index: int, size: int, captions: int = 1) -> tuple[bytes, str, dict]:
    """One training pair: (JPEG, caption, metadata with a scene label). Held-out combos never appear.
    `captions` > 1: that many phrasings, one a line."""
    objects, bg, caption, meta, rng = _train_scene(seed, index, size, captions)
    return render(objects, bg, size, rng, seed), caption, meta


@dataclass(frozen=True)
class Noise:
    """Planted noise of the training split: a fraction `captions` of the pairs get another pair's caption
    (one of another scene label), a fraction `duplicates` are copies (image and caption) of another pair."""
    captions: float = 0.0
    duplicates: float = 0.0

    def check(self) -> None:
        if not (0 <= self.captions <= 1 and 0 <= self.duplicates <= 1 and self.captions + self.duplicates < 1):
            raise ValueError(f"noise = {self.captions}, duplicates = {self.duplicates}: expected fractions "
                             "in [0, 1) with a sum below 1")

    def kind(self, seed: int, index: int) -> str:
        """"caption", "duplicate" or "" for a clean pair; from its own RNG, so from (seed, index) only."""
        u = random.Random(f"{seed}/noise/{index}").random()
        return "caption" if u < self.captions else "duplicate" if u < self.captions + self.duplicates else ""

    def source(self, seed: int, index: int, samples: int, kind: str) -> int:
        """The pair whose caption (or whole pair) sample `index` takes: another clean-or-caption pair; for a
        caption, one of another scene label."""
        rng = random.Random(f"{seed}/noise-source/{index}")
        label = _train_scene(seed, index, 16)[3]["label"] if kind == "caption" else None
        for _ in range(1000):
            j = rng.randrange(samples)
            if j == index or self.kind(seed, j) == "duplicate":
                continue
            if label is not None and _train_scene(seed, j, 16)[3]["label"] == label:
                continue
            return j
        raise ValueError(f"no source pair for planted noise at sample {index} of {samples}")


def noisy_train_sample(seed: int, index: int, size: int, samples: int, noise: Noise,
                       captions: int = 1) -> tuple[bytes, str, dict]:
    """`train_sample` with the planted noise: the metadata says ``"noise": kind, "source": j`` when planted
    (the label stays the image's)."""
    kind = noise.kind(seed, index) if noise.captions or noise.duplicates else ""
    if not kind:
        return train_sample(seed, index, size, captions)
    j = noise.source(seed, index, samples, kind)
    if kind == "caption":
        jpeg, _, meta = train_sample(seed, index, size, captions)
        caption = _train_scene(seed, j, size, captions)[2]
    else:
        jpeg, caption, meta = train_sample(seed, j, size, captions)
    return jpeg, caption, {**meta, "noise": kind, "source": j}


def eval_sample(name: str, seed: int, index: int, size: int) -> tuple[bytes, str, Optional[dict]]:
    """One sample of an evaluation set (see EVAL_SETS); RNG streams are disjoint from training."""
    rng = random.Random(f"{seed}/{name}/{index}")
    bg = rng.choice(BACKGROUNDS)
    if name in ("zeroshot_seen", "zeroshot_heldout"):
        classes = SEEN if name == "zeroshot_seen" else HELD
        label = index % len(classes)                          # balanced classes
        obj, _ = _single(rng, classes[label], size)
        caption = ZEROSHOT_TEMPLATES[0].format(c=classname(classes[label]))
        return render([obj], bg, size, rng, seed), caption, {"label": label}
    if name == CAPTIONING_SET:                                # one held-out object, several phrasings a line
        combo = HELD[index % len(HELD)]
        obj, z = _single(rng, combo, size)
        lines = [p.format(o=classname(combo), z=z, b=bg) for p in rng.sample(SINGLE_PHRASES, CAPTION_REFERENCES)]
        return render([obj], bg, size, rng, seed), "\n".join(lines), None
    a, b = _two_combos(rng, SEEN)
    relation = rng.choice(RELATIONS)
    jpeg = render(_pair(rng, a, b, relation, size), bg, size, rng, seed)
    if name == "retrieval":                                   # several captions, one per line
        phrases = rng.sample(PAIR_PHRASES, 3)
        lines = [p.format(a=classname(a), r=relation, b=classname(b), g=bg) for p in phrases]
        return jpeg, "\n".join(lines), None
    if name == "relation":
        true = PAIR_PHRASES[0].format(a=classname(a), r=relation, b=classname(b))
        swapped = PAIR_PHRASES[0].format(a=classname(b), r=relation, b=classname(a))
        return jpeg, true, {"swapped": swapped}
    raise ValueError(f"unknown eval set {name!r}; expected one of {', '.join(EVAL_SETS)}")


# -------------------------------------------------------------------------------------- writing
def _members(jpeg: bytes, caption: str, meta: Optional[dict], label_as_cls: bool) -> dict[str, bytes]:
    """A sample's tar members; with `label_as_cls` a ``"label"`` goes to ``KEY.cls`` (CLIP_benchmark's way)."""
    members = {"jpg": jpeg, "txt": caption.encode("utf-8")}
    meta = dict(meta or {})
    if label_as_cls and "label" in meta:
        members["cls"] = encode_label(meta.pop("label"))
    if meta:
        members["json"] = json.dumps(meta).encode("utf-8")
    return members


def _render_range(split: str, seed: int, start: int, stop: int, size: int, samples: int = 0,
                  noise: Noise = Noise(), captions: int = 1) -> list[tuple[bytes, str, Optional[dict]]]:
    if split == "train":
        return [noisy_train_sample(seed, i, size, samples, noise, captions) for i in range(start, stop)]
    return [eval_sample(split, seed, i, size) for i in range(start, stop)]


def _write_split(writer: ShardWriter, split: str, n: int, seed: int, size: int, workers: int,
                 progress: bool, noise: Noise = Noise(), phrasings: int = 1) -> tuple[list[str], dict[str, dict]]:
    """Render `n` samples of a split (``train`` or an eval set's name) into `writer`; returns the captions
    and the planted noise by key."""
    ranges = [(i, min(i + writer.shard_size, n)) for i in range(0, n, writer.shard_size)]
    captions: list[str] = []
    planted: dict[str, dict] = {}
    extra = {"created_by": "contrast data synth", "split": split, "seed": seed, "image_size": size}
    if split == "train" and (noise.captions or noise.duplicates):
        extra["noise"] = {"captions": noise.captions, "duplicates": noise.duplicates, "file": PLANTED}
    bar = progress_bar(total=n, enabled=progress, desc=f"synth {split}", unit="sample", leave=False)
    with writer, ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
        chunks = pool.map(_render_range, *zip(*[(split, seed, a, b, size, n, noise, phrasings) for a, b in ranges]))
        for (start, _), chunk in zip(ranges, chunks):
            for i, (jpeg, caption, meta) in enumerate(chunk):
                key = f"{start + i:08d}"
                writer.write(key, _members(jpeg, caption, meta, label_as_cls=split != "train"))
                captions.append(caption)
                if meta and meta.get("noise"):
                    planted[key] = {"noise": meta["noise"], "source": f"{meta['source']:08d}"}
            bar.update(len(chunk))
        writer.close(**extra)
    bar.close()
    return captions, planted


class _Inline:
    """A stand-in for a process pool that maps lazily in this process."""

    def map(self, fn, *iterables) -> Iterator:
        return map(fn, *iterables)

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None


def write_eval_set(set_dir: str, name: str, samples: int, tokenizer: Tokenizer, *, seed: int = 0,
                   image_size: int = 64, shard_size: int = 1000, workers: int = 1, progress: bool = False) -> None:
    """One eval set of EVAL_SETS at `set_dir` in CLIP_benchmark's layout, with a copy of `tokenizer`."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown eval set {name!r}; expected one of {', '.join(EVAL_SETS)}")
    storage.makedirs(set_dir)
    tokenizer.save(storage.join(set_dir, TOKENIZER))
    if name.startswith("zeroshot"):
        classes = SEEN if name == "zeroshot_seen" else HELD
        write_set_files(set_dir, CLASSIFICATION, [classname(c) for c in classes], ZEROSHOT_TEMPLATES)
    else:
        write_set_files(set_dir, RETRIEVAL)
    # the shards last: nshards.txt, written after them, is what says the set is whole
    _write_split(split_writer(set_dir, EVAL_TEST, shard_size), name, samples, seed, image_size, workers, progress)


def synthesize(out: str, samples: int, *, eval_samples: int = 1000, image_size: int = 64, shard_size: int = 1000,
               seed: int = 0, workers: int = 1, vocab_size: int = 1024, progress: bool = True,
               noise: float = 0.0, duplicates: float = 0.0, captions: int = 1) -> dict:
    """Write `out/train` (shards, manifest.json, tokenizer.json) and `out/eval/<set>` for EVAL_SETS.

    Each eval set is in CLIP_benchmark's layout (see `pipeline.data.evalsets`), so CLIP_benchmark reads it
    as it is: zero-shot sets are classification sets (labels in ``KEY.cls``), retrieval sets hold one
    caption a line. `captioning_heldout` is CLIP_benchmark's captioning layout (its retrieval layout, what
    ``clip_benchmark eval --task captioning`` reads, as its wds form of mscoco_captions): single objects of the
    held-out combinations, each with CAPTION_REFERENCES reference captions in the training phrasings. The
    relation set is a retrieval set to CLIP_benchmark (it scores the true captions) with our extra
    ``KEY.json`` {"swapped": caption}, which CLIP_benchmark does not read. A copy of the train tokenizer.json
    sits in each set, so each set stands alone. `captions` > 1 gives every training
    sample that many phrasings, one a line (for data.captions_per_image).
    """
    if samples < 1 or eval_samples < 1:
        raise ValueError(f"samples = {samples}, eval_samples = {eval_samples}: expected at least 1 of each")
    if image_size < 16:
        raise ValueError(f"image_size = {image_size}: expected at least 16 pixels for recognisable shapes")
    planted_noise = Noise(noise, duplicates)
    planted_noise.check()
    out = str(out).rstrip("/")
    train_dir = storage.join(out, DATASET_TRAIN)
    if captions < 1:
        raise ValueError(f"captions = {captions}: expected at least 1 per training sample")
    written, planted = _write_split(ShardWriter(train_dir, shard_size), "train", samples, seed, image_size,
                                    workers, progress, planted_noise, captions)
    if noise or duplicates:
        storage.write_bytes(storage.join(train_dir, PLANTED), json.dumps(planted, sort_keys=True).encode())
    corpus = written + [t.format(c=classname(c)) for t in ZEROSHOT_TEMPLATES for c in ALL_COMBOS]
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    tokenizer.save(storage.join(train_dir, TOKENIZER))
    for name in EVAL_SETS:
        write_eval_set(storage.join(out, DATASET_EVAL, name), name, eval_samples, tokenizer, seed=seed,
                       image_size=image_size, shard_size=shard_size, workers=workers, progress=progress)
    summary = {"train": train_dir, "samples": samples,
               "eval": {n: storage.join(out, DATASET_EVAL, n) for n in EVAL_SETS},
               "held_out": sorted(classname(c) for c in HELD),
               "planted": dict(Counter(p["noise"] for p in planted.values()))}
    log.info("synthesised %d training samples at %s and %d samples per eval set", samples, train_dir, eval_samples)
    return summary
