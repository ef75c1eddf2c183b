"""Images, masks and datasets by name (the sample types are in :mod:`editeval.core.samples`)."""

from editeval.data.datasets import DATASETS, load_dataset
from editeval.data.images import (
    Geometry,
    ImageLoadError,
    MaskError,
    fit_to_resolution,
    load_image,
    load_mask,
)

__all__ = [
    "DATASETS",
    "Geometry",
    "ImageLoadError",
    "MaskError",
    "fit_to_resolution",
    "load_dataset",
    "load_image",
    "load_mask",
]
