"""Small data by hand: encoded images and tars with whatever members a test needs, broken ones included."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image


def image_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: int | tuple[int, int] = 32,
                fmt: str = "JPEG") -> bytes:
    """A plain image of one colour, encoded."""
    out = io.BytesIO()
    Image.new("RGB", size if isinstance(size, tuple) else (size, size), colour).save(out, format=fmt)
    return out.getvalue()


def make_shard(path: Path | str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write a tar of (key, {ext: bytes}) samples as given."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_benchmark_set(root: Path | str, splits: dict[str, list[list[tuple[str, dict[str, bytes]]]]], *,
                        nshards: dict[str, str] | None = None, **files: str) -> Path:
    """A set in CLIP_benchmark's local layout, written by hand: ``root/SPLIT/{i}.tar`` for each list of
    samples in `splits[SPLIT]`, ``nshards.txt`` (the shard count, or the text in `nshards`), and a file
    ``NAME.txt`` holding the text of each keyword in `files` (classnames, zeroshot_classification_templates,
    dataset_type)."""
    root = Path(root)
    for split, shards in splits.items():
        (root / split).mkdir(parents=True)
        for i, samples in enumerate(shards):
            make_shard(root / split / f"{i}.tar", samples)
        (root / split / "nshards.txt").write_text((nshards or {}).get(split, f"{len(shards)}\n"))
    for name, text in files.items():
        (root / f"{name}.txt").write_text(text)
    return root
