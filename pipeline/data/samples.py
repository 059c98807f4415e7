"""What makes a sample usable: one set of rules for pack, the stream, inspect and the eval sets.

A sample is the members of one key in a shard: an image (``KEY.jpg|jpeg|png|webp``), a caption
(``KEY.txt``: UTF-8, not blank; one caption a line where there are several) and optional metadata
(``KEY.json``, e.g. ``{"label": 3}``) and an optional class label (``KEY.cls``: the class index as
ASCII digits, CLIP_benchmark's convention; a ``"label"`` in the JSON is read the same way, and the two
must agree when both are there). `validate_sample` applies the checks that need no decoding;
decoding (`transforms.decode_image`) adds ``corrupt_image`` and ``too_many_pixels``. Every failure is
a `BadSample` whose `reason` is the name it is counted under.
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


def decode_caption(data: Optional[bytes]) -> str:
    """A caption's text; BadSample("missing_caption" | "bad_caption_encoding") otherwise."""
    if data is None:
        raise BadSample("missing_caption")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("bad_caption_encoding") from None
    if not text.strip():
        raise BadSample("missing_caption")
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
    if caption_required or "txt" in members:
        caption = decode_caption(members.get("txt"))
    meta = decode_meta(members.get("json"))
    return Sample(key, image, caption, meta, shard_name(shard), sample_label(members, meta))


def shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def caption_id(text: str) -> int:
    """A signed 64-bit id of a caption: equal for captions equal after NFKC, case folding and collapsing
    whitespace (what the tokenizer's normaliser does too), so equal ids mean the same text input."""
    canonical = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
