"""What makes a sample usable: one set of rules for pack, the stream, inspect and the eval sets.

A sample is the members of one key in a shard: an image (``KEY.jpg|jpeg|png|webp``), a caption
(``KEY.txt``: UTF-8, not blank; one caption a line where there are several; without it, a JSON
``"captions"`` list of non-blank strings) and optional metadata (``KEY.json``, e.g. ``{"label": 3}``)
and an optional class label (``KEY.cls``: the class index as
ASCII digits, CLIP_benchmark's convention; a ``"label"`` in the JSON is read the same way, and the two
must agree when both are there). `validate_sample` applies the checks that need no decoding;
decoding (`transforms.decode_image`) adds ``corrupt_image`` and ``too_many_pixels``. Every failure is
a `BadSample` whose `reason` is the name it is counted under.

A text pair (text–text training) is ``KEY.query.txt`` and ``KEY.pos.txt`` (UTF-8, not blank) and
optional ``KEY.neg.json``, a list of hard-negative passages (non-blank strings); `validate_text_pair`.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from typing import Optional

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 64_000_000                    # larger images are refused as decompression bombs


class BadSample(ValueError):
    """A sample that cannot be used; `reason` is the name it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Sample:
    """A sample that passed `validate_sample`: the image still encoded, the caption decoded."""
    key: str
    image: bytes
    caption: Optional[str]                 # None only where captions are optional (zero-shot eval sets)
    meta: Optional[dict]
    shard: str                             # its shard's name, for bad-sample reports
    label: Optional[int] = None            # the class index, from KEY.cls or the JSON's "label"

    def caption_lines(self) -> list[str]:
        """The captions of a sample that has several (retrieval), one a line."""
        return [line.strip() for line in (self.caption or "").splitlines() if line.strip()]


def image_member(members: dict[str, bytes]) -> Optional[bytes]:
    """The encoded image among a sample's members, or None."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return members[ext]
    return None


def decode_caption(data: Optional[bytes], missing: str = "missing_caption",
                   bad_encoding: str = "bad_caption_encoding") -> str:
    """A caption's (or any text member's) text; BadSample(`missing` | `bad_encoding`) otherwise."""
    if data is None:
        raise BadSample(missing)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample(bad_encoding) from None
    if not text.strip():
        raise BadSample(missing)
    return text


def decode_meta(data: Optional[bytes]) -> Optional[dict]:
    """A sample's JSON metadata (None when absent); BadSample("bad_json") when unreadable."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSample("bad_json") from None


def decode_label(data: bytes) -> int:
    """A ``KEY.cls`` member's class index; BadSample("bad_label") unless it is a non-negative integer."""
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample("bad_label", f"expected a class index in ASCII digits, got {data[:20]!r}") from None
    if label < 0:
        raise BadSample("bad_label", f"class index {label} is negative")
    return label


def encode_label(label: int) -> bytes:
    """The ``KEY.cls`` member of a class index (what webdataset and CLIP_benchmark write and read)."""
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"class label {label!r}: expected a non-negative int")
    return str(label).encode("ascii")


def sample_label(members: dict[str, bytes], meta: Optional[dict]) -> Optional[int]:
    """The class index of a sample: ``KEY.cls``, else an int ``"label"`` in its JSON; None when neither.

    Both present and different is BadSample("label_mismatch"): which one a reader trusts must not matter.
    """
    from_meta = meta.get("label") if isinstance(meta, dict) else None
    if isinstance(from_meta, bool) or not isinstance(from_meta, int):
        from_meta = None
    if "cls" not in members:
        return from_meta
    label = decode_label(members["cls"])
    if from_meta is not None and from_meta != label:
        raise BadSample("label_mismatch", f".cls says {label}, .json says {from_meta}")
    return label


def check_pixels(width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    if width * height > max_pixels:
        raise BadSample("too_many_pixels", f"{width}x{height} is over the limit of {max_pixels} pixels")


def validate_sample(key: str, members: dict[str, bytes], shard: str, caption_required: bool = True) -> Sample:
    """The checks that need no decoding, in one place; raises BadSample naming the first failure."""
    image = image_member(members)
    if image is None:
        raise BadSample("missing_image")
    if not image:
        raise BadSample("corrupt_image", "zero bytes")
    caption = None
    meta = decode_meta(members.get("json"))
    listed = json_captions(meta) if "txt" not in members else None
    if listed is not None:
        caption = listed
    elif caption_required or "txt" in members:
        caption = decode_caption(members.get("txt"))
    return Sample(key, image, caption, meta, shard_name(shard), sample_label(members, meta))


def json_captions(meta: Optional[dict]) -> Optional[str]:
    """A JSON ``"captions"`` list as the lines of a caption (None without one); BadSample("bad_captions") when
    it is not a non-empty list of non-blank strings. A caption's own line breaks become spaces."""
    if not isinstance(meta, dict) or "captions" not in meta:
        return None
    listed = meta["captions"]
    if not isinstance(listed, list) or not listed or any(not isinstance(c, str) or not c.strip() for c in listed):
        raise BadSample("bad_captions", "the JSON's \"captions\" must be a non-empty list of non-blank strings")
    return "\n".join(" ".join(c.split()) for c in listed)


def shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def caption_id(text: str) -> int:
    """A signed 64-bit id of a caption: equal for captions equal after NFKC, case folding and collapsing
    whitespace (what the tokenizer's normaliser does too), so equal ids mean the same text input."""
    canonical = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def sample_ids(source: str, shard: str, key: str, caption: str) -> tuple[int, int]:
    """Signed 64-bit stable ids of a sample's image (its source, shard name and key) and of the caption it is
    trained with (that image id and the caption's text): the same in every process and run, so per-sample
    state (isogclr's temperatures) follows the sample whichever rank reads it."""
    image = hashlib.blake2b(f"{source}\0{shard}\0{key}".encode(), digest_size=8).digest()
    text = hashlib.blake2b(image + caption.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(image, "little", signed=True), int.from_bytes(text, "little", signed=True)


# ------------------------------------------------------------------------------------ text pairs
QUERY, POSITIVE, NEGATIVES = "query.txt", "pos.txt", "neg.json"     # a text pair's members


@dataclass
class TextPair:
    """A text pair that passed `validate_text_pair`: a query, its positive passage, its hard negatives."""
    key: str
    query: str
    pos: str
    negatives: list[str]
    shard: str


def is_text_pair(members: dict[str, bytes]) -> bool:
    """Whether a sample's members are laid out as a text pair (it has a query)."""
    return QUERY in members


def decode_negatives(data: Optional[bytes]) -> list[str]:
    """A pair's hard negatives ([] when absent); BadSample("bad_negatives") unless a list of non-blank strings."""
    if data is None:
        return []
    try:
        negatives = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSample("bad_negatives", "not UTF-8 JSON") from None
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise BadSample("bad_negatives", "expected a JSON list of non-blank strings")
    return negatives


def validate_text_pair(key: str, members: dict[str, bytes], shard: str) -> TextPair:
    """The checks of a text pair, in one place; raises BadSample naming the first failure."""
    query = decode_caption(members.get(QUERY), "missing_query", "bad_text_encoding").strip()
    pos = decode_caption(members.get(POSITIVE), "missing_positive", "bad_text_encoding").strip()
    return TextPair(key, query, pos, decode_negatives(members.get(NEGATIVES)), shard_name(shard))
