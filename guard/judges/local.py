"""A judge that runs a local Hugging Face instruct model: the paper's 0-100 logprob score, offline.

The paper's judge reads one next-token distribution, which works for API models whose tokenizer
holds every integer 0-100 as one token. Most open models split numbers into digits, so here
"the distribution over the integers 0-100" is read off the model exactly: P(k) is the product
of the probabilities of k's tokens, times the probability that the number stops there when k
is also the start of a longer number in range ("1" of "10"). One forward of the judge prompt
(with KV cache) plus one small batched forward over the numbers' token prefixes gives all 101.
With a tokenizer where every integer is one token this is exactly the paper's rule.
"""

from __future__ import annotations

import torch

from ..core.chat import format_prompt
from ..core.models import eval_mode, model_name
from .base import MIN_NUMERIC_MASS, render_rubric, score_from_candidates


class LocalJudge:
    """Scores answers with a local causal LM by reading its distribution over the integers 0-100.

    Args:
        model, tokenizer: the judge model and its tokenizer.
        name: the judge's name, which keys the on-disk cache (default: built from the model's name
            and any non-default ``system`` and ``min_mass``).
        system: a system prompt for the judge (None: none).
        min_mass: the least probability the integers must hold for a score (less: None).
    """

    def __init__(self, model, tokenizer, *, name: str | None = None, system: str | None = None,
                 min_mass: float = MIN_NUMERIC_MASS):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.min_mass = min_mass
        # The name keys the on-disk cache, so it carries everything that changes a score.
        self.name = name or (f"local:{model_name(model)}" + (f"|system={system}" if system else "")
                             + (f"|min_mass={min_mass}" if min_mass != MIN_NUMERIC_MASS else ""))
        self._paths_by_tail: dict[str, dict[int, tuple[int, ...]]] = {}
        self._digit_start: torch.Tensor | None = None

    def score(self, question: str, answer: str, rubric: str) -> float | None:
        """The probability-weighted mean of 0-100 under :meth:`distribution`; None below ``min_mass``.

        Args:
            question, answer: the question asked and the answer judged.
            rubric: the template with ``{question}`` and ``{answer}`` placeholders.
        """
        return score_from_candidates(self.distribution(question, answer, rubric).items(), self.min_mass)

    def _number_paths(self, prompt: str) -> dict[int, tuple[int, ...]]:
        """Token ids of each integer 0..100 as the tokenizer writes it right after ``prompt``."""
        tail = prompt[-32:]  # the boundary tokenisation depends only on the prompt's last characters
        if tail not in self._paths_by_tail:
            encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
            base = encode(tail)
            paths = {}
            for k in range(101):
                full = encode(tail + str(k))
                paths[k] = tuple(full[len(base):] if full[:len(base)] == base else encode(str(k)))
            self._paths_by_tail[tail] = paths
        return self._paths_by_tail[tail]

    def _digit_start_mask(self, vocab: int) -> torch.Tensor:
        """Tokens that would continue a number (start with a digit, no leading space marker)."""
        if self._digit_start is None or len(self._digit_start) != vocab:
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(self.tokenizer)))))
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[: len(tokens)] = torch.tensor([bool(t) and t[0].isdigit() for t in tokens])
            self._digit_start = mask
        return self._digit_start

    @torch.inference_mode()
    def distribution(self, question: str, answer: str, rubric: str) -> dict[int, float]:
        """Unnormalised P(the judge answers k) for k = 0..100.

        Args:
            question, answer, rubric: as in :meth:`score`.
        """
        prompt = format_prompt(self.tokenizer, render_rubric(rubric, question, answer), self.system)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        paths = self._number_paths(prompt)
        # Prefixes whose next-token distribution we need: the numbers that are the start of another.
        inner = sorted({path[:i] for path in paths.values() for i in range(1, len(path))} - {()})
        device = next(self.model.parameters()).device
        with eval_mode(self.model):
            ids = torch.tensor([prompt_ids], device=device)
            out = self.model(input_ids=ids, use_cache=bool(inner))
            logprobs = {(): torch.log_softmax(out.logits[0, -1].float(), dim=-1)}
            if inner:
                width = max(map(len, inner))
                cont = torch.zeros((len(inner), width), dtype=torch.long, device=device)
                for row, prefix in enumerate(inner):
                    cont[row, : len(prefix)] = torch.tensor(prefix)
                cache = out.past_key_values
                cache.batch_repeat_interleave(len(inner))
                # Padding sits after each prefix, so causal attention keeps it out of the logits we read.
                positions = torch.arange(len(prompt_ids), len(prompt_ids) + width, device=device).expand(len(inner), -1)
                logits = self.model(input_ids=cont, past_key_values=cache, position_ids=positions,
                                    attention_mask=torch.ones((len(inner), len(prompt_ids) + width), device=device,
                                                              dtype=torch.long),
                                    use_cache=False).logits.float()
                for row, prefix in enumerate(inner):
                    logprobs[prefix] = torch.log_softmax(logits[row, len(prefix) - 1], dim=-1)

        continues = self._digit_start_mask(logprobs[()].shape[-1]).to(logprobs[()].device)
        probs = {}
        for k, path in paths.items():
            logp = sum(float(logprobs[path[:i]][tok]) for i, tok in enumerate(path))
            p = torch.tensor(logp).exp().item()
            if path in logprobs:  # k is also the start of a longer number: it must stop here
                p *= 1.0 - float(logprobs[path].exp()[continues].sum())
            probs[k] = p
        return probs
