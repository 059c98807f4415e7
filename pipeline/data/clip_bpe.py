"""OpenAI CLIP's byte-pair tokenizer, with the ids open_clip's `SimpleTokenizer` gives.

Models imported from open_clip (hub folders without their own tokenizer, training checkpoints) were
trained on these ids, so the text tower only works with exactly them. The tokenizer is rebuilt here
from the public vocabulary `assets/bpe_simple_vocab_16e6.txt.gz` (see assets/README.md) as a
Hugging Face `tokenizers` pipeline (fast, and serialisable as `tokenizer.json` like every other
tokenizer of ours), plus open_clip's text cleaning in Python, which `tokenizers` cannot express:

* cleaning (`clean`): ftfy's `fix_text`, HTML entities unescaped twice, whitespace runs collapsed
  to one space and stripped, lower case;
* words: the pattern ``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``, each word's UTF-8
  bytes mapped to printable characters (GPT-2's byte table), its last symbol marked ``</w>``;
* merges in rank order (the first 48,894 lines of the file after its header);
* ids: 256 bytes, the same 256 with ``</w>``, one per merge, then ``<start_of_text>`` (49406) and
  ``<end_of_text>`` (49407), which frame every row; rows pad with 0 and, when too long, are cut
  to ``context_length`` with the end token kept last.

The normaliser stored in the JSON (NFC, whitespace, lower case) repeats the parts of the cleaning that
`tokenizers` can do, so the file alone, loaded by transformers, is close (ftfy and HTML entities aside).
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

VOCAB_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
START, END = "<start_of_text>", "<end_of_text>"
VOCAB_SIZE = 49408
_MERGES = VOCAB_SIZE - 256 * 2 - 2                 # 48,894 merge rules follow the header line
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def is_clip_bpe(tok: HFTokenizer) -> bool:
    """Whether a `tokenizers` pipeline is this one (open_clip's special tokens name it)."""
    return tok.token_to_id(START) == VOCAB_SIZE - 2 and tok.token_to_id(END) == VOCAB_SIZE - 1


def clean(text: str) -> str:
    """open_clip's default cleaning of a caption ('lower'): ftfy, HTML entities, whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


@lru_cache(maxsize=1)
def clip_bpe_json() -> str:
    """The tokenizer as a `tokenizer.json` string (built once per process from the vocabulary file)."""
    try:
        lines = gzip.open(VOCAB_FILE, "rt", encoding="utf-8").read().split("\n")
    except OSError as e:
        raise FileNotFoundError(f"{VOCAB_FILE}: CLIP's BPE vocabulary is missing or unreadable ({e}); "
                                "reinstall the package") from None
    merges = [tuple(line.split()) for line in lines[1:_MERGES + 1]]
    alphabet = list(_byte_alphabet())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [START, END]
    ids = {token: i for i, token in enumerate(vocab)}
    tok = HFTokenizer(models.BPE(vocab=ids, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Strip(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.Sequence([decoders.Replace("</w>", " "), decoders.ByteLevel()])
    tok.add_special_tokens([START, END])
    tok.post_processor = processors.TemplateProcessing(single=f"{START} $A {END}",
                                                       special_tokens=[(START, ids[START]), (END, ids[END])])
    return tok.to_str()


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible map of the 256 byte values to printable characters, in CLIP's vocabulary order:
    the printable Latin-1 bytes keep their character, the others take 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
