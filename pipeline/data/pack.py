"""Pack image-caption pairs into shards: from a folder, a CSV or parquet table, or img2dataset output;
or a folder of class subfolders into a zero-shot eval set in CLIP_benchmark's layout (`pack_zeroshot_set`).

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

from pipeline import storage
from pipeline.data.evalsets import (
    CLASSIFICATION,
    TemplateError,
    check_templates,
    read_lines,
    split_writer,
    write_set_files,
)
from pipeline.data.samples import (
    IMAGE_EXTS,
    MAX_PIXELS,
    BadSample,
    check_pixels,
    decode_caption,
    encode_label,
    image_member,
)
from pipeline.data.shards import DataError, ShardWriter, read_shard
from pipeline.data.tokenizer import Tokenizer, train_tokenizer
from pipeline.layout import CLASSNAMES, EVAL_SPLITS, EVAL_TEST, NSHARDS, TEMPLATES, TOKENIZER, eval_split_url
from pipeline.log import get_logger, progress_bar

log = get_logger(__name__)

TOKENIZER_CAPTIONS = 1_000_000             # captions kept to train the tokenizer
EXAMPLES_PER_REASON = 5
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_READABLE = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")     # converted to PNG when packed
# zero-shot templates of a packed set when --templates gives none; {c} stands for the class name
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a bad photo of a {c}.", "a photo of the large {c}.",
                     "a photo of the small {c}.", "a close-up photo of a {c}.", "a cropped photo of the {c}.",
                     "a rendering of a {c}.", "art of the {c}.")


@dataclass
class Item:
    """One input pair before checking: bytes may be None when reading failed (`error` says why)."""
    key: str
    image: Optional[bytes]
    caption: Optional[bytes]
    source: str                            # where it came from, for the summary
    meta: Optional[dict] = None
    error: Optional[str] = None            # a reason already known (e.g. unreadable file)
    label: Optional[int] = None            # a class index, written as KEY.cls


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

    def count(self, manifest: dict) -> None:
        """Take the written totals from the manifest."""
        self.written = manifest["samples"]
        self.shards = len(manifest["shards"])
        self.bytes = sum(s["bytes"] for s in manifest["shards"])


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


def _scan_folder(root: str) -> tuple[Path, list[Path], list[str]]:
    """The folder, its image files (any depth, sorted) and its class subfolders (sorted: index = label)."""
    base = Path(storage.local_path(root))
    if not base.is_dir():
        raise DataError(f"--folder {root}: not a folder")
    images = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in _READABLE)
    classes = sorted({p.relative_to(base).parts[0] for p in images if len(p.relative_to(base).parts) > 1})
    return base, images, classes


def class_name(folder: str) -> str:
    """A class subfolder's name as text: ``red_apple`` → ``red apple``."""
    return folder.replace("_", " ")


def folder_items(root: str) -> Iterator[Item]:
    """`x.jpg` beside `x.txt`, or class subfolders (caption "a photo of a {class}.", label = class index)."""
    base, images, classes = _scan_folder(root)
    for path in images:
        rel = path.relative_to(base)
        key = safe_key(str(rel.with_suffix("")))
        caption_file = path.with_suffix(".txt")
        meta = None
        if caption_file.exists():
            caption = caption_file.read_bytes()
        elif len(rel.parts) > 1:
            name = class_name(rel.parts[0])
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
         max_pixels: int = MAX_PIXELS, progress: bool = True, source: str = "", tokenizer: Optional[Tokenizer] = None,
         manifest_extra: Optional[dict] = None) -> PackSummary:
    """Check and write items into shards at `out`, then tokenizer.json (`tokenizer`, else one trained on the
    captions), then manifest.json (with `manifest_extra`'s keys: a curated set's lineage)."""
    summary = PackSummary(str(out))
    with ShardWriter(out, shard_size) as writer:
        captions = _write_checked(items, writer, summary, max_pixels, progress, source)
        (tokenizer or train_tokenizer(captions, vocab_size=vocab_size)).save(storage.join(out, TOKENIZER))
        extra = {"created_by": "contrast data pack", **(manifest_extra or {})}
        summary.count(writer.close(source=source, skipped=dict(summary.skipped), **extra))
    return summary


def pack_zeroshot_set(root: str, out: str, *, split: str = EVAL_TEST, templates: Optional[list[str]] = None,
                      shard_size: int = 1000, max_pixels: int = MAX_PIXELS, progress: bool = True) -> PackSummary:
    """A folder of class subfolders → a zero-shot classification set at `out` in CLIP_benchmark's layout.

    Class names are the subfolder names (sorted; ``_`` read as a space), each image's class index goes
    to ``KEY.cls``, its ``KEY.txt`` is the first template with its class name. `split` ``test`` is the
    scored split, ``train`` the linear probe's; the second split packed into a set must have the same
    classes as the first. Given templates replace the set's; without, the set keeps its own (or gets
    DEFAULT_TEMPLATES when new).
    """
    if split not in EVAL_SPLITS:
        raise DataError(f"--split {split}: expected one of {', '.join(EVAL_SPLITS)}")
    split_url = eval_split_url(out, split)
    if storage.exists(storage.join(split_url, NSHARDS)):
        raise DataError(f"{split_url} already holds a packed split ({NSHARDS}); remove it or choose another --out")
    base, images, folders = _scan_folder(root)
    if not folders:
        raise DataError(f"--folder {root}: no class subfolders with images; --clip-benchmark expects DIR/CLASS/IMAGE")
    classnames = [class_name(f) for f in folders]
    existing = read_lines(storage.join(out, CLASSNAMES)) if storage.exists(storage.join(out, CLASSNAMES)) else None
    if existing is not None and existing != classnames:
        raise DataError(f"--folder {root}: classes {classnames[:5]}… differ from {storage.join(out, CLASSNAMES)} "
                        f"({existing[:5]}…); every split of a set has the same classes")
    templates = _set_templates(out, templates)
    summary = PackSummary(split_url)
    with split_writer(out, split, shard_size) as writer:
        items = _class_items(base, images, folders, templates[0])
        _write_checked(items, writer, summary, max_pixels, progress, root)
        write_set_files(out, CLASSIFICATION, classnames, templates)
        summary.count(writer.close(created_by="contrast data pack --clip-benchmark", source=root, split=split,
                                   skipped=dict(summary.skipped)))
    return summary


def _set_templates(set_url: str, given: Optional[list[str]]) -> list[str]:
    """The templates to write: the given ones, else the set's own (from the split packed first), else the default."""
    kept = storage.join(set_url, TEMPLATES)
    if not given and storage.exists(kept):
        given = read_lines(kept)
    try:
        return check_templates(given or list(DEFAULT_TEMPLATES), "--templates")
    except TemplateError as e:
        raise DataError(str(e)) from None


def _class_items(base: Path, images: list[Path], folders: list[str], template: str) -> Iterator[Item]:
    """Items of the images in class subfolders; an image at the top level has no class and is skipped."""
    for path in images:
        rel = path.relative_to(base)
        if len(rel.parts) == 1:
            yield Item(safe_key(str(rel.with_suffix(""))), None, None, str(rel), error="no_class_folder")
            continue
        label = folders.index(rel.parts[0])
        caption = template.replace("{c}", class_name(rel.parts[0])).encode("utf-8")
        yield Item(safe_key(str(rel.with_suffix(""))), _read(str(path)), caption, str(rel), label=label)


def _write_checked(items: Iterator[Item], writer: ShardWriter, summary: PackSummary, max_pixels: int,
                   progress: bool, source: str) -> list[str]:
    """Check each item and write the good ones (skipping and counting the rest); returns the captions kept
    for the tokenizer. Raises DataError when nothing was usable (the writer then removes its shards)."""
    seen: set[str] = set()
    captions: list[str] = []
    for item in progress_bar(items, enabled=progress, desc="pack", unit="sample"):
        key = safe_key(item.key)                   # sources' keys may hold '/', '.' or '..'
        reason = item.error or ("bad_key" if not key.strip("_") else "") or ("duplicate_key" if key in seen else "")
        caption, image, ext = None, None, ""
        if not reason:
            caption, reason = check_caption(item.caption)
        if not reason:
            image, ext = check_image(item.image, max_pixels)
            reason = "" if image is not None else ext
        if reason:
            summary.skip(reason, item.source)
            continue
        seen.add(key)
        members = {ext: image, "txt": caption.encode("utf-8")}
        if item.meta is not None:
            members["json"] = json.dumps(item.meta).encode("utf-8")
        if item.label is not None:
            members["cls"] = encode_label(item.label)
        writer.write(key, members)
        if len(captions) < TOKENIZER_CAPTIONS:
            captions.append(caption)
    if not seen:
        raise DataError(f"nothing to pack from {source or 'the input'}: every input was skipped "
                        f"({dict(summary.skipped)})")
    writer.flush()
    return captions
