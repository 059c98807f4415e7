"""One logging setup for the whole package: quiet by default, the rank in every worker line."""
from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname).1s %(rank)s%(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int | None) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] " if rank is not None else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.prefix
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
    handler.addFilter(_RankFilter(rank))
    logger.addHandler(handler)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """A logger under the package's root (`pipeline.<name>`)."""
    return logging.getLogger(name if name.startswith("pipeline") else f"pipeline.{name}")
