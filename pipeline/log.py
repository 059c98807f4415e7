"""One logging setup for the whole package: quiet by default, the rank in every worker line; the progress
bars of the commands; and the start-up timeline a run reports (where the seconds before its first step went)."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Optional

import psutil
from tqdm import tqdm

_FORMAT = "%(asctime)s %(levelname).1s %(rank)s%(where)s: %(message)s"


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr when it is a terminal (never in a log file: a bar there is a line of `\\r`s)."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


class _Context(logging.Filter):
    """The rank (in a worker) and where a line comes from: its stage (`train`, `eval`, `data`, …), or the
    whole module name when logging debug."""

    def __init__(self, rank: int | None, debug: bool) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] " if rank is not None else ""
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.prefix
        parts = record.name.split(".")
        record.where = record.name if self.debug or len(parts) < 2 else parts[1]
        return True


def setup_logging(level: str | int = "info", rank: int | None = None) -> None:
    """Configure the `pipeline` logger once per process; call again to change level or rank."""
    if rank is None and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
    logger = logging.getLogger("pipeline")
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_Context(rank, debug=logger.level <= logging.DEBUG))
    logger.addHandler(handler)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """A logger under the package's root (`pipeline.<name>`)."""
    return logging.getLogger(name if name.startswith("pipeline") else f"pipeline.{name}")


def process_start_time() -> float:
    """When this process started (seconds since the epoch): the origin of a start-up timeline."""
    return psutil.Process().create_time()


class Timeline:
    """Named moments of one start-up, in order: `summary()` says how long each phase took.

    A phase ends at its mark and began at the previous one (the first at `origin`, by default this
    process's start). Moments are wall-clock seconds since the epoch, so a timeline begun in the
    driver can be continued in a worker process (`to_dict` / `from_dict`).
    """

    def __init__(self, origin: Optional[float] = None, marks: tuple[tuple[str, float], ...] = ()):
        self.origin = process_start_time() if origin is None else origin
        self.marks: list[tuple[str, float]] = [(name, float(at)) for name, at in marks]

    def mark(self, phase: str, at: Optional[float] = None) -> None:
        """`phase` ended now, or at `at` but not before the previous phase (a worker process Ray started
        ahead of its use took no time of the start-up to start)."""
        at = time.time() if at is None else max(at, self.marks[-1][1] if self.marks else self.origin)
        self.marks.append((phase, at))

    def elapsed(self) -> float:
        return (self.marks[-1][1] if self.marks else self.origin) - self.origin

    def summary(self) -> str:
        """`12.3 s (phase 1.0, phase 2.1, ...)`: the total, then each phase's own duration."""
        parts, last = [], self.origin
        for name, at in self.marks:
            parts.append(f"{name} {at - last:.1f}")
            last = at
        return f"{self.elapsed():.1f} s ({', '.join(parts)})"

    def to_dict(self) -> dict:
        return {"origin": self.origin, "marks": [list(m) for m in self.marks]}

    @classmethod
    def from_dict(cls, data: dict) -> Timeline:
        return cls(data["origin"], tuple((name, at) for name, at in data["marks"]))
