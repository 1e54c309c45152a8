"""Base models: loading, families, keys, the base profile, load settings and the tiny offline builders."""

from studio.models.keys import compatibility_key, cross_attention_layers
from studio.models.loading import BaseModel, describe, family_of_pipeline, load_base
from studio.models.profile import BaseProfile
from studio.models.settings import BaseSettings
from studio.models.tiny import TINY_NAMES, build_tiny_pipeline

__all__ = ["BaseModel", "BaseProfile", "BaseSettings", "describe", "load_base", "family_of_pipeline",
           "compatibility_key", "cross_attention_layers", "TINY_NAMES", "build_tiny_pipeline"]
