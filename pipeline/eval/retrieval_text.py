"""Text retrieval evaluation on BEIR-style sets: nDCG@10, MRR@10 and Recall@100 by exact search.

A set is a folder (under `data.eval_dir`, named in `eval.sets` like any other set) holding
``queries.jsonl`` ({"_id", "text"} a line), ``corpus.jsonl`` ({"_id", "title", "text"}; a passage is
title + " " + text) and ``qrels/test.tsv`` (query-id, corpus-id, score; a header line). Queries are
encoded by the query encoder and passages by the passage encoder of a published text model.

Search is exact and brute force: the corpus embeddings are kept (N × D floats: 150 MB for 100k passages
at 384 dimensions) and scored against the queries in blocks of `QUERY_BLOCK` × `CORPUS_BLOCK`,
keeping a running top-k per query, so memory never holds a queries × corpus matrix.

Metrics (as BEIR computes them with pytrec_eval), over the queries with a relevant passage (score > 0):
    nDCG@10   = DCG@10 / ideal DCG@10, DCG = Σ_{rank i ≤ 10} rel_i / log2(i + 1) (graded relevance, linear gain)
    MRR@10    = mean of 1 / rank of the first relevant passage in the top 10 (0 when none)
    Recall@100 = relevant passages in the top 100 / relevant passages
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pipeline import storage
from pipeline.eval.sets import EvalSetError
from pipeline.layout import BEIR_CORPUS, BEIR_QRELS, BEIR_QUERIES
from pipeline.models import Published

QUERY_BLOCK, CORPUS_BLOCK = 1024, 16384
METRICS = ("nDCG@10", "MRR@10", "Recall@100")


@dataclass
class TextRetrievalSet:
    """A BEIR-style set in memory: ids and texts in file order, and the judgements by query."""
    name: str
    query_ids: list[str]
    queries: list[str]
    doc_ids: list[str]
    docs: list[str]
    qrels: dict[str, dict[str, int]]             # query id → {corpus id: relevance}


def is_text_retrieval_set(eval_dir: str, name: str) -> bool:
    """Whether the set folder `name` is a BEIR-style text set (it has a corpus.jsonl)."""
    return storage.exists(storage.join(eval_dir, name, BEIR_CORPUS))


def open_text_retrieval_set(eval_dir: str, name: str) -> TextRetrievalSet:
    """Read and check a BEIR-style set; EvalSetError names the file, the line and what was expected."""
    url = storage.join(eval_dir, name)
    query_ids, queries = _read_jsonl(storage.join(url, BEIR_QUERIES), name, title=False)
    doc_ids, docs = _read_jsonl(storage.join(url, BEIR_CORPUS), name, title=True)
    qrels = _read_qrels(storage.join(url, BEIR_QRELS), name, set(query_ids), set(doc_ids))
    if not any(rel > 0 for judged in qrels.values() for rel in judged.values()):
        raise EvalSetError(f"eval set {name!r}: {BEIR_QRELS} holds no relevant pair (score > 0)")
    return TextRetrievalSet(name, query_ids, queries, doc_ids, docs, qrels)


def _read_jsonl(url: str, name: str, title: bool) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    try:
        with storage.open_url(url, "r", encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key, text = str(record["_id"]), record["text"]
                    if not isinstance(text, str):
                        raise TypeError("text is not a string")
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise EvalSetError(f"eval set {name!r}: {url} line {i}: expected "
                                       f'{{"_id": ..., "text": "..."}} ({type(e).__name__}: {e})') from None
                heading = record.get("title") if title else None
                ids.append(key)
                texts.append(f"{heading} {text}" if isinstance(heading, str) and heading.strip() else text)
    except FileNotFoundError:
        raise EvalSetError(f"eval set {name!r}: {url} is missing (a BEIR set holds {BEIR_QUERIES}, {BEIR_CORPUS} "
                           f"and {BEIR_QRELS})") from None
    if not ids:
        raise EvalSetError(f"eval set {name!r}: {url} holds no records")
    if len(set(ids)) != len(ids):
        raise EvalSetError(f"eval set {name!r}: {url} repeats ids")
    return ids, texts


def _read_qrels(url: str, name: str, query_ids: set[str], doc_ids: set[str]) -> dict[str, dict[str, int]]:
    try:
        text = storage.read_bytes(url).decode("utf-8")
    except FileNotFoundError:
        raise EvalSetError(f"eval set {name!r}: {url} is missing (query-id, corpus-id, score a line)") from None
    qrels: dict[str, dict[str, int]] = {}
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    for i, row in enumerate(rows, start=1):
        if i == 1 and row and not row[-1].strip().lstrip("-").isdigit():
            continue                                     # the header line
        if not row:
            continue
        if len(row) != 3 or not row[2].strip().lstrip("-").isdigit():
            raise EvalSetError(f"eval set {name!r}: {url} line {i}: expected query-id<TAB>corpus-id<TAB>integer "
                               f"score, got {row!r}")
        qid, did, score = row[0].strip(), row[1].strip(), int(row[2])
        unknown = [f"query {qid!r}"] if qid not in query_ids else []
        unknown += [f"passage {did!r}"] if did not in doc_ids else []
        if unknown:
            raise EvalSetError(f"eval set {name!r}: {url} line {i} judges an unknown {' and '.join(unknown)}")
        qrels.setdefault(qid, {})[did] = score
    return qrels


# ------------------------------------------------------------------------------------------- search
def exact_top_k(queries: torch.Tensor, corpus: torch.Tensor, k: int, query_block: int = QUERY_BLOCK,
                corpus_block: int = CORPUS_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the k highest inner products of each query with the corpus, best first;
    blocks of queries × corpus rows, a running top-k merged per corpus block (exact)."""
    k = min(k, len(corpus))
    scores_out, index_out = [], []
    for q in range(0, len(queries), query_block):
        block = queries[q:q + query_block]
        best = block.new_full((len(block), 0), -math.inf)
        best_index = torch.empty((len(block), 0), dtype=torch.long)
        for c in range(0, len(corpus), corpus_block):
            scores = block @ corpus[c:c + corpus_block].T
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            merged, where = torch.cat([best, top.values], 1).topk(min(k, best.shape[1] + top.values.shape[1]), dim=1)
            best_index = torch.cat([best_index, top.indices + c], 1).gather(1, where)
            best = merged
        scores_out.append(best)
        index_out.append(best_index)
    return torch.cat(scores_out), torch.cat(index_out)


# ------------------------------------------------------------------------------------------ metrics
def ranking_metrics(ranked: Sequence[Sequence[str]], query_ids: Sequence[str],
                    qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@100 of ranked passage ids per query, averaged over the queries that
    have a relevant passage (relevance > 0)."""
    ndcg, mrr, recall = [], [], []
    for qid, docs in zip(query_ids, ranked):
        judged = qrels.get(qid, {})
        relevant = {d for d, rel in judged.items() if rel > 0}
        if not relevant:
            continue
        gains = [max(judged.get(d, 0), 0) for d in docs[:10]]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
        ideal = sorted((rel for rel in judged.values() if rel > 0), reverse=True)[:10]
        ndcg.append(dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal)))
        first = next((i for i, d in enumerate(docs[:10]) if d in relevant), None)
        mrr.append(0.0 if first is None else 1.0 / (first + 1))
        recall.append(len(relevant & set(docs[:100])) / len(relevant))
    if not ndcg:
        raise EvalSetError("no query has a relevant passage (score > 0) in the judgements")
    return {"nDCG@10": sum(ndcg) / len(ndcg), "MRR@10": sum(mrr) / len(mrr), "Recall@100": sum(recall) / len(recall)}


# ----------------------------------------------------------------------------------------- the task
@torch.no_grad()
def encode_texts(encode: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable, texts: Sequence[str],
                 batch_size: int) -> torch.Tensor:
    """Unit embeddings of `texts` in batches (fp32)."""
    return torch.cat([encode(tokenizer(list(texts[i:i + batch_size]))).float()
                      for i in range(0, len(texts), batch_size)])


def evaluate_text_retrieval(published: Published, data: TextRetrievalSet, batch_size: int) -> dict[str, float]:
    """Encode the set with the checkpoint's query and passage encoders, search exactly, score the ranking."""
    model = published.model
    if not hasattr(model, "encode_query"):
        raise EvalSetError(f"eval set {data.name!r} is a text retrieval set; this checkpoint is an image–text model "
                           "(train model.name: text on text pairs)")
    judged = [i for i, qid in enumerate(data.query_ids) if qid in data.qrels]
    query_ids = [data.query_ids[i] for i in judged]
    queries = encode_texts(model.encode_query, published.tokenizer, [data.queries[i] for i in judged], batch_size)
    corpus = encode_texts(model.encode_passage, published.tokenizer, data.docs, batch_size)
    _, top = exact_top_k(queries, corpus, 100)
    ranked = [[data.doc_ids[j] for j in row] for row in top.tolist()]
    return ranking_metrics(ranked, query_ids, data.qrels)
