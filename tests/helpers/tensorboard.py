"""Reading TensorBoard event files back in tests."""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline import storage


def scalars(tensorboard_url: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of a folder (any URL), read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util
    series: dict[str, list[tuple[int, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tb-read-") as tmp:
        for i, url in enumerate(storage.iter_files(tensorboard_url)):
            local = Path(tmp, str(i))
            local.write_bytes(storage.read_bytes(url))
            for event in EventFileLoader(str(local)).Load():
                for v in event.summary.value:
                    if v.HasField("tensor"):              # histograms: `histograms`
                        series.setdefault(v.tag, []).append((event.step, float(tensor_util.make_ndarray(v.tensor))))
    return series


def histograms(tensorboard_url: str) -> dict[str, list[tuple[int, dict]]]:
    """Every histogram in the event files of a folder: per tag, (step, {min, max, num, sum, limits, counts})."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    series: dict[str, list[tuple[int, dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="tb-read-") as tmp:
        for i, url in enumerate(storage.iter_files(tensorboard_url)):
            local = Path(tmp, str(i))
            local.write_bytes(storage.read_bytes(url))
            for event in EventFileLoader(str(local)).Load():
                for v in event.summary.value:
                    if v.HasField("histo"):
                        h = v.histo
                        series.setdefault(v.tag, []).append((event.step, dict(
                            min=h.min, max=h.max, num=h.num, sum=h.sum, limits=list(h.bucket_limit),
                            counts=list(h.bucket))))
    return series
