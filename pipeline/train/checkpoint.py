"""Checkpoints of a run: for exact resume (`checkpoints/`), for evaluation (`published/`), for Ray.

A resume checkpoint (`pipeline.layout` names its files) holds DeepSpeed's files (each rank uploads
its own), the data stream's position with all ranks merged (any world size resumes from it), each
rank's generator states, each rank's shard of the loss's per-sample state when it keeps one (isogclr's
temperatures, safetensors; any world size reads every shard and keeps its own ids), `meta.json`
(step, samples seen, world size, ZeRO stage, parameter shapes, the run config) and `manifest.json`
(every file's size and sha256, `integrity`); `COMPLETE` is last.

Each rank saves locally, uploads through fsspec (any `run_dir` URL), then rank 0 writes the manifest
and the marker and keeps the newest `checkpoint.keep`. Resume takes the newest complete folder whose
files match its manifest (a damaged one is named, logged and skipped for the one before), refuses one
from a different model, and restores every piece: on the same world size bit for bit; on another one
through DeepSpeed's universal checkpoint, which re-shards the ZeRO optimizer state (made once, kept in
the checkpoint's `universal/`).
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline import storage
from pipeline.config import Config, ConfigError
from pipeline.data import Tokenizer
from pipeline.distributed import all_gather_objects, barrier, broadcast_from_rank0, get_rank, get_world_size
from pipeline.layout import (
    COMPLETE,
    DATA_STATE,
    DEEPSPEED,
    MANIFEST,
    META,
    UNIVERSAL,
    checkpoint_url,
    checkpoints_dir,
    parse_step,
    published_url,
    rng_file,
    sample_state_file,
)
from pipeline.log import get_logger
from pipeline.models import save_published
from pipeline.train.engine import Engine, convert_to_universal
from pipeline.train.integrity import DamagedCheckpoint, digest, dumps, file_digests, manifest, problems
from pipeline.train.lease import holder as lease_holder

log = get_logger(__name__)


@dataclass
class TrainState:
    """The loop's counters: optimizer steps taken and samples consumed."""
    step: int = 0
    samples_seen: int = 0

    def advance(self, global_batch: int) -> None:
        self.step += 1
        self.samples_seen += global_batch


def complete_steps(run_dir: str) -> list[int]:
    """Steps of the complete resume checkpoints in `run_dir`, ascending."""
    names = storage.complete_subdirs(checkpoints_dir(run_dir))
    return sorted(step for n in names if (step := parse_step(n)) is not None)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """URL of the newest complete resume checkpoint, or None."""
    steps = complete_steps(run_dir)
    return checkpoint_url(run_dir, steps[-1]) if steps else None


# ------------------------------------------------------------------------------------ saving
def save_checkpoint(engine: Engine, cfg: Config, state: TrainState, data_state: dict[str, Any],
                    tokenizer: Tokenizer, sample_state: Optional[dict[str, torch.Tensor]] = None) -> str:
    """Write the resume checkpoint of `state.step` (a collective: every rank calls it). Returns its URL.
    `sample_state`: this rank's shard of the loss's per-sample state (tensors), when the loss keeps one."""
    rank, url = get_rank(), checkpoint_url(cfg.run_dir, state.step)
    if rank == 0:
        storage.remove(url)                  # the leftovers of an interrupted attempt at this step
    barrier()
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        needed = engine.checkpoint_bytes()
        storage.require_space(tmp, needed)
        with storage.space_named(tmp, needed):
            engine.save(tmp)
        storage.write_json(str(Path(tmp, rng_file(rank))), rng_state())
        if sample_state is not None:
            path = Path(tmp, sample_state_file(rank))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(save_safetensors({k: v.contiguous().cpu() for k, v in sample_state.items()}))
        files = file_digests(tmp)
        storage.upload_dir(tmp, url)
    everyone = all_gather_objects(files)      # also waits until every rank's files are uploaded
    if rank == 0:
        files = {rel: entry for ranks_files in everyone for rel, entry in ranks_files.items()}
        meta = {"step": state.step, "samples_seen": state.samples_seen, "world_size": get_world_size(),
                "zero_stage": engine.zero_stage, "params": engine.param_shapes(), "config": cfg.to_dict(),
                "tokenizer_sha256": tokenizer_sha256(tokenizer)}
        for name, obj in ((DATA_STATE, data_state), (META, meta)):
            data = dumps(obj)
            storage.write_bytes(storage.join(url, name), data)
            files[name] = digest(data)
        storage.write_bytes(storage.join(url, MANIFEST), dumps(manifest(state.step, files)))
        storage.write_json(storage.join(url, COMPLETE), {"step": state.step})
        prune(cfg.run_dir, cfg.checkpoint.keep)
    barrier()
    return url


def prune(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and unfinished ones below them."""
    complete = complete_steps(run_dir)
    if not complete:
        return
    kept = set(complete[-keep:])
    root = checkpoints_dir(run_dir)
    for name in storage.listdir(root):
        step = parse_step(name)
        if step is not None and step not in kept and step < complete[-1]:
            storage.remove(storage.join(root, name))


def publish(engine: Engine, tokenizer: Tokenizer, cfg: Config, state: TrainState) -> None:
    """Publish consolidated weights for evaluation (collective under ZeRO-3; rank 0 writes).

    A step already published (a resumed run replaying it) is left alone: its readers may be at
    work, and an exact resume reproduces the same weights anyway.
    """
    url = published_url(cfg.run_dir, state.step)
    if broadcast_from_rank0(storage.is_complete(url)) or (get_rank() != 0 and engine.zero_stage != 3):
        return
    weights = engine.consolidated_state(rank0_only=True)
    if get_rank() == 0:
        save_published(engine.module, tokenizer, url, state.step, samples_seen=state.samples_seen,
                       run_config=cfg, state_dict=weights)
        log.debug("published %s", url)


def progress_key(run_dir: str) -> bytes:
    """Where, in Ray's key-value store, rank 0 leaves the last step it finished."""
    return f"contrast/step/{run_dir}".encode()


def report_progress(run_dir: str, step: int) -> None:
    """Rank 0 leaves the step it finished where the driver can read it (its interrupt message)."""
    from ray.experimental import internal_kv
    if get_rank() == 0 and internal_kv._internal_kv_initialized():
        internal_kv._internal_kv_put(progress_key(run_dir), str(step).encode(), overwrite=True)


# ---------------------------------------------------------------------------------- inventory
@dataclass
class CheckpointStatus:
    """One resume checkpoint folder as `contrast checkpoints` shows it."""
    step: int
    url: str
    state: str                       # complete | damaged | in progress | unfinished
    detail: str = ""                 # what is wrong (damaged), or what an unfinished folder is
    world_size: Optional[int] = None
    zero_stage: Optional[int] = None
    bytes: int = 0
    universal: bool = False          # DeepSpeed's universal form kept beside it


def checkpoint_statuses(run_dir: str, hashes: bool = True) -> list[CheckpointStatus]:
    """Every resume checkpoint folder of `run_dir`, ascending: complete (every file matches its manifest),
    damaged (what is wrong), in progress (no `COMPLETE` yet while a driver holds the run_dir's lease),
    unfinished (no `COMPLETE`, nobody training: its writer stopped; ignored, then replaced or pruned)."""
    holder = lease_holder(run_dir)
    out = []
    for name in storage.listdir(checkpoints_dir(run_dir)):
        step = parse_step(name)
        if step is None:
            continue
        url = checkpoint_url(run_dir, step)
        status = CheckpointStatus(step, url, "in progress" if holder is not None and holder.alive() else "unfinished",
                                  bytes=folder_bytes(url), universal=storage.is_complete(storage.join(url, UNIVERSAL)))
        if storage.is_complete(url):
            wrong = problems(url, hashes)
            status.state, status.detail = ("damaged", "; ".join(wrong)) if wrong else ("complete", "")
            if not wrong:
                meta = storage.read_json(storage.join(url, META))
                status.world_size, status.zero_stage = meta["world_size"], meta["zero_stage"]
        elif status.state == "unfinished":
            status.detail = "its writer stopped before COMPLETE: not used"
        out.append(status)
    return out


def folder_bytes(url: str) -> int:
    fs, path = storage.fresh(url)
    return sum(int(info.get("size") or 0) for info in fs.find(path, detail=True).values()) if fs.exists(path) else 0


# ----------------------------------------------------------------------------------- resuming
@dataclass
class Resume:
    """A checkpoint chosen for resuming, its JSON parts read (the DeepSpeed part loads in `restore`);
    `damaged`: the newer complete checkpoints skipped because their files do not match their manifest."""
    url: str
    meta: dict[str, Any]
    data_state: dict[str, Any]
    damaged: list[str] = field(default_factory=list)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """The run continues with the tokenizer it was trained with: other ids would mean other tokens."""
        saved = self.meta.get("tokenizer_sha256")
        if saved is None or saved == tokenizer_sha256(tokenizer):
            return
        if tokenizer.without_start is not None and saved == tokenizer_sha256(tokenizer.without_start):
            raise ConfigError(f"checkpoint {self.url} is a CoCa run from before its tokenizer put `<start>` before "
                              "every caption (one more id: the decoder now predicts a caption's first word too); "
                              "its token embeddings and decoder have one row fewer, and its decoder never saw the "
                              "token. It cannot be resumed with this version: start a new run_dir (or finish it "
                              "with the version that wrote it)")
        raise ConfigError(f"checkpoint {self.url} was trained with another tokenizer (sha256 {saved[:12]}…, now "
                          f"{tokenizer_sha256(tokenizer)[:12]}…): the same ids would mean other tokens. Resume "
                          "with the tokenizer of that run (data.tokenizer), or use a new run_dir")

    def resharded(self, world_size: int) -> bool:
        """Whether resuming on `world_size` workers re-shards ZeRO-partitioned optimizer state."""
        return self.meta["world_size"] != world_size and self.meta["zero_stage"] > 0

    def sample_state(self) -> list[dict[str, torch.Tensor]]:
        """Every saved rank's shard of the loss's per-sample state (none when the loss kept none): the caller
        keeps the ids it owns at its world size."""
        shards = []
        for rank in range(self.meta["world_size"]):
            url = storage.join(self.url, sample_state_file(rank))
            if storage.exists(url):
                shards.append(load_safetensors(storage.read_bytes(url)))
        return shards

    def restore(self, engine: Engine, tokenizer: Tokenizer) -> TrainState:
        """Load model, optimizer, scheduler and (same world size) this rank's RNG; returns the counters to
        continue from. `engine` must have been built for DeepSpeed's universal form when `resharded`."""
        self.check_tokenizer(tokenizer)
        check_same_model(self.meta, engine, self.url)
        world, saved = get_world_size(), self.meta["world_size"]
        if self.resharded(world):
            with _universal_copy(self.url, self.meta["step"]) as local:
                engine.load(local, universal=True)
        else:
            with _local_copy(self.url, get_rank() if saved == world else None) as local:
                engine.load(local)
        if saved == world:
            set_rng_state(storage.read_json(storage.join(self.url, rng_file(get_rank()))))
        how = "" if saved == world else f", written by {saved} workers, continued on {world}"
        log.info("resumed from %s (step %d)%s", self.url, self.meta["step"], how)
        return TrainState(self.meta["step"], self.meta["samples_seen"])


def find_resume(cfg: Config, hashes: bool = True) -> Optional[Resume]:
    """The checkpoint to continue from (the newest complete one whose files match its manifest) or None;
    refuses what cannot continue.

    A damaged checkpoint is named with what is wrong, logged and skipped: the one before it is used
    (`Resume.damaged` lists the skipped ones). When every complete checkpoint is damaged, nothing is
    silently restarted: `DamagedCheckpoint` says so. `hashes` False checks sizes only (a quick look).
    Workers always continue what is there: `train.resume=never` is enforced by the driver before the
    run starts (`refuse_existing`), so a worker restarted after a failure resumes its own run.
    """
    damaged: list[tuple[str, list[str]]] = []
    for step in reversed(complete_steps(cfg.run_dir)):
        url = checkpoint_url(cfg.run_dir, step)
        wrong = problems(url, hashes)
        if wrong:
            log.warning("checkpoint %s is damaged, skipped: %s", url, "; ".join(wrong))
            damaged.append((url, wrong))
            continue
        meta = storage.read_json(storage.join(url, META))
        check_same_config(meta, cfg, url)
        check_same_layout(meta, cfg, url)
        if damaged:
            log.warning("resuming from %s, the newest undamaged checkpoint (skipped: %s)", url,
                        ", ".join(u for u, _ in damaged))
        return Resume(url, meta, storage.read_json(storage.join(url, DATA_STATE)), [u for u, _ in damaged])
    if damaged:
        raise DamagedCheckpoint(
            f"no usable checkpoint in {cfg.run_dir}: every complete one is damaged:\n"
            + "\n".join(f"  - {u}: {'; '.join(w)}" for u, w in damaged)
            + "\nrestore them from a copy, or move them away to start the run again (`contrast checkpoints "
            f"{cfg.run_dir}` lists them)")
    return None


def agreed_resume(cfg: Config) -> Optional[Resume]:
    """`find_resume` on rank 0 (every file's sha256 read once), its answer or its refusal on every rank:
    all ranks load the same checkpoint (a collective)."""
    outcome: Any = None
    if get_rank() == 0:
        try:
            outcome = find_resume(cfg)
        except (ConfigError, DamagedCheckpoint) as e:
            outcome = e
    outcome = broadcast_from_rank0(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def refuse_existing(cfg: Config) -> None:
    """For `train.resume=never`: a run_dir that already holds checkpoints is refused, not mixed into."""
    url = latest_checkpoint(cfg.run_dir)
    if url is not None:
        raise ConfigError(
            f"train.resume = 'never' but run_dir {cfg.run_dir} already holds checkpoints (newest: {url}): a fresh "
            "run there would mix two runs' checkpoints, published weights and TensorBoard curves. Choose a new "
            "run_dir, delete the old one, or use train.resume=auto")


def model_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """What fixes the model's parameters: the model section and the input sizes."""
    return {"model": cfg["model"], "data.image_size": cfg["data"]["image_size"],
            "data.context_length": cfg["data"]["context_length"]}


def check_same_config(meta: dict[str, Any], cfg: Config, url: str) -> None:
    saved, now = _flat(model_identity(meta["config"])), _flat(model_identity(cfg.to_dict()))
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError(f"run_dir {cfg.run_dir} holds checkpoints of a different model ({url}):\n  - "
                          + "\n  - ".join(diff) + "\nuse a new run_dir, or the model settings of that run")
    was = meta["config"]["loss"]["name"]
    if was != cfg.loss.name and not cfg.train.allow_loss_change:
        raise ConfigError(f"run_dir {cfg.run_dir} was trained with loss.name = {was!r} ({url}); continuing with "
                          f"{cfg.loss.name!r} changes what the run optimises. Use a new run_dir, or set "
                          "train.allow_loss_change=true to continue it with the new loss on purpose")


def check_same_model(meta: dict[str, Any], engine: Engine, url: str) -> None:
    saved, now = meta["params"], engine.param_shapes()
    diff = [f"{k}: {saved.get(k)} in the checkpoint, {now.get(k)} now" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError(f"checkpoint {url} does not fit this model (parameter shapes differ: "
                          + "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
                          + "). Was the tokenizer (vocabulary) or the loss (logit bias) changed?")


def check_same_layout(meta: dict[str, Any], cfg: Config, url: str) -> None:
    """Same ZeRO stage (any world size: a change re-shards the optimizer state through DeepSpeed's
    universal checkpoint; the data stream continues the same batches on any world size dividing its
    virtual streams, which the stream checks when it opens)."""
    stage = int((cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0))
    if meta["zero_stage"] != stage:
        raise ConfigError(f"checkpoint {url} was written under ZeRO stage {meta['zero_stage']}, this run uses "
                          f"stage {stage}: DeepSpeed cannot load one into the other. Resume with "
                          f"deepspeed.zero_optimization.stage={meta['zero_stage']}")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def _local_copy(url: str, rank: Optional[int]) -> Iterator[str]:
    """The checkpoint as a local folder: itself when local, else a download of the DeepSpeed files this
    rank needs (`rank` None: every rank's ZeRO files)."""
    if storage.is_local(url):
        yield storage.local_path(url)
        return
    src = storage.join(url, DEEPSPEED)
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        Path(tmp, DEEPSPEED).mkdir()
        for name in storage.listdir(src):
            owner = re.search(r"zero_pp_rank_(\d+)_", name)
            if rank is None or owner is None or int(owner.group(1)) == rank:
                Path(tmp, DEEPSPEED, name).write_bytes(storage.read_bytes(storage.join(src, name)))
        yield tmp


@contextlib.contextmanager
def _universal_copy(url: str, step: int) -> Iterator[str]:
    """A local folder holding the checkpoint's universal form in `universal/` (a collective).

    Rank 0 converts the checkpoint once and publishes the result beside its files, with its own
    manifest in the `COMPLETE` marker; a later resize reuses it after checking it."""
    target = storage.join(url, UNIVERSAL)
    if get_rank() == 0 and not (storage.is_complete(target) and not problems(target, listing=COMPLETE)):
        with _local_copy(url, None) as local, tempfile.TemporaryDirectory(prefix="universal-") as out:
            convert_to_universal(local, out)
            storage.remove(target)
            done = Path(out, UNIVERSAL)
            storage.publish_dir(done, target, marker=manifest(step, file_digests(done)))
        log.info("converted %s to DeepSpeed's universal form (%s)", url, target)
    barrier()
    if storage.is_local(url):
        yield storage.local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="resume-universal-") as tmp:
        storage.download_dir(target, Path(tmp, UNIVERSAL))
        yield tmp


# ---------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's generator states as JSON (no pickle): torch CPU/CUDA, numpy, random."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else None,
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "random": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()
