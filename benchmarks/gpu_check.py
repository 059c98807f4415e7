"""The GPU check: throughput, memory per chunk, the tiled loss at scale, the gradient cache's overhead.

One process, one device, no torch.distributed (world size 1: no NCCL). `benchmarks/gpu_check.sh`
finds or makes a venv and runs this; it also runs alone. Each measurement is written to
OUT/gpu_check.json as soon as it is done (a timeout keeps what was measured) and the whole as a
table to OUT/gpu_check.txt.

  throughput  ViT-B/32 at 224 px, context 77, bf16 weights (what DeepSpeed's bf16 runs), CLIP loss,
              `forward_backward` with the gradient cache (local batch 4096, chunk 512) then AdamW:
              samples/s per GPU. The anchor: about 790 samples/s per A100 in open_clip's
              LAION-400M ViT-B/32 run (amp bf16, no gradient cache).
  memory      peak memory of one such step (weights, gradients, AdamW state, batch, activations) at a
              batch of 4096 for each chunk size, and for the plain step when it fits:
              torch.cuda.max_memory_allocated; on CPU the live tensor storages of the step
              (`benchmarks/gradcache.py`'s counter, weights and gradients included, no AdamW state).
  tiled loss  the CLIP loss over 65,536 rows × 512 (fp32), forward + backward, tiled and dense: time
              and peak memory (the dense one may not fit).
  overhead    a cached step (chunk 256) against a plain one at a batch of 1024 that fits plainly,
              interleaved, medians: the ratio (the floor is one extra forward, about 1.33).

`--reduced` (the default without CUDA) runs the same code on the `tiny` model at 32 px with small
batches: what the tests run on CPU.

    python benchmarks/gpu_check.py --out DIR [--reduced]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.config import ModelConfig
from pipeline.gradcache import forward_backward
from pipeline.losses import get_loss
from pipeline.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from gradcache import TensorMemory  # the CPU memory counter of the gradient-cache benchmark

GIB = 2 ** 30
ANCHOR = "open_clip ViT-B/32 at 224 px: about 790 samples/s per A100 (LAION-400M run, amp bf16, no gradient cache)"


@dataclass(frozen=True)
class Settings:
    model: str
    image_size: int
    context: int
    vocab: int
    batch: int                      # throughput and memory
    chunk: int                      # throughput
    steps: int                      # timed throughput steps (after 2 warm-up steps)
    memory_chunks: tuple[int, ...]
    overhead_batch: int
    overhead_chunk: int
    overhead_repeats: int
    loss_rows: int
    loss_dim: int


FULL = Settings("ViT-B-32", 224, 77, 49408, batch=4096, chunk=512, steps=5, memory_chunks=(128, 256, 512, 1024, 2048),
                overhead_batch=1024, overhead_chunk=256, overhead_repeats=5, loss_rows=65536, loss_dim=512)
REDUCED = Settings("tiny", 32, 16, 1000, batch=32, chunk=8, steps=2, memory_chunks=(8, 16),
                   overhead_batch=16, overhead_chunk=4, overhead_repeats=2, loss_rows=1024, loss_dim=64)


class Check:
    """The device, the settings, and the results so far (written out after each measurement)."""

    def __init__(self, out: Path, settings: Settings, device: torch.device):
        self.out, self.s, self.device = out, settings, device
        self.results: dict[str, Any] = {
            "mode": "reduced" if settings == REDUCED else "full", "settings": asdict(settings),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "anchor": ANCHOR}

    def run(self, name: str, measure: Callable[[], Any]) -> None:
        """Record `measure()` under `name`, or the error it raised; then write the JSON."""
        started = time.perf_counter()
        try:
            self.results[name] = measure()
        except Exception as e:                       # one failed measurement must not lose the others
            self.results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: done in {time.perf_counter() - started:.1f} s", flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1))

    # ------------------------------------------------------------------------- the pieces
    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=self.s.model), image_size=self.s.image_size,
                            context_length=self.s.context, vocab_size=self.s.vocab)
        return model.to(self.device, torch.bfloat16).train()

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=self.device).manual_seed(1)
        images = torch.randn(n, 3, self.s.image_size, self.s.image_size, generator=g, device=self.device)
        texts = torch.randint(1, self.s.vocab, (n, self.s.context), generator=g, device=self.device)
        return images, texts

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_step(self, model, opt, images, texts, chunk: int) -> float:
        """One gradient-cache step and AdamW step; wall seconds (synchronised)."""
        self.sync()
        start = time.perf_counter()
        forward_backward(model, images, texts, get_loss("clip"), chunk_size=chunk)
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
        self.sync()
        return time.perf_counter() - start

    # ------------------------------------------------------------------------ measurements
    def throughput(self) -> dict[str, Any]:
        model = self.model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images, texts = self.batch(self.s.batch)
        for _ in range(2):
            self.timed_step(model, opt, images, texts, self.s.chunk)
        times = [self.timed_step(model, opt, images, texts, self.s.chunk) for _ in range(self.s.steps)]
        step = statistics.median(times)
        return {"batch": self.s.batch, "chunk": self.s.chunk, "step_s": times, "samples_per_s": self.s.batch / step}

    def memory(self) -> list[dict[str, Any]]:
        rows = []
        for chunk in (*self.s.memory_chunks, 0):
            try:
                rows.append({"chunk": chunk or "plain", "peak_gib": self.peak_of_step(chunk) / GIB})
            except torch.OutOfMemoryError:
                rows.append({"chunk": chunk or "plain", "peak_gib": None, "error": "out of memory"})
            self.release()
        return rows

    def peak_of_step(self, chunk: int) -> int:
        model = self.model()
        images, texts = self.batch(self.s.batch)
        if self.device.type == "cpu":
            with TensorMemory(list(model.parameters()) + [images, texts]) as counter:
                self.timed_step(model, None, images, texts, chunk)
            return counter.peak
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.timed_step(model, opt, images, texts, chunk)            # AdamW state exists from here on
        torch.cuda.reset_peak_memory_stats(self.device)
        self.timed_step(model, opt, images, texts, chunk)
        return torch.cuda.max_memory_allocated(self.device)

    def overhead(self) -> dict[str, Any]:
        model = self.model()
        images, texts = self.batch(self.s.overhead_batch)
        runs: dict[str, list[float]] = {"plain": [], "cached": []}
        for i in range(self.s.overhead_repeats + 1):
            for mode, chunk in (("plain", 0), ("cached", self.s.overhead_chunk)):
                t = self.timed_step(model, None, images, texts, chunk)
                if i:                                                # the first round warms up
                    runs[mode].append(t)
        plain, cached = statistics.median(runs["plain"]), statistics.median(runs["cached"])
        return {"batch": self.s.overhead_batch, "chunk": self.s.overhead_chunk, "plain_s": plain, "cached_s": cached,
                "ratio": cached / plain}

    def tiled_loss(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.s.loss_rows, "dim": self.s.loss_dim}
        for name, tiled in (("tiled", True), ("dense", False)):
            try:
                out[name] = self.loss_step(tiled)
            except torch.OutOfMemoryError:
                out[name] = {"error": "out of memory"}
            self.release()
        return out

    def loss_step(self, tiled: bool) -> dict[str, float]:
        g = torch.Generator(device=self.device).manual_seed(2)
        image, text = (torch.nn.functional.normalize(torch.randn(self.s.loss_rows, self.s.loss_dim, generator=g,
                                                                 device=self.device), dim=-1).requires_grad_()
                       for _ in range(2))
        scale = torch.tensor(20.0, device=self.device, requires_grad=True)
        fn = get_loss("clip", tiled=tiled)
        base = self.allocated()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        counter = TensorMemory([]) if self.device.type == "cpu" else contextlib.nullcontext()
        self.sync()
        start = time.perf_counter()
        with counter:
            fn(image, text, logit_scale=scale).backward()
        self.sync()
        seconds = time.perf_counter() - start
        peak = counter.peak if self.device.type == "cpu" else torch.cuda.max_memory_allocated(self.device) - base
        return {"s": seconds, "peak_extra_gib": peak / GIB}

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ report
def table(r: dict[str, Any]) -> str:
    """The results as a few human-readable lines."""
    lines = [f"GPU check ({r['mode']}): {r['device']}, torch {r['torch']}, CUDA {r['cuda']}"]
    t = r.get("throughput", {})
    if "samples_per_s" in t:
        lines.append(f"throughput: {t['samples_per_s']:.0f} samples/s per device ({r['settings']['model']}, batch "
                     f"{t['batch']}, chunk {t['chunk']}, bf16); anchor: {r['anchor']}")
    lines.append("peak memory per chunk (batch {}): ".format(r["settings"]["batch"]) + ", ".join(
        f"{m['chunk']}: " + (f"{m['peak_gib']:.2f} GiB" if m.get("peak_gib") is not None else m.get("error", "?"))
        for m in r.get("memory", []) if isinstance(m, dict)))
    o = r.get("overhead", {})
    if "ratio" in o:
        lines.append(f"gradient-cache overhead: {o['ratio']:.2f}× a plain step (batch {o['batch']}, chunk "
                     f"{o['chunk']}: {o['cached_s']:.3f} s vs {o['plain_s']:.3f} s)")
    loss = r.get("tiled_loss", {})
    for name in ("tiled", "dense"):
        if name in loss:
            v = loss[name]
            text = v.get("error") or f"{v['s']:.3f} s, peak extra {v['peak_extra_gib']:.2f} GiB"
            lines.append(f"CLIP loss {name} at {loss['rows']} rows × {loss['dim']}: {text}")
    lines += [f"{k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.txt")
    p.add_argument("--reduced", action="store_true", help="the small CPU-sized settings (default without CUDA)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    check = Check(Path(args.out), REDUCED if args.reduced or not cuda else FULL, device)
    print(f"device {check.results['device']}, mode {check.results['mode']}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    for name, measure in (("throughput", check.throughput), ("memory", check.memory),
                          ("overhead", check.overhead), ("tiled_loss", check.tiled_loss)):
        check.run(name, measure)
    text = table(check.results)
    (Path(args.out) / "gpu_check.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
