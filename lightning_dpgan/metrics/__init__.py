"""Quality metrics. Metric modules are never gossiped, averaged or checkpointed with the model (see strategy.py)."""

from lightning_dpgan.metrics.extractor import DigitClassifier, FrozenExtractor, extractor_report, load_classifier
from lightning_dpgan.metrics.image_quality import (
    InceptionWeightsError,
    ensure_inception_weights,
    fid_metric,
    inception_score_metric,
    to_unit_range,
)
from lightning_dpgan.metrics.mode_coverage import ModeCoverage, mode_coverage

__all__ = [
    "DigitClassifier",
    "FrozenExtractor",
    "InceptionWeightsError",
    "ModeCoverage",
    "ensure_inception_weights",
    "extractor_report",
    "fid_metric",
    "inception_score_metric",
    "load_classifier",
    "mode_coverage",
    "to_unit_range",
]
