"""Auto-steering from a one-sentence description with a sparse autoencoder, offline.

:func:`autosteer` runs the whole pipeline (contrastive data from the model's own answers, latent
retrieval, weight search on dev prompts, a held-out report against prompting and a random-latent
control) and returns an :class:`AutosteerResult`, whose :meth:`~AutosteerResult.save` writes a
steering spec file that :meth:`guard.core.steering.Steering.load`, ``persona-guard evaluate
--steer`` and ``Steering.apply`` accept.
"""

from .data import (
    NEUTRAL_SYSTEM,
    PROMPT_BANK,
    AutosteerError,
    ContrastiveSet,
    PromptSplit,
    build_contrastive,
    ensure_dev_only,
    load_prompt_bank,
)
from .proposer import ChatProposer, parse_strengths
from .pipeline import AutosteerConfig, AutosteerResult, ConditionReport, autosteer
from .retrieval import LatentRecord, Retrieval, latent_steering, retrieve_latents
from .scoring import (
    ConditionScores,
    Reference,
    concept_rubric,
    reference,
    score_condition,
)
from .search import (
    ProposalError,
    SearchResult,
    Trial,
    harmonic_mean,
    search_one_strength,
    search_strengths,
    search_with_proposer,
)

__all__ = [
    "NEUTRAL_SYSTEM",
    "PROMPT_BANK",
    "AutosteerConfig",
    "AutosteerError",
    "AutosteerResult",
    "ChatProposer",
    "ConditionReport",
    "ConditionScores",
    "ContrastiveSet",
    "LatentRecord",
    "PromptSplit",
    "ProposalError",
    "Reference",
    "Retrieval",
    "SearchResult",
    "Trial",
    "autosteer",
    "build_contrastive",
    "concept_rubric",
    "ensure_dev_only",
    "harmonic_mean",
    "latent_steering",
    "load_prompt_bank",
    "parse_strengths",
    "reference",
    "retrieve_latents",
    "score_condition",
    "search_one_strength",
    "search_strengths",
    "search_with_proposer",
]
