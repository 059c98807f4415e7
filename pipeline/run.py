"""`contrast run CONFIG`: the whole pipeline on one config — data if missing, train, eval, report.

1. Synthesise the data when ``data.train_urls`` names a synthetic dataset that is not there yet
   (``data.synth.samples`` > 0): ``D/train`` is written with the eval sets beside it in ``D/eval``.
2. Train with `pipeline.orchestrate.train`, which runs the scheduled evaluation as a Ray actor
   beside the workers (``eval.schedule``) and drains it at the end.
3. Evaluate anything the policy still wants (e.g. when the actor ran out of time); claims make this
   a no-op for checkpoints already done.
4. Write the report and print its path and a table of the final metrics.
"""
from __future__ import annotations

import os
import posixpath
import time
from typing import Any

from pipeline import storage
from pipeline.config import Config, ConfigError
from pipeline.data import synthesize
from pipeline.eval.fashion_mnist import SET_NAME as FASHION_MNIST
from pipeline.eval.report import final_metrics, read_results, write_report
from pipeline.eval.retrieval_text import is_text_retrieval_set
from pipeline.eval.scheduler import Watcher
from pipeline.eval.sets import is_eval_set
from pipeline.layout import DATASET_EVAL, DATASET_TRAIN, MANIFEST
from pipeline.log import get_logger
from pipeline.orchestrate import absolute_paths, train
from pipeline.train.lease import hold

log = get_logger(__name__)


def synth_root(cfg: Config) -> str:
    """The folder `contrast data synth` writes for this config: the parent of ``data.train_urls[0]``."""
    urls = cfg.data.train_urls
    if len(urls) != 1 or posixpath.basename(urls[0].rstrip("/")) != DATASET_TRAIN:
        raise ConfigError(f"data.train_urls = {urls} (from {cfg.origin('data.train_urls')}) has no shards and "
                          "cannot be synthesised: expected one folder named 'train' (e.g. data/synth/train)")
    return posixpath.dirname(urls[0].rstrip("/")) or "."


def _missing_data(cfg: Config) -> list[str]:
    """Dataset folders and eval sets the run needs that are not whole yet (their manifest, or an eval
    set's nshards.txt, is written last)."""
    missing = [u for u in cfg.data.train_urls if "{" not in u and not u.endswith(".tar") and not u.endswith(MANIFEST)
               and not storage.exists(storage.join(u, MANIFEST))]
    if cfg.eval.schedule != "off" and cfg.data.eval_dir:
        sets = [s for s in cfg.eval.sets if s != FASHION_MNIST and not is_text_retrieval_set(cfg.data.eval_dir, s)]
        missing += [u for u in (storage.join(cfg.data.eval_dir, s) for s in sets) if not is_eval_set(u)]
    return missing


def ensure_data(cfg: Config) -> None:
    """Synthesise the dataset when it is missing and the config says how (``data.synth.samples``)."""
    missing = _missing_data(cfg)
    if not missing:
        return
    synth = cfg.data.synth
    if synth.samples <= 0:
        raise ConfigError(f"no dataset at {', '.join(missing)}: write it with `contrast data synth` / `contrast data "
                          "pack`, or set data.synth.samples to have `contrast run` synthesise one")
    root = synth_root(cfg)
    eval_dir = storage.join(root, DATASET_EVAL)
    if cfg.data.eval_dir is None:
        cfg.data.eval_dir = eval_dir
    elif eval_dir != cfg.data.eval_dir.rstrip("/"):
        raise ConfigError(f"data.eval_dir = {cfg.data.eval_dir}: synthesised eval sets go to {eval_dir}; "
                          "point data.eval_dir there")
    log.info("synthesising %d training samples (+%d per eval set) into %s", synth.samples, synth.eval_samples, root)
    started = time.perf_counter()
    synthesize(root, synth.samples, eval_samples=synth.eval_samples, image_size=synth.image_size,
               shard_size=synth.shard_size, seed=synth.seed, workers=os.cpu_count() or 1,
               progress=cfg.logging.progress, captions=synth.captions)
    log.info("data ready in %.0f s", time.perf_counter() - started)


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Data → train (with scheduled eval) → catch-up eval → report. Returns the report URL, the final metrics and,
    when step 0 was evaluated (`checkpoint.publish_initial`), the initial ones."""
    started = time.perf_counter()
    cfg = absolute_paths(cfg)
    with hold(cfg.run_dir, cfg.cluster.lease_ttl_s, "contrast run"):    # refused at once if another trains there
        ensure_data(cfg)
        train(cfg)
        if cfg.eval.schedule != "off":
            outcome = Watcher(cfg.run_dir, cfg).drain()
            if outcome.evaluated:
                log.info("evaluated after training: steps %s", outcome.evaluated)
    report = write_report(cfg.run_dir)
    results = read_results(cfg.run_dir)
    initial = [r for r in results[:1] if r["step"] == 0 and len(results) > 1]
    return {"report": report, "step": results[-1]["step"] if results else None, "metrics": final_metrics(results),
            "initial": final_metrics(initial), "seconds": time.perf_counter() - started}
