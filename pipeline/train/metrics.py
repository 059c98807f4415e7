"""What a run reports while it trains: TensorBoard scalars and a console line, from rank 0.

Also `progress.json` at each of those steps, and the console's progress line: step/total, loss,
samples/s, data wait, ETA, then lr, temperature, gradient norm, memory.

Scalars (global over ranks, at every `train.log_every`-th step and the last):
    train/  loss, lr, logit_scale, temperature, logit_bias, grad_norm,
            alignment, uniformity_image, uniformity_text, tolerance (with labels)
    perf/   samples_per_s, step_time_s, data_wait_fraction, peak_memory_gb
    data/   bad_samples, bad/<reason>, duplicate_rate (rows of the global batch whose caption another
            row has too), and per source <source>/samples, <source>/bad_samples (read so far)
    checkpoint/damaged_skipped   at a resume step: damaged newer checkpoints skipped for the one resumed
Histograms (a loss with per-sample temperatures, isogclr; at the same steps, over every rank's table):
    train/sample_temperature/image, train/sample_temperature/text   the temperatures of every sample seen
Event files go to `run_dir/tensorboard/`, directly when it is local, else written locally and
uploaded (at most every `SYNC_EVERY_S`, before each checkpoint and at the end). A resumed run first
reads the last step of each scalar already logged there and logs none of them again: replayed steps
never appear twice on a curve, and none goes missing.
"""
from __future__ import annotations

import math
import resource
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from pipeline import storage
from pipeline.config import Config
from pipeline.distributed import all_gather, all_gather_objects, all_reduce_max, all_reduce_sum, get_world_size
from pipeline.gradcache import StepOutput
from pipeline.layout import tensorboard_dir
from pipeline.log import get_logger
from pipeline.losses import embedding_metrics
from pipeline.losses.base import duplicate_groups
from pipeline.train.progress import Eta, format_duration, write_progress

log = get_logger(__name__)

OWN_PREFIXES = ("train/", "perf/", "data/", "checkpoint/")     # the eval stage may log eval/* into the same folder
SYNC_EVERY_S = 60.0


# ------------------------------------------------------------------------------------- timing
class Meter:
    """Wall time and data-wait time of the steps since the last `window()`."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self._start, self._wait, self._steps = time.perf_counter(), 0.0, 0

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The batches of `batches`, the time spent waiting for each counted as data wait."""
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:                   # finite data (a source with on_end: stop)
                return
            self._wait += time.perf_counter() - t
            self._steps += 1
            yield batch

    def window(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self._start
        steps = max(self._steps, 1)
        out = {"perf/samples_per_s": steps * self.global_batch / elapsed, "perf/step_time_s": elapsed / steps,
               "perf/data_wait_fraction": self._wait / elapsed}
        self._start, self._wait, self._steps = time.perf_counter(), 0.0, 0
        return out


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # Linux reports KiB


# ------------------------------------------------------------------------------------ scalars
def step_scalars(out: StepOutput, batch: dict[str, Any], *, lr: float, grad_norm: float,
                 data: dict[str, Any], meter: Meter) -> dict[str, float]:
    """The scalars of one logged step, reduced over ranks (a collective: every rank calls it).

    `out` is the gradient cache's step output, `batch` this rank's batch (its labels and caption ids),
    `data` this rank's stream statistics (`Stream.stats()`).
    """
    labels = batch.get("label")
    scale = float(out.logit_scale)
    scalars = {"train/loss": float(all_reduce_sum(out.loss.detach().float())) / get_world_size(),
               "train/lr": lr, "train/grad_norm": grad_norm,
               "train/logit_scale": scale, "train/temperature": 1.0 / scale}
    if out.logit_bias is not None:
        scalars["train/logit_bias"] = float(out.logit_bias)
    if out.caption is not None:                            # CoCa: the two terms of train/loss apart
        for name, value in (("contrastive", out.contrastive), ("caption", out.caption)):
            scalars[f"train/loss_{name}"] = float(all_reduce_sum(value.detach().float())) / get_world_size()
    scalars.update({f"train/{k}": float(v) for k, v in embedding_metrics(out.image, out.text, labels).items()})
    scalars.update(meter.window())
    scalars["perf/peak_memory_gb"] = float(all_reduce_max(torch.tensor(peak_memory_gb())))
    scalars.update(data_scalars(data))
    scalars["data/duplicate_rate"] = duplicate_rate(batch["caption_id"], across_columns="more_text" in batch)
    return scalars


@dataclass
class Histogram:
    """A distribution over every rank's values as TensorBoard's raw histogram takes it (log-spaced buckets)."""
    count: float
    total: float
    squares: float
    low: float
    high: float
    limits: list[float]              # each bucket's upper edge
    counts: list[float]


def temperature_histograms(loss_fn: Any, buckets: int = 48) -> dict[str, Optional[Histogram]]:
    """`train/sample_temperature/<side>` of a loss with per-sample temperatures ({} for any other): this rank's
    values counted in log-spaced buckets over [τ_min, τ_max], the counts and moments summed over ranks, so no
    rank ever holds another's table (a collective; None where no rank has a value yet)."""
    if not hasattr(loss_fn, "temperatures"):
        return {}
    edges = torch.logspace(math.log10(loss_fn.tau_min), math.log10(loss_fn.tau_max), buckets + 1, dtype=torch.float64)
    out: dict[str, Optional[Histogram]] = {}
    for side, values in loss_fn.temperatures().items():
        counts = torch.bincount(torch.bucketize(values, edges[1:-1], right=True), minlength=buckets).double()
        moments = torch.stack([torch.tensor(float(len(values)), dtype=torch.float64), values.sum(),
                               values.square().sum()])
        ends = torch.stack([-values.min(), values.max()]) if len(values) else torch.full((2,), -math.inf,
                                                                                         dtype=torch.float64)
        counts, moments, ends = all_reduce_sum(counts), all_reduce_sum(moments), all_reduce_max(ends)
        out[f"train/sample_temperature/{side}"] = None if moments[0] == 0 else Histogram(
            float(moments[0]), float(moments[1]), float(moments[2]), float(-ends[0]), float(ends[1]),
            edges[1:].tolist(), counts.tolist())
    return out


def data_scalars(stats: dict[str, Any]) -> dict[str, float]:
    """Bad samples by reason, and usable and bad samples per source, summed over ranks (a collective)."""
    bad: Counter = Counter()
    ok: Counter = Counter()
    bad_by_source: Counter = Counter()
    for rank_stats in all_gather_objects({"bad": stats["bad"], "sources": stats["sources"]}):
        bad.update(rank_stats["bad"])
        for name, s in rank_stats["sources"].items():
            ok[name] += s["ok"]
            bad_by_source[name] += sum(s["bad"].values())
    scalars = {"data/bad_samples": float(sum(bad.values()))}
    scalars.update({f"data/bad/{reason}": float(n) for reason, n in sorted(bad.items())})
    for name in sorted(ok):
        scalars[f"data/{name}/samples"] = float(ok[name])
        scalars[f"data/{name}/bad_samples"] = float(bad_by_source[name])
    return scalars


def duplicate_rate(caption_ids: torch.Tensor, across_columns: bool = False) -> float:
    """The fraction of the global batch's rows that another row duplicates (the same caption id; for
    text pairs, (n, 2) ids: the same query or positive; rows of k captions, `across_columns`: any shared
    caption), the rows the loss masks (a collective)."""
    groups = duplicate_groups(all_gather(caption_ids), across_columns=across_columns)
    _, inverse, counts = torch.unique(groups, return_inverse=True,
                                      return_counts=True)
    return float((counts[inverse] > 1).float().mean())


def console_line(step: int, total: int, s: dict[str, float], eta_s: float) -> str:
    """The progress line: where the run is and when it ends first, then the optimisation's numbers."""
    line = (f"step {step}/{total} ({step / total:.0%})  loss {s['train/loss']:.4f}  "
            f"{s['perf/samples_per_s']:,.0f} samples/s  data wait {s['perf/data_wait_fraction']:.0%}  "
            f"ETA {format_duration(eta_s)}  |  lr {s['train/lr']:.2e}  temp {s['train/temperature']:.4f}  "
            f"grad {s['train/grad_norm']:.3f}  mem {s['perf/peak_memory_gb']:.2f} GB")
    return line + (f"  bad samples {s['data/bad_samples']:.0f}" if s["data/bad_samples"] else "")


def progress_record(step: int, total: int, s: dict[str, float], eta_s: float) -> dict[str, Any]:
    """What `progress.json` holds: the console line's numbers and the samples read per source."""
    sources = sorted({tag.split("/")[1] for tag in s if tag.startswith("data/") and tag.endswith("/samples")})
    return {"step": step, "total": total, "loss": s["train/loss"], "samples_per_s": s["perf/samples_per_s"],
            "step_time_s": s["perf/step_time_s"], "data_wait_fraction": s["perf/data_wait_fraction"],
            "eta_s": eta_s, "bad_samples": s["data/bad_samples"],
            "sources": {n: {"samples": s[f"data/{n}/samples"], "bad_samples": s[f"data/{n}/bad_samples"]}
                        for n in sources}}


# ------------------------------------------------------------------------------------- writer
class TrainLogger:
    """Rank 0's console line, `progress.json` and TensorBoard writer; on other ranks every call does nothing."""

    def __init__(self, cfg: Config, rank: int):
        self.every, self.total, self.run_dir = cfg.train.log_every, cfg.train.steps, cfg.run_dir
        self.enabled = rank == 0
        self.eta = Eta(cfg.train.steps)
        self.url = tensorboard_dir(cfg.run_dir)
        self.remote = not storage.is_local(self.url)
        self.writer = None
        self.logged: dict[str, int] = {}                  # tag → last step already in the event files
        if self.enabled and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.logged = logged_steps(self.url)
            self._dir = tempfile.mkdtemp(prefix="tensorboard-") if self.remote else storage.local_path(self.url)
            self.writer = SummaryWriter(self._dir)
            self._synced = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether `step` is logged (the same answer on every rank: the scalars are collectives)."""
        return step % self.every == 0 or step == self.total

    def log(self, step: int, scalars: dict[str, float], histograms: Optional[dict[str, Optional[Histogram]]] = None
            ) -> None:
        if not self.enabled:
            return
        eta_s = self.eta.seconds(step, scalars["perf/step_time_s"])
        log.info(console_line(step, self.total, scalars, eta_s))
        write_progress(self.run_dir, progress_record(step, self.total, scalars, eta_s))
        if self.writer is None:
            return
        for tag, value in scalars.items():
            if step > self.logged.get(tag, 0):            # else a replayed step, already on the curve
                self.writer.add_scalar(tag, value, step)
        for tag, h in (histograms or {}).items():
            if h is not None and step > self.logged.get(tag, 0):
                self.writer.add_histogram_raw(tag, h.low, h.high, h.count, h.total, h.squares, h.limits, h.counts,
                                              step)
        if self.remote and time.monotonic() - self._synced > SYNC_EVERY_S:
            self.sync()

    def resumed(self, step: int, skipped_damaged: int) -> None:
        """Count, at the resume step, the damaged checkpoints skipped for the one resumed from (when any)."""
        if self.writer is not None and skipped_damaged:
            self.writer.add_scalar("checkpoint/damaged_skipped", skipped_damaged, step)

    def sync(self) -> None:
        """Flush, and upload the event files when `run_dir` is remote."""
        if self.writer is None:
            return
        self.writer.flush()
        if self.remote:
            storage.upload_dir(self._dir, self.url)
            self._synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        if self.writer is not None:
            self.writer.close()


def logged_steps(url: str) -> dict[str, int]:
    """The last step of each of this stage's scalars in the event files directly inside `url`.

    Per scalar, not per run: a worker killed while its writer was emptying its buffer leaves a step
    with only some of its scalars on disk, and the resumed run must write the others.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    last: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tensorboard-read-") as tmp:
        for i, file_url in enumerate(storage.iter_files(url)):
            if "tfevents" not in file_url.rsplit("/", 1)[-1]:
                continue
            path = storage.local_path(file_url)
            if not storage.is_local(file_url):
                path = str(Path(tmp, f"{i}.tfevents"))
                Path(path).write_bytes(storage.read_bytes(file_url))
            for event in EventFileLoader(path).Load():
                for v in event.summary.value:
                    if v.tag.startswith(OWN_PREFIXES):
                        last[v.tag] = max(last.get(v.tag, 0), event.step)
    return last
