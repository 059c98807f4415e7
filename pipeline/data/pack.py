"""Pack image-caption pairs into shards: from a folder, a CSV or parquet table, or img2dataset output.

Every input is checked before it is written: unreadable or zero-byte images, images over a pixel
limit (decompression bombs), missing or non-UTF-8 captions and duplicate keys are skipped and
counted by reason. A BPE tokenizer is trained on the captions and saved beside the manifest, which is
written last; an interrupted run removes the shards it wrote, so a folder holds a whole dataset or
nothing of this run.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image
from tqdm import tqdm

from pipeline import storage
from pipeline.data.samples import IMAGE_EXTS, MAX_PIXELS, BadSample, check_pixels, decode_caption, image_member
from pipeline.data.shards import DataError, ShardWriter, read_shard
from pipeline.data.tokenizer import train_tokenizer
from pipeline.layout import TOKENIZER
from pipeline.log import get_logger

log = get_logger(__name__)

TOKENIZER_CAPTIONS = 1_000_000             # captions kept to train the tokenizer
EXAMPLES_PER_REASON = 5
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Item:
    """One input pair before checking: bytes may be None when reading failed (`error` says why)."""
    key: str
    image: Optional[bytes]
    caption: Optional[bytes]
    source: str                            # where it came from, for the summary
    meta: Optional[dict] = None
    error: Optional[str] = None            # a reason already known (e.g. unreadable file)


@dataclass
class PackSummary:
    out: str
    written: int = 0
    shards: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, source: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(source)

    def text(self) -> str:
        lines = [f"packed {self.written} samples into {self.shards} shards ({self.bytes / 1e6:.1f} MB) at {self.out}"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())} inputs:")
            for reason, n in sorted(self.skipped.items()):
                lines.append(f"  {reason}: {n}  (e.g. {', '.join(self.examples[reason])})")
        else:
            lines.append("skipped nothing")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- checking
def check_image(data: Optional[bytes], max_pixels: int = MAX_PIXELS) -> tuple[Optional[bytes], str]:
    """(bytes to store, extension) or (None, reason). JPEG/PNG/WebP are kept as is, others become PNG."""
    if data is None:
        return None, "unreadable_image"
    if not data:
        return None, "empty_image"
    try:
        img = Image.open(io.BytesIO(data))
        check_pixels(*img.size, max_pixels)
        img.draft("RGB", (64, 64))                 # a full pass over the data at reduced size: finds truncation
        img.load()
    except BadSample as e:
        return None, e.reason
    except Image.DecompressionBombError:
        return None, "too_many_pixels"
    except Exception:
        return None, "unreadable_image"
    ext = _FORMAT_EXT.get(img.format or "")
    if ext is None:
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(out, format="PNG")
        return out.getvalue(), "png"
    return data, ext


def check_caption(data: Optional[bytes]) -> tuple[Optional[str], str]:
    """(caption, "") or (None, reason), by the same rules as the stream's."""
    try:
        return decode_caption(data).strip(), ""
    except BadSample as e:
        return None, e.reason


def safe_key(name: str) -> str:
    """A webdataset key: no dots or slashes (webdataset splits names at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


# --------------------------------------------------------------------------------------- sources
def _read(url: str) -> Optional[bytes]:
    try:
        return storage.read_bytes(url)
    except (OSError, ValueError):
        return None


def folder_items(root: str) -> Iterator[Item]:
    """`x.jpg` beside `x.txt`, or class subfolders (caption "a photo of a {class}.", label = class index)."""
    base = Path(storage.local_path(root))
    if not base.is_dir():
        raise DataError(f"--folder {root}: not a folder")
    images = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in
                    IMAGE_EXTS + ("bmp", "gif", "tif", "tiff"))
    classes = sorted({p.relative_to(base).parts[0] for p in images if len(p.relative_to(base).parts) > 1})
    for path in images:
        rel = path.relative_to(base)
        key = safe_key(str(rel.with_suffix("")))
        caption_file = path.with_suffix(".txt")
        meta = None
        if caption_file.exists():
            caption = caption_file.read_bytes()
        elif len(rel.parts) > 1:
            name = rel.parts[0].replace("_", " ")
            caption = f"a photo of a {name}.".encode()
            meta = {"label": classes.index(rel.parts[0]), "class": name}
        else:
            caption = None
        yield Item(key, _read(str(path)), caption, str(rel), meta)


def table_items(url: str, image_column: str, caption_column: str) -> Iterator[Item]:
    """Rows of a CSV or parquet table: image paths (relative to the table's folder, or URLs) and captions."""
    import pyarrow.csv
    import pyarrow.parquet

    with storage.open_url(url, "rb") as f:
        table = pyarrow.parquet.read_table(f) if url.endswith(".parquet") else pyarrow.csv.read_csv(f)
    missing = [c for c in (image_column, caption_column) if c not in table.column_names]
    if missing:
        raise DataError(f"{url}: no column {', '.join(missing)}; columns are {', '.join(table.column_names)} "
                        "(choose with --image-column / --caption-column)")
    folder = posixpath.dirname(url) if "://" in url else str(Path(url).parent)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        image_ref, caption = row[image_column], row[caption_column]
        key = safe_key(str(row["key"])) if "key" in row and row["key"] is not None else f"{i:09d}"
        if image_ref is None:
            yield Item(key, None, None, f"row {i}", error="unreadable_image")
            continue
        image_url = image_ref if "://" in image_ref or image_ref.startswith("/") else storage.join(folder, image_ref)
        text = caption.encode("utf-8") if isinstance(caption, str) else caption
        meta = {"label": row["label"]} if isinstance(row.get("label"), int) else None
        yield Item(key, _read(image_url), text, f"row {i} ({image_ref})", meta)


def img2dataset_items(root: str) -> Iterator[Item]:
    """The samples of img2dataset's tars (`.jpg`, `.txt`, `.json`), for re-sharding."""
    tars = list(storage.iter_files(root, ".tar"))
    if not tars:
        raise DataError(f"--img2dataset {root}: no .tar files; expected img2dataset's webdataset output")
    for url in tars:
        try:
            for raw in read_shard(url):
                image = image_member(raw.members)
                meta = None
                if "json" in raw.members:
                    try:
                        meta = json.loads(raw.members["json"])
                    except ValueError:
                        meta = None
                yield Item(raw.key, image, raw.members.get("txt"), f"{posixpath.basename(url)}:{raw.key}", meta,
                           error=None if image is not None else "unreadable_image")
        except Exception as e:               # a truncated tar: keep what came before, count the rest as lost
            yield Item(posixpath.basename(url), None, None, f"{url} ({type(e).__name__})", error="truncated_shard")


# ----------------------------------------------------------------------------------------- pack
def pack(items: Iterator[Item], out: str, *, shard_size: int = 1000, vocab_size: int = 8192,
         max_pixels: int = MAX_PIXELS, progress: bool = True, source: str = "") -> PackSummary:
    """Check and write items into shards at `out`, then tokenizer.json, then manifest.json."""
    summary = PackSummary(str(out))
    seen: set[str] = set()
    captions: list[str] = []
    with ShardWriter(out, shard_size) as writer:
        for item in tqdm(items, desc="pack", unit="sample", disable=not progress):
            reason = item.error or ("duplicate_key" if item.key in seen else "")
            caption, image, ext = None, None, ""
            if not reason:
                caption, reason = check_caption(item.caption)
            if not reason:
                image, ext = check_image(item.image, max_pixels)
                reason = "" if image is not None else ext
            if reason:
                summary.skip(reason, item.source)
                continue
            seen.add(item.key)
            members = {ext: image, "txt": caption.encode("utf-8")}
            if item.meta is not None:
                members["json"] = json.dumps(item.meta).encode("utf-8")
            writer.write(item.key, members)
            if len(captions) < TOKENIZER_CAPTIONS:
                captions.append(caption)
        if not seen:
            raise DataError(f"nothing to pack from {source or 'the input'}: every input was skipped "
                            f"({dict(summary.skipped)})")
        writer.flush()
        train_tokenizer(captions, vocab_size=vocab_size).save(storage.join(out, TOKENIZER))
        manifest = writer.close(created_by="contrast data pack", source=source, skipped=dict(summary.skipped))
    summary.written = manifest["samples"]
    summary.shards = len(manifest["shards"])
    summary.bytes = sum(s["bytes"] for s in manifest["shards"])
    return summary
