"""Base models: named suites, short names, and loading through ``from_pretrained``."""

from editeval.models.loading import ModelNotAvailableError, default_device, load_pipeline, resolve_dtype
from editeval.models.suites import ALIASES, KINDS, SUITES, ModelSuite, resolve_checkpoint

__all__ = [
    "ALIASES",
    "KINDS",
    "SUITES",
    "ModelNotAvailableError",
    "ModelSuite",
    "default_device",
    "load_pipeline",
    "resolve_checkpoint",
    "resolve_dtype",
]
