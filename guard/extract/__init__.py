"""Extraction: from a trait definition to a persona vector per layer, and the layer to use."""

from .cached import load_or_extract
from .extraction import Extraction, ExtractionConfig, Rollout, extract_vector
from .selection import LayerSelection, select_and_record, select_layer

__all__ = ["Extraction", "ExtractionConfig", "LayerSelection", "Rollout", "extract_vector", "load_or_extract",
           "select_and_record", "select_layer"]
