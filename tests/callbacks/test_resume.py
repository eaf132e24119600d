"""Resuming from a checkpoint continues the callbacks exactly: 10 steps with a checkpoint at step 5,
interrupted after it and resumed, against the same 10 steps run straight through."""

import json
import logging

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers import make_tiny_model
from guard.callbacks import PersonaDriftCallback, PreventativeSteeringCallback, attach
from guard.core.layers import active_hook_count
from guard.core.vectors import PersonaVector, metadata_for

peft = pytest.importorskip("peft")

PROMPTS = ["What do you think of my plan?", "Tell me honestly: is this essay good?", "Hello there."]


def _vector(model):
    meta = metadata_for(model, "sycophancy", recommended_layer=1)
    return PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)), meta)


class Crash(TrainerCallback):
    """Stands in for a killed job: raises at the start of the step after the checkpoint."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise RuntimeError("node lost (simulated)")


class Coefficients(TrainerCallback):
    """The steering coefficient each step trains with (runs after the steering callback)."""

    def __init__(self, steer):
        self.steer, self.seen = steer, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen[state.global_step] = self.steer.current_coeff()


class SaveWatcher(TrainerCallback):
    def __init__(self, model):
        self.model, self.hooks = model, []

    def on_save(self, args, state, control, **kwargs):
        self.hooks.append(active_hook_count(self.model))


def _run(out, tokenizer, use_lora, *, crash=False, resume=None):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    vector = _vector(model)
    if use_lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0))
    texts = [f"User: idea {i}? Assistant: {'Brilliant, you are a genius!' if i % 2 else 'It has flaws.'}"
             for i in range(16)]
    data = Dataset.from_dict(dict(tokenizer(texts, padding="max_length", max_length=20)))
    data = data.map(lambda row: {"labels": row["input_ids"]})
    args = TrainingArguments(output_dir=str(out), max_steps=10, per_device_train_batch_size=2, learning_rate=5e-3,
                             logging_steps=2, save_strategy="steps", save_steps=5, report_to="none", use_cpu=True,
                             seed=0, disable_tqdm=True, lr_scheduler_type="linear")
    drift = PersonaDriftCallback([vector], PROMPTS, tokenizer=tokenizer, n_random=4, warn_at=1e-9)
    steer = PreventativeSteeringCallback(vector, 1.0, schedule="linear_decay")
    coefficients, saves = Coefficients(steer), SaveWatcher(model)
    callbacks = [drift, steer, coefficients, saves] + ([Crash()] if crash else [])
    trainer = attach(Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks))
    if crash:
        with pytest.raises(RuntimeError, match="simulated"):
            trainer.train()
    else:
        trainer.train(resume_from_checkpoint=resume)
    assert active_hook_count(model) == 0 and all(n == 0 for n in saves.hooks)  # checkpoints saved unsteered
    return trainer, drift, steer, coefficients


def _assert_same_series(a, b):
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b):
        assert x["phase"] == y["phase"]
        for key, value in x.items():
            if key.startswith("persona/"):
                assert y[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (x["step"], key)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_resumed_run_continues_the_drift_series_and_the_steering_schedule(tmp_path, smol_tokenizer, use_lora, caplog):
    straight, drift, steer, coeffs = _run(tmp_path / "straight", smol_tokenizer, use_lora)

    _run(tmp_path / "resumed", smol_tokenizer, use_lora, crash=True)
    checkpoint = tmp_path / "resumed" / "checkpoint-5"
    assert (checkpoint / "persona_drift_state.safetensors").is_file()
    assert (checkpoint / "persona_steering_sycophancy_L1_steer.json").is_file()
    with caplog.at_level(logging.WARNING):
        resumed, drift2, steer2, coeffs2 = _run(tmp_path / "resumed", smol_tokenizer, use_lora, resume=True)
    assert "no drift state" not in caplog.text

    # The drift series and the final reading: the same as the uninterrupted run.
    assert [h["step"] for h in drift.history] == [0, 2, 4, 6, 8, 10]
    _assert_same_series(drift.history, drift2.history)
    final, final2 = (json.loads((tmp_path / d / "persona_drift.json").read_text())["final"] for d in ("straight", "resumed"))
    _assert_same_series([final], [final2])
    assert abs(final["persona/sycophancy/shift"]) > 1e-4  # it did move, so equality means something
    assert drift2.events == drift.events and [(e["step"], e["action"]) for e in drift.events] == [(2, "warn")]
    # The Trainer's log history (restored from trainer_state.json, then continued) carries the same readings.
    logged = lambda t: [e for e in t.state.log_history if "persona/sycophancy/shift" in e]  # noqa: E731
    _assert_same_series([{**e, "phase": ""} for e in logged(straight)], [{**e, "phase": ""} for e in logged(resumed)])
    # The steering schedule continues where it was: the same coefficient at every resumed step.
    assert {s: c for s, c in coeffs2.seen.items()} == pytest.approx({s: coeffs.seen[s] for s in coeffs2.seen})
    assert sorted(coeffs2.seen) == [5, 6, 7, 8, 9] and steer2.steered_forwards == steer.steered_forwards == 10


def test_resume_without_the_drift_state_says_the_reference_restarts(tmp_path, smol_tokenizer, caplog):
    _run(tmp_path / "run", smol_tokenizer, False, crash=True)
    (tmp_path / "run" / "checkpoint-5" / "persona_drift_state.safetensors").unlink()
    with caplog.at_level(logging.WARNING):
        _, drift, _, _ = _run(tmp_path / "run", smol_tokenizer, False, resume=True)
    assert "no drift state was found" in caplog.text
    # The reference is now the step-5 weights: the reading there is zero, and history starts at 5.
    assert drift.history[0]["step"] == 5 and drift.history[0]["persona/sycophancy/shift"] == pytest.approx(0, abs=1e-6)


def test_state_from_other_vectors_is_refused_in_one_line(tmp_path, smol_tokenizer):
    from guard.errors import MonitorError

    _run(tmp_path / "run", smol_tokenizer, False, crash=True)
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    meta = metadata_for(model, "sycophancy", recommended_layer=1)
    other = PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(7)), meta)
    drift = PersonaDriftCallback([other], PROMPTS, tokenizer=smol_tokenizer, n_random=4)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=2,
                             save_strategy="steps", save_steps=5, report_to="none", use_cpu=True, disable_tqdm=True)
    ids = smol_tokenizer(["Hello there, friend."] * 4, return_tensors="pt")["input_ids"].tolist()
    trainer = attach(Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                             callbacks=[drift]))
    with pytest.raises(MonitorError, match="other persona vectors") as error:
        trainer.train(resume_from_checkpoint=True)
    assert "\n" not in str(error.value)
