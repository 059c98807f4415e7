"""Evaluation metrics on embeddings: zero-shot classification, retrieval recall@k, relations, probes.

Every function takes L2-normalised embeddings (rows) and returns plain floats, so the tasks stay
thin and the maths can be tested on hand-made vectors. Conventions follow CLIP_benchmark:
acc@5 exists only with at least 5 classes; a retrieval hit at k means any positive is in the top k.
"""
from __future__ import annotations

import re

import numpy as np
import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose true label is among the k highest logits."""
    topk = logits.topk(k, dim=1).indices                       # (N, k)
    return (topk == labels[:, None]).any(dim=1).float().mean().item()


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Recall of each class present in `labels`, averaged over those classes (balanced accuracy)."""
    recalls = [(pred[labels == c] == c).float().mean() for c in labels.unique()]
    return torch.stack(recalls).mean().item()


def class_embeddings(text_emb: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Average the template embeddings of each class and re-normalise.

    `text_emb` is (num_classes * T, D), class-major: rows c*T .. c*T+T-1 are class c's templates.
    """
    per_class = text_emb.reshape(num_classes, -1, text_emb.shape[-1]).mean(dim=1)
    return torch.nn.functional.normalize(per_class, dim=-1)


def zeroshot_metrics(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (only with >= 5 classes) and mean per-class recall of argmax(image · class)."""
    logits = image_emb @ class_emb.T
    out = {"acc1": topk_accuracy(logits, labels, 1)}
    if class_emb.shape[0] >= 5:
        out["acc5"] = topk_accuracy(logits, labels, 5)
    out["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=1), labels)
    return out


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image→text and text→image recall@k; text j is a caption of image `text_to_image[j]`.

    Image→text: a hit when any of the image's captions is in its top k texts.
    Text→image: a hit when the caption's own image is in its top k images.
    A k larger than the candidates is skipped (recall would be 1 by construction).
    """
    sim = image_emb @ text_emb.T                                 # (I, T)
    positive = text_to_image[None, :] == torch.arange(sim.shape[0])[:, None]   # (I, T)
    out = {}
    for k in ks:
        if k < sim.shape[1]:
            top_texts = sim.topk(k, dim=1).indices                # (I, k)
            out[f"image_to_text_R@{k}"] = positive.gather(1, top_texts).any(dim=1).float().mean().item()
        if k < sim.shape[0]:
            top_images = sim.T.topk(k, dim=1).indices             # (T, k)
            out[f"text_to_image_R@{k}"] = (top_images == text_to_image[:, None]).any(dim=1).float().mean().item()
    return out


def relation_accuracy(image_emb: torch.Tensor, true_emb: torch.Tensor, swapped_emb: torch.Tensor) -> float:
    """Fraction of images more similar to their true caption than to the swapped one (ties lose)."""
    true_sim = (image_emb * true_emb).sum(dim=1)
    swapped_sim = (image_emb * swapped_emb).sum(dim=1)
    return (true_sim > swapped_sim).float().mean().item()


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, train_fraction: float,
                          seed: int = 0) -> float:
    """Logistic regression on frozen features of one set: fit on a stratified split, return the test accuracy.

    Classes with a single example cannot be split between train and test and are left out.
    """
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, classes[counts >= 2])
    x, y = features[keep], labels[keep]
    if len(np.unique(y)) < 2:
        raise ValueError(f"linear probe needs at least 2 classes with 2+ examples each; got labels {np.unique(labels)}")
    n_test = max(len(np.unique(y)), int(round(len(y) * (1 - train_fraction))))
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=n_test, random_state=seed, stratify=y)
    return fit_linear_probe(x_train, y_train, x_test, y_test)


def fit_linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Logistic regression fitted on (x_train, y_train), features standardised on the training rows;
    the accuracy on (x_test, y_test). A test class absent from training counts as wrong."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        raise ValueError(f"linear probe needs at least 2 classes to train on; got labels {np.unique(y_train)}")
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=1000, C=1.0)
    clf.fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_test)) == y_test).mean())


WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")     # letters and digits, joined by inner hyphens or apostrophes


def caption_words(text: str) -> list[str]:
    """A caption as the captioning metrics compare it: its lower-cased words, punctuation dropped, as COCO's
    caption evaluation leaves them (pycocoevalcap's PTB tokenizer, which needs Java, then drops punctuation)."""
    return WORD.findall(text.lower())


def caption_metrics(generated: list[str], references: list[list[str]]) -> dict[str, float]:
    """Exact match (the generated caption equals one of its references, word for word after `caption_words`),
    corpus BLEU-4 and CIDEr-D (pycocoevalcap's scorers, fed `caption_words` tokens in place of its PTB tokenizer's)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(generated) != len(references) or not generated or not all(references):
        raise ValueError(f"caption_metrics: {len(generated)} captions for {len(references)} reference lists "
                         "(expected as many, each with at least one reference)")
    hyp = {i: [" ".join(caption_words(g))] for i, g in enumerate(generated)}
    refs = {i: [" ".join(caption_words(r)) for r in rs] for i, rs in enumerate(references)}
    exact = np.mean([hyp[i][0] in refs[i] for i in hyp])
    bleu, _ = Bleu(4).compute_score(refs, hyp, verbose=0)
    cider, _ = Cider().compute_score(refs, hyp)
    return {"exact_match": float(exact), "bleu4": float(bleu[3]), "cider": float(cider)}
