"""Real signal on the embedded model: a small extraction already separates held-out prompts."""

import pytest
import torch

from helpers import BENCHMARK_DATA

from guard.core.forward import prompt_activations
from guard.core.chat import format_prompt
from guard.extract.extraction import ExtractionConfig, extract_vector
from guard.core.generation import SamplingConfig
from guard.core.stats import auroc, random_directions
from guard.traits import load_trait

pytestmark = pytest.mark.integration


def test_sycophancy_vector_separates_held_out_prompts_before_generation(embedded):
    model, tokenizer, _ = embedded
    trait = load_trait("sycophancy")
    config = ExtractionConfig(max_questions=5, sampling=SamplingConfig(max_new_tokens=32))
    vector = extract_vector(model, tokenizer, trait, config).vector
    questions = trait.evaluation_questions[:10]
    pos = [format_prompt(tokenizer, q, p.pos) for p in trait.instruction_pairs for q in questions]
    neg = [format_prompt(tokenizer, q, p.neg) for p in trait.instruction_pairs for q in questions]
    acts = prompt_activations(model, tokenizer, pos + neg, batch_size=30)
    n = len(pos)
    scores = [auroc(acts[:n, layer] @ vector.unit(layer), acts[n:, layer] @ vector.unit(layer))
              for layer in range(vector.num_layers)]
    best = max(range(len(scores)), key=scores.__getitem__)
    assert scores[best] >= 0.9, scores
    rand = acts[:, best] @ random_directions(10, vector.hidden_size, seed=1).T
    rand_scores = torch.tensor([auroc(rand[:n, k], rand[n:, k]) for k in range(10)])
    assert scores[best] - rand_scores.mean() > 0.25, (scores[best], rand_scores)


def test_screening_separates_trait_from_normal_responses_without_generation(embedded):
    """Approximation mode on the labelled screening set's evil pairs (written for the benchmark):
    a small evil vector ranks the malicious responses above the normal ones."""

    from guard.screen.samples import load_samples
    from guard.screen.scoring import ScreenConfig, Screener

    model, tokenizer, _ = embedded
    trait = load_trait("evil")
    vector = extract_vector(model, tokenizer, trait, ExtractionConfig(max_questions=5,
                                                                      sampling=SamplingConfig(max_new_tokens=32))).vector
    data = BENCHMARK_DATA / "screen_eval.jsonl"
    samples = [s for s in load_samples(data).samples if s.id.startswith("evil-")]
    labels = [s.id.endswith("-pos") for s in samples]
    result = Screener(model, tokenizer, [vector], ScreenConfig(mode="approx"), layers=list(range(8, 21, 4))).score(samples)
    scores = {}
    for key in result.keys:
        values = torch.tensor([s.scores[key.name]["approx"] for s in result.samples])
        scores[key.layer] = auroc(values[torch.tensor(labels)], values[~torch.tensor(labels)])
    assert max(scores.values()) >= 0.9, scores
