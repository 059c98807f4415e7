"""Fashion-MNIST as a zero-shot eval set: 10,000 real test images that no run ever trains on.

The Debian package ``dataset-fashion-mnist`` installs the IDX files in /usr/share/datasets/fashion-mnist.
`ensure_fashion_mnist(eval_dir)` converts the test split once into an eval set (PNG shards, labels in
``.json``, classnames.txt, templates) published atomically with a COMPLETE marker, so concurrent
watchers never read a half-written set and later runs reuse it.
"""
from __future__ import annotations

import gzip
import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.data.shards import ShardWriter
from pipeline.layout import CLASSNAMES, TEMPLATES

SET_NAME = "fashion_mnist"
SOURCE = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
PROMPTS = ["a photo of a {c}.", "a black and white photo of a {c}.", "a low resolution photo of a {c}.",
           "a photo of the {c}, a type of clothing.", "a grayscale picture of a {c}."]
IDX_IMAGES, IDX_LABELS = 2051, 2049


def read_idx(path: str | Path) -> np.ndarray:
    """A gzipped IDX file (the MNIST format) → uint8 array: (N, rows, cols) images or (N,) labels."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == IDX_IMAGES:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, count * rows * cols, offset=16).reshape(count, rows, cols)
    if magic == IDX_LABELS:
        return np.frombuffer(data, np.uint8, count, offset=8)
    raise ValueError(f"{path}: not an IDX image or label file (magic {magic}, expected {IDX_IMAGES} or {IDX_LABELS})")


def ensure_fashion_mnist(eval_dir: str, source: str = SOURCE, shard_size: int = 2500) -> str:
    """The URL of the converted set under `eval_dir`, converting the IDX test split on first use."""
    url = storage.join(eval_dir, SET_NAME)
    if storage.is_complete(url):
        return url
    images_path, labels_path = Path(source, "t10k-images-idx3-ubyte.gz"), Path(source, "t10k-labels-idx1-ubyte.gz")
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(f"Fashion-MNIST test split not found in {source}: install the Debian package "
                                f"(apt-get install dataset-fashion-mnist) or drop {SET_NAME!r} from eval.sets")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if len(images) != len(labels):
        raise ValueError(f"{source}: {len(images)} test images but {len(labels)} labels")
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(tmp, shard_size) as writer:
            for i, (image, label) in enumerate(zip(images, labels)):
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                writer.write(f"{i:06d}", {"png": png.getvalue(), "json": json.dumps({"label": int(label)}).encode()})
            writer.close(source=source, split="test")
        Path(tmp, CLASSNAMES).write_text("\n".join(CLASS_NAMES) + "\n")
        Path(tmp, TEMPLATES).write_text("\n".join(PROMPTS) + "\n")
        storage.publish_dir(tmp, url, marker={"source": source, "samples": len(images)})
    return url
