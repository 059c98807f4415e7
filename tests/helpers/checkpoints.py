"""Resume checkpoint folders laid out the way `save_checkpoint` writes them, without a training run: for
tests of what reads them (damage checks, resume refusals)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from pipeline.config import Config
from pipeline.layout import checkpoint_url
from pipeline.train.integrity import file_digests, manifest

SHARD = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def write_checkpoint(run: str, step: int, cfg: Config, data_state: Optional[dict[str, Any]] = None,
                     with_manifest: bool = True) -> Path:
    """A complete checkpoint of `step` by 2 workers under ZeRO 2 with `cfg` in its meta: DeepSpeed files
    (random bytes) of two ranks, RNG states, the data state (default `{"step": step}`), meta; then its
    manifest (sizes and sha256 of every file) and COMPLETE."""
    folder = Path(checkpoint_url(run, step))
    files = {"deepspeed/mp_rank_00_model_states.pt": os.urandom(3000), SHARD: os.urandom(5000),
             "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(5000),
             "rng/rank_00000.json": b'{"torch": []}', "rng/rank_00001.json": b'{"torch": []}',
             "data_state.json": json.dumps(data_state or {"step": step}).encode(),
             "meta.json": json.dumps({"step": step, "samples_seen": cfg.train.global_batch * step, "world_size": 2,
                                      "zero_stage": 2, "params": {}, "config": cfg.to_dict()}).encode()}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    if with_manifest:
        (folder / "manifest.json").write_text(json.dumps(manifest(step, file_digests(folder))))
    (folder / "COMPLETE").write_text(json.dumps({"step": step}))
    return folder
