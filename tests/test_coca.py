"""CoCa: the model (towers, tokens, decoder, generation), its caption loss, and the gradient cache with the
caption term, in float64 on one process: one SGD step (lr 1: the update is the gradient) through the cache
equals one plain backward over the whole batch of contrastive + weight × token cross-entropy (computed
here with torch's own mean cross-entropy). The same across 1, 2 and 4 ranks and ZeRO
0–3: test_text_equivalence.py."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import Config, ModelConfig, TowerConfig
from pipeline.gradcache import forward_backward, plan_paired_calls
from pipeline.losses import get_loss
from pipeline.losses.caption import CaptionLoss
from pipeline.models import build_model, count_parameters
from pipeline.models.coca import CocaModel
from tests.helpers.compare import max_abs_diff

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

N, L, V, S = 8, 10, 64, 16                              # rows, tokens, vocabulary, image size
EOT, SOT = V - 1, 1


def coca(loss_name: str = "clip", **model) -> CocaModel:
    torch.manual_seed(0)
    m = build_model(ModelConfig(name="coca_tiny", **model), image_size=S, context_length=L, vocab_size=V,
                    loss_name=loss_name)
    return m.double()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N, 3, S, S, generator=g, dtype=torch.float64)
    texts = torch.randint(2, V - 1, (N, L), generator=g)
    texts[:, 0] = SOT
    for i in range(N):                                   # captions of different lengths, padded after the end
        end = 3 + i % (L - 3)
        texts[i, end], texts[i, end + 1:] = EOT, 0
    return images, texts


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def reference_step(model, images, texts, weight=2.0, smoothing=0.0, loss="clip"):
    """One plain step: the whole batch in one call, `loss` + weight · mean token CE (torch's), SGD."""
    out = model(image=images, text=texts, caption=True)
    contrastive = get_loss(loss)(out["image"], out["text"], logit_scale=out["logit_scale"],
                                 logit_bias=out["logit_bias"])
    ce = F.cross_entropy(out["caption_logits"].flatten(0, 1), texts[:, 1:].flatten(), ignore_index=0,
                         label_smoothing=smoothing)
    (contrastive + weight * ce).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return params(model), contrastive.item(), ce.item()


def cached_step(model, images, texts, chunk, weight=2.0, smoothing=0.0, seed=0):
    torch.manual_seed(seed)
    out = forward_backward(model, images, texts, get_loss("clip"), chunk_size=chunk,
                           caption=CaptionLoss(weight, smoothing, pad_id=0))
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return params(model), out


# ------------------------------------------------------------------------------------ the model
def test_public_shapes_have_open_clips_parameter_counts():
    """open_clip's model table lists coca_ViT-B-32 at 253.56 M and coca_ViT-L-14 at 638.45 M parameters."""
    for name, millions in (("coca_ViT-B-32", 253.56), ("coca_ViT-L-14", 638.45)):
        counts = count_parameters(ModelConfig(name=name), image_size=224, context_length=76, vocab_size=49408)
        assert round(counts["total"] / 1e6, 2) == millions, name
        assert counts["decoder"] > 0


def test_towers_give_embeddings_tokens_and_caption_logits():
    model = coca()
    images, texts = batch()
    out = model(image=images, text=texts, caption=True)
    assert out["image"].shape == out["text"].shape == (N, 128)
    assert out["caption_logits"].shape == (N, L - 1, V)
    emb, tokens = model.image_features(images)
    assert tokens.shape == (N, 31, 128)                   # 32 pooler queries, the first one pooled
    assert torch.allclose(emb, model.encode_image(images)) and torch.allclose(emb, out["image"])
    plain = model(image=images, text=texts)               # without `caption`: the dual-encoder contract
    assert "caption_logits" not in plain and torch.allclose(plain["text"], out["text"])


def test_decoder_is_causal_and_sees_the_image():
    model = coca().eval()
    images, texts = batch()
    _, tokens = model.image_features(images)
    logits = model.next_token_logits(tokens, texts)
    changed = texts.clone()
    changed[:, 5] = (changed[:, 5] + 1) % (V - 1)
    other = model.next_token_logits(tokens, changed)
    assert torch.allclose(logits[:, :5], other[:, :5]) and not torch.allclose(logits[:, 5:], other[:, 5:])
    _, tokens2 = model.image_features(images.flip(0))
    assert not torch.allclose(model.next_token_logits(tokens2, texts), logits)


@pytest.mark.slow
def test_generate_greedy_and_beam():
    """Greedy follows the decoder's argmax step by step; beam finds a caption at least as likely."""
    model = coca()
    images = batch()[0][:3]
    greedy = model.generate(images, sot_id=SOT, eot_id=EOT, pad_id=0, max_len=L)
    beam = model.generate(images, sot_id=SOT, eot_id=EOT, pad_id=0, max_len=L, strategy="beam", beams=3)
    _, tokens = model.image_features(images)

    def log_prob(seq, row):
        seq = seq[seq != 0] if (seq == 0).any() else seq
        logp = model.next_token_logits(tokens[row:row + 1], seq[None, :-1])[0].log_softmax(-1)
        return logp[torch.arange(len(seq) - 1), seq[1:]].sum().item(), logp
    for row in range(3):
        g = greedy[row]
        assert g[0] == SOT and EOT in g.tolist()
        end = g.tolist().index(EOT)
        _, logp = log_prob(g[:end + 1], row)
        if end < L - 1:                                  # not cut off by max_len: every step the argmax
            assert torch.equal(logp.argmax(-1), g[1:end + 1])
        assert log_prob(beam[row][:beam[row].tolist().index(EOT) + 1], row)[0] >= \
            log_prob(g[:end + 1], row)[0] - 1e-9


# ----------------------------------------------------------------------------- the caption loss
def test_caption_loss_is_the_mean_token_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, V, generator=g, dtype=torch.float64)
    targets = torch.randint(1, V, (4, 6), generator=g)
    targets[0, 3:] = targets[2, 1:] = 0
    for smoothing in (0.0, 0.1):
        loss = CaptionLoss(2.0, smoothing, pad_id=0)
        tokens = loss.tokens(targets)
        want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0, label_smoothing=smoothing)
        assert float(tokens) == int((targets != 0).sum())
        assert torch.allclose(loss(logits, targets, tokens), want)
        parts = loss(logits[:2], targets[:2], tokens) + loss(logits[2:], targets[2:], tokens)
        assert torch.allclose(parts, want)                 # per sample: chunks add up


def test_bad_caption_settings_are_named():
    with pytest.raises(ValueError, match="caption_weight"):
        CaptionLoss(-1.0)
    cfg = Config()
    cfg.model.name, cfg.data.image_size = "coca_tiny", 64
    cfg.gradcache.chunk_size, cfg.gradcache.text_chunk_size = 4, 2
    from pipeline.models.configs import check_model_config
    assert any("gradcache.text_chunk_size" in p for p in check_model_config(cfg))


# ----------------------------------------------------------------------------- the gradient cache
@pytest.mark.parametrize("chunk", [0, 3, 4])
def test_cached_step_equals_plain_backward(chunk):
    model = coca()
    images, texts = batch()
    want, contrastive, ce = reference_step(copy.deepcopy(model), images, texts)
    initial = params(model)
    got, out = cached_step(model, images, texts, chunk)
    assert max_abs_diff(want, initial) > 0.01
    assert max_abs_diff(got, want) <= 1e-10
    assert float(out.caption) == pytest.approx(ce, rel=1e-12)
    assert float(out.contrastive) == pytest.approx(contrastive, rel=1e-12)
    assert float(out.loss) == pytest.approx(contrastive + 2.0 * ce, rel=1e-12)
    assert set(k.split(".")[0] for k, v in got.items() if (v != initial[k]).any()) >= {"image_tower", "text_tower",
                                                                                        "decoder"}


def test_caption_weight_and_label_smoothing_reach_the_step():
    images, texts = batch()
    model = coca()
    want, *_ = reference_step(copy.deepcopy(model), images, texts, weight=0.5, smoothing=0.1)
    got, _ = cached_step(model, images, texts, 3, weight=0.5, smoothing=0.1)
    assert max_abs_diff(got, want) <= 1e-10
    other, _ = cached_step(coca(), images, texts, 3)        # the defaults end elsewhere: the check can fail
    assert max_abs_diff(other, want) > 1e-4


def _paired_reference(model, images, texts, chunk, seed):
    """The cache's calls with graphs, one loss. Each call starts from the generator state the calls before it
    leave when run without the decoder (the cache's pass 1: its masks are those of the contrastive loss);
    the decoder draws after the towers."""
    torch.manual_seed(seed)
    calls, states = plan_paired_calls(N, chunk), []
    with torch.no_grad():
        for c in calls:
            states.append(torch.get_rng_state())
            model(image=images[c.image], text=texts[c.text])
    outs = []
    for c, state in zip(calls, states):
        torch.set_rng_state(state)
        outs.append(model(image=images[c.image], text=texts[c.text], caption=True))
    image, text = (torch.cat([o[t] for o in outs]) for t in ("image", "text"))
    logits = torch.cat([o["caption_logits"] for o in outs])
    loss = get_loss("clip")(image, text, logit_scale=outs[-1]["logit_scale"]) + 2.0 * F.cross_entropy(
        logits.flatten(0, 1), texts[:, 1:].flatten(), ignore_index=0)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return params(model)


@pytest.mark.slow
@pytest.mark.parametrize("model_cfg", [dict(dropout=0.3), dict(dropout=0.2, grad_checkpointing=True),
                                       dict(image=TowerConfig(patch_dropout=0.5))],
                         ids=["dropout", "dropout-checkpointing", "patch-dropout"])
def test_random_masks_are_replayed_with_the_caption_term(model_cfg):
    """Dropout in towers and decoder, patch dropout: pass 2 restores each chunk's RNG state, so its towers
    draw pass 1's masks and the caption term is computed on them."""
    images, texts = batch()
    model = coca(**model_cfg)
    want = _paired_reference(copy.deepcopy(model), images, texts, 3, seed=5)
    other = _paired_reference(copy.deepcopy(model), images, texts, 3, seed=6)
    assert max_abs_diff(other, want) > 1e-4                 # the masks matter
    got, _ = cached_step(model, images, texts, 3, seed=5)
    assert max_abs_diff(got, want) <= 1e-10


def test_compiled_step_equals_eager():
    """`train.compile` (`compile_towers`: both towers and the decoder) through the gradient cache, dropout on: the
    same loss and update as eager mode, and the caption forward (the cache's pass 2) runs all three compiled, not
    the decoder alone. AOT autograd with eager kernels (torch.compile's `aot_eager`: dynamo's graphs, their
    backward traced) keeps the test fast (inductor's C++ builds take minutes here)."""
    import torch._dynamo
    aot_eager, calls = torch._dynamo.lookup_backend("aot_eager"), []

    def counting(gm, example_inputs):
        compiled = aot_eager(gm, example_inputs)
        def run(*args):
            calls.append(gm)
            return compiled(*args)
        return run
    images, texts = batch()
    model = coca(dropout=0.1)
    want, eager = cached_step(copy.deepcopy(model), images, texts, 4)
    torch._dynamo.reset()
    model.compile_towers(backend=counting)
    got, compiled = cached_step(model, images, texts, 4)
    assert max_abs_diff(got, want) <= 1e-12
    assert float(compiled.loss) == pytest.approx(float(eager.loss), rel=1e-12)
    assert float(compiled.caption) == pytest.approx(float(eager.caption), rel=1e-12)
    calls.clear()
    model(image=images[:4], text=texts[:4], caption=True)
    assert len(calls) == 3                                      # image tower, text tower, decoder


def test_bf16_step_runs():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="coca_tiny"), image_size=S, context_length=L, vocab_size=V).bfloat16()
    images, texts = batch()
    out = forward_backward(model, images.bfloat16(), texts, get_loss("clip"), chunk_size=4,
                           caption=CaptionLoss(2.0, pad_id=0))
    assert torch.isfinite(out.loss) and out.caption > 0
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in model.parameters())


def test_a_published_coca_loads_as_coca_with_its_decoder(synth, tmp_path):
    """The scheduled eval and every consumer read a run's published weights: a CoCa's must come back whole."""
    from pipeline.data import load_tokenizer
    from pipeline.models import load_published, save_published
    tok = load_tokenizer(str(synth(64) / "train"), 16)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="coca_tiny"), image_size=32, context_length=16, vocab_size=tok.vocab_size)
    url = save_published(model, tok, str(tmp_path / "published" / "step_00000001"), 1)
    loaded = load_published(url).model
    assert isinstance(loaded, CocaModel)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and any(k.startswith("decoder.") for k in got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(image=images)["image"], loaded(image=images)["image"])


# ------------------------------------------------------------------------- tokens, generation, captioning
def test_a_coca_run_tokenizes_with_a_start_token(synth):
    """Our BPE has no start token (a caption's first token is its first word, which a decoder predicting each
    token from those before it would never learn): a CoCa run adds `<start>` and puts it first."""
    from pipeline.data import clip_tokenizer, load_tokenizer, with_start_token
    from pipeline.models import run_tokenizer
    root = synth(64)
    plain = load_tokenizer(str(root / "train"), 16)
    assert plain.sot_id is None
    cfg = Config()
    cfg.model.name, cfg.data.train_urls, cfg.data.context_length = "coca_tiny", [str(root / "train")], 16
    tok = run_tokenizer(cfg)
    assert tok.sot_id == plain.vocab_size and tok.vocab_size == plain.vocab_size + 1     # one more id, last
    assert tok.eot_id == plain.eot_id and tok.pad_id == plain.pad_id
    ids, words = tok(["a red circle."])[0].tolist(), plain(["a red circle."])[0].tolist()
    n = words.index(plain.eot_id) + 1
    assert ids[0] == tok.sot_id and ids[1:n + 1] == words[:n]        # the same words, one place later
    assert tok.decode(ids) == plain.decode(words)
    from tokenizers import Tokenizer as HFTokenizer

    from pipeline.data.tokenizer import Tokenizer
    assert Tokenizer(HFTokenizer.from_str(tok.to_json()), 16).sot_id == tok.sot_id      # published as it is
    clip = clip_tokenizer(16)
    assert with_start_token(clip) is clip and clip.sot_id == 49406
    cfg.model.name = "tiny"
    assert run_tokenizer(cfg) is None                                # other models: the data's, unchanged


def test_resuming_a_coca_checkpoint_from_before_the_start_token_says_so(synth):
    """A CoCa checkpoint written with the data's tokenizer (before `<start>`) is refused with what happened and
    what to do; a checkpoint of any other tokenizer keeps the general message."""
    from pipeline.config import ConfigError
    from pipeline.data import load_tokenizer, train_tokenizer
    from pipeline.models import run_tokenizer
    from pipeline.train.checkpoint import Resume, tokenizer_sha256
    root = synth(64)
    cfg = Config()
    cfg.model.name, cfg.data.train_urls, cfg.data.context_length = "coca_tiny", [str(root / "train")], 16
    tok = run_tokenizer(cfg)
    def resume(written_with):
        return Resume("run/checkpoints/step_00000010", {"tokenizer_sha256": tokenizer_sha256(written_with)}, {})
    resume(tok).check_tokenizer(tok)                                  # the same tokenizer resumes
    with pytest.raises(ConfigError, match="from before its tokenizer put `<start>`.*start a new run_dir"):
        resume(load_tokenizer(str(root / "train"), 16)).check_tokenizer(tok)
    with pytest.raises(ConfigError, match="was trained with another tokenizer"):
        resume(train_tokenizer(["entirely different words"], vocab_size=300, context_length=16)).check_tokenizer(tok)


def test_caption_metrics_by_hand():
    """Exact match, BLEU-4 and CIDEr-D on captions whose scores follow from their definitions."""
    from pipeline.eval.metrics import caption_metrics
    refs = [["A red circle on a plain background.", "something else"], ["two blue squares left of stars today"]]
    same = caption_metrics(["a  red circle on a PLAIN background", "two blue squares, left of stars today."], refs)
    assert same["exact_match"] == 1.0
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)             # every n-gram matched, no brevity penalty
    # CIDEr-D: 10 × mean over n of the tf-idf cosine; the two images share no n-gram, so every idf > 0 and
    # an identical caption scores 10 (its length equal to its reference's: no penalty)
    one = caption_metrics(["a red circle on a plain background.", "two blue squares left of stars today"],
                          [["a red circle on a plain background."], ["two blue squares left of stars today"]])
    assert one["cider"] == pytest.approx(10.0, rel=1e-6)
    half = caption_metrics(["a red circle on a plain background.", "zzz yyy xxx www vvv uuu"],
                           [["a red circle on a plain background."], ["two blue squares left of stars today"]])
    assert half["exact_match"] == 0.5 and half["cider"] == pytest.approx(5.0, rel=1e-6)
    assert half["bleu4"] < same["bleu4"]


def test_captioning_task_on_the_held_out_combinations(synth, tmp_path):
    """The eval task on the synthetic held-out colour–shape set with a published CoCa: its metrics equal those
    computed here from `Published.generate` and from the training forward's caption logits, sample by sample."""
    from pipeline.eval.metrics import caption_metrics, caption_words
    from pipeline.eval.sets import open_eval_set
    from pipeline.eval.tasks import Encoder, captioning
    from pipeline.models import load_published, run_tokenizer, save_published
    root = synth(64, eval_samples=12)
    cfg = Config()
    cfg.model.name, cfg.data.train_urls, cfg.data.context_length = "coca_tiny", [str(root / "train")], 16
    tok = run_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=32, context_length=16, vocab_size=tok.vocab_size)
    cfg.data.eval_dir, cfg.eval.caption_max_len = str(root / "eval"), 12
    published = load_published(save_published(model, tok, str(tmp_path / "published" / "step_00000001"), 1,
                                              run_config=cfg))
    eval_set = open_eval_set(str(root / "eval"), "zeroshot_heldout")
    got = captioning(Encoder(published, 5), eval_set, max_len=12)    # batches of 5: 5, 5, 2
    samples = list(eval_set.samples())
    encoder = Encoder(published, 100)
    refs = [s.caption_lines() for s in samples]
    generated = published.generate(encoder.pixels([s.image for s in samples]), max_len=12)
    assert all(isinstance(g, str) for g in generated) and len(generated) == 12
    exact = sum(caption_words(g) in [caption_words(r) for r in rs] for g, rs in zip(generated, refs)) / 12
    correct = total = 0
    for s, rs in zip(samples, refs):
        text = tok([rs[0]])
        logits = published.model(image=encoder.pixels([s.image]), text=text, caption=True)["caption_logits"]
        target = text[0, 1:]
        keep = target != tok.pad_id
        correct += int((logits[0].argmax(-1) == target)[keep].sum())
        total += int(keep.sum())
    assert got["caption_exact_match"] == exact
    assert got["caption_token_acc"] == pytest.approx(correct / total)
    assert got["caption_bleu4"] == pytest.approx(caption_metrics(generated, refs)["bleu4"])
    assert 0 <= got["caption_cider"] and 0 <= got["caption_token_acc"] <= 1
    beam = published.generate(encoder.pixels([s.image for s in samples[:2]]), max_len=12, strategy="beam")
    assert len(beam) == 2 and all(isinstance(b, str) for b in beam)
    from pipeline.eval.report import caption_figure  # the report shows them beside their images
    figure = caption_figure(str(tmp_path), tmp_path)
    assert figure.file == "captions.png" and (tmp_path / "captions.png").stat().st_size > 1000


def write_clip_benchmark_captioning_set(root: Path, rows: list[tuple[bytes, list[str]]], per_shard: int) -> None:
    """A captioning set the way CLIP_benchmark's `convert_retrieval_dataset` writes one (its wds form of
    mscoco_captions): test/0.tar … with keys s0000000 …, a .webp image and a .txt of the captions one a line,
    test/nshards.txt, dataset_type.txt "retrieval"; no manifest.json and no tokenizer."""
    import io
    import tarfile

    from PIL import Image
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    shards = [rows[i:i + per_shard] for i in range(0, len(rows), per_shard)]
    for n, shard in enumerate(shards):
        with tarfile.open(root / "test" / f"{n}.tar", "w") as tar:
            for i, (image, captions) in enumerate(shard):
                webp = io.BytesIO()
                Image.open(io.BytesIO(image)).save(webp, format="webp", lossless=True)
                for ext, data in (("webp", webp.getvalue()), ("txt", "\n".join(captions).encode())):
                    info = tarfile.TarInfo(f"s{n * per_shard + i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")


def test_a_clip_benchmark_captioning_set_is_read_and_captioned(synth, tmp_path):
    """CLIP_benchmark's captioning layout (several references a line) is read with every reference, the
    captioning task scores against all of them, and `contrast data synth` writes its held-out set that way."""
    from pipeline.data.synth import CAPTION_REFERENCES, HELD, classname
    from pipeline.eval.sets import open_eval_set
    from pipeline.eval.tasks import Encoder, captioning
    from pipeline.models import load_published, run_tokenizer, save_published
    root = synth(64, eval_samples=12)
    ours = open_eval_set(str(root / "eval"), "captioning_heldout")
    samples = list(ours.samples())
    assert ours.kind == "retrieval" and len(samples) == 12
    held = [classname(c) for c in HELD]
    for s in samples:                                        # held-out objects only, five distinct phrasings
        lines = s.caption_lines()
        assert len(set(lines)) == CAPTION_REFERENCES and sum(any(h in line for h in held) for line in lines) == 5
    rows = [(s.image, s.caption_lines()) for s in samples]
    write_clip_benchmark_captioning_set(tmp_path / "eval" / "cb_captions", rows, per_shard=5)   # 3 shards
    theirs = open_eval_set(str(tmp_path / "eval"), "cb_captions")
    read = list(theirs.samples())
    assert theirs.kind == "retrieval" and [s.key for s in read] == [f"s{i:07d}" for i in range(12)]
    assert [s.caption_lines() for s in read] == [r for _, r in rows]

    cfg = Config()
    cfg.model.name, cfg.data.train_urls, cfg.data.context_length = "coca_tiny", [str(root / "train")], 16
    tok = run_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=32, context_length=16, vocab_size=tok.vocab_size)
    published = load_published(save_published(model, tok, str(tmp_path / "published" / "step_00000001"), 1,
                                              run_config=cfg))
    got = captioning(Encoder(published, 5), theirs, max_len=12)      # the task runs on it (an untrained decoder)
    assert set(got) == {"caption_exact_match", "caption_bleu4", "caption_cider", "caption_token_acc"}
    assert 0 <= got["caption_token_acc"] <= 1


# ------------------------------------------------------------------------------------ open_clip interop
def _open_clip_coca_shapes(embed, v_width, v_layers, patch, image_size, queries, t_width, layers, context, vocab):
    """open_clip's `CoCa` state-dict layout (3.x, one attentional pooler), written from its architecture."""
    from tests.helpers.open_clip import expected_open_clip_shapes
    shapes = {k if k.startswith(("visual.", "logit_scale")) else f"text.{k}": v for k, v in
              expected_open_clip_shapes(embed, v_width, v_layers, patch, image_size, t_width, layers, context,
                                        vocab).items()}
    shapes["text.positional_embedding"] = (context + 1, t_width)          # the appended class token's position
    shapes["text.cls_emb"] = (t_width,)
    shapes["visual.ln_post.weight"] = shapes["visual.ln_post.bias"] = (embed,)   # after the pooler
    shapes["visual.proj"] = (embed, embed)
    a = "visual.attn_pool"
    shapes.update({f"{a}.query": (queries, embed), f"{a}.attn.in_proj_bias": (3 * embed,),
                   f"{a}.attn.out_proj.weight": (embed, embed), f"{a}.attn.out_proj.bias": (embed,),
                   f"{a}.ln_q.weight": (embed,), f"{a}.ln_q.bias": (embed,), f"{a}.ln_k.weight": (v_width,),
                   f"{a}.ln_k.bias": (v_width,)})
    if v_width == embed:
        shapes[f"{a}.attn.in_proj_weight"] = (3 * embed, embed)
    else:
        shapes.update({f"{a}.attn.q_proj_weight": (embed, embed), f"{a}.attn.k_proj_weight": (embed, v_width),
                       f"{a}.attn.v_proj_weight": (embed, v_width)})
    for k, v in expected_open_clip_shapes(embed, v_width, 0, patch, image_size, t_width, layers, context,
                                          vocab).items():
        if k.startswith("transformer.resblocks."):
            shapes[f"text_decoder.{k[len('transformer.'):]}"] = v
            cross = f"text_decoder.cross_attn.{k[len('transformer.resblocks.'):]}"
            shapes[cross] = v
            if k.endswith("ln_1.weight") or k.endswith("ln_1.bias"):
                shapes[cross.replace("ln_1", "ln_1_kv")] = v
    shapes.update({"text_decoder.ln_final.weight": (t_width,), "text_decoder.ln_final.bias": (t_width,),
                   "text_decoder.text_projection": (t_width, vocab)})
    return shapes


def test_open_clip_coca_layout_and_config():
    """coca_ViT-B-32 exports under open_clip's names and shapes (unpacked pooler q/k/v: 768-wide tokens) with its
    config's keys and values; coca_tiny (tokens as wide as the queries) with the pooler's q/k/v packed."""
    from pipeline.models.convert import open_clip_architecture
    from pipeline.models.export import architecture, open_clip_config, open_clip_state_dict
    for name, size, ctx, vocab, want in (
            ("coca_ViT-B-32", 224, 76, 49408, (512, 768, 12, 32, 224, 256, 512, 12, 76, 49408)),
            ("coca_tiny", 32, 16, 300, (128, 128, 3, 8, 32, 32, 128, 2, 16, 300))):
        with torch.device("meta"):
            model = build_model(ModelConfig(name=name), image_size=size, context_length=ctx, vocab_size=vocab)
        got = {k: tuple(v.shape) for k, v in open_clip_state_dict(model).items()}
        assert got == _open_clip_coca_shapes(*want), name
        cfg = open_clip_config(model, hf_tokenizer=False)
        assert open_clip_architecture(cfg, name) == architecture(model)
        if name == "coca_ViT-B-32":
            b32_cfg, b32 = cfg, architecture(model)
    # open_clip 3.3's own coca_ViT-B-32 config (open_clip.get_model_config), whose defaults ours spells out
    theirs = {"embed_dim": 512,
              "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "attentional_pool": True,
                             "attn_pooler_heads": 8, "output_tokens": True},
              "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                           "embed_cls": True, "output_tokens": True},
              "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                                 "attn_pooler_heads": 8}, "custom_text": True}
    for key, value in theirs.items():
        assert b32_cfg[key] == value if not isinstance(value, dict) else value.items() <= b32_cfg[key].items(), key
    assert open_clip_architecture(theirs, "theirs") == b32


def test_open_clip_coca_round_trip(synth, tmp_path):
    """export --format open_clip, then model.init_from on that folder: the same embeddings and captions."""
    from interop_open_clip_coca import export_perturbed_coca

    from pipeline.models import build_run_model, load_published, run_tokenizer
    root = synth(64)
    cfg = Config()
    cfg.model.name, cfg.data.train_urls, cfg.data.context_length, cfg.data.image_size = \
        "coca_tiny", [str(root / "train")], 16, 32
    tok = run_tokenizer(cfg)
    model, url = export_perturbed_coca(cfg, tok, tmp_path)
    cfg.model.init_from = str(tmp_path / "export")
    imported, imported_tok = build_run_model(cfg, tok.vocab_size).eval(), run_tokenizer(cfg)
    assert isinstance(imported, CocaModel) and imported_tok.sot_id == tok.sot_id
    want, got = model.state_dict(), imported.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    images, texts = torch.randn(3, 3, 32, 32), tok(["a red circle.", "a photo of a blue star.", "x"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), imported.encode_image(images))
        assert torch.equal(model.encode_text(texts), imported.encode_text(texts))
    published = load_published(url)
    ids = dict(sot_id=tok.sot_id, eot_id=tok.eot_id, pad_id=tok.pad_id, max_len=12)
    assert torch.equal(published.generate_ids(images, 12), imported.generate(images, **ids))
