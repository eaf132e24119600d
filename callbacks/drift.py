"""``PersonaDriftCallback``: watch a model's character while it trains."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

from transformers import TrainerCallback

from guard.measure.drift import DriftProbe, TraitShift
from guard.core.vectors import PersonaVector

from ._trainer import move_ahead_of_reporters

logger = logging.getLogger(__name__)

Threshold = float | Mapping[str, float] | None


def _for_trait(threshold: Threshold, trait: str) -> float | None:
    return threshold.get(trait) if isinstance(threshold, Mapping) else threshold


class PersonaDriftCallback(TrainerCallback):
    """Measures the finetuning shift along persona vectors during training.

    At train begin it takes the base model's mean last-prompt-token activation over a probe set
    (the traits' evaluation questions by default; with PEFT, adapters disabled). Every
    ``every_n_steps`` optimizer steps and on every evaluation it measures the current model and
    logs, for each trait, under ``persona/<trait>/``:

    ``shift``              (current - base) projected on the unit vector at its layer
    ``shift_frac``         shift / ||v||: 1.0 = as far as the trait's own positive-negative difference
    ``projection``         the current raw projection
    ``random_shift``       mean |shift| along ``n_random`` random unit directions (noise floor)
    ``shift_over_random``  |shift| / random_shift

    The metrics go through the Trainer's own logging, so every reporter (TensorBoard, W&B, the
    log history) gets them; a JSON report is written to ``<output_dir>/persona_drift.json``.
    ``warn_at`` / ``stop_at`` (on ``shift_frac``; one number, or one per trait) log a warning or
    stop training with a message naming the trait and value. Probes run in eval mode without
    gradients and give the model back in the mode they found it.
    """

    def __init__(self, vectors: Sequence[PersonaVector | str | Path], prompts: Sequence | None = None, *,
                 tokenizer=None, every_n_steps: int = 50, layers: Sequence[int | None] | None = None,
                 warn_at: Threshold = None, stop_at: Threshold = None, n_random: int = 8, batch_size: int = 16,
                 allow_other_weights: bool = True, report_name: str = "persona_drift.json", seed: int = 0,
                 layer_path: str | None = None):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be at least 1")
        self.vectors = [v if isinstance(v, PersonaVector) else PersonaVector.load(v) for v in vectors]
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.warn_at, self.stop_at = warn_at, stop_at
        self.n_random, self.batch_size, self.seed, self.layer_path = n_random, batch_size, seed, layer_path
        # A finetune changes the weights the fingerprint reads (full finetuning); the shape and model
        # name checks still apply.
        self.allow_other_weights = allow_other_weights
        self.report_name = report_name
        self.probe: DriftProbe | None = None
        self.history: list[dict] = []
        self.events: list[dict] = []
        self._pending: dict[str, float] = {}
        self._warned: set[str] = set()
        self.probe_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        move_ahead_of_reporters(self)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        move_ahead_of_reporters(self)  # also when added with trainer.add_callback after __init__
        tokenizer = self.tokenizer or getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is None:
            raise ValueError("PersonaDriftCallback needs a tokenizer: pass tokenizer= or give the Trainer one")
        for vector in self.vectors:
            vector.check_model(model, allow_other_weights=self.allow_other_weights)
        self.probe = DriftProbe(self.vectors, tokenizer, self.prompts, layers=self.layers, n_random=self.n_random,
                                seed=self.seed, batch_size=self.batch_size, layer_path=self.layer_path)
        started = time.perf_counter()
        self.probe.set_reference(model)
        self.probe_seconds += time.perf_counter() - started
        self._record(self.probe.measure(model), state, "train_begin")  # 0 by construction, unless PEFT init moved it

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._measure_and_act(model, state, control, "train")
            control.should_log = True  # log at this step, so the values land on their own step
        return control

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._measure_and_act(model, state, control, "eval")

    def on_log(self, args, state, control, logs=None, **kwargs):
        # We run ahead of the reporters (see move_ahead_of_reporters), so they see these keys.
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)  # Trainer appended before calling on_log
            self._pending = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.probe is not None and (not self.history or self.history[-1]["step"] != state.global_step):
            self._measure_and_act(model, state, control, "train_end")
        if state.is_world_process_zero:
            self.write_report(Path(args.output_dir) / self.report_name, state)

    # -- measuring -------------------------------------------------------------------------
    def _measure_and_act(self, model, state, control, phase: str) -> None:
        started = time.perf_counter()
        shifts = self.probe.measure(model)
        self.probe_seconds += time.perf_counter() - started
        self._record(shifts, state, phase)
        for s in shifts:
            stop, warn = _for_trait(self.stop_at, s.trait), _for_trait(self.warn_at, s.trait)
            if stop is not None and abs(s.shift_frac) >= stop:
                message = (f"persona drift: {s.trait} shifted {s.shift_frac:+.3f} x its persona vector at layer "
                           f"{s.layer} (step {state.global_step}), past the stop threshold {stop}; stopping training")
                logger.warning(message)
                self.events.append({"step": state.global_step, "trait": s.trait, "action": "stop",
                                    "shift_frac": s.shift_frac, "message": message})
                control.should_training_stop = True
            elif warn is not None and abs(s.shift_frac) >= warn and s.trait not in self._warned:
                message = (f"persona drift: {s.trait} shifted {s.shift_frac:+.3f} x its persona vector at layer "
                           f"{s.layer} (step {state.global_step}), past the warning threshold {warn}")
                logger.warning(message)
                self._warned.add(s.trait)
                self.events.append({"step": state.global_step, "trait": s.trait, "action": "warn",
                                    "shift_frac": s.shift_frac, "message": message})

    def _record(self, shifts: list[TraitShift], state, phase: str) -> None:
        metrics = {}
        for s in shifts:
            metrics.update(s.metrics())
        self._pending.update(metrics)
        self.history.append({"step": state.global_step, "phase": phase, **metrics})

    def write_report(self, path: Path, state=None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "vectors": [{"trait": v.trait, "layer": layer, "norm": norm, "model": v.meta.model_name}
                        for v, layer, norm in zip(self.vectors, self.probe.layers, self.probe.norms)] if self.probe else [],
            "probe_prompts": len(self.probe.texts) if self.probe else 0,
            "every_n_steps": self.every_n_steps, "warn_at": self.warn_at, "stop_at": self.stop_at,
            "probe_seconds": round(self.probe_seconds, 3),
            "history": self.history, "events": self.events,
        }
        path.write_text(json.dumps(report, indent=2))
        return path
