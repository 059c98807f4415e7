"""Image decoding and transforms with PIL and numpy (no torchvision).

Decoding is where the time goes: when the output is much smaller than the stored JPEG, the decoder
is asked for a reduced image (JPEG draft mode: DCT scaling by 1/2, 1/4 or 1/8) that still has at
least the output's resolution over the crop, and crop + resize happen in one PIL call.
Train: random resized crop (no horizontal flip: captions say left and right). Eval: resize the
short side and centre-crop.
"""
from __future__ import annotations

import io
import math
import random
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.data.samples import MAX_PIXELS, BadSample, check_pixels

# CLIP's normalisation constants (what open_clip and Hugging Face CLIP towers expect)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE = (0.9, 1.0)                   # area fraction of the random resized crop (open_clip's default)
TRAIN_RATIO = (3 / 4, 4 / 3)

Box = tuple[float, float, float, float]


def random_resized_box(w: int, h: int, rng: random.Random, scale: Sequence[float] = TRAIN_SCALE,
                       ratio: Sequence[float] = TRAIN_RATIO) -> Box:
    """A crop box covering a random area fraction in `scale` with aspect ratio in `ratio`."""
    area = w * h
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if cw <= w and ch <= h:
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return (x0, y0, x0 + cw, y0 + ch)
    return centre_box(w, h)


def centre_box(w: int, h: int) -> Box:
    """The centred square: resize-short-side then centre-crop, expressed as one crop box."""
    side = min(w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def decode_image(data: bytes, size: int, rng: Optional[random.Random] = None, draft: bool = True,
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """JPEG/PNG/WebP bytes → (size, size, 3) uint8. A random resized crop when `rng` is given, else
    centre crop. Raises BadSample("corrupt_image" | "too_many_pixels")."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        check_pixels(w, h, max_pixels)
        box = random_resized_box(w, h, rng) if rng is not None else centre_box(w, h)
        if draft and img.format == "JPEG":
            box = draft_box(img, box, size)
        img = img.convert("RGB")
        return np.asarray(img.resize((size, size), Image.BICUBIC, box=box))
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("too_many_pixels", str(e)) from None
    except Exception as e:                   # PIL raises many types on broken data (OSError, SyntaxError, ...)
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None


def draft_box(img: Image.Image, box: Box, size: int) -> Box:
    """Let the JPEG decoder shrink by up to 8x while the crop keeps at least `size` pixels per side."""
    shrink = min(box[2] - box[0], box[3] - box[1]) / size
    if shrink < 2:
        return box
    w, h = img.size
    img.draft("RGB", (math.ceil(w / shrink), math.ceil(h / shrink)))
    sx, sy = img.size[0] / w, img.size[1] / h
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


_MEAN = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(STD).view(1, 3, 1, 1) * 255


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 arrays → normalised float tensor (N, 3, H, W)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float()
    return x.sub_(_MEAN).div_(_STD)
