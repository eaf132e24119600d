"""``PersonaDriftCallback``: watch a model's character while it trains."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

from transformers import TrainerCallback

from guard.core.vectors import PersonaVector
from guard.errors import MonitorError
from guard.measure.drift import CONTROL_PROMPTS, DriftProbe, TraitShift

from ._checkpoint import resume_candidates, resumed, saved_checkpoint_dir
from ._plot import matplotlib_available, plot_drift

logger = logging.getLogger(__name__)

Threshold = float | Mapping[str, float] | None
STATE_FORMAT = "persona-guard/drift-callback-state"


def _for_trait(threshold: Threshold, trait: str) -> float | None:
    return threshold.get(trait) if isinstance(threshold, Mapping) else threshold


def _eval_prefix(metrics: Mapping | None) -> str:
    """The Trainer's prefix for this evaluation's keys (``eval``, ``eval_<dataset>``), read off
    the ``<prefix>_runtime`` key every ``Trainer.evaluate`` writes."""
    for key in metrics or ():
        if key.endswith("_runtime"):
            return key[:-len("_runtime")]
    return "eval"


class PersonaDriftCallback(TrainerCallback):
    """Measures the finetuning shift along persona vectors during training.

    At train begin it takes the base model's mean last-prompt-token activation over a probe set
    (the traits' evaluation questions by default; with PEFT, adapters disabled). Then it measures
    the current model on the Trainer's logging steps, on every evaluation and at the end of
    training, and logs, for each trait:

    ``persona/<trait>/shift``              (current - base) projected on the unit vector at its layer
    ``persona/<trait>/shift_frac``         shift / ||v||: 1.0 = as far as the trait's own positive-negative difference
    ``persona/<trait>/projection``         the current raw projection
    ``persona/<trait>/random_shift``       mean |shift| along ``n_random`` random unit directions (noise floor)
    ``persona/<trait>/shift_over_random``  |shift| / random_shift
    ``persona/<trait>/shift_ci_low``, ``/shift_ci_high``  95% bootstrap interval of the shift over the
                                           probe prompts (each prompt's own change, paired)
    ``persona/<trait>/specific_shift``     with ``control_prompts``: the shift with the control prompts'
                                           shift direction taken out of the vector (``/specific_frac``: / ||v||)
    ``persona/<trait>/warn``, ``/stop``    the reading that crossed ``warn_at`` / ``stop_at`` (once each)

    Evaluation readings carry the evaluation's prefix (``eval_persona/...``, shown as
    ``eval/persona/...`` by TensorBoard and W&B), at the evaluation's step.

    Reporting goes through ``trainer.log``, so every reporter (TensorBoard, W&B, ...) and
    ``state.log_history`` receive it. The callback needs its trainer for that, as TRL's
    callbacks do: pass ``trainer=``, or call :meth:`attach` (or ``guard.callbacks.attach(trainer)``)
    after building the trainer. Unattached, readings are added to the Trainer's own log of the
    same step in ``on_log``, which reaches only the callbacks listed after this one. (A TRL trainer
    folds its running metrics, such as token accuracy, into the next ``log`` call of the step: they
    then sit in the persona entry of ``log_history`` rather than the loss entry, at the same step.)

    Every checkpoint gets the callback's state (``<report stem>_state.safetensors``: reference
    activations, random directions, history, events); ``trainer.train(resume_from_checkpoint=...)``
    restores it, so a resumed run measures against the original base model and keeps its history.

    At the end, on the main process, ``<output_dir>/persona_drift.json`` (the report) and, with
    matplotlib installed, ``persona_drift.png`` (shift per step with the random floor) are written.

    Args:
        vectors: persona vectors (objects or vector files), one per trait.
        prompts: the probe set (default: the traits' shipped evaluation questions).
        tokenizer: default the Trainer's ``processing_class``.
        every_n_steps: measure every n optimizer steps instead of on the logging steps; readings at
            steps the Trainer does not log go to the report only (no extra log events).
        layers: one layer per vector (default: each vector's recommended layer).
        warn_at, stop_at: thresholds on |specific_frac| (or |shift_frac|, see ``reading``): one number, or one per trait.
        n_random: random directions for the noise floor.
        batch_size: probe batch size.
        allow_other_weights: accept vectors extracted from other weights of the same model (a full
            finetune changes the weights the fingerprint reads).
        report_name: the report's file name in ``output_dir``; the plot and the checkpoint state take its stem.
        seed: seed of the random directions.
        layer_path: the decoder-block list, when auto-discovery needs help.
        trainer: the Trainer to log through (see :meth:`attach`).
        plot: write the PNG plot when matplotlib is installed.
        control_prompts: ordinary prompts read beside the probe set, for the specific shift (see
            :mod:`guard.measure.drift`); default ``guard.measure.drift.CONTROL_PROMPTS``, 16 ordinary
            questions (capitals, arithmetic, recipes). None: read the probe set only.
        reading: what ``warn_at`` / ``stop_at`` compare: ``"specific"`` (specific_frac, the default
            when there are control prompts) or ``"shift"`` (shift_frac, the paper's statistic, the
            default without them). Both are logged. Why specific: any finetune first moves every
            assistant-style prompt along persona vectors (a harmless run on the demo's data reads
            1.4 x ||v|| of evil at step 5, as high as the malicious run); the ordinary questions'
            shared change, taken out of the vector, leaves the harmless run below the malicious one
            at every step (benchmarks/drift_reading.py, RESULTS ``drift_reading_evil``).

    Probes run in eval mode without gradients and give the model back in the mode they found it.
    In distributed runs every rank measures (the means are reduced across ranks) and logs like
    the Trainer does; only the main process writes files.
    """

    def __init__(self, vectors: Sequence[PersonaVector | str | Path], prompts: Sequence | None = None, *,
                 tokenizer=None, every_n_steps: int | None = None, layers: Sequence[int | None] | None = None,
                 warn_at: Threshold = None, stop_at: Threshold = None, n_random: int = 8, batch_size: int = 16,
                 allow_other_weights: bool = True, report_name: str = "persona_drift.json", seed: int = 0,
                 layer_path: str | None = None, trainer=None, plot: bool = True,
                 control_prompts: Sequence | None = CONTROL_PROMPTS, reading: str | None = None):
        if every_n_steps is not None and every_n_steps < 1:
            raise MonitorError("every_n_steps must be at least 1 (or None: the Trainer's logging steps)")
        self.vectors = [v if isinstance(v, PersonaVector) else PersonaVector.load(v) for v in vectors]
        if reading is None:
            reading = "specific" if control_prompts else "shift"
        if reading not in ("shift", "specific"):
            raise MonitorError(f"reading must be 'shift' or 'specific', got {reading!r}")
        if reading == "specific" and not control_prompts:
            raise MonitorError("reading='specific' needs control_prompts (guard.measure.drift.CONTROL_PROMPTS is a "
                               "shipped set of ordinary questions)")
        self.prompts = prompts
        self.control_prompts = list(control_prompts) if control_prompts else None
        self.reading = reading
        self.tokenizer = tokenizer
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.warn_at, self.stop_at = warn_at, stop_at
        self.n_random, self.batch_size, self.seed, self.layer_path = n_random, batch_size, seed, layer_path
        self.allow_other_weights = allow_other_weights
        self.report_name = report_name
        self.plot = plot
        self.trainer = trainer
        self.probe: DriftProbe | None = None
        self.history: list[dict] = []
        self.events: list[dict] = []
        self.probe_seconds = 0.0
        self._warned: set[str] = set()
        self._resume_from: Path | None = None
        self._last: tuple[int, dict] | None = None   # (step, metrics) of the latest reading in this run
        self._held_events: dict[str, float] = {}      # event metrics waiting for the next logged reading
        self._for_on_log: dict[int, dict] = {}        # unattached: metrics to add to the Trainer's log of a step

    # -- attaching -------------------------------------------------------------------------
    def attach(self, trainer) -> "PersonaDriftCallback":
        """Log through ``trainer`` (and add this callback to it when it is not there yet).

            >>> drift = PersonaDriftCallback([vector])
            >>> trainer = SFTTrainer(..., callbacks=[drift])
            >>> drift.attach(trainer)        # or guard.callbacks.attach(trainer) for every persona-guard callback
        """
        self.trainer = trainer
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    def load_checkpoint(self, checkpoint_dir: str | Path) -> "PersonaDriftCallback":
        """Resume from the state saved in ``checkpoint_dir``, for a checkpoint outside ``output_dir``
        (inside it, ``trainer.train(resume_from_checkpoint=...)`` finds the state by itself)."""
        self._resume_from = Path(checkpoint_dir)
        return self

    def state_path(self, checkpoint_dir: str | Path) -> Path:
        """This callback's state file inside a checkpoint directory.

        Args:
            checkpoint_dir: the checkpoint directory.
        """
        return Path(checkpoint_dir) / f"{Path(self.report_name).stem}_state.safetensors"

    # -- lifecycle -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        tokenizer = self.tokenizer or getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is None:
            raise MonitorError("PersonaDriftCallback needs a tokenizer: pass tokenizer= or give the Trainer one")
        if self.trainer is None:
            logger.warning("PersonaDriftCallback is not attached to its trainer: its readings reach the report and "
                           "the callbacks listed after it, not TensorBoard, W&B or log_history. Call "
                           "guard.callbacks.attach(trainer) after building the trainer.")
        for vector in self.vectors:
            vector.check_model(model, allow_other_weights=self.allow_other_weights)
        self.probe = DriftProbe(self.vectors, tokenizer, self.prompts, layers=self.layers, n_random=self.n_random,
                                seed=self.seed, batch_size=self.batch_size, layer_path=self.layer_path,
                                control_prompts=self.control_prompts)
        self._last, self._held_events, self._for_on_log = None, {}, {}
        if resumed(state) and self._restore(args, state):
            return
        self.history, self.events, self._warned, self.probe_seconds = [], [], set(), 0.0
        started = time.perf_counter()
        self.probe.set_reference(model)
        self.probe_seconds += time.perf_counter() - started
        # 0 by construction, unless PEFT init moved it; in the report, not logged (no Trainer log at this step)
        self._read(model, state, control, "train_begin", act=False)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe_measure(model, state, control)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # With logging_strategy="epoch" the Trainer logs after this event.
        self._maybe_measure(model, state, control)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if self.probe is None or self.probe.base is None:
            return  # evaluate() before any training: no reference yet
        metrics_now = self._reading_at(model, state, control, "eval")
        prefix = _eval_prefix(metrics)
        # The Trainer logged the evaluation's own metrics just before this event; ours follow at the same step.
        self._emit({f"{prefix}_{key}": value for key, value in metrics_now.items()}, state, control, eval_time=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Unattached only: add our metrics to the Trainer's own log of the same step (reaches the
        # callbacks after this one).
        pending = self._for_on_log.pop(state.global_step, None)
        if pending and logs is not None:
            logs.update(pending)

    def on_save(self, args, state, control, **kwargs):
        if self.probe is None or self.probe.base is None or not args.should_save:
            return
        directory = saved_checkpoint_dir(args, state)
        if not directory.is_dir():
            logger.warning(f"persona drift: no checkpoint directory {directory} to save the drift state in "
                           "(hyperparameter search?); a resume from it will restart the drift reference")
            return
        self._save_state(self.state_path(directory), state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.probe is not None and self.probe.base is not None:
            if not self.history or self.history[-1]["step"] != state.global_step:
                self._read(model, state, control, "train_end")  # training ended off the measuring grid
            last = self.history[-1]
            if last["step"] == state.global_step and not last.get("logged"):
                self._emit(self._reading_metrics(last), state, control)
        if state.is_world_process_zero:
            report = self.write_report(Path(args.output_dir) / self.report_name, state)
            if self.plot and self.probe is not None:
                self._write_plot(report.with_suffix(".png"))

    # -- measuring -------------------------------------------------------------------------
    def _maybe_measure(self, model, state, control) -> None:
        if self.probe is None or self.probe.base is None:
            return
        if self._last is not None and self._last[0] == state.global_step:
            return  # already read at this step (on_step_end, then on_epoch_end)
        logged_step = bool(control.should_log)  # set before us by DefaultFlowCallback when the Trainer will log
        final = state.global_step >= state.max_steps > 0 or control.should_training_stop
        due = logged_step if self.every_n_steps is None else state.global_step % self.every_n_steps == 0
        if not (due or final):
            return
        metrics = self._reading_at(model, state, control, "train")
        # Logged where the Trainer logs too: its logging steps, and the last step (its train
        # summary), which a stop decided by this reading makes this one.
        if logged_step or final or control.should_training_stop:
            self._emit(metrics, state, control)

    def _reading_at(self, model, state, control, phase: str) -> dict:
        """The reading at this step: measured once, whatever asks for it (weights do not change
        within a step)."""
        if self._last is not None and self._last[0] == state.global_step:
            return self._last[1]
        return self._read(model, state, control, phase)

    def _read(self, model, state, control, phase: str, act: bool = True) -> dict:
        started = time.perf_counter()
        shifts = self.probe.measure(model)
        self.probe_seconds += time.perf_counter() - started
        metrics = {}
        for s in shifts:
            metrics.update(s.metrics())
        self.history.append({"step": state.global_step, "phase": phase, **metrics})
        self._last = (state.global_step, metrics)
        if act:
            self._act(shifts, state, control)
        return metrics

    def _act(self, shifts: list[TraitShift], state, control) -> None:
        for s in shifts:
            stop, warn = _for_trait(self.stop_at, s.trait), _for_trait(self.warn_at, s.trait)
            frac = s.specific_frac if self.reading == "specific" else s.shift_frac
            what = "specific shift" if self.reading == "specific" else "shifted"
            where = f"{s.trait} {what} {frac:+.3f} x its persona vector at layer {s.layer} (step {state.global_step})"
            if stop is not None and abs(frac) >= stop:
                action, message = "stop", f"persona drift: {where}, past the stop threshold {stop}; stopping training"
                control.should_training_stop = True
            elif warn is not None and abs(frac) >= warn and s.trait not in self._warned:
                action, message = "warn", f"persona drift: {where}, past the warning threshold {warn}"
                self._warned.add(s.trait)
            else:
                continue
            logger.warning(message)
            self.events.append({"step": state.global_step, "trait": s.trait, "action": action,
                                "shift_frac": s.shift_frac, "specific_frac": s.specific_frac, "reading": self.reading,
                                "value": frac, "message": message})
            self._held_events[f"persona/{s.trait}/{action}"] = frac

    @staticmethod
    def _reading_metrics(entry: dict) -> dict:
        return {k: v for k, v in entry.items() if k.startswith("persona/")}

    # -- reporting -------------------------------------------------------------------------
    def _emit(self, metrics: dict, state, control, eval_time: bool = False) -> None:
        """Send a reading (and any held warn/stop events) to the reporters at this step."""
        if self.trainer is None and eval_time:
            return  # the Trainer logged the evaluation before on_evaluate: nothing left to add to
        logs = {**metrics, **self._held_events}
        self._held_events = {}
        if not eval_time and self.history and self.history[-1]["step"] == state.global_step:
            self.history[-1]["logged"] = True
        if self.trainer is not None:
            will_log = control.should_log
            self.trainer.log(logs)
            # CallbackHandler.on_log clears should_log; the Trainer's own log of this step (loss,
            # learning rate) comes after this event and must still happen.
            control.should_log = will_log
        else:  # the Trainer's own log of this step comes next; on_log adds these to it
            self._for_on_log[state.global_step] = {**self._for_on_log.get(state.global_step, {}), **logs}

    def report(self) -> dict:
        """The report as a dict (what :meth:`write_report` writes)."""
        probe = self.probe
        return {
            "vectors": [{"trait": v.trait, "layer": layer, "norm": norm, "model": v.meta.model_name}
                        for v, layer, norm in zip(self.vectors, probe.layers, probe.norms)] if probe else [],
            "probe_prompts": len(probe.texts) if probe else 0,
            "measured_on": "logging steps" if self.every_n_steps is None else f"every {self.every_n_steps} steps",
            "every_n_steps": self.every_n_steps, "warn_at": self.warn_at, "stop_at": self.stop_at,
            "reading": self.reading, "control_prompts": len(probe.control_texts) if probe else 0,
            "probe_seconds": round(self.probe_seconds, 3),
            "history": self.history, "events": self.events, "final": self.history[-1] if self.history else None,
        }

    def write_report(self, path: Path, state=None) -> Path:
        """Write the JSON report to ``path``. Args: path: the file; state: unused (kept for callers)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(), indent=2))
        return path

    def _write_plot(self, path: Path) -> Path | None:
        if not matplotlib_available():
            logger.warning(f"persona drift: matplotlib is not installed, so no {path.name} "
                           "(pip install 'persona-guard[train]'); the numbers are in the JSON report")
            return None
        return plot_drift(self.report(), path)

    # -- checkpoints -----------------------------------------------------------------------
    def _save_state(self, path: Path, state) -> None:
        from safetensors.torch import save_file

        probe = self.probe.state_dict()
        tensors = {f"base.{layer}": t.contiguous() for layer, t in probe.pop("base").items()}
        tensors.update({f"random.{i}": t.contiguous() for i, t in enumerate(probe.pop("random"))})
        tensors.update({f"control.{layer}": t.contiguous() for layer, t in probe.pop("base_control", {}).items()})
        tensors.update({f"rows.{layer}": t.contiguous() for layer, t in probe.pop("base_rows", {}).items()})
        header = {"format": STATE_FORMAT, "format_version": 1, "step": state.global_step, "probe": probe,
                  "history": self.history, "events": self.events, "warned": sorted(self._warned),
                  "probe_seconds": self.probe_seconds}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(header)})
        tmp.replace(path)  # a checkpoint never holds half a state file

    def _restore(self, args, state) -> bool:
        """Load the state saved with the checkpoint this run resumed from; False (with a
        warning) when there is none, and the reference is then retaken."""
        from safetensors import safe_open

        for directory in resume_candidates(args, state, self._resume_from):
            path = self.state_path(directory)
            if not path.is_file():
                continue
            with safe_open(str(path), framework="pt") as f:
                header = json.loads(f.metadata()["state"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            if header.get("format") != STATE_FORMAT or header.get("step") != state.global_step:
                continue  # another run's or another step's state
            probe = dict(header["probe"])
            probe["base"] = {int(k.split(".")[1]): t for k, t in tensors.items() if k.startswith("base.")}
            randoms = sorted((int(k.split(".")[1]), t) for k, t in tensors.items() if k.startswith("random."))
            probe["random"] = [t for _, t in randoms]
            control_means = {int(k.split(".")[1]): t for k, t in tensors.items() if k.startswith("control.")}
            if control_means:
                probe["base_control"] = control_means
            rows = {int(k.split(".")[1]): t for k, t in tensors.items() if k.startswith("rows.")}
            if rows:
                probe["base_rows"] = rows
            try:
                self.probe.load_state_dict(probe)
            except ValueError as exc:
                raise MonitorError(f"{path}: {exc}; resume with the vectors and settings the run started with") from None
            if state.is_world_process_zero and probe.get("texts_sha256") != self.probe.state_dict()["texts_sha256"]:
                logger.warning("persona drift: the probe prompts differ from the ones the checkpoint's reference was "
                               "taken on; shifts after the resume compare different prompt sets")
            self.history, self.events = header["history"], header["events"]
            self._warned, self.probe_seconds = set(header["warned"]), header["probe_seconds"]
            self._resume_from = None
            return True
        logger.warning(f"persona drift: resumed at step {state.global_step} but no drift state was found with the "
                       "checkpoint; the base reference is retaken from the resumed weights (shifts restart at zero) "
                       "and earlier history is lost. Pass the checkpoint with load_checkpoint(dir) if it lies "
                       "outside output_dir.")
        return False
