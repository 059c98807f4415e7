"""What makes a sample usable: one set of rules for pack, the stream, inspect and the eval sets.

A sample is the members of one key in a shard: an image (``KEY.jpg|jpeg|png|webp``), a caption
(``KEY.txt``: UTF-8, not blank; one caption a line where there are several) and optional metadata
(``KEY.json``, e.g. ``{"label": 3}``). `validate_sample` applies the checks that need no decoding;
decoding (`transforms.decode_image`) adds ``corrupt_image`` and ``too_many_pixels``. Every failure is
a `BadSample` whose `reason` is the name it is counted under.

A text pair (text–text training) is ``KEY.query.txt`` and ``KEY.pos.txt`` (UTF-8, not blank) and
optional ``KEY.neg.json``, a list of hard-negative passages (non-blank strings); `validate_text_pair`.
"""
from __future__ import annotations

import json
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
    if caption_required or "txt" in members:
        caption = decode_caption(members.get("txt"))
    return Sample(key, image, caption, decode_meta(members.get("json")), shard_name(shard))


def shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


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
