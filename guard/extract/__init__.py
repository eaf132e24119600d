"""Extraction: from a trait definition to a persona vector per layer, and the layer to use."""

from .extraction import Extraction, ExtractionConfig, Rollout, extract_vector

__all__ = ["Extraction", "ExtractionConfig", "Rollout", "extract_vector"]
