"""Judges: score how strongly an answer shows a trait, or how coherent it is, on 0-100.

``LocalJudge`` runs any local Hugging Face instruct model; ``OpenAICompatibleJudge`` calls an
OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, ...). Both follow :class:`Judge`
and aggregate one answer distribution with :func:`score_from_candidates`. ``CachedJudge`` adds
an on-disk cache.
"""

from .base import (COHERENCE_RUBRIC, MIN_NUMERIC_MASS, CachedJudge, Judge, JudgeError, JudgeFilter, render_rubric,
                   score_from_candidates)
from .local import LocalJudge
from .openai import OpenAICompatibleJudge

__all__ = ["COHERENCE_RUBRIC", "CachedJudge", "Judge", "JudgeError", "JudgeFilter", "LocalJudge", "MIN_NUMERIC_MASS",
           "OpenAICompatibleJudge", "render_rubric", "score_from_candidates"]
