"""Dual-encoder models: towers, named configs, pretrained towers and locking, published checkpoints, export."""
from pipeline.models.configs import MODEL_NAMES, HFSpec, ModelSpec, TextSpec, ViTSpec, named_spec
from pipeline.models.dual import DualEncoder, build_model, count_parameters, resolve_spec
from pipeline.models.published import CheckpointError, load_published, published_name, save_published

__all__ = ["MODEL_NAMES", "ModelSpec", "ViTSpec", "TextSpec", "HFSpec", "named_spec", "DualEncoder",
           "build_model", "count_parameters", "resolve_spec", "CheckpointError",
           "load_published", "published_name", "save_published"]
