"""Classic image-editing metrics on torchmetrics: CLIPScore, CLIP-I, directional CLIP, LPIPS,
PSNR/SSIM/MSE on the unedited region, DINO structure distance, FID and KID.

``editeval score RUN_DIR --metrics clip_t,psnr,...`` (or :func:`score_metrics`) adds them to a run;
:func:`metric_table` gives the method x task table. Modules: :mod:`~editeval.metrics.regions`
(image conversion, PIE-Bench regions), :mod:`~editeval.metrics.pixel` (PSNR, SSIM, MSE),
:mod:`~editeval.metrics.perceptual` (LPIPS), :mod:`~editeval.metrics.clip_similarity` (CLIP
metrics), :mod:`~editeval.metrics.structure` (DINO structure distance),
:mod:`~editeval.metrics.distribution` (FID, KID), :mod:`~editeval.metrics.backbones` (which network,
loading), :mod:`~editeval.metrics.tiny` (tiny random backbones for tests),
:mod:`~editeval.metrics.scoring` (run directories), :mod:`~editeval.metrics.correlation` (how well
each metric predicts the toy world's ground truth).
"""

from editeval.metrics.backbones import (
    FIELD_DEFAULTS,
    OFFLINE_DEFAULTS,
    BackboneUnavailableError,
    default_backbones,
    load_clip,
)
from editeval.metrics.scoring import (
    DEFAULT_METRICS,
    METRICS,
    MetricSummary,
    metric_table,
    metrics_markdown,
    parse_metrics,
    score_metrics,
)

__all__ = [
    "DEFAULT_METRICS",
    "FIELD_DEFAULTS",
    "METRICS",
    "OFFLINE_DEFAULTS",
    "BackboneUnavailableError",
    "MetricSummary",
    "default_backbones",
    "load_clip",
    "metric_table",
    "metrics_markdown",
    "parse_metrics",
    "score_metrics",
]
