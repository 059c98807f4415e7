"""`contrast data pydoc`: docstring pairs from a standard-library tree (parsed, never imported), held-out
packages as a BEIR set, hard negatives from the same module; on a small hand-made tree and on the real one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data import StreamOptions, open_stream, train_tokenizer
from pipeline.data.pydoc_pairs import Doc, docstring_pairs, first_sentence, is_held_out, pair_of, write_pydoc_dataset
from pipeline.eval.retrieval_text import open_text_retrieval_set

MODULE = '''
"""A module."""
import os
os.environ["PYDOC_PAIRS_RAN_ME"] = "1"          # importing this file would set it

def alpha(x, *, y=2):
    """Compute the alpha of x. The alpha is the first letter of the Greek alphabet and this function
    returns it for any input whatsoever, which is useful."""

def beta():
    """Short."""

def _private():
    """A private function with a long enough docstring to be a pair if it were public, which it is not."""

class Gamma:
    """Hold a gamma value. Gamma values are kept for later use by the other functions in this module."""

    def __init__(self, value):
        pass

    def delta(self):
        """Return delta, a quantity derived from the gamma value held by this instance of the class."""

    def _hidden(self):
        """Not public, and so never a pair even though this docstring is more than long enough."""
'''


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "lib"
    for package in ("pkgone", "pkgtwo", "pkgthree", "pkgfour"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(MODULE.replace("alpha", f"alpha_{package}"))
        (root / package / "sub.py").write_text(MODULE.replace("Gamma", f"Gamma{package}").replace("alpha", "a2")
                                               .replace("the Greek", f"the {package} Greek")
                                               .replace("gamma value", f"{package} gamma value"))
    (root / "test").mkdir()
    (root / "test" / "mod.py").write_text(MODULE)          # test folders are skipped
    (root / "_private.py").write_text(MODULE)                # private modules too
    return root


def test_first_sentence_and_pairs():
    assert first_sentence("Do a thing. Then more.\n\nA second paragraph.") == ("Do a thing.",
                                                                             "Then more. A second paragraph.")
    long = Doc("m.n", "f", "(a, b=1)", "Return a value. " + "It is computed with care and returned. " * 2)
    assert pair_of(long) == ("Return a value.", "It is computed with care and returned. " * 1
                             + "It is computed with care and returned.")
    short_rest = Doc("m.n", "Klass", "(self, v)", "A class that does several useful things for its users, always.")
    assert pair_of(short_rest) == ("m.n.Klass(self, v)", "A class that does several useful things for its users, "
                                                         "always.")
    assert pair_of(Doc("m", "f", "()", "Too short.")) is None


def test_pairs_from_a_tree_without_importing_it(tree, monkeypatch):
    monkeypatch.delenv("PYDOC_PAIRS_RAN_ME", raising=False)
    pairs = docstring_pairs(str(tree))
    assert "PYDOC_PAIRS_RAN_ME" not in __import__("os").environ
    names = {p["key"].split("-", 1)[1] for p in pairs}
    assert "pkgone-alpha_pkgone" in names and "pkgone_sub-Gammapkgone_delta" in names
    assert not any("private" in n or "hidden" in n or "beta" in n or n.startswith("test") for n in names)
    assert len({p["query"] for p in pairs}) == len(pairs) and len({p["pos"] for p in pairs}) == len(pairs)
    gammas = [p for p in pairs if p["key"].endswith("-Gamma")]          # four identical ones: the first kept
    assert len(gammas) == 1 and gammas[0]["query"] == "Hold a gamma value."


def test_dataset_holds_packages_out_and_streams(tree, tmp_path, capsys):
    out = tmp_path / "pydoc"
    summary = write_pydoc_dataset(str(out), shard_size=4, root=str(tree))
    held = [p for p in ("pkgone", "pkgtwo", "pkgthree", "pkgfour") if is_held_out(p)]
    assert summary["held_out_packages"] == held
    data = open_text_retrieval_set(str(out / "eval"), "pydoc_heldout")
    assert len(data.query_ids) == summary["eval_queries"] and all(len(v) == 1 for v in data.qrels.values())
    shards = sorted((out / "train").glob("*.tar"))
    assert shards and json.loads((out / "train" / "manifest.json").read_text())["samples"] == summary["train_pairs"]
    train_tokenizer(["a b c"]).save(str(out / "train" / "tokenizer.json"))
    batch = next(iter(open_stream(str(out / "train"), global_batch=4, options=StreamOptions(
        format="text_pairs", hard_negatives=1, context_length=8, streams=1))))
    assert batch["neg"].shape[:2] == (4, 1)
    for key in batch["key"]:
        assert not any(f"-{p}" in key for p in held)


def test_the_real_standard_library(tmp_path, capsys):
    assert main(["data", "pydoc", "--out", str(tmp_path / "pydoc")]) == 0
    printed = capsys.readouterr().out
    train = int(printed.split("(")[1].split()[0])
    queries = int(printed.split("(")[2].split()[0])
    assert train > 1500 and queries > 100, printed
    assert "json" in printed.split("held-out packages:")[1]
