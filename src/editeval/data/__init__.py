"""Images, masks, samples and datasets."""

from editeval.data.datasets import DATASETS, load_dataset
from editeval.data.images import (
    Geometry,
    ImageLoadError,
    MaskError,
    fit_to_resolution,
    load_image,
    load_mask,
)
from editeval.data.samples import TASKS, Dataset, DatasetError, Sample

__all__ = [
    "DATASETS",
    "TASKS",
    "Dataset",
    "DatasetError",
    "Geometry",
    "ImageLoadError",
    "MaskError",
    "Sample",
    "fit_to_resolution",
    "load_dataset",
    "load_image",
    "load_mask",
]
