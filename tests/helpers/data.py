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
