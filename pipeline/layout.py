"""Where every artifact lives: the run-dir and dataset layouts, and the names the stages share.

The stages talk only through these artifacts, so their names are defined once, here:

    run_dir/
        checkpoints/step_{N:08d}/      resume checkpoints (the training stage)
            deepspeed/                 DeepSpeed's own files, one set per rank
            data_state.json            the data stream's position, all ranks merged
            rng/rank_{r:05d}.json      each rank's generator states
            meta.json                  step, samples, world size, ZeRO stage, shapes, the run config
            manifest.json              every file above with its size and sha256
            COMPLETE                   written last
            universal/                 DeepSpeed's universal form, made when resuming on another world size
        published/step_{N:08d}/        what evaluation and export read
            model.safetensors, tokenizer.json, manifest.json, then COMPLETE
        eval/step_{N:08d}.json         one evaluation result
        eval/claims/                   who evaluates what (exactly-once claims)
        tensorboard/                   training scalars; tensorboard/eval/ the eval stage's own
        progress.json                  the newest logged step: loss, samples/s, ETA, data read per source
        events/{ms}-{kind}.json        attempts started, failures, stops (what `contrast status` lists)
        ray/train-{time}/              Ray Train's own storage: only its check that every node sees run_dir
        lease/{generation:08d}.json    who trains into this run_dir now (one writer at a time)
        report.html

    dataset/                           written by `contrast data pack` (or synth's train/)
        NNNNN.tar ... manifest.json tokenizer.json
    eval_dir/SET/                      an eval set in CLIP_benchmark's local WebDataset layout:
        test/0.tar ... nshards.txt     the scored split (shards numbered from 0, their count in nshards.txt)
        train/                         optional, the same way: the linear probe's training split
        classnames.txt                 zero-shot: line i names class i (labels in KEY.cls)
        zeroshot_classification_templates.txt, dataset_type.txt, tokenizer.json
    eval_dir/SET/ (our first layout)   shards and manifest.json beside classnames.txt and templates
    eval_dir/SET/ (text retrieval)     a BEIR text set: queries.jsonl, corpus.jsonl, qrels/test.tsv
    synth/train/, synth/eval/SET/      what `contrast data synth` writes

A folder holding `COMPLETE` is finished; without it, it does not exist for any reader.
This module imports nothing from the package: every layer may use it.
"""
from __future__ import annotations

import posixpath
import re
from typing import Optional

TOWERS = ("image", "text")                 # the dual encoder's towers, in the order they are encoded

# ---------------------------------------------------------------------------------- markers, files
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"                 # a dataset's shard list, or a published checkpoint's description
TOKENIZER = "tokenizer.json"
WEIGHTS = "model.safetensors"
META = "meta.json"
DATA_STATE = "data_state.json"
DEEPSPEED = "deepspeed"
UNIVERSAL = "universal"                    # a checkpoint's optimizer state re-shardable to any world size
RNG = "rng"
SAMPLE_STATE = "sample_state"              # a loss's per-sample state (isogclr), one shard per rank
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
NSHARDS = "nshards.txt"                    # CLIP_benchmark: a split's shard count (shards 0.tar .. N-1.tar)
DATASET_TYPE = "dataset_type.txt"          # CLIP_benchmark: classification (when absent), retrieval, multilabel
REPORT = "report.html"
BEIR_QUERIES = "queries.jsonl"             # a BEIR-style text retrieval set: {"_id", "text"} a line
BEIR_CORPUS = "corpus.jsonl"               # {"_id", "title", "text"} a line
BEIR_QRELS = "qrels/test.tsv"              # query-id, corpus-id, score (a header line first)

# ---------------------------------------------------------------------------------- run_dir folders
CHECKPOINTS = "checkpoints"
PUBLISHED = "published"
EVAL = "eval"
CLAIMS = "claims"
TENSORBOARD = "tensorboard"
RAY = "ray"
LEASE = "lease"
PROGRESS = "progress.json"
EVENTS = "events"

# ------------------------------------------------- a synthesised dataset's folders (`contrast data synth`)
DATASET_TRAIN = "train"
DATASET_EVAL = "eval"

# ------------------------------------------------------- an eval set's splits (CLIP_benchmark's names)
EVAL_TEST = "test"                         # scored by every task
EVAL_TRAIN = "train"                       # fits the linear probe when present
EVAL_SPLITS = (EVAL_TEST, EVAL_TRAIN)

_STEP = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    """The folder (or file stem) of a step: ``step_00000300``."""
    return f"step_{step:08d}"


def parse_step(name: str) -> Optional[int]:
    """The step of a `step_name`, or None for any other name."""
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def _join(base: str, *parts: str) -> str:
    """URL join without the storage layer (a local path keeps its separators: they are '/' on POSIX)."""
    return posixpath.join(str(base), *parts)


def numbered_shard(index: int) -> str:
    """A shard's name in CLIP_benchmark's layout: ``0.tar``, ``1.tar``, … (no padding: it reads ``{0..N-1}.tar``)."""
    return f"{index}.tar"


def eval_split_url(set_url: str, split: str) -> str:
    """``SET/test`` or ``SET/train``."""
    return _join(set_url, split)


def checkpoints_dir(run_dir: str) -> str:
    return _join(run_dir, CHECKPOINTS)


def checkpoint_url(run_dir: str, step: int) -> str:
    return _join(run_dir, CHECKPOINTS, step_name(step))


def published_root(run_dir: str) -> str:
    return _join(run_dir, PUBLISHED)


def published_url(run_dir: str, step: int) -> str:
    return _join(run_dir, PUBLISHED, step_name(step))


def eval_result_url(run_dir: str, step: int) -> str:
    return _join(run_dir, EVAL, step_name(step) + ".json")


def eval_results_dir(run_dir: str) -> str:
    return _join(run_dir, EVAL)


def claims_dir(run_dir: str) -> str:
    return _join(run_dir, EVAL, CLAIMS)


def tensorboard_dir(run_dir: str) -> str:
    """Training's event files (rank 0 writes here)."""
    return _join(run_dir, TENSORBOARD)


def eval_tensorboard_dir(run_dir: str) -> str:
    """The eval stage's event files, apart from training's (no training rank writes there)."""
    return _join(run_dir, TENSORBOARD, EVAL)


def progress_url(run_dir: str) -> str:
    return _join(run_dir, PROGRESS)


def events_dir(run_dir: str) -> str:
    return _join(run_dir, EVENTS)


def lease_dir(run_dir: str) -> str:
    return _join(run_dir, LEASE)


def lease_file(generation: int) -> str:
    """A lease generation's file name: ``00000003.json``."""
    return f"{generation:08d}.json"


def parse_lease_file(name: str) -> Optional[int]:
    """The generation of a `lease_file` name, or None for any other name."""
    m = re.match(r"^(\d{8})\.json$", name)
    return int(m.group(1)) if m else None


def rng_file(rank: int) -> str:
    """A rank's generator states, relative to its checkpoint folder."""
    return _join(RNG, f"rank_{rank:05d}.json")


def sample_state_file(rank: int) -> str:
    """A rank's shard of the loss's per-sample state, relative to its checkpoint folder."""
    return _join(SAMPLE_STATE, f"rank_{rank:05d}.safetensors")


def run_dir_of_published(published: str) -> Optional[str]:
    """``run_dir/published/step_N`` → ``run_dir``; None for a folder not laid out that way."""
    parts = str(published).rstrip("/").rsplit("/", 2)
    if len(parts) < 3 or parts[1] != PUBLISHED or parse_step(parts[2]) is None:
        return None
    return parts[0] or "/"
