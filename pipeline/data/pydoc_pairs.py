"""Text pairs from the docstrings of the Python standard library: real text, written by others, on every
machine with Python, for the text demo and benchmark (`contrast data pydoc`).

The standard library's sources are parsed (`ast`, nothing is imported or run). Every public module-level
function and class of a public module, and every public method of such a class, with a docstring gives
one pair:
* the query is the docstring's first sentence and the passage the rest of the docstring, when that rest
  says something (at least `MIN_PASSAGE` characters);
* otherwise the query is the qualified name with its signature (``json.dumps(obj, *, skipkeys=False, ...)``)
  and the passage the whole docstring.
Pairs whose query or passage repeats an earlier one are dropped (a repeated text in a batch would be its
own false negative). Whole top-level packages are held out by a hash of their name (`HELD_OUT` of them):
their pairs form a BEIR-style retrieval set (every held-out passage is the corpus), the others the
training shards, each with up to `NEGATIVES` hard negatives: passages of other objects of the same module.
The pairs depend on the Python version (its standard library) and nothing else.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from pipeline import storage
from pipeline.data.text_pairs import write_pairs
from pipeline.layout import BEIR_CORPUS, BEIR_QRELS, BEIR_QUERIES, DATASET_EVAL, DATASET_TRAIN

MIN_PASSAGE = 60                           # characters a passage needs
MIN_QUERY = 12
HELD_OUT = 0.2                             # fraction of top-level packages held out (by name hash)
NEGATIVES = 3                              # hard negatives per training pair, from the same module
SET_NAME = "pydoc_heldout"                 # the eval set's folder under eval/
_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
              "dist-packages", "pydoc_data", "__pycache__"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Doc:
    """One documented public object of the standard library."""
    module: str                            # e.g. "json.decoder"
    qualname: str                          # e.g. "JSONDecoder.decode"
    signature: str                         # e.g. "(self, s, _w=...)", "" for a class without __init__
    docstring: str

    @property
    def package(self) -> str:
        return self.module.split(".")[0]


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_docs(root: Optional[str] = None) -> Iterator[Doc]:
    """The documented public functions, classes and methods of the public modules under `root`, in path order."""
    root = root or stdlib_root()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".", "_", "test"))
                             and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith(("_", "test")) and name != "__init__.py":
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
            module = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            yield from _module_docs(path, module)


def _module_docs(path: str, module: str) -> Iterator[Doc]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if ast.get_docstring(node):
            yield Doc(module, node.name, _signature(node), ast.get_docstring(node))
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and not member.name.startswith("_") \
                        and ast.get_docstring(member):
                    yield Doc(module, f"{node.name}.{member.name}", _signature(member), ast.get_docstring(member))


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        init = next((m for m in node.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"), None)
        return _signature(init) if init is not None else ""
    return f"({ast.unparse(node.args)})"


def first_sentence(text: str) -> tuple[str, str]:
    """(the first sentence of the first paragraph, everything after it), whitespace collapsed."""
    text = inspect.cleandoc(text)
    paragraph, _, later = text.partition("\n\n")
    paragraph = " ".join(paragraph.split())
    parts = _SENTENCE_END.split(paragraph, maxsplit=1)
    rest = " ".join(((parts[1] if len(parts) > 1 else "") + "\n\n" + later).split())
    return parts[0], rest


def pair_of(doc: Doc) -> Optional[tuple[str, str]]:
    """(query, passage) of a documented object, or None when its docstring is too short to make one."""
    head, rest = first_sentence(doc.docstring)
    if len(rest) >= MIN_PASSAGE and len(head) >= MIN_QUERY:
        return head, rest
    whole = " ".join(inspect.cleandoc(doc.docstring).split())
    if len(whole) < MIN_PASSAGE:
        return None
    return f"{doc.module}.{doc.qualname}{doc.signature}", whole


def is_held_out(package: str, fraction: float = HELD_OUT) -> bool:
    """Whether a top-level package belongs to the held-out evaluation set (a stable hash of its name)."""
    digest = int(hashlib.sha1(package.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def docstring_pairs(root: Optional[str] = None) -> list[dict[str, Any]]:
    """Every usable pair {"key", "module", "query", "pos", "held_out"}, repeated queries and passages dropped."""
    pairs, seen = [], set()
    for doc in stdlib_docs(root):
        made = pair_of(doc)
        if made is None or made[0] in seen or made[1] in seen:
            continue
        seen.update(made)
        pairs.append({"key": f"{len(pairs):05d}-{doc.module}-{doc.qualname}".replace(".", "_"), "module": doc.module,
                      "query": made[0], "pos": made[1], "held_out": is_held_out(doc.package)})
    return pairs


def with_hard_negatives(pairs: list[dict[str, Any]], seed: int = 0, k: int = NEGATIVES) -> list[dict[str, Any]]:
    """Each pair with up to k passages of other objects of its module as "neg" (seeded choice)."""
    by_module: dict[str, list[str]] = {}
    for p in pairs:
        by_module.setdefault(p["module"], []).append(p["pos"])
    out = []
    for p in pairs:
        others = [text for text in by_module[p["module"]] if text != p["pos"]]
        rng = random.Random(f"{seed}/{p['key']}")
        out.append({**p, "neg": rng.sample(others, min(k, len(others)))})
    return out


def write_pydoc_dataset(out: str, *, shard_size: int = 250, seed: int = 0, root: Optional[str] = None
                        ) -> dict[str, Any]:
    """``out/train`` (text-pair shards with hard negatives) and ``out/eval/pydoc_heldout`` (a BEIR set);
    returns counts and locations."""
    pairs = docstring_pairs(root)
    train = [p for p in with_hard_negatives([p for p in pairs if not p["held_out"]], seed) if p["neg"]]
    held = [p for p in pairs if p["held_out"]]
    rng = random.Random(f"{seed}/order")
    rng.shuffle(train)                      # shards mix modules; the stream shuffles within windows
    train_url = storage.join(out, DATASET_TRAIN)
    write_pairs(train_url, train, shard_size=shard_size)
    eval_url = storage.join(out, DATASET_EVAL, SET_NAME)
    write_beir_set(eval_url, held)
    return {"train": train_url, "train_pairs": len(train), "eval": eval_url, "eval_queries": len(held),
            "held_out_packages": sorted({p["module"].split(".")[0] for p in held})}


def write_beir_set(url: str, pairs: list[dict[str, Any]]) -> None:
    """queries.jsonl, corpus.jsonl and qrels/test.tsv: query i's one relevant passage is passage i."""
    queries = "".join(json.dumps({"_id": f"q{i}", "text": p["query"]}) + "\n" for i, p in enumerate(pairs))
    corpus = "".join(json.dumps({"_id": f"d{i}", "title": "", "text": p["pos"]}) + "\n" for i, p in enumerate(pairs))
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(pairs)))
    storage.write_bytes(storage.join(url, BEIR_QUERIES), queries.encode("utf-8"))
    storage.write_bytes(storage.join(url, BEIR_CORPUS), corpus.encode("utf-8"))
    storage.write_bytes(storage.join(url, BEIR_QRELS), qrels.encode("utf-8"))
