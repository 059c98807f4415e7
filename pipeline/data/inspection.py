"""`contrast data inspect`: counts, bytes, sample layouts and corrupt members of shards at any URL,
and, for a run config, each source's expected share of the batches."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from pipeline import storage
from pipeline.config import Config
from pipeline.data.mixture import MixturePlan, config_sources, expected_epochs, stop_step
from pipeline.data.order import SourceSpec
from pipeline.data.samples import BadSample, validate_sample
from pipeline.data.shards import Lost, iter_raw, resolve_shards
from pipeline.data.stream import StreamOptions, resolve_source
from pipeline.data.transforms import decode_image


@dataclass
class ShardReport:
    url: str
    samples: int = 0
    bytes: int = 0
    expected: int | None = None            # the manifest's count, when there is one
    layouts: Counter = field(default_factory=Counter)   # "jpg+json+txt" → samples
    problems: list[str] = field(default_factory=list)  # "KEY: reason" or "truncated_shard ..."


def inspect_shards(urls: str | Sequence[str], decode: bool = True, allow_pipe: bool = False) -> list[ShardReport]:
    """Read every shard; with `decode`, also decode every image (finds corrupt JPEGs)."""
    reports = []
    for shard in resolve_shards(urls, allow_pipe=allow_pipe):
        report = ShardReport(shard.url, expected=shard.samples)
        try:
            fs, path = storage.filesystem(shard.url)
            report.bytes = int(fs.size(path) or 0)
        except Exception:                      # e.g. pipe: URLs have no size
            report.bytes = 0
        for item in iter_raw(shard):
            if isinstance(item, Lost):
                report.problems.append(f"{item.reason} after {report.samples} samples")
                continue
            report.samples += 1
            report.layouts["+".join(sorted(item.members))] += 1
            try:
                sample = validate_sample(item.key, item.members, item.shard)
                if decode:
                    decode_image(sample.image, 16)
            except BadSample as e:
                report.problems.append(f"{item.key}: {e}")
        if report.expected is not None and report.expected != report.samples:
            report.problems.append(f"manifest says {report.expected} samples, read {report.samples}")
        reports.append(report)
    return reports


def format_reports(reports: Sequence[ShardReport], max_problems: int = 20) -> str:
    width = max([len(r.url) for r in reports] + [5])
    lines = [f"{'shard':<{width}}  {'samples':>8}  {'bytes':>12}  problems"]
    layouts: Counter = Counter()
    for r in reports:
        lines.append(f"{r.url:<{width}}  {r.samples:>8}  {r.bytes:>12}  {len(r.problems)}")
        layouts.update(r.layouts)
    total_samples, total_bytes = sum(r.samples for r in reports), sum(r.bytes for r in reports)
    lines.append(f"total: {len(reports)} shards, {total_samples} samples, {total_bytes / 1e6:.1f} MB")
    lines.append("members per sample: " + ", ".join(f"{k} ({v})" for k, v in layouts.most_common()))
    problems = [f"{r.url.rsplit('/', 1)[-1]}: {p}" for r in reports for p in r.problems]
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines.extend("  " + p for p in problems[:max_problems])
        if len(problems) > max_problems:
            lines.append(f"  … and {len(problems) - max_problems} more")
    else:
        lines.append("no corrupt members")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- mixtures
PLANNED_BATCHES = 1000                     # batches of the mixture plan counted for the planned shares


@dataclass
class SourceShare:
    """What a run's mixture does with one source."""
    source: SourceSpec
    share: float                           # weight / sum of weights: the expected share of every batch
    planned: float                         # its share of the rows the plan assigns in the first batches
    per_batch: float                       # expected rows per global batch
    epochs: float                          # passes over the source in the run (until the data ends)


def inspect_mixture(cfg: Config) -> list[SourceShare]:
    """The expected share of each source of a run config's data (`data.sources` or `data.train_urls`),
    what the mixture plan gives over the first batches, and how often the run reads each source."""
    options = StreamOptions.from_config(cfg.data)
    sources = [resolve_source(s, options) for s in config_sources(cfg.data)]
    plan = MixturePlan([s.weight for s in sources], cfg.seed)
    g = cfg.train.global_batch
    batches = min(cfg.train.steps, PLANNED_BATCHES)
    planned = sum(plan.counts(t * g, g) for t in range(batches)) / (batches * g)
    steps = run_steps(sources, plan.shares, g, cfg.train.steps)
    return [SourceShare(s, share, float(p), share * g, expected_epochs(s, share, g, steps))
            for s, share, p in zip(sources, plan.shares, planned)]


def run_steps(sources: Sequence[SourceSpec], shares: Sequence[float], global_batch: int, steps: int) -> int:
    """The steps a run gets before a source with `on_end: stop` ends the data (at most `steps`)."""
    stops = [stop_step(s, share, global_batch) for s, share in zip(sources, shares) if s.on_end == "stop"]
    return min([steps, *stops])


def format_mixture(shares: Sequence[SourceShare], cfg: Config) -> str:
    g, steps = cfg.train.global_batch, cfg.train.steps
    ends = run_steps([s.source for s in shares], [s.share for s in shares], g, steps)
    width = max([len(s.source.name) for s in shares] + [6])
    lines = [f"mixture of {len(shares)} source(s); global batch {g}, {steps} steps, seed {cfg.seed}",
             f"{'source':<{width}}  {'weight':>7}  {'share':>7}  {'planned':>7}  {'rows/batch':>10}  {'shards':>7}  "
             f"{'samples':>9}  {'epochs in run':>13}  reading"]
    for s in shares:
        src = s.source
        if src.resampled:
            reading = "resampled (endless)"
        elif src.on_end == "stop":
            reading = f"epochs, stop: the data ends after ~{stop_step(src, s.share, g)} steps"
        else:
            reading = "epochs, restart"
        lines.append(f"{src.name:<{width}}  {src.weight:>7g}  {s.share:>7.1%}  {s.planned:>7.1%}  "
                     f"{s.per_batch:>10.1f}  {len(src.shards):>7}  {src.total:>9}  {s.epochs:>13.2f}  {reading}")
    lines.append(f"planned: the share of the rows in the first {min(steps, PLANNED_BATCHES)} batches of the plan")
    if ends < steps:
        lines.append(f"the data ends after about {ends} of the {steps} steps (a source with on_end: stop)")
    return "\n".join(lines)
