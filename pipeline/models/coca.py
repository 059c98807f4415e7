"""CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models"): the dual encoder
plus a multimodal decoder that captions the image.

The image tower returns its pooled embedding and its token sequence (CoCa's attentional pooler); the
unimodal text tower gives the contrastive embedding (its appended class token) and the caption's token
states; the decoder runs those states causally, cross-attending to the image tokens, and predicts each
next token. The layout is open_clip's `CoCa`, so its weights map one-to-one (`pipeline.models.export`).

One forward entry point serves training and the gradient cache: `model(image=..., text=...,
caption=True)` adds the next-token logits of the rows given (both inputs, same rows), so DeepSpeed
ZeRO-3 gathers the decoder through its module hooks like every other parameter.
"""
from __future__ import annotations

import contextlib
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.configs import ModelSpec, TextSpec, ViTSpec
from pipeline.models.dual import DualEncoder
from pipeline.models.transformer import MultimodalDecoder, at_least_fp32


class CocaModel(DualEncoder):
    """A `DualEncoder` with CoCa's towers and a captioning decoder (`decoder`)."""

    has_decoder = True

    def __init__(self, spec: ModelSpec, *, image_size: int, context_length: int, vocab_size: int,
                 dropout: float = 0.0, **kwargs: Any):
        if spec.decoder is None or not isinstance(spec.image, ViTSpec) or spec.image.pool != "coca" \
                or not isinstance(spec.text, TextSpec) or spec.text.pool != "appended":
            raise ValueError("a CoCa model needs a decoder, a ViT pooled `coca` and a text tower pooled `appended`")
        if not spec.decoder.width == spec.text.width == spec.embed_dim:
            raise ValueError(f"CoCa: the decoder ({spec.decoder.width}), the text tower ({spec.text.width}) and the "
                             f"embedding ({spec.embed_dim}, the image tokens' width) must be equally wide")
        super().__init__(spec, image_size=image_size, context_length=context_length, vocab_size=vocab_size,
                         dropout=dropout, **kwargs)
        d = spec.decoder
        self.decoder = MultimodalDecoder(d.width, d.layers, d.heads, vocab_size, d.mlp_ratio, dropout, d.act, d.eps)

    # ------------------------------------------------------------------------------ encoding
    def _encode_tokens(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit embeddings (fp32), token sequence) of one tower, without a graph if it is locked."""
        frozen = torch.no_grad() if name in self.locked_towers else contextlib.nullcontext()
        with frozen:
            features, tokens = self.tower(name)(x, with_tokens=True)
        return F.normalize(at_least_fp32(features), dim=-1), tokens

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) → ((N, D) unit embeddings, (N, Q − 1, D) image tokens for the decoder)."""
        self.check_images(images)
        return self._encode_tokens("image", images)

    def next_token_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's (N, L, V) logits at every position of `tokens` (N, L), given the image tokens:
        logits[:, i] predict token i + 1."""
        _, states = self._encode_tokens("text", tokens)
        return self.decoder(image_tokens, states)

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                caption: bool = False) -> dict[str, Any]:
        """Embeddings of whichever inputs are given, s and b; with `caption` (both inputs, row for row) also
        `caption_logits` (N, L − 1, V): the decoder's prediction of text[:, 1:] from text[:, :-1]."""
        if not caption:
            return super().forward(image=image, text=text)
        if image is None or text is None or len(image) != len(text):
            raise ValueError("CoCa: the caption logits need images and texts, one text per image")
        self.check_tokens(text)
        image_emb, image_tokens = self.image_features(image)
        text_emb, states = self._encode_tokens("text", text)
        return {"image": image_emb, "text": text_emb, **self.logit_outputs(),
                "caption_logits": self.decoder(image_tokens, states[:, :-1])}

    # ------------------------------------------------------------------------------ training
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        super().set_grad_checkpointing(enabled)
        self.decoder.grad_checkpointing = enabled

    def compile_towers(self, **options: Any) -> None:
        super().compile_towers(**options)
        self.decoder.compile(**options)

    # ------------------------------------------------------------------------------ captioning
    @torch.no_grad()
    def generate(self, images: torch.Tensor, *, sot_id: int, eot_id: int, pad_id: int, max_len: int,
                 strategy: Literal["greedy", "beam"] = "greedy", beams: int = 4, min_len: int = 0) -> torch.Tensor:
        """Captions of `images` as (N, ≤ max_len) token ids: `sot_id` first, `eot_id` at the end, `pad_id`
        after it. `greedy` takes the most likely next token; `beam` keeps the `beams` most likely
        continuations (log-probability sum, a finished caption kept as it is) and returns the best.
        `min_len` forbids the end token before that many tokens (sot included; open_clip's `min_seq_len`).
        A caption that reaches `max_len` tokens ends with `eot_id` in place of its last token."""
        if max_len < 2:
            raise ValueError(f"generate: max_len = {max_len}: expected at least 2 (start and end tokens)")
        max_len = min(max_len, self.context_length)
        was_training = self.training
        self.eval()
        try:
            _, image_tokens = self.image_features(images)
            if strategy == "greedy":
                return self._greedy(image_tokens, sot_id, eot_id, pad_id, max_len, min_len)
            if strategy == "beam":
                return self._beam(image_tokens, sot_id, eot_id, pad_id, max_len, min_len, beams)
            raise ValueError(f"generate: strategy = {strategy!r}; expected greedy or beam")
        finally:
            self.train(was_training)

    def _log_probs(self, image_tokens: torch.Tensor, out: torch.Tensor, eot_id: int, min_len: int) -> torch.Tensor:
        logits = self.next_token_logits(image_tokens, out)[:, -1].float()
        if out.shape[1] < min_len:
            logits[:, eot_id] = float("-inf")
        return logits.log_softmax(dim=-1)

    def _greedy(self, image_tokens: torch.Tensor, sot_id: int, eot_id: int, pad_id: int, max_len: int,
                min_len: int) -> torch.Tensor:
        n = len(image_tokens)
        out = torch.full((n, 1), sot_id, dtype=torch.long, device=image_tokens.device)
        done = torch.zeros(n, dtype=torch.bool, device=out.device)
        while not done.all() and out.shape[1] < max_len:
            if out.shape[1] == max_len - 1:
                nxt = torch.full((n,), eot_id, dtype=torch.long, device=out.device)
            else:
                nxt = self._log_probs(image_tokens, out, eot_id, min_len).argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eot_id
        return out

    def _beam(self, image_tokens: torch.Tensor, sot_id: int, eot_id: int, pad_id: int, max_len: int,
              min_len: int, beams: int) -> torch.Tensor:
        results = []
        for row in range(len(image_tokens)):                    # one image at a time: simple, exact
            tokens = image_tokens[row:row + 1]
            alive = [(0.0, [sot_id])]
            finished: list[tuple[float, list[int]]] = []
            while alive and len(alive[0][1]) < max_len:
                seqs = torch.tensor([s for _, s in alive], device=tokens.device)
                if seqs.shape[1] == max_len - 1:               # the last position: the end token
                    finished += [(score, s + [eot_id]) for score, s in alive]
                    break
                logp = self._log_probs(tokens.expand(len(alive), -1, -1), seqs, eot_id, min_len)
                total = torch.tensor([score for score, _ in alive], device=logp.device)[:, None] + logp
                best = total.flatten().topk(min(2 * beams, total.numel()))
                candidates = []
                for value, index in zip(best.values.tolist(), best.indices.tolist()):
                    beam, token = divmod(index, logp.shape[1])
                    seq = alive[beam][1] + [token]
                    (finished if token == eot_id else candidates).append((value, seq))
                alive = candidates[:beams]
                if len(finished) >= beams and (not alive or max(f[0] for f in finished) >= alive[0][0]):
                    break                                        # no live beam can still beat the best finished
            best_seq = max(finished or alive, key=lambda f: f[0])[1]
            results.append(best_seq)
        width = max(len(s) for s in results)
        return torch.tensor([s + [pad_id] * (width - len(s)) for s in results], device=image_tokens.device)


def caption_targets(text: torch.Tensor) -> torch.Tensor:
    """What the decoder predicts from a caption's tokens: text[:, 1:] (teacher forcing)."""
    return text[:, 1:]


def caption_model(model: nn.Module) -> bool:
    """Whether the (possibly wrapped: DDP, DeepSpeed) model has a captioning decoder."""
    return bool(getattr(getattr(model, "module", model), "has_decoder", False))
