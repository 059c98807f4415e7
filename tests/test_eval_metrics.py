"""Metrics on hand-made embeddings whose answers are worked out by hand in the comments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.eval.metrics import (
    class_embeddings,
    linear_probe_accuracy,
    mean_per_class_recall,
    relation_accuracy,
    retrieval_metrics,
    topk_accuracy,
    zeroshot_metrics,
)


def unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_topk_accuracy_counts_label_within_k():
    logits = torch.tensor([[0.9, 0.5, 0.1, 0.0],     # label 0: rank 1
                           [0.9, 0.5, 0.1, 0.0],     # label 1: rank 2
                           [0.9, 0.5, 0.1, 0.0],     # label 3: rank 4
                           [0.1, 0.2, 0.3, 0.4]])    # label 3: rank 1
    labels = torch.tensor([0, 1, 3, 3])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(2 / 4)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(3 / 4)
    assert topk_accuracy(logits, labels, 4) == pytest.approx(1.0)


def test_mean_per_class_recall_weights_classes_equally():
    # class 0: 4 samples, 4 right; class 1: 1 sample, wrong.  accuracy 4/5, balanced (1 + 0)/2.
    labels = torch.tensor([0, 0, 0, 0, 1])
    pred = torch.tensor([0, 0, 0, 0, 0])
    assert mean_per_class_recall(pred, labels) == pytest.approx(0.5)


def test_class_embeddings_average_templates_then_renormalise():
    # class 0 templates: e0 and e1 → mean (0.5, 0.5, 0) → (1/√2, 1/√2, 0); class 1: e2 twice → e2.
    text = unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1])
    got = class_embeddings(text, num_classes=2)
    want = torch.tensor([[2 ** -0.5, 2 ** -0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(got, want, atol=1e-6)


def test_zeroshot_metrics_with_few_classes_has_no_acc5():
    classes = unit([1, 0], [0, 1])
    images = unit([1, 0.1], [0.2, 1], [1, 0.3])       # predicted 0, 1, 0
    m = zeroshot_metrics(images, classes, torch.tensor([0, 1, 1]))
    assert m["acc1"] == pytest.approx(2 / 3)
    assert "acc5" not in m                              # undefined with fewer than 5 classes
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5) / 2)


def test_zeroshot_metrics_acc5_with_six_classes():
    classes = torch.eye(6)
    # image 0: similarities ordered 0 > 1 > 2 > 3 > 4 > 5; label 5 is rank 6 → miss at 5.
    # image 1: label 4 is rank 5 → hit at 5, miss at 1.  image 2: label 0 rank 1.
    images = unit([6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1])
    m = zeroshot_metrics(images, classes, torch.tensor([5, 4, 0]))
    assert m["acc1"] == pytest.approx(1 / 3)
    assert m["acc5"] == pytest.approx(2 / 3)


def test_retrieval_with_several_captions_per_image():
    # 3 images on the axes. Captions: image 0 has texts 0 and 1, image 1 text 2, image 2 text 3.
    images = torch.eye(3)
    texts = unit([0.2, 1, 0],      # text 0 (of image 0) points at image 1: wrong for t→i @1
                 [1, 0, 0.1],      # text 1 (of image 0) points at image 0
                 [0, 1, 0.5],      # text 2 (of image 1) points at image 1
                 [0, 0.9, 1])      # text 3 (of image 2) points at image 2
    text_to_image = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(images, texts, text_to_image, ks=(1, 2))
    # image→text @1: image 0's best text is text 1 (a positive) ✓; image 1's best is text 0
    # (text0·e1 = 1/√1.04 = 0.981 > text2·e1 = 1/√1.25 = 0.894) ✗; image 2's best is text 3 ✓ → 2/3
    assert m["image_to_text_R@1"] == pytest.approx(2 / 3)
    # @2: image 1's top two are text 0 and text 2 ✓ → 3/3
    assert m["image_to_text_R@2"] == pytest.approx(1.0)
    # text→image @1: text 0 → image 1 ✗, text 1 → 0 ✓, text 2 → 1 ✓, text 3 → 2 ✓ → 3/4
    assert m["text_to_image_R@1"] == pytest.approx(3 / 4)
    assert m["text_to_image_R@2"] == pytest.approx(1.0)


def test_retrieval_skips_k_not_below_candidates():
    m = retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), ks=(1, 5))
    assert set(m) == {"image_to_text_R@1", "text_to_image_R@1"}


def test_relation_accuracy_ties_count_as_wrong():
    images = unit([1, 0], [0, 1], [1, 1])
    true = unit([1, 0.1], [1, 0], [1, 0])
    swapped = unit([0, 1], [0, 1], [0, 1])     # image 0 ✓, image 1 ✗, image 2 tie ✗
    assert relation_accuracy(images, true, swapped) == pytest.approx(1 / 3)


def test_linear_probe_separable_vs_random_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    centres = np.eye(8)[:4] * 5.0
    separable = centres[labels] + rng.normal(size=(200, 8))
    assert linear_probe_accuracy(separable, labels, train_fraction=0.8) > 0.95
    noise = rng.normal(size=(200, 8))
    assert linear_probe_accuracy(noise, labels, train_fraction=0.8) < 0.5


def test_linear_probe_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe_accuracy(np.zeros((5, 3)), np.zeros(5, dtype=int), train_fraction=0.8)
