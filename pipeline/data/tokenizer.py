"""Text tokenizer: a byte-level BPE trained on the captions, stored as ``tokenizer.json``.

Contract (shared with the models and eval stages): calling the tokenizer on a list of strings gives
a LongTensor (N, context_length); pad id is 0; every row ends with the end token, which is the
largest id of our own vocabularies (so argmax pooling over ids finds it, as open_clip does, and a
Hugging Face ``eos_token_id`` agrees). Rows longer than the context are truncated and keep the end
token. Any other ``tokenizer.json`` (e.g. one shipped with a pretrained text tower) also loads; its
own post-processor (``[CLS] … [SEP]``) is kept, and so is the padding token it declares (SigLIP pads
with its end token). OpenAI CLIP's BPE (`clip_tokenizer`, models imported from open_clip) also
cleans each caption as open_clip does before tokenizing (`pipeline.data.clip_bpe`). A CoCa run's
tokenizer starts every caption with a start token (`with_start_token`: `<start>`, one id after the end).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from pipeline import storage
from pipeline.data import clip_bpe
from pipeline.layout import MANIFEST, TOKENIZER

PAD = "<pad>"
END = "<end>"
START = "<start>"                          # `with_start_token`: a captioning model's start token
_END_NAMES = (END, "<|endoftext|>", clip_bpe.END, "</s>", "[SEP]")
_PAD_NAMES = (PAD, "[PAD]", "<|pad|>")


class Tokenizer:
    """Strings → fixed-length token ids (pad id 0 unless the tokenizer declares its padding, end token kept
    under truncation)."""

    def __init__(self, tok: HFTokenizer, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length = {context_length}: expected at least 2 (one token plus the end token)")
        self._tok = tok
        self.context_length = context_length
        self.without_start: Tokenizer | None = None      # `with_start_token`: the tokenizer it added `<start>` to
        self.eot_id = _first_id(tok, _END_NAMES, "an end token")
        padding = tok.padding
        self._pad_token = padding["pad_token"] if padding else None
        self.pad_id = padding["pad_id"] if padding else _first_id(tok, _PAD_NAMES, default=0)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._clean = clip_bpe.clean if clip_bpe.is_clip_bpe(tok) else None
        tok.no_padding()
        tok.enable_truncation(max_length=context_length)

    @property
    def sot_id(self) -> int | None:
        """The start token the tokenizer puts before every caption (CLIP's `<start_of_text>`, BERT's `[CLS]`,
        `with_start_token`'s `<start>`); None when a caption's first token is its first word (our own BPE)."""
        ids = self._tok.encode("").ids
        return ids[0] if len(ids) >= 2 else None

    @property
    def is_clip_bpe(self) -> bool:
        """Whether this is OpenAI CLIP's BPE with open_clip's cleaning (open_clip's built-in tokenizer)."""
        return self._clean is not None

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if self._clean is not None:
            texts = [self._clean(t) for t in texts]
        rows = []
        for enc in self._tok.encode_batch(list(texts)):
            ids = enc.ids
            if self.eot_id not in ids[-1:]:               # a foreign tokenizer without an end post-processor
                ids = ids[: self.context_length - 1] + [self.eot_id]
            rows.append(ids + [self.pad_id] * (self.context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.context_length)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id])

    def to_json(self) -> str:
        """The `tokenizer.json` text, with the padding token when the tokenizer declared one."""
        if self._pad_token is None:
            return self._tok.to_str()
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.enable_padding(pad_id=self.pad_id, pad_token=self._pad_token)
        return tok.to_str()

    def save(self, url: str) -> None:
        storage.write_bytes(url, self.to_json().encode("utf-8"))


def _first_id(tok: HFTokenizer, names: Sequence[str], what: str = "", default: int | None = None) -> int:
    for name in names:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    if default is not None:
        return default
    raise ValueError(f"tokenizer has none of {', '.join(names)}; expected {what}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, context_length: int = 77) -> Tokenizer:
    """Train a byte-level BPE on captions; `<pad>` gets id 0 and `<end>` the largest id."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - 1, 257), special_tokens=[PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([END])                         # appended after training: the largest id
    tok.post_processor = processors.TemplateProcessing(single=f"$A {END}", special_tokens=[(END, tok.token_to_id(END))])
    return Tokenizer(tok, context_length)


def with_start_token(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` itself when it starts captions with a token of its own, else the same vocabulary plus `<start>`
    (one more id, after the end token), put before every caption. A captioning decoder needs one: it predicts
    each token from those before it, so without a start token it never learns a caption's first word. Not the end
    token reused: open_clip's `CoCa.generate` stops at once on a start token equal to its end token. The
    post-processor and the token are stored in the published `tokenizer.json`."""
    if tokenizer.sot_id is not None:
        return tokenizer
    tok = HFTokenizer.from_str(tokenizer.to_json())
    tok.add_special_tokens([START])
    end = tok.id_to_token(tokenizer.eot_id)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {end}", special_tokens=[(START, tok.token_to_id(START)), (end, tokenizer.eot_id)])
    started = Tokenizer(tok, tokenizer.context_length)
    started.without_start = tokenizer
    return started


def clip_tokenizer(context_length: int = 77) -> Tokenizer:
    """OpenAI CLIP's BPE with open_clip's cleaning: the ids of open_clip's `SimpleTokenizer`."""
    return Tokenizer(HFTokenizer.from_str(clip_bpe.clip_bpe_json()), context_length)


def tokenizer_url(url_or_dataset_dir: str) -> str:
    """`tokenizer.json` itself, or the one beside a dataset folder / its manifest.json."""
    url = str(url_or_dataset_dir).rstrip("/")
    if url.endswith(".json") and not url.endswith(MANIFEST):
        return url
    if url.endswith(MANIFEST):
        url = url[: -len(MANIFEST)].rstrip("/")
    return storage.join(url, TOKENIZER)


def load_tokenizer(url_or_dataset_dir: str, context_length: int = 77) -> Tokenizer:
    """Load a `tokenizer.json` (or the one of a dataset folder) with the given context length."""
    url = tokenizer_url(url_or_dataset_dir)
    try:
        text = storage.read_bytes(url).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer at {url}: expected a tokenizer.json written by `contrast data synth` "
                                "or `contrast data pack`, or set data.tokenizer to one") from None
    return Tokenizer(HFTokenizer.from_str(text), context_length)
