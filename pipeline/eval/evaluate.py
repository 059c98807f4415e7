"""Evaluate one published checkpoint on the configured sets; write its result and TensorBoard scalars.

`evaluate_checkpoint` reads only the published artifact (safetensors, verified against the manifest's
sha256) and the eval sets; `write_result` puts ``run_dir/eval/step_N.json`` (written atomically)
and scalars ``eval/<set>/<metric>`` at the checkpoint's step into the eval stage's own TensorBoard
folder, ``run_dir/tensorboard/eval`` (no training rank writes there).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Optional

from pipeline import storage
from pipeline.config import Config, config_from_dict
from pipeline.eval.fashion_mnist import SET_NAME as FASHION_MNIST
from pipeline.eval.fashion_mnist import ensure_fashion_mnist
from pipeline.eval.retrieval_text import evaluate_text_retrieval, is_text_retrieval_set, open_text_retrieval_set
from pipeline.eval.sets import EvalSetError, list_eval_sets, open_eval_set
from pipeline.eval.tasks import Encoder, captioning, has_captions, run_task
from pipeline.layout import eval_result_url, eval_tensorboard_dir, run_dir_of_published, step_name
from pipeline.log import get_logger
from pipeline.models import CheckpointError, load_published

log = get_logger(__name__)

HEADLINE = ("/acc1", "_R@1", "/accuracy", "/nDCG@10", "/caption_cider")  # the metrics worth a console line


def run_dir_of(checkpoint_url: str) -> str:
    """``run_dir/published/step_N`` → ``run_dir``."""
    run_dir = run_dir_of_published(checkpoint_url)
    if run_dir is None:
        raise CheckpointError(f"{checkpoint_url}: expected a published checkpoint folder RUN_DIR/published/step_N")
    return run_dir


def eval_sets(cfg: Config) -> list[str]:
    """The configured set names, or every set found under `data.eval_dir` when none are listed."""
    if cfg.eval.sets:
        return list(cfg.eval.sets)
    if not cfg.data.eval_dir:
        raise EvalSetError("nothing to evaluate: set data.eval_dir (and optionally eval.sets)")
    return list_eval_sets(cfg.data.eval_dir)


def evaluate_checkpoint(checkpoint_url: str, cfg: Optional[Config] = None) -> dict[str, Any]:
    """Every metric of every configured set for one published checkpoint, with its hash and timings.

    `cfg` chooses the sets (`data.eval_dir`, `eval.*`); by default the run config stored in the
    checkpoint's manifest. Raises CheckpointError for an unfinished or corrupt checkpoint and
    EvalSetError for a missing or malformed set.
    """
    started = time.perf_counter()
    published = load_published(checkpoint_url)
    manifest = published.manifest
    cfg = cfg or config_from_dict(manifest["config"], origin=f"{checkpoint_url} manifest")
    timings = {"load_s": time.perf_counter() - started}
    encoder = Encoder(published, cfg.eval.batch_size)
    metrics: dict[str, float] = {}
    for name in eval_sets(cfg):
        t0 = time.perf_counter()
        if name == FASHION_MNIST:
            ensure_fashion_mnist(cfg.data.eval_dir)
        if is_text_retrieval_set(cfg.data.eval_dir, name):
            results = evaluate_text_retrieval(published, open_text_retrieval_set(cfg.data.eval_dir, name),
                                              cfg.eval.batch_size)
        else:
            eval_set = open_eval_set(cfg.data.eval_dir, name)
            results = run_task(encoder, eval_set, cfg.eval.linear_probe_train_fraction, cfg.seed)
            if cfg.eval.captioning and published.can_caption and has_captions(eval_set):
                results.update(captioning(encoder, eval_set, cfg.eval.caption_max_len, cfg.eval.caption_strategy,
                                          cfg.eval.caption_samples))
        for metric, value in results.items():
            metrics[f"{name}/{metric}"] = value
        timings[f"{name}_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    return {
        "step": manifest["step"],
        "samples_seen": manifest.get("samples_seen"),
        "checkpoint": checkpoint_url,
        "sha256": manifest["sha256"],
        "metrics": metrics,
        "timings": timings,
        "evaluated_at": time.time(),
        "host": socket.gethostname(),
    }


def write_result(run_dir: str, result: dict[str, Any]) -> str:
    """Write the result JSON (atomically) and its TensorBoard scalars; returns the JSON's URL."""
    write_scalars(run_dir, result["step"], result["metrics"])
    url = eval_result_url(run_dir, result["step"])
    storage.write_json(url, result)
    headline = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items() if k.endswith(HEADLINE))
    log.info("step %d evaluated (%.1f s): %s; all %d metrics in %s", result["step"], result["timings"]["total_s"],
             headline, len(result["metrics"]), url)
    return url


def write_scalars(run_dir: str, step: int, metrics: dict[str, float]) -> None:
    """Scalars ``eval/<name>`` at `step` in an event file of their own under run_dir/tensorboard/eval.

    One file per evaluation: writers in several processes never share a file. On object stores the
    file is written locally, then uploaded whole.
    """
    from torch.utils.tensorboard import SummaryWriter

    suffix = f".{step_name(step)}.{os.getpid()}"
    with storage.staged_dir(eval_tensorboard_dir(run_dir)) as log_dir:
        writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=suffix)
        for name, value in sorted(metrics.items()):
            writer.add_scalar(f"eval/{name}", value, global_step=step)
        writer.close()


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-column table: set/metric, value."""
    if not metrics:
        return "(no evaluation results)"
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:8.4f}" for k, v in metrics.items())
