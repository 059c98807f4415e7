"""`contrast data inspect`: counts, bytes, sample layouts and corrupt members of shards at any URL."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from pipeline import storage
from pipeline.data.samples import BadSample, is_text_pair, validate_sample, validate_text_pair
from pipeline.data.shards import Lost, iter_raw, resolve_shards
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
    """Read every shard; with `decode`, also decode every image (finds corrupt JPEGs). Text pairs
    (samples with a ``query.txt``) are checked by the text-pair rules."""
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
                if is_text_pair(item.members):
                    validate_text_pair(item.key, item.members, item.shard)
                    continue
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
