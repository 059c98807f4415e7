"""Dual-encoder models: towers, named configs, pretrained towers and locking, published checkpoints, export."""
from pipeline.models.configs import MODEL_NAMES, TEXT_MODEL, HFSpec, ModelSpec, TextSpec, ViTSpec, named_spec
from pipeline.models.dual import DualEncoder, build_model, count_parameters, resolve_spec
from pipeline.models.logits import LOGIT_SCALE_BOUNDS
from pipeline.models.published import CheckpointError, Published, load_published, save_published
from pipeline.models.text_dual import TextDualEncoder, TextDualSpec

__all__ = ["LOGIT_SCALE_BOUNDS", "MODEL_NAMES", "TEXT_MODEL", "ModelSpec", "ViTSpec", "TextSpec", "HFSpec",
           "named_spec", "DualEncoder", "TextDualEncoder", "TextDualSpec", "build_model", "count_parameters",
           "resolve_spec", "CheckpointError", "Published", "load_published", "save_published"]
