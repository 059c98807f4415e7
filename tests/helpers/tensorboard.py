"""Reading TensorBoard event files back in tests."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline import storage


def _values(tensorboard_url: str) -> Iterator[tuple[int, Any]]:
    """(step, summary value) of every event in the event files of a folder (any URL), with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    with tempfile.TemporaryDirectory(prefix="tb-read-") as tmp:
        for i, url in enumerate(storage.iter_files(tensorboard_url)):
            local = Path(tmp, str(i))
            local.write_bytes(storage.read_bytes(url))
            for event in EventFileLoader(str(local)).Load():
                for v in event.summary.value:
                    yield event.step, v


def scalars(tensorboard_url: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of a folder (any URL)."""
    from tensorboard.util import tensor_util
    series: dict[str, list[tuple[int, float]]] = {}
    for step, v in _values(tensorboard_url):
        if v.metadata.plugin_data.plugin_name != "histograms":      # those: `histograms`
            series.setdefault(v.tag, []).append((step, float(tensor_util.make_ndarray(v.tensor))))
    return series


def histograms(tensorboard_url: str) -> dict[str, list[tuple[int, list[tuple[float, float, float]]]]]:
    """Every histogram in the event files of a folder: per tag, (step, its buckets as (left, right, count)), as
    TensorBoard reads them (the first left edge is the minimum, the last right edge the maximum)."""
    from tensorboard.util import tensor_util
    series: dict[str, list[tuple[int, list[tuple[float, float, float]]]]] = {}
    for step, v in _values(tensorboard_url):
        if v.metadata.plugin_data.plugin_name == "histograms":
            buckets = [tuple(map(float, row)) for row in tensor_util.make_ndarray(v.tensor)]
            series.setdefault(v.tag, []).append((step, buckets))
    return series
