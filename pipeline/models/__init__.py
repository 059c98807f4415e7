"""Dual-encoder models: towers, named configs, pretrained towers and locking, imports (`model.init_from`),
published checkpoints, export; the text–text dual encoder (`model.name: text`)."""
from pipeline.models.build import build_model, count_parameters, resolve_spec
from pipeline.models.configs import MODEL_NAMES, TEXT_MODEL, HFSpec, ModelSpec, TextSpec, ViTSpec, named_spec
from pipeline.models.convert import ConversionError
from pipeline.models.dual import DualEncoder
from pipeline.models.init_from import (
    build_run_model,
    check_source,
    load_model,
    run_parameter_counts,
    run_tokenizer,
    weight_sources,
)
from pipeline.models.logits import LOGIT_SCALE_BOUNDS
from pipeline.models.published import CheckpointError, Published, load_published, save_published
from pipeline.models.text_dual import TextDualEncoder, TextDualSpec

__all__ = ["LOGIT_SCALE_BOUNDS", "MODEL_NAMES", "TEXT_MODEL", "ModelSpec", "ViTSpec", "TextSpec", "HFSpec",
           "named_spec", "DualEncoder", "TextDualEncoder", "TextDualSpec", "build_model", "count_parameters",
           "resolve_spec", "CheckpointError", "ConversionError", "Published", "load_published", "save_published",
           "build_run_model", "load_model", "run_parameter_counts", "run_tokenizer", "weight_sources", "check_source"]
