"""Text retrieval evaluation: nDCG@10 / MRR@10 / Recall@100 against hand-computed rankings, exact blocked
search against a full sort, BEIR-file errors, and a published text checkpoint evaluated (result file,
TensorBoard scalars, report) with real all-MiniLM-L6-v2 weights."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.data import load_tokenizer
from pipeline.eval.evaluate import evaluate_checkpoint, run_dir_of, write_result
from pipeline.eval.report import write_report
from pipeline.eval.retrieval_text import exact_top_k, open_text_retrieval_set, ranking_metrics
from pipeline.eval.sets import EvalSetError
from pipeline.layout import published_url
from pipeline.models import build_model, save_published
from tests.helpers.eval import EVAL_DATA, eval_config, publish
from tests.helpers.text import minilm_path, text_config


def test_ranking_metrics_by_hand():
    qrels = {"q1": {"a": 2, "b": 1, "z": 0}, "q2": {"c": 1}, "q3": {"d": 1}, "q4": {"x": 0}}
    ranked = [["b", "x", "a"], ["y"] * 10 + ["c"], ["e", "f", "d"], ["x"]]
    m = ranking_metrics(ranked, ["q1", "q2", "q3", "q4"], qrels)      # q4 has nothing relevant: left out
    ideal_q1 = 2 + 1 / math.log2(3)
    ndcg = [(1 + 2 / math.log2(4)) / ideal_q1, 0.0, (1 / math.log2(4)) / 1]
    assert m["nDCG@10"] == pytest.approx(sum(ndcg) / 3, abs=1e-12)
    assert m["MRR@10"] == pytest.approx((1 + 0 + 1 / 3) / 3, abs=1e-12)
    assert m["Recall@100"] == pytest.approx((1 + 1 + 1) / 3, abs=1e-12)
    assert ranking_metrics([["a", "b"]], ["q1"], qrels)["nDCG@10"] == pytest.approx(1.0)


def test_blocked_exact_search_equals_a_full_sort():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(7, 5, generator=g), torch.randn(23, 5, generator=g)
    scores, index = exact_top_k(q, c, 6, query_block=3, corpus_block=4)
    full = (q @ c.T).topk(6, dim=1)
    torch.testing.assert_close(scores, full.values)
    assert torch.equal(index, full.indices)
    assert exact_top_k(q, c, 100)[1].shape == (7, 23)


def write_beir(folder: Path, queries: dict, corpus: dict, qrels: list[tuple[str, str, int]]) -> None:
    (folder / "qrels").mkdir(parents=True)
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": t, "text": v}) + "\n"
                                                 for k, (t, v) in corpus.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                               + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))


PASSAGES = {f"d{i}": ("", text) for i, text in enumerate([
    "Return the absolute value of a number.", "Open a file and return a stream.",
    "Sort a list in place.", "Join path components intelligently.", "Create a new thread of execution.",
    "Compute the square root of x.", "Parse a string of JSON into a Python object.",
    "Read all lines of a text file into a list."])}


@pytest.mark.parametrize("edit, match", [
    (lambda d: (d / "corpus.jsonl").unlink(), "corpus.jsonl is missing"),
    (lambda d: (d / "queries.jsonl").write_text('{"_id": "q0"}\n'), "queries.jsonl line 1: expected"),
    (lambda d: (d / "qrels" / "test.tsv").write_text("q0\tnope\t1\n"), "unknown passage 'nope'"),
    (lambda d: (d / "qrels" / "test.tsv").write_text("h\th\th\nq0\td0\n"), "line 2: expected query-id<TAB>corpus"),
    (lambda d: (d / "qrels" / "test.tsv").write_text("q0\td0\t0\n"), "no relevant pair"),
])
def test_malformed_sets_are_clear_errors(tmp_path, edit, match):
    write_beir(tmp_path / "set", {"q0": "absolute value"}, PASSAGES, [("q0", "d0", 1)])
    edit(tmp_path / "set")
    with pytest.raises(EvalSetError, match=match):
        open_text_retrieval_set(str(tmp_path), "set")


def test_titles_join_their_text(tmp_path):
    write_beir(tmp_path / "set", {"q0": "x"}, {"d0": ("Title", "body"), "d1": ("", "plain")}, [("q0", "d0", 1)])
    data = open_text_retrieval_set(str(tmp_path), "set")
    assert data.docs == ["Title body", "plain"] and data.qrels == {"q0": {"d0": 1}}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A published MiniLM text checkpoint (step 5) and a BEIR set whose queries paraphrase their passage."""
    root = tmp_path_factory.mktemp("text-run")
    queries = {"q0": "absolute value of a number", "q1": "open a file", "q2": "sort a list",
               "q3": "join parts of a path", "q5": "square root", "q6": "decode JSON text", "q9": "unjudged"}
    write_beir(root / "eval" / "docs", queries, PASSAGES,
               [("q0", "d0", 1), ("q1", "d1", 1), ("q1", "d7", 1), ("q2", "d2", 1), ("q3", "d3", 1), ("q5", "d5", 2),
                ("q6", "d6", 1)])
    path = minilm_path()
    cfg = text_config(path, f"run_dir={root / 'run'}", f"data.eval_dir={root / 'eval'}", "eval.sets=[docs]",
                      f"data.tokenizer={path}/tokenizer.json", "data.context_length=64", "eval.batch_size=3")
    tok = load_tokenizer(cfg.data.tokenizer, 64)
    model = build_model(cfg.model, image_size=0, context_length=64, vocab_size=tok.vocab_size)
    url = save_published(model, tok, published_url(cfg.run_dir, 5), 5, run_config=cfg)
    return url


def test_published_text_checkpoint_is_evaluated(text_run):
    result = evaluate_checkpoint(text_run)
    m = result["metrics"]
    assert set(m) == {"docs/nDCG@10", "docs/MRR@10", "docs/Recall@100"}
    assert m["docs/Recall@100"] == 1.0                    # 8 passages: everything is in the top 100
    assert m["docs/MRR@10"] >= 0.8 and m["docs/nDCG@10"] >= 0.8     # MiniLM knows these paraphrases
    write_result(run_dir_of(text_run), result)
    acc = EventAccumulator(str(Path(run_dir_of(text_run)) / "tensorboard" / "eval"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {f"eval/{k}" for k in m}
    (event,) = acc.Scalars("eval/docs/nDCG@10")
    assert event.step == 5 and event.value == pytest.approx(m["docs/nDCG@10"])
    page = Path(write_report(run_dir_of(text_run))).read_text()
    assert "docs/nDCG@10" in page and "No retrieval set among eval.sets" in page


def test_an_image_text_checkpoint_on_a_text_set_is_a_clear_error(text_run, synth, tmp_path):
    cfg = eval_config(synth(**EVAL_DATA), tmp_path / "run")
    ckpt = publish(cfg, step=1)
    cfg.data.eval_dir = str(Path(run_dir_of(text_run)).parent / "eval")
    cfg.eval.sets = ["docs"]
    with pytest.raises(EvalSetError, match="text retrieval set; this checkpoint is an image–text model"):
        evaluate_checkpoint(ckpt, cfg)
