"""`contrast report RUN_DIR`: one HTML page with PNG plots of a run's training and evaluation.

Sources are the run's artifacts only: TensorBoard event files under ``run_dir/tensorboard`` (read with
TensorBoard's EventAccumulator) for the training curves, ``run_dir/eval/step_N.json`` for the eval
metrics, and the newest published checkpoint for a similarity heat map and retrieval examples.
Output: ``run_dir/report.html`` and its images in ``run_dir/report/``. A missing source leaves a
note in its section instead of failing the report.
"""
from __future__ import annotations

import html
import math
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline import storage
from pipeline.config import config_from_dict
from pipeline.data.transforms import decode_image
from pipeline.eval.evaluate import eval_sets
from pipeline.eval.fashion_mnist import SET_NAME as FASHION_MNIST
from pipeline.eval.metrics import caption_words
from pipeline.eval.retrieval_text import is_text_retrieval_set
from pipeline.eval.scheduler import published_checkpoints
from pipeline.eval.sets import open_eval_set
from pipeline.eval.tasks import Encoder, captions_of, has_captions
from pipeline.layout import EVAL, REPORT, eval_results_dir, parse_step, tensorboard_dir
from pipeline.log import get_logger
from pipeline.models import load_published

log = get_logger(__name__)

IMAGES_DIR = "report"                  # the PNGs beside report.html

# Training panels: the title, then the patterns a scalar tag may match (first match wins per tag).
TRAINING_PANELS = [
    ("loss", re.compile(r"loss", re.I)),
    ("temperature", re.compile(r"temperature", re.I)),
    ("uniformity", re.compile(r"uniformity", re.I)),
    ("tolerance", re.compile(r"tolerance", re.I)),
]

Series = dict[str, list[tuple[int, float]]]        # tag → [(step, value)], sorted by step


@dataclass
class Figure:
    title: str
    file: Optional[str]          # PNG name under report/, None when there was nothing to draw
    note: str = ""


# ------------------------------------------------------------------------------------ sources
def read_scalar_events(run_dir: str, exclude: tuple[str, ...] = (EVAL,)) -> dict[str, list[Any]]:
    """Every scalar event (`.wall_time`, `.step`, `.value`) in the run's TensorBoard folders (except `exclude`d
    sub-folders), by tag, in the order written. Scalars only: histograms (isogclr's per-sample temperatures)
    and other summaries are not read as numbers. The one reader of a run's scalars (report, benchmarks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: dict[str, list[Any]] = defaultdict(list)
    with storage.local_copy(tensorboard_dir(run_dir)) as root:
        folders = sorted({p.parent for p in root.rglob("*tfevents*")
                          if not set(p.relative_to(root).parts[:-1]) & set(exclude)})
        for folder in folders:
            acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                events[tag].extend(acc.Scalars(tag))
    return dict(events)


def read_scalars(run_dir: str, exclude: tuple[str, ...] = (EVAL,)) -> Series:
    """Every scalar in the run's TensorBoard folders (except `exclude`d sub-folders), by tag, as (step, value)
    sorted by step. A step logged twice (a resumed run) keeps its last value."""
    values: dict[str, dict[int, float]] = defaultdict(dict)
    for tag, events in read_scalar_events(run_dir, exclude).items():
        for event in events:
            values[tag][event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in values.items()}


def read_results(run_dir: str) -> list[dict[str, Any]]:
    """The eval results of a run, oldest step first."""
    folder = eval_results_dir(run_dir)
    results = [storage.read_json(url) for url in storage.iter_files(folder, suffix=".json")
               if parse_step(url.rsplit("/", 1)[-1][: -len(".json")]) is not None]
    return sorted(results, key=lambda r: r["step"])


# ------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_training(series: Series, out: Path) -> Figure:
    """Loss, temperature, uniformity and tolerance vs step, one panel each."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    drawn = 0
    for ax, (title, pattern) in zip(axes.flat, TRAINING_PANELS):
        tags = [t for t in sorted(series) if pattern.search(t)]
        for tag in tags:
            steps, values = zip(*series[tag])
            ax.plot(steps, values, label=tag, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if tags:
            ax.legend(fontsize=8)
            drawn += 1
        else:
            ax.text(0.5, 0.5, f"no '{title}' scalars logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    note = "" if drawn else "No training scalars were found under run_dir/tensorboard."
    return Figure("Training", out.name, note)


def plot_eval(results: list[dict[str, Any]], out: Path) -> Figure:
    """Every eval metric vs step, one panel per eval set."""
    if not results:
        return Figure("Evaluation", None, "No evaluation results under run_dir/eval yet.")
    plt = _pyplot()
    by_set: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        for key, value in r["metrics"].items():
            set_name, _, metric = key.partition("/")
            by_set[set_name][metric].append((r["step"], value))
    cols = min(3, len(by_set))
    rows = math.ceil(len(by_set) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, (set_name, metrics) in zip(axes.flat, sorted(by_set.items())):
        for metric, points in sorted(metrics.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", label=metric)
        ax.set_title(set_name)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, framealpha=0.6, ncol=2)
    for ax in list(axes.flat)[len(by_set):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Figure("Evaluation metrics vs step", out.name)


def plot_similarity(images: list[np.ndarray], captions: list[str], sim: np.ndarray, out: Path,
                    subtitle: str) -> Figure:
    """Cosine similarity of n images (columns) × their n captions (rows); true pairs on the diagonal."""
    plt = _pyplot()
    n = len(images)
    fig = plt.figure(figsize=(3.5 + 0.85 * n, 1.5 + 0.85 * n))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, n], hspace=0.05)
    strip = fig.add_subplot(grid[0])
    strip.imshow(np.concatenate(images, axis=1), extent=(-0.5, n - 0.5, 0, 1), aspect="auto")
    strip.axis("off")
    strip.set_title(f"image × caption cosine similarity ({subtitle})")
    ax = fig.add_subplot(grid[1])
    shown = ax.imshow(sim.T, cmap="viridis", aspect="auto")
    middle = (sim.max() + sim.min()) / 2
    for i in range(n):
        for j in range(n):
            ax.text(i, j, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if sim[i, j] < middle else "black")
    ax.set_yticks(range(n), [_shorten(c, 45) for c in captions], fontsize=8)
    ax.set_xticks(range(n), [f"image {i}" for i in range(n)], fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.03, pad=0.02)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Figure("Image × caption similarity", out.name)


def plot_retrieval_examples(images: list[np.ndarray], captions: list[str], owner: np.ndarray, sim: np.ndarray,
                            queries: list[int], out: Path, subtitle: str, k: int = 3) -> Figure:
    """For a few query images, the top-k captions of the whole set (✓ marks one of its own captions)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(queries), 2, figsize=(10, 1.6 * len(queries)),
                             gridspec_kw={"width_ratios": [1, 6]}, squeeze=False)
    for row, q in enumerate(queries):
        axes[row, 0].imshow(images[q])
        axes[row, 0].axis("off")
        top = np.argsort(-sim[q])[:k]
        lines = [f"{'✓' if owner[t] == q else '✗'}  {sim[q, t]:.2f}  {_shorten(captions[t], 80)}" for t in top]
        if owner[top[0]] != q:
            lines.append(f"    (true: {_shorten(captions[int(np.flatnonzero(owner == q)[0])], 80)})")
        axes[row, 1].text(0, 0.5, "\n".join(lines), va="center", fontsize=10)
        axes[row, 1].axis("off")
    fig.suptitle(f"top-{k} captions per image ({subtitle})")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Figure(f"Retrieval examples: top-{k} captions per image", out.name)


def _shorten(text: str, n: int) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)      # an untrained decoder's bytes
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------- checkpoint views
def checkpoint_figures(run_dir: str, out_dir: Path, n: int = 8, queries: int = 4) -> list[Figure]:
    """Heat map and retrieval examples: the newest published checkpoint on the first retrieval set."""
    title = "Similarity and retrieval examples"
    checkpoints = published_checkpoints(run_dir)
    if not checkpoints:
        return [Figure(title, None, "No published checkpoint yet.")]
    published = load_published(checkpoints[-1].url)
    cfg = config_from_dict(published.manifest["config"], origin="checkpoint manifest")
    captioned = next((s for s in (open_eval_set(cfg.data.eval_dir, name) for name in eval_sets(cfg)
                                  if name != FASHION_MNIST and not is_text_retrieval_set(cfg.data.eval_dir, name))
                      if s.kind == "retrieval"), None)
    if captioned is None:
        return [Figure(title, None, "No retrieval set among eval.sets.")]
    samples = list(captioned.samples())
    captions, owner = captions_of(captioned, samples)
    encoder = Encoder(published, cfg.eval.batch_size)
    sim = (encoder.images(s.image for s in samples) @ encoder.texts(captions).T).numpy()
    images = [decode_image(s.image, 96) for s in samples[: max(n, queries)]]
    first = [owner.index(i) for i in range(min(n, len(samples)))]        # each image's first caption
    where = f"step {checkpoints[-1].step}, set {captioned.name}"
    return [
        plot_similarity(images[: len(first)], [captions[t] for t in first], sim[: len(first)][:, first],
                        out_dir / "similarity.png", where),
        plot_retrieval_examples(images, captions, np.array(owner), sim, list(range(min(queries, len(samples)))),
                                out_dir / "retrieval_examples.png", where),
    ]


CAPTION_SETS = ("captioning_heldout", "zeroshot_heldout", "relation")   # shown first when present: never trained on


def caption_figure(run_dir: str, out_dir: Path, n: int = 6) -> Optional[Figure]:
    """A captioning model's (CoCa's) generated captions beside a few images of each of its first two captioned
    sets (held-out combinations first), with their true captions; None for a model that does not caption."""
    checkpoints = published_checkpoints(run_dir)
    if not checkpoints:
        return None
    published = load_published(checkpoints[-1].url)
    if not published.can_caption:
        return None
    cfg = config_from_dict(published.manifest["config"], origin="checkpoint manifest")
    names = [x for x in eval_sets(cfg) if x != FASHION_MNIST and not is_text_retrieval_set(cfg.data.eval_dir, x)]
    names = [x for x in CAPTION_SETS if x in names] + [x for x in names if x not in CAPTION_SETS]
    sets = [s for s in (open_eval_set(cfg.data.eval_dir, x) for x in names) if has_captions(s)][:2]
    if not sets:
        return Figure("Generated captions", None, "No eval set with captions among eval.sets.")
    rows = []
    encoder = Encoder(published, cfg.eval.batch_size)
    for eval_set in sets:
        samples = [s for _, s in zip(range(n), eval_set.samples())]
        generated = published.generate(encoder.pixels([s.image for s in samples]), cfg.eval.caption_max_len,
                                       cfg.eval.caption_strategy)
        rows += [(eval_set.name, s, g) for s, g in zip(samples, generated)]
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 1.3 * len(rows)), gridspec_kw={"width_ratios": [1, 7]},
                             squeeze=False)
    for row, (name, sample, caption) in enumerate(rows):
        axes[row, 0].imshow(decode_image(sample.image, 96))
        axes[row, 0].axis("off")
        true = sample.caption_lines()
        mark = "✓" if caption_words(caption) in [caption_words(t) for t in true] else "✗"
        more = f" (+{len(true) - 1} more references)" if len(true) > 1 else ""
        axes[row, 1].text(0, 0.5, f"{mark} generated: {_shorten(caption, 80)}\n   true: {_shorten(true[0], 80)}"
                          f"{more}\n   ({name})", va="center", fontsize=10)
        axes[row, 1].axis("off")
    fig.suptitle(f"generated captions ({cfg.eval.caption_strategy}, step {checkpoints[-1].step})")
    fig.tight_layout()
    out = out_dir / "captions.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Figure("Generated captions", out.name)


# ------------------------------------------------------------------------------------- page
def final_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    return dict(sorted(results[-1]["metrics"].items())) if results else {}


def write_report(run_dir: str) -> str:
    """Render report.html (and its PNGs) for a run; returns the report's URL."""
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        out_dir = Path(tmp)
        results = read_results(run_dir)
        figures = [plot_training(read_scalars(run_dir), out_dir / "training.png"),
                   plot_eval(results, out_dir / "eval.png")]
        try:
            figures += checkpoint_figures(run_dir, out_dir)
        except Exception as e:                      # a broken checkpoint must not cost the whole report
            log.warning("report: similarity/retrieval figures skipped: %s: %s", type(e).__name__, e)
            figures.append(Figure("Similarity and retrieval examples", None, f"Skipped: {type(e).__name__}: {e}"))
        try:
            figures += [f for f in (caption_figure(run_dir, out_dir),) if f is not None]
        except Exception as e:                      # as above: a note, not a failed report
            log.warning("report: caption figure skipped: %s: %s", type(e).__name__, e)
            figures.append(Figure("Generated captions", None, f"Skipped: {type(e).__name__}: {e}"))
        page = _html(run_dir, figures, results)
        storage.upload_dir(out_dir, storage.join(run_dir, IMAGES_DIR))
    url = storage.join(run_dir, REPORT)
    storage.write_bytes(url, page.encode("utf-8"))
    return url


def _html(run_dir: str, figures: list[Figure], results: list[dict[str, Any]]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Run report: {esc(run_dir)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child{text-align:left}</style></head><body>",
             f"<h1>Run report</h1><p>run_dir: <code>{esc(run_dir)}</code></p>"]
    if results:
        last = results[-1]
        parts.append(f"<h2>Final metrics (step {last['step']})</h2><table><tr><th>metric</th><th>value</th></tr>")
        parts += [f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" for k, v in final_metrics(results).items()]
        parts.append(f"</table><p>checkpoint sha256: <code>{esc(str(last.get('sha256')))}</code>; "
                     f"evaluated in {last.get('timings', {}).get('total_s', float('nan')):.1f} s</p>")
    for f in figures:
        parts.append(f"<h2>{esc(f.title)}</h2>")
        if f.note:
            parts.append(f"<p><em>{esc(f.note)}</em></p>")
        if f.file:
            parts.append(f"<img src='{IMAGES_DIR}/{esc(f.file)}' alt='{esc(f.title)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
