"""Contrastive data for auto-steering: the shipped prompt bank with its fixed dev/test split, and
the model's own greedy answers under the description as a system prompt and under a neutral one.

The split is the rule every stage keeps: latent retrieval and weight tuning see only ``dev``
prompts (:func:`ensure_dev_only` refuses anything else); ``test`` prompts are read only by the
held-out report.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.chat import format_prompt
from ..core.forward import encode, pad_batch, plan_batches
from ..core.generation import SamplingConfig, generate
from ..core.layers import capture
from ..core.models import eval_mode
from ..errors import AutosteerError

PROMPT_BANK = Path(__file__).with_name("prompts.json")
NEUTRAL_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class PromptSplit:
    """Ordinary prompts split once and for all into ``dev`` (selection, tuning) and ``test`` (report).

    Args:
        dev: the prompts retrieval and tuning may read.
        test: the held-out prompts, read only by the report.
        source: where the split comes from (a file path), for reports.
    """

    dev: tuple[str, ...]
    test: tuple[str, ...]
    source: str = "shipped"

    def __post_init__(self):
        if not self.dev or not self.test:
            raise AutosteerError(f"the prompt bank {self.source} needs both 'dev' and 'test' prompts")
        for name, prompts in (("dev", self.dev), ("test", self.test)):
            bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
            if bad:
                raise AutosteerError(f"the prompt bank {self.source} has an empty or non-string {name} prompt")
        shared = sorted(set(self.dev) & set(self.test))
        if shared:
            raise AutosteerError(f"the prompt bank {self.source} has {len(shared)} prompt(s) in both dev and test "
                                 f"(first: {shared[0]!r}); a prompt belongs to one split")

    def take(self, n_dev: int | None = None, n_test: int | None = None) -> PromptSplit:
        """The first ``n_dev`` dev and ``n_test`` test prompts (None: all), the split unchanged.

        Args:
            n_dev: dev prompts kept (at least 1).
            n_test: test prompts kept (at least 1).
        """
        for n, name in ((n_dev, "n_dev"), (n_test, "n_test")):
            if n is not None and n < 1:
                raise AutosteerError(f"{name} must be at least 1, got {n}")
        return PromptSplit(self.dev[:n_dev], self.test[:n_test], self.source)

    def to_dict(self) -> dict:
        return {"source": self.source, "dev": list(self.dev), "test": list(self.test)}


def load_prompt_bank(path: str | Path | None = None) -> PromptSplit:
    """The prompt bank: a JSON object with ``dev`` and ``test`` lists of prompts.

    Args:
        path: the JSON file (None: the shipped ``guard/autosteer/prompts.json``).
    """
    file = Path(path) if path is not None else PROMPT_BANK
    if not file.is_file():
        raise AutosteerError(f"prompt bank {file} does not exist; give a JSON file with 'dev' and 'test' lists")
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise AutosteerError(f"prompt bank {file} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("dev"), list) or not isinstance(data.get("test"), list):
        raise AutosteerError(f"prompt bank {file} must be a JSON object with 'dev' and 'test' lists of prompts")
    return PromptSplit(tuple(data["dev"]), tuple(data["test"]), "shipped" if path is None else str(file))


def ensure_dev_only(prompts: Sequence[str], split: PromptSplit, stage: str) -> None:
    """Refuse ``prompts`` unless every one is a dev prompt of ``split``: selection and tuning must
    never see a test prompt.

    Args:
        prompts: the prompts a stage is about to read.
        split: the prompt split.
        stage: the stage's name, for the message.
    """
    test = set(split.test)
    leaked = [p for p in prompts if p in test]
    if leaked:
        raise AutosteerError(f"{stage} was handed {len(leaked)} test prompt(s) (first: {leaked[0]!r}); "
                             "only dev prompts may choose latents or tune weights")
    unknown = [p for p in prompts if p not in set(split.dev)]
    if unknown:
        raise AutosteerError(f"{stage} was handed {len(unknown)} prompt(s) outside the dev split "
                             f"(first: {unknown[0]!r})")


@dataclass
class ContrastiveSet:
    """Per prompt, the model's greedy answer under the description (``prompted``) and under the
    neutral system prompt (``neutral``), as token ids and text.

    Args:
        split: ``"dev"`` or ``"test"``.
        prompts: the user prompts (those whose two answers were both non-empty).
        prompted_ids, neutral_ids: the answers' token ids.
        prompted, neutral: the answers' text.
        dropped: prompts left out because one answer was empty.
    """

    split: str
    prompts: list[str]
    prompted_ids: list[list[int]]
    neutral_ids: list[list[int]]
    prompted: list[str]
    neutral: list[str]
    dropped: list[str]

    def pairs(self) -> list[tuple[str, str, str]]:
        """``(prompt, prompted answer, neutral answer)`` triples, as the pairwise metrics take them."""
        return list(zip(self.prompts, self.prompted, self.neutral))

    def to_dict(self, samples: int | None = None) -> dict:
        """The prompts and answers as JSON (the first ``samples`` of them; None: all).

        Args:
            samples: how many prompts to include.
        """
        rows = [{"prompt": p, "prompted": a, "neutral": b}
                for p, a, b in list(zip(self.prompts, self.prompted, self.neutral))[:samples]]
        return {"split": self.split, "n": len(self.prompts), "dropped": self.dropped, "answers": rows}


def prompt_ids(tokenizer, prompts: Sequence[str], system: str | None) -> list[list[int]]:
    """Token ids of chat-templated prompts ending where the reply begins.

    Args:
        tokenizer: the tokenizer.
        prompts: the user prompts.
        system: the system prompt (None or empty: none).
    """
    return encode(tokenizer, [format_prompt(tokenizer, p, system or None) for p in prompts])


def greedy_answers(model, tokenizer, prompts: Sequence[str], system: str | None, max_new_tokens: int, *,
                   steering=None, batch_size: int = 16, progress: bool = False,
                   desc: str = "generating") -> list[list[int]]:
    """Greedy answers' token ids (stop token excluded), under ``steering`` when given.

    Args:
        model, tokenizer: the model and its tokenizer.
        prompts: the user prompts.
        system: the system prompt (None or empty: none).
        max_new_tokens: the length cap.
        steering: a :class:`~guard.core.steering.Steering` applied while generating (None: none).
        batch_size: prompts per generation batch.
        progress, desc: a progress bar and its label.
    """
    from contextlib import nullcontext

    ids = prompt_ids(tokenizer, prompts, system)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    with steering.apply(model) if steering is not None else nullcontext():
        return generate(model, tokenizer, ids, sampling, batch_size=batch_size, progress=progress, desc=desc)


def build_contrastive(model, tokenizer, prompts: Sequence[str], description: str, split: str, *,
                      neutral_system: str = NEUTRAL_SYSTEM, max_new_tokens: int = 48, batch_size: int = 16,
                      progress: bool = False) -> ContrastiveSet:
    """The model's greedy answers to ``prompts`` with ``description`` as the system prompt and with
    ``neutral_system``; prompts where either answer is empty are dropped (and listed).

    Args:
        model, tokenizer: the model and its tokenizer.
        prompts: the user prompts (of one split).
        description: the behaviour, used as the system prompt of the prompted answers.
        split: ``"dev"`` or ``"test"``, recorded on the set.
        neutral_system: the system prompt of the neutral answers (empty: none).
        max_new_tokens: the answers' length cap.
        batch_size: prompts per generation batch.
        progress: show progress bars.
    """
    prompts = list(prompts)
    prompted = greedy_answers(model, tokenizer, prompts, description, max_new_tokens, batch_size=batch_size,
                              progress=progress, desc=f"{split}: prompted answers")
    neutral = greedy_answers(model, tokenizer, prompts, neutral_system, max_new_tokens, batch_size=batch_size,
                             progress=progress, desc=f"{split}: neutral answers")
    kept, dropped = [], []
    for i, prompt in enumerate(prompts):
        a = tokenizer.decode(prompted[i], skip_special_tokens=True)
        b = tokenizer.decode(neutral[i], skip_special_tokens=True)
        # pairwise metrics re-tokenise the text: both answers must survive as at least one token
        if a.strip() and b.strip() and tokenizer(a, add_special_tokens=False)["input_ids"] \
                and tokenizer(b, add_special_tokens=False)["input_ids"]:
            kept.append((prompt, prompted[i], neutral[i], a, b))
        else:
            dropped.append(prompt)
    if not kept:
        raise AutosteerError(f"every {split} prompt got an empty answer; raise max_new_tokens or check the model")
    p, pi, ni, a, b = (list(column) for column in zip(*kept))
    return ContrastiveSet(split, p, pi, ni, a, b, dropped)


@torch.inference_mode()
def response_token_activations(model, prompts_ids: Sequence[list[int]], responses_ids: Sequence[list[int]],
                               layer: int, *, batch_size: int = 16,
                               layer_path: str | None = None) -> list[torch.Tensor]:
    """Per sequence, the ``(response tokens, d)`` float32 activations at ``layer`` of ``prompt +
    response`` (the prompt read as context, only response positions kept).

    Args:
        model: the model.
        prompts_ids: each prompt's token ids.
        responses_ids: each response's token ids (appended to its prompt).
        layer: the decoder block whose output is read.
        batch_size: sequences per forward.
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    from ..core.forward import forward_until

    full = [list(p) + list(r) for p, r in zip(prompts_ids, responses_ids)]
    out: list[torch.Tensor | None] = [None] * len(full)
    device = next(model.parameters()).device
    with eval_mode(model):
        for batch in plan_batches([len(s) for s in full], batch_size):
            ids, attn = pad_batch([full[i] for i in batch], 0, device, side="right")
            with capture(model, [layer], position="all", layer_path=layer_path) as acts:
                forward_until(model, ids, attn, layer, layer_path)
            hidden = acts[layer].cpu()
            for row, i in enumerate(batch):
                start = len(prompts_ids[i])
                out[i] = hidden[row, start:len(full[i])].float()
    return out  # type: ignore[return-value]
