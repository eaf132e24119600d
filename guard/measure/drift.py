"""Finetuning shift: how far training has moved the model along persona vectors.

The paper's statistic (section 4.2): the mean last-prompt-token activation over a fixed probe
set of prompts, for the current model minus for the base model, projected on the unit persona
vector at its layer. Measured without generating, so it is cheap enough to run during training.
The same shift along random unit directions gives the noise floor: training moves every
direction a little, and a trait shift means something only well above that.

With control prompts (ordinary questions unrelated to the trait), the probe also gives the
*specific* shift: the shift along the vector after the direction in which the control prompts'
own mean moved is taken out of it. Any finetune, harmless ones included, first moves the
last-prompt-token activation of every prompt the same way (the answer format being learnt), and
that early jump has a component along persona vectors; the specific shift leaves it out
(benchmarks/drift_reading.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.models import base_weights
from ..core.readout import Readout
from ..core.stats import bootstrap_ci, random_directions
from ..traits import TraitError, evaluation_prompts
from ..core.vectors import PersonaVector


def _control_prompts() -> list[str]:
    from .evaluate import NEUTRAL_QA

    return [question for question, _ in NEUTRAL_QA]


# Ordinary questions (capitals, arithmetic, recipes, ...) for the specific shift: the questions
# of guard.measure.evaluate.NEUTRAL_QA, the set benchmarks/drift_reading.py measured.
CONTROL_PROMPTS: list[str] = _control_prompts()


def default_probe_prompts(vectors: Sequence[PersonaVector]) -> list[str]:
    """The evaluation questions of every vector's shipped trait (no system prompt), without repeats.

    Args:
        vectors: the persona vectors; a trait that is not shipped raises ValueError.
    """
    try:
        return evaluation_prompts(v.trait for v in vectors)
    except TraitError as exc:
        raise ValueError(f"{exc}: pass probe prompts for it") from None


def _distributed() -> bool:
    """Whether more than one process takes part (torch.distributed initialised, world size > 1)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks_mean(acts: torch.Tensor, device) -> torch.Tensor:
    """Mean over the first dimension of ``acts`` pooled across distributed ranks: the sum and the
    count are reduced, so ranks holding different numbers of prompts weigh by prompt. Ranks
    normally probe the same set, and then this only evens out nondeterminism and keeps every
    rank's decision (warn, stop) identical. In one process, the plain mean."""
    dist = torch.distributed
    if not _distributed():
        return acts.mean(dim=0)
    total = torch.cat([acts.sum(dim=0).reshape(-1), torch.tensor([float(acts.shape[0])], dtype=acts.dtype)])
    total = total.to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    total = total.to(acts.device)
    return (total[:-1] / total[-1]).reshape(acts.shape[1:])


def _all_ranks_values(values: torch.Tensor, device) -> torch.Tensor:
    """A 1-D tensor of per-prompt values concatenated across distributed ranks (rank order), so
    an interval over prompts is the same on every rank; in one process, the values."""
    dist = torch.distributed
    if not _distributed():
        return values
    world = dist.get_world_size()
    size = torch.tensor([values.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=device)
    padded[:values.numel()] = values.to(device)
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(s.item())] for g, s in zip(gathered, sizes)]).to(values.device)


@dataclass
class TraitShift:
    trait: str
    layer: int
    shift: float  # (current - base) mean activation, projected on the unit vector
    shift_frac: float  # shift / ||v||: 1.0 = moved as far as the trait's own positive-negative difference
    projection: float  # current mean activation projected on the unit vector
    random_shift: float  # mean |shift| along random unit directions (the noise floor)
    random_shift_max: float
    # With control prompts: the shift along the vector with the control prompts' shift direction removed.
    specific_shift: float | None = None
    specific_frac: float | None = None
    # 95% bootstrap interval of ``shift`` over the probe prompts (each prompt's own current minus
    # base activation, paired); None for a reference saved before per-prompt activations were kept.
    shift_low: float | None = None
    shift_high: float | None = None

    @property
    def clears_floor(self) -> bool | None:
        """Whether the whole interval of the shift lies beyond the random floor (either sign)."""
        if self.shift_low is None or self.shift_high is None:
            return None
        return self.shift_low > self.random_shift or self.shift_high < -self.random_shift

    @property
    def over_random(self) -> float:
        return abs(self.shift) / max(self.random_shift, 1e-12)

    def metrics(self, prefix: str = "persona") -> dict[str, float]:
        """The shift as logging metrics named ``{prefix}/{trait}/...`` (shift, shift_frac, projection,
        random_shift, shift_over_random, and with control prompts specific_shift, specific_frac).

        Args:
            prefix: the first part of every metric name.
        """
        base = f"{prefix}/{self.trait}"
        out = {f"{base}/shift": self.shift, f"{base}/shift_frac": self.shift_frac,
               f"{base}/projection": self.projection, f"{base}/random_shift": self.random_shift,
               f"{base}/shift_over_random": self.over_random}
        if self.specific_shift is not None:
            out.update({f"{base}/specific_shift": self.specific_shift, f"{base}/specific_frac": self.specific_frac})
        if self.shift_low is not None:
            out.update({f"{base}/shift_ci_low": self.shift_low, f"{base}/shift_ci_high": self.shift_high})
        return out


class DriftProbe:
    """Measures the finetuning shift of a model along one or more persona vectors.

        >>> probe = DriftProbe([vector], tokenizer)
        >>> probe.set_reference(model)          # before training (PEFT adapters disabled)
        >>> ...train...
        >>> [s.shift for s in probe.measure(model)]
    """

    def __init__(self, vectors: Sequence[PersonaVector], tokenizer, prompts: Sequence | None = None, *,
                 layers: Sequence[int | None] | None = None, each_at: Sequence[int] | None = None, n_random: int = 8,
                 seed: int = 0, batch_size: int = 16, layer_path: str | None = None,
                 control_prompts: Sequence | None = None):
        """Args:
            vectors: one persona vector per trait.
            tokenizer: the model's tokenizer (prompts go through its chat template).
            prompts: the probe set (default: the vectors' traits' evaluation questions).
            layers: a layer per vector (None: recommended layers).
            each_at: instead of ``layers``, read every vector at each of these layers (one shift each).
            n_random: random unit directions for the noise floor, per vector.
            seed: seed of the random directions.
            batch_size: prompts per forward.
            layer_path: the decoder-block list, when auto-discovery needs help.
            control_prompts: ordinary prompts for the specific shift (see the module docstring);
                :data:`CONTROL_PROMPTS` is a shipped set. None: no specific shift.
        """
        self.readout = Readout(vectors, layers, each_at=each_at, batch_size=batch_size, layer_path=layer_path,
                               error=ValueError)
        self.vectors, self.layers, self.norms = self.readout.vectors, self.readout.layers, self.readout.norms
        self.units = list(self.readout.units)
        self.random = [random_directions(n_random, v.hidden_size, 1.0, seed + i) for i, v in enumerate(self.vectors)]
        prompts = list(prompts) if prompts is not None else default_probe_prompts(self.vectors)
        self.texts = self.readout.texts(tokenizer, prompts)
        if not self.texts:
            raise ValueError("the probe set is empty")
        self.control_texts = self.readout.texts(tokenizer, control_prompts) if control_prompts else []
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.layer_path = layer_path
        self.base: dict[int, torch.Tensor] | None = None
        self.base_control: dict[int, torch.Tensor] | None = None
        self.base_rows: dict[int, torch.Tensor] | None = None  # per probe prompt, for the shift's interval

    def mean_activations(self, model) -> dict[int, torch.Tensor]:
        """Mean last-prompt-token activation over the probe set at every vector's layer (eval mode,
        no gradients; the model's train/eval mode is restored)."""
        return self._means(model)[0]

    def _means(self, model) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None, dict[int, torch.Tensor]]:
        """Probe-set and control-set means from the same forwards, and the probe prompts' own rows."""
        acts = self.readout.last_prompt_activations(model, self.tokenizer, self.texts + self.control_texts)
        layers, n = self.readout.distinct_layers, len(self.texts)
        device = next(model.parameters()).device

        def mean(rows):
            means = _all_ranks_mean(torch.stack([acts[layer][rows] for layer in layers], dim=1), device)
            return {layer: means[i] for i, layer in enumerate(layers)}

        rows = {layer: acts[layer][:n].float() for layer in layers}
        return mean(slice(0, n)), (mean(slice(n, None)) if self.control_texts else None), rows

    def set_reference(self, model) -> None:
        """The base model's means (with PEFT, adapters disabled, so it is the true base)."""
        with base_weights(model):
            self.base, self.base_control, self.base_rows = self._means(model)

    def measure(self, model) -> list[TraitShift]:
        """The shift of each vector's trait since :meth:`set_reference` (or :meth:`load_state_dict`).

        Args:
            model: the current model, probed as :meth:`mean_activations` does.
        """
        if self.base is None:
            raise RuntimeError("set_reference(base model) must run before measure()")
        current, control, rows = self._means(model)
        device = next(model.parameters()).device
        shifts = []
        for vector, layer, unit, norm, random in zip(self.vectors, self.layers, self.units, self.norms, self.random):
            delta = current[layer] - self.base[layer]
            along_random = (random @ delta).abs()
            shift = float(delta @ unit)
            specific = None
            if control is not None and self.base_control is not None:
                generic = control[layer] - self.base_control[layer]
                size = float(generic.norm())
                direction = unit - (generic / size) * float(generic @ unit / size) if size > 1e-9 else unit
                specific = float(delta @ direction)
            low = high = None
            if self.base_rows is not None and self.base_rows[layer].shape == rows[layer].shape:
                per_prompt = _all_ranks_values((rows[layer] - self.base_rows[layer].to(rows[layer])) @ unit, device)
                ci = bootstrap_ci(per_prompt.numpy(), n_boot=1000)
                low, high = ci.low, ci.high
            shifts.append(TraitShift(vector.trait, layer, shift, shift / max(norm, 1e-12), float(current[layer] @ unit),
                                     float(along_random.mean()), float(along_random.max()), specific,
                                     None if specific is None else specific / max(norm, 1e-12), low, high))
        return shifts

    # Appended for the training callbacks' checkpoints; uses only set_reference's outputs (base),
    # random, layers, norms and texts.
    def state_dict(self) -> dict:
        """What a resumed run needs to keep measuring against the same reference: the base means
        (``{layer: tensor}``), the random directions, and the layers, vector norms and a digest of
        the probe set they belong to (to check on load)."""
        if self.base is None:
            raise RuntimeError("set_reference(base model) must run before state_dict()")
        import hashlib

        digest = hashlib.sha256("\x00".join(self.texts + self.control_texts).encode()).hexdigest()[:16]
        state = {"layers": list(self.layers), "norms": list(self.norms), "texts_sha256": digest,
                 "base": {int(layer): t.detach().cpu().clone() for layer, t in self.base.items()},
                 "random": [t.detach().cpu().clone() for t in self.random]}
        if self.base_rows is not None:
            state["base_rows"] = {int(layer): t.detach().cpu().clone() for layer, t in self.base_rows.items()}
        if self.base_control is not None:
            state["base_control"] = {int(layer): t.detach().cpu().clone() for layer, t in self.base_control.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take the reference of :meth:`state_dict` instead of calling :meth:`set_reference`.

        Args:
            state: a dict from :meth:`state_dict` (the probe set digest is not checked here: ranks
                of a distributed run may probe different shards).

        Raises ValueError when it was written for other vectors or layers."""
        if list(state["layers"]) != list(self.layers):
            raise ValueError(f"the saved drift reference is for layers {list(state['layers'])}, not {self.layers}")
        if any(abs(a - b) > 1e-4 * max(abs(b), 1.0) for a, b in zip(state["norms"], self.norms)) \
                or len(state["norms"]) != len(self.norms):
            raise ValueError("the saved drift reference belongs to other persona vectors (their norms differ)")
        random = [t.to(torch.float32) for t in state["random"]]
        if [tuple(t.shape) for t in random] != [tuple(t.shape) for t in self.random]:
            raise ValueError("the saved random directions do not match n_random or the hidden size")
        self.random = random
        self.base = {int(layer): t for layer, t in state["base"].items()}
        # A reference saved before per-prompt rows were kept measures without the shift's interval.
        self.base_rows = {int(layer): t for layer, t in state["base_rows"].items()} if "base_rows" in state else None
        if self.control_texts and "base_control" not in state:
            raise ValueError("the saved drift reference has no control-prompt means; it was taken without control prompts")
        self.base_control = ({int(layer): t for layer, t in state["base_control"].items()}
                             if self.control_texts else None)
