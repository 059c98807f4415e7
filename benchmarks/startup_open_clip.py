"""One torchrun process of open_clip's own trainer on CPU, for `benchmarks/startup.py`'s open_clip side.

Runs in the open_clip side venv (`../shared/tools/make-open-clip-venv.sh`), never in the project's:

    torchrun --standalone --nproc_per_node 2 benchmarks/startup_open_clip.py MODEL_CONFIG_DIR ARGS_JSON

What it adds around `open_clip_train.main.main(ARGS)`, and why:
  - ARGS (open_clip's command line) come as a JSON list in a file: on torchrun's own command line,
    open_clip's `--logs` is taken for an abbreviation of torchrun's `--logs-specs`.
  - `import tv_shim_hook` before torch: the side venv's torchvision is a CUDA wheel that needs the shim.
  - MODEL_CONFIG_DIR goes to `open_clip.add_model_config`, so `--model NAME` finds our model's JSON.
  - DDP built with `device_ids=[cpu]` (what open_clip passes) is refused by torch 2.13: the CPU ids are dropped.
  - marks: a global optimizer step post-hook records the wall time at the end of every optimizer step;
    rank 0 prints the first and the last as `open-clip-marks {"first": t, "last": t, "steps": n}` once
    open_clip's main returns (after its checkpoint), the way the plain loop prints its marks.
Nothing else of open_clip's trainer is changed.
"""
import tv_shim_hook  # noqa: F401, I001  (must precede torch and open_clip)

import json
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_post_hook

MARK = "open-clip-marks "


class CpuDDP(DistributedDataParallel):
    """DistributedDataParallel that drops CPU `device_ids` (open_clip passes them; torch 2.13 refuses them)."""

    def __init__(self, module: torch.nn.Module, device_ids: list | None = None, *args, **kwargs) -> None:
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def main(argv: list[str]) -> None:
    """Register the model configs, patch DDP, hook the optimizer steps, run open_clip's trainer, print marks."""
    config_dir, args_file = argv
    with open(args_file, encoding="utf-8") as f:
        oc_args = json.load(f)
    torch.set_num_threads(1)
    import open_clip
    open_clip.add_model_config(config_dir)
    torch.nn.parallel.DistributedDataParallel = CpuDDP   # open_clip's main looks it up at call time
    marks: list[float] = []
    register_optimizer_step_post_hook(lambda _opt, _args, _kwargs: marks.append(time.time()))
    from open_clip_train.main import main as train_main
    train_main(oc_args)
    if os.environ.get("RANK", "0") == "0":
        if not marks:
            raise SystemExit("open_clip's trainer took no optimizer step")
        line = MARK + json.dumps({"first": marks[0], "last": marks[-1], "steps": len(marks)}) + "\n"
        sys.stdout.write(line)              # one write: rank 1's output shares the pipe
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
