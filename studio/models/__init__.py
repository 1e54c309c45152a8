"""Base models: loading, families, keys and the tiny offline builders."""

from studio.models.keys import compatibility_key, cross_attention_layers
from studio.models.loading import BaseModel, describe, family_of_pipeline, load_base
from studio.models.tiny import TINY_NAMES, build_tiny_pipeline

__all__ = ["BaseModel", "describe", "load_base", "family_of_pipeline", "compatibility_key", "cross_attention_layers",
           "TINY_NAMES", "build_tiny_pipeline"]
