"""Reading TensorBoard event files back, with TensorBoard's own reader."""
from __future__ import annotations

from pathlib import Path

from pipeline import storage


def scalars(tensorboard_url: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of a folder (any URL), read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util
    series: dict[str, list[tuple[int, float]]] = {}
    for i, url in enumerate(storage.iter_files(tensorboard_url)):
        local = Path(f"/tmp/tb-read-{i}")
        local.write_bytes(storage.read_bytes(url))
        for event in EventFileLoader(str(local)).Load():
            for v in event.summary.value:
                series.setdefault(v.tag, []).append((event.step, float(tensor_util.make_ndarray(v.tensor))))
        local.unlink()
    return series
