"""Run a function in W spawned processes joined in a gloo group (CPU), and collect their results."""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.net import free_port


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:                                          # the group's start too: its error (a port taken) is reported
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 900.0) -> list[Any]:
    """Call `fn(rank, world_size, *args)` in `world_size` gloo processes; return results by rank.

    `fn` must be importable (defined at module level). A failure in any rank fails the caller with
    that rank's traceback; ranks still running after `timeout_s` (a collective hang) are killed and
    fail the caller too.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_entry, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size, join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    raise AssertionError(f"the {world_size} ranks did not finish within {timeout_s:.0f} s: "
                                         "a collective that not every rank called?")
        except AssertionError:
            raise
        except Exception:
            errors = []
            for r in range(world_size):
                path = os.path.join(out_dir, f"{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"rank {r}:\n{rec['error']}")
            raise AssertionError("\n".join(errors) or "a rank failed") from None
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)["result"]
                for r in range(world_size)]
