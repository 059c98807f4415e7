"""The text–text dual encoder: real all-MiniLM-L6-v2 weights give sentence-transformers' embeddings; pooling,
projection, shared or two encoders, locking, checkpointing, published round trip, config checks, and the
gradient cache with hard negatives (one process; across ranks in test_text_equivalence.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, load_config
from pipeline.data import load_tokenizer
from pipeline.gradcache import forward_backward
from pipeline.losses import get_loss
from pipeline.models import TextDualEncoder, build_model, count_parameters, load_published, save_published
from tests.helpers.compare import max_abs_diff
from tests.helpers.text import minilm_path, text_config, tiny_bert

TEXTS = ["How do I read a file line by line?", "Return the absolute value of a number.", "a"]


def build(cfg, vocab_size=64, context_length=12, loss="clip", pad_id=0):
    return build_model(cfg.model, image_size=0, context_length=context_length, vocab_size=vocab_size,
                       loss_name=loss, pad_id=pad_id)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def tokens(n: int, length: int = 12, seed: int = 0, pad_from: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 64, (n, length), generator=g)
    t[:, pad_from:] = 0
    t[0, 4:] = 0                                         # rows of different lengths
    return t


# ------------------------------------------------------------------------------------ real weights
def test_minilm_text_model_gives_sentence_transformers_embeddings():
    from sentence_transformers import SentenceTransformer
    path = minilm_path()
    tok = load_tokenizer(f"{path}/tokenizer.json", context_length=128)
    model = build(text_config(path), vocab_size=tok.vocab_size, context_length=128).eval()
    ours = model.encode_query(tok(TEXTS))
    theirs = SentenceTransformer(path, device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert ours.shape == (3, 384)
    assert (ours - theirs).abs().max() < 1e-5
    assert torch.equal(model.encode_passage(tok(TEXTS)), ours)         # one shared encoder


# ------------------------------------------------------------------------------------ pooling, projection
@pytest.mark.parametrize("pool", ["mean", "cls", "last"])
def test_pooling_against_the_encoder_by_hand(bert, pool):
    from transformers import AutoModel
    model = build(text_config(bert, f"model.text.pool={pool}")).eval()
    t = tokens(4)
    mask = (t != 0).long()
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(bert).eval()(input_ids=t, attention_mask=mask).last_hidden_state
    if pool == "mean":
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    elif pool == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = hidden[torch.arange(4), mask.sum(1) - 1]
    torch.testing.assert_close(model.encode_query(t), F.normalize(pooled, dim=-1), rtol=0, atol=1e-6)


def test_padding_id_is_the_tokenizers(bert):
    """Pooling masks the tokenizer's own pad id: with pad 5, a row padded with 5 equals its unpadded self."""
    model = build(text_config(bert), pad_id=5).eval()
    short = torch.tensor([[9, 3, 8]])
    padded = torch.tensor([[9, 3, 8, 5, 5, 5]])
    torch.testing.assert_close(model.encode_query(short), model.encode_query(padded), rtol=0, atol=1e-6)


def test_projection_two_encoders_and_parameter_counts(bert):
    shared = build(text_config(bert, "model.projection_dim=8"))
    assert shared.encode_query(tokens(2)).shape == (2, 8) and shared.spec.embed_dim == 8
    two = build(text_config(bert, "model.shared_tower=false"))
    assert two.query_encoder is not two.passage_encoder
    assert max_abs_diff(dict(two.query_encoder.named_parameters()), dict(two.passage_encoder.named_parameters())) == 0
    counts = count_parameters(text_config(bert, "model.shared_tower=false").model, image_size=0, context_length=12,
                              vocab_size=64)
    single = count_parameters(text_config(bert).model, image_size=0, context_length=12, vocab_size=64)
    assert counts["query"] == counts["passage"] == single["encoder"]
    assert counts["total"] == 2 * single["encoder"] + 1 == single["total"] + single["encoder"]


def test_lock_and_unlock_last(bert):
    locked = build(text_config(bert, "model.text.lock=true"))
    assert locked.locked_towers == {"image", "text"} and not locked.encoder.training
    assert not any(p.requires_grad for p in locked.encoder.parameters())
    assert locked.encode_query(tokens(2)).grad_fn is None
    partial = build(text_config(bert, "model.text.lock=true", "model.text.unlock_last=1",
                                "model.projection_dim=4", "model.shared_tower=false"))
    for encoder in (partial.query_encoder, partial.passage_encoder):
        trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith(("model.encoder.layer.1.", "proj.")) for n in trainable)
    assert partial.locked_towers == set()


def test_gradient_checkpointing_gives_the_same_gradients(bert):
    t = tokens(3)

    def grads(checkpointing: bool):
        model = build(text_config(bert, f"model.grad_checkpointing={str(checkpointing).lower()}")).train()
        model.encode_query(t).pow(2).sum(1).mul(torch.arange(3.0)).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert max_abs_diff(grads(False), grads(True)) < 1e-6


# ------------------------------------------------------------------------------------ published
def test_published_round_trip(bert, tmp_path):
    cfg = text_config(bert, "model.shared_tower=false", "model.projection_dim=6", "loss.name=siglip")
    model = build(cfg, loss="siglip")
    with torch.no_grad():
        model.passage_encoder.proj.weight.add_(0.5)       # the two encoders differ now
    tok = load_tokenizer(f"{minilm_path()}/tokenizer.json", 12)
    save_published(model, tok, str(tmp_path / "published" / "step_00000001"), 1, run_config=cfg)
    p = load_published(str(tmp_path / "published" / "step_00000001"))
    assert isinstance(p.model, TextDualEncoder) and p.image_size is None and p.model.logit_bias is not None
    t = tokens(3)
    model.eval()
    torch.testing.assert_close(p.model.encode_query(t), model.encode_query(t), rtol=0, atol=0)
    torch.testing.assert_close(p.encode_text(t), model.encode_passage(t), rtol=0, atol=0)
    assert not torch.allclose(p.model.encode_query(t), p.model.encode_passage(t))


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, match", [
    (["model.name=text", "data.format=text_pairs"], "model.text.hf_path"),
    (["model.name=text", "model.text.hf_path=x", "data.format=text_pairs"], "data.tokenizer = None .*x/tokenizer"),
    (["model.name=text", "model.text.hf_path=x"], "data.format = 'image_text'"),
    (["data.format=text_pairs"], "model.name = 'text' to train a text–text model"),
    (["model.projection_dim=8"], "apply only to model.name = 'text'"),
    (["model.name=text", "model.text.hf_path=x", "data.format=text_pairs", "model.image.lock=true"],
     "model.image .* is not used"),
    (["model.name=nope"], "one of tiny, small, ViT-B-32, ViT-B-16, ViT-L-14, coca_tiny, coca_ViT-B-32, "
                          "coca_ViT-L-14, text"),
])
def test_config_checks(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["eval.schedule=off", *overrides])


# ------------------------------------------------------------------------------------ gradient cache
def sgd_step(model):
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("loss, overrides", [("clip", []), ("siglip", ["model.shared_tower=false"]),
                                             ("dcl", ["model.projection_dim=8"])])
def test_gradient_cache_with_hard_negatives_equals_one_plain_backward(bert, loss, overrides):
    """Chunks over queries and over positives + negatives give the plain step's update (to fp32 noise)."""
    base = build(text_config(bert, f"loss.name={loss}", *overrides), loss=loss).train()
    fn = get_loss(loss, matryoshka_dims=[8, 4] if loss == "dcl" else None)
    q, p, negs = tokens(6, seed=1), tokens(6, seed=2), tokens(12, seed=3).view(6, 2, 12)

    initial = {k: v.detach().clone() for k, v in base.named_parameters()}
    plain = copy.deepcopy(base)
    out = plain(image=q, text=torch.cat([p, negs.flatten(0, 1)]))
    fn(out["image"], out["text"][:6], logit_scale=out["logit_scale"], logit_bias=out["logit_bias"],
       negatives=out["text"][6:].view(6, 2, -1)).backward()
    want = sgd_step(plain)
    largest = max_abs_diff(want, initial)                  # the largest gradient entry (SGD, lr 1)
    assert largest > 0.1
    for chunk, text_chunk in ((2, 5), (4, 0), (6, 18)):
        model = copy.deepcopy(base)
        step = forward_backward(model, q, p, fn, chunk_size=chunk, text_chunk_size=text_chunk, negatives=negs)
        assert max_abs_diff(sgd_step(model), want) < 1e-5 * largest, (chunk, text_chunk, largest)
        assert step.negatives.shape[:2] == (6, 2) and step.text.shape[0] == 6


def test_gradient_cache_refuses_misshapen_negatives(bert):
    model = build(text_config(bert))
    with pytest.raises(ValueError, match=r"negatives must be \(4, k, 12\)"):
        forward_backward(model, tokens(4), tokens(4), get_loss("clip"), negatives=tokens(4))
