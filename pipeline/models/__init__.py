"""Dual-encoder models: towers, named configs, pretrained towers and locking, published checkpoints, export."""
from pipeline.models.configs import MODEL_NAMES, HFSpec, ModelSpec, TextSpec, ViTSpec, named_spec
from pipeline.models.dual import LOGIT_SCALE_BOUNDS, DualEncoder, build_model, count_parameters, resolve_spec
from pipeline.models.published import CheckpointError, Published, load_published, save_published

__all__ = ["LOGIT_SCALE_BOUNDS", "MODEL_NAMES", "ModelSpec", "ViTSpec", "TextSpec", "HFSpec", "named_spec",
           "DualEncoder", "build_model", "count_parameters", "resolve_spec", "CheckpointError", "Published",
           "load_published", "save_published"]
