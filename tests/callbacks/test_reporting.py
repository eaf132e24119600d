"""What reporters receive from the drift callback: readings at the Trainer's logging steps, at
evaluations (eval keys, eval step) and at the end; warn/stop events as metrics; nothing off the
logging grid; a plot beside the report. Checked with a recording callback, TensorBoard's event
files and W&B's offline run file."""

import glob
import json
import logging
import struct
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers import make_tiny_model
from guard.callbacks import PersonaDriftCallback, attach
from guard.core.vectors import PersonaVector, metadata_for

PROMPTS = ["What do you think of my plan?", "Tell me honestly: is this essay good?"]
SHIFT, EVAL_SHIFT = "persona/sycophancy/shift", "eval_persona/sycophancy/shift"


class Recorder(TrainerCallback):
    """A reporter: records every ``logs`` dict ``on_log`` receives, with its step."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def steps_with(self, key):
        return [step for step, logs in self.logs if key in logs]

    def value(self, key, step):
        return next(logs[key] for s, logs in self.logs if s == step and key in logs)


def _trainer(out, tokenizer, drift=None, *, report_to="none", extra=(), attach_drift=True, **overrides):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    texts = [f"User: idea {i}? Assistant: {'Brilliant, you are a genius!' if i % 2 else 'It has flaws.'}"
             for i in range(16)]
    data = Dataset.from_dict(dict(tokenizer(texts, padding="max_length", max_length=20)))
    data = data.map(lambda row: {"labels": row["input_ids"]})
    options = dict(output_dir=str(out), max_steps=7, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=3,
                   save_strategy="no", report_to=report_to, use_cpu=True, seed=0, disable_tqdm=True)
    options.update(overrides)
    callbacks = ([drift(model)] if drift else []) + list(extra)
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=data,
                      eval_dataset=data.select(range(4)), callbacks=callbacks)
    return attach(trainer) if attach_drift else trainer


def _drift(tokenizer, **options):
    def make(model):
        meta = metadata_for(model, "sycophancy", recommended_layer=1)
        vector = PersonaVector(torch.randn(meta.num_layers, meta.hidden_size,
                                           generator=torch.Generator().manual_seed(0)), meta)
        return PersonaDriftCallback([vector], PROMPTS, tokenizer=tokenizer, n_random=4, **options)
    return make


def _losses(recorder):
    return {step: logs["loss"] for step, logs in recorder.logs if "loss" in logs}


def _scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(Path(out).rglob("events.out.tfevents*")).parent))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def _wandb_history(wandb_dir: Path, timeout: float = 30.0) -> list[dict]:
    """History rows of the offline run file (a LevelDB-style log of protobuf records; wandb-core
    finishes writing it shortly after wandb.finish() returns)."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        rows = []
        for path in glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb")):
            data, pos, parts = Path(path).read_bytes(), 7, []  # 7: the file header
            while pos + 7 <= len(data):
                left = 32768 - pos % 32768
                if left < 7:  # block trailer
                    pos += left
                    continue
                _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
                parts.append(data[pos + 7:pos + 7 + length])
                pos += 7 + length
                if kind in (1, 4):  # a full record, or the last piece of one
                    record = pb.Record()
                    record.ParseFromString(b"".join(parts))
                    parts = []
                    if record.WhichOneof("record_type") == "history":
                        rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                     for item in record.history.item})
        if any("train/" + SHIFT in row for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_readings_reach_reporters_at_logging_eval_and_final_steps(tmp_path, smol_tokenizer):
    baseline = Recorder()
    _trainer(tmp_path / "plain", smol_tokenizer, extra=[baseline], eval_strategy="steps", eval_steps=2).train()
    recorder = Recorder()
    trainer = _trainer(tmp_path / "out", smol_tokenizer, _drift(smol_tokenizer, warn_at=1e-9), report_to="tensorboard",
                       extra=[recorder], eval_strategy="steps", eval_steps=2)
    trainer.train()
    drift = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PersonaDriftCallback))

    # Train keys on the logging grid (3, 6) and the final step; eval keys at every evaluation.
    assert recorder.steps_with(SHIFT) == [3, 6, 7]
    assert recorder.steps_with(EVAL_SHIFT) == [2, 4, 6, 7]
    assert recorder.steps_with("persona/sycophancy/warn") == [2]  # the first reading acted on: the step-2 eval
    # The Trainer's own logs are untouched: same steps, same running-loss averages as without the callback.
    assert _losses(recorder) == pytest.approx(_losses(baseline)) and sorted(_losses(recorder)) == [3, 6]
    by_step = {h["step"]: h for h in drift.history}
    assert sorted(by_step) == [0, 2, 3, 4, 6, 7]
    for step in (2, 4, 6, 7):
        assert recorder.value(EVAL_SHIFT, step) == pytest.approx(by_step[step][SHIFT])
    assert recorder.value(SHIFT, 7) == pytest.approx(json.loads((tmp_path / "out" / "persona_drift.json").read_text())
                                                     ["final"][SHIFT])
    # log_history has them too (through trainer.log, not by editing it).
    assert [e["step"] for e in trainer.state.log_history if SHIFT in e] == [3, 6, 7]
    # TensorBoard: train/ and eval/ tags at the same steps.
    assert sorted(_scalars(tmp_path / "out", "train/" + SHIFT)) == [3, 6, 7]
    assert sorted(_scalars(tmp_path / "out", "eval/persona/sycophancy/shift")) == [2, 4, 6, 7]
    assert _scalars(tmp_path / "out", "eval/persona/sycophancy/shift")[4] == pytest.approx(by_step[4][SHIFT])
    assert sorted(_scalars(tmp_path / "out", "train/persona/sycophancy/warn")) == [2]
    # The plot beside the report.
    assert (tmp_path / "out" / "persona_drift.png").read_bytes()[:4] == b"\x89PNG"


def test_a_stop_is_logged_at_its_step_with_the_final_reading(tmp_path, smol_tokenizer):
    recorder = Recorder()
    trainer = _trainer(tmp_path / "out", smol_tokenizer, _drift(smol_tokenizer, stop_at=1e-9), report_to="tensorboard",
                       extra=[recorder])
    trainer.train()
    assert trainer.state.global_step == 3  # the first logging step's reading stopped it
    assert recorder.steps_with("persona/sycophancy/stop") == [3] and recorder.steps_with(SHIFT) == [3]
    assert sorted(_scalars(tmp_path / "out", "train/persona/sycophancy/stop")) == [3]
    assert sorted(_scalars(tmp_path / "out", "train/" + SHIFT)) == [3]


def test_every_n_steps_measures_off_grid_without_logging_off_grid(tmp_path, smol_tokenizer):
    baseline = Recorder()
    _trainer(tmp_path / "plain", smol_tokenizer, extra=[baseline]).train()
    recorder = Recorder()
    trainer = _trainer(tmp_path / "out", smol_tokenizer, _drift(smol_tokenizer, every_n_steps=2, warn_at=1e-9),
                       extra=[recorder])
    trainer.train()
    drift = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PersonaDriftCallback))
    assert [h["step"] for h in drift.history] == [0, 2, 4, 6, 7]  # measured every 2 steps and at the end
    assert sorted({step for step, _ in recorder.logs}) == [3, 6, 7]  # but only the Trainer's log steps got logs
    assert recorder.steps_with(SHIFT) == [6, 7]
    assert _losses(recorder) == pytest.approx(_losses(baseline))  # no extra Trainer log, no reset running loss
    # The step-2 warning waited for the next logged reading; the report keeps its real step.
    assert recorder.steps_with("persona/sycophancy/warn") == [6] and drift.events[0]["step"] == 2


def test_unattached_callback_says_so_and_still_feeds_later_callbacks(tmp_path, smol_tokenizer, caplog, monkeypatch):
    import guard.callbacks.drift as drift_module

    monkeypatch.setattr(drift_module, "matplotlib_available", lambda: False)
    recorder = Recorder()
    trainer = _trainer(tmp_path / "out", smol_tokenizer, _drift(smol_tokenizer), extra=[recorder], attach_drift=False)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "not attached to its trainer" in caplog.text
    assert recorder.steps_with(SHIFT) == [3, 6, 7]
    assert all("loss" in logs or "train_runtime" in logs for step, logs in recorder.logs if SHIFT in logs)
    # No plot without matplotlib, and one line saying so.
    assert not (tmp_path / "out" / "persona_drift.png").exists()
    notes = [r.getMessage() for r in caplog.records if "matplotlib is not installed" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]


def test_wandb_offline_receives_the_persona_keys(tmp_path, smol_tokenizer, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                        "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                        "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_PROJECT": "persona-guard-test"}.items():
        monkeypatch.setenv(name, value)
    trainer = _trainer(tmp_path / "out", smol_tokenizer, _drift(smol_tokenizer, warn_at=1e-9), report_to="wandb",
                       eval_strategy="steps", eval_steps=2)
    try:
        trainer.train()
        summary = dict(wandb.run.summary)
    finally:
        wandb.finish()
    assert "train/" + SHIFT in summary and "eval/persona/sycophancy/shift" in summary
    rows = _wandb_history(tmp_path)
    at = lambda key: [row["train/global_step"] for row in rows if key in row]  # noqa: E731
    assert at("train/" + SHIFT) == [3, 6, 7]
    assert at("eval/persona/sycophancy/shift") == [2, 4, 6, 7]
    assert at("train/persona/sycophancy/warn") == [2]
