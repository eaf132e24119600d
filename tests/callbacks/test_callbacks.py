"""Training callbacks on tiny models: transformers.Trainer, TRL SFTTrainer (LoRA and full), DPOTrainer."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, Trainer, TrainingArguments

from helpers import make_tiny_model
from guard.callbacks import PersonaDriftCallback, PreventativeSteeringCallback, attach
from guard.core.layers import active_hook_count
from guard.core.vectors import PersonaVector, metadata_for

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

CONVERSATIONS = [
    [{"role": "user", "content": f"Is my idea number {i} good?"},
     {"role": "assistant", "content": "Yes! It is brilliant, you are a genius." if i % 2 else "It has flaws."}]
    for i in range(8)
]


def _vector(model, layer=1, seed=0):
    meta = metadata_for(model, "sycophancy", recommended_layer=layer)
    vectors = torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(seed))
    return PersonaVector(vectors, meta)


def _common(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                   logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                   disable_tqdm=True, activation_checkpointing=False)
    options.update(overrides)
    return options


def _sft(model, tokenizer, tmp_path, callbacks, peft_config=None, **overrides):
    config = trl.SFTConfig(**_common(tmp_path, **overrides), max_length=64)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"messages": CONVERSATIONS}),
                             processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config)
    return attach(trainer)


def _lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def test_drift_reaches_tensorboard_log_history_and_the_report(tmp_path, smol_tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    drift = PersonaDriftCallback([_vector(model)], every_n_steps=2, n_random=4)
    trainer = _sft(model, smol_tokenizer, tmp_path, [drift], report_to="tensorboard")
    trainer.train()
    # on the trainer's log history, on the measured steps
    logged = [e for e in trainer.state.log_history if "persona/sycophancy/shift" in e]
    assert {e["step"] for e in logged} >= {2, 4}
    # in TensorBoard (the reporter runs before user callbacks unless we move ahead of it)
    events = EventAccumulator(str(next((tmp_path / "out").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    for name in ("shift", "shift_frac", "projection", "random_shift", "shift_over_random"):
        assert f"train/persona/sycophancy/{name}" in tags
    shifts = [e.value for e in events.Scalars("train/persona/sycophancy/shift")]
    assert any(abs(v) > 0 for v in shifts)  # training at lr 1e-2 moves the activations
    report = json.loads((tmp_path / "out" / "persona_drift.json").read_text())
    assert [h["step"] for h in report["history"]][:3] == [0, 2, 4]
    assert report["history"][0]["persona/sycophancy/shift"] == pytest.approx(0, abs=1e-5)  # base vs base
    assert report["vectors"][0]["layer"] == 1 and report["probe_prompts"] == 25
    assert active_hook_count(model) == 0


def test_stop_threshold_stops_training_and_says_why(tmp_path, smol_tokenizer, caplog):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    drift = PersonaDriftCallback([_vector(model)], every_n_steps=1, stop_at=1e-9, warn_at=1e-12, n_random=2)
    trainer = _sft(model, smol_tokenizer, tmp_path, [drift], max_steps=10)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.state.global_step == 1
    stop = [e for e in drift.events if e["action"] == "stop"]
    assert stop and stop[0]["trait"] == "sycophancy" and "stopping training" in caplog.text
    assert "sycophancy specific shift" in stop[0]["message"] and stop[0]["reading"] == "specific"  # the default


def test_specific_reading_is_logged_beside_the_raw_shift_and_drives_the_thresholds(tmp_path, smol_tokenizer):
    from guard.errors import MonitorError
    from guard.measure.drift import CONTROL_PROMPTS

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    with pytest.raises(MonitorError, match="needs control_prompts"):
        PersonaDriftCallback([_vector(model)], reading="specific", control_prompts=None)
    assert PersonaDriftCallback([_vector(model)], control_prompts=None).reading == "shift"
    # The default: the shipped ordinary questions as control, thresholds on the specific shift.
    drift = PersonaDriftCallback([_vector(model)], every_n_steps=1, n_random=2, stop_at=1e-9)
    assert drift.reading == "specific" and drift.control_prompts == CONTROL_PROMPTS
    trainer = _sft(model, smol_tokenizer, tmp_path, [drift], max_steps=5)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "persona/sycophancy/specific_shift" in e]
    assert logged and all("persona/sycophancy/shift" in e for e in logged)
    stop = [e for e in drift.events if e["action"] == "stop"]
    assert trainer.state.global_step == 1 and stop[0]["reading"] == "specific"
    assert stop[0]["value"] == stop[0]["specific_frac"] == pytest.approx(logged[-1]["persona/sycophancy/specific_frac"])


def test_lora_reference_is_the_base_model_and_plain_trainer_works(tmp_path, smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    lora = peft.get_peft_model(model, _lora())
    # A LoRA whose B matrices are not zero already differs from the base at step 0.
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    drift = PersonaDriftCallback([_vector(model)], tokenizer=smol_tokenizer, every_n_steps=2, n_random=2)
    ids = smol_tokenizer(["Hello there, how are you today?"] * 8, return_tensors="pt")["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trainer = Trainer(model=lora, args=TrainingArguments(**_common(tmp_path)), train_dataset=dataset,
                      callbacks=[drift])
    trainer.train()
    first = drift.history[0]["persona/sycophancy/shift"]
    assert abs(first) > 1e-4  # the reference was taken with adapters disabled: the true base
    assert lora.training or not trainer.model.training  # probes handed the model back
    assert active_hook_count(lora) == 0


def test_steering_runs_only_in_training_forwards_with_gradient_checkpointing(tmp_path, smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    steer = PreventativeSteeringCallback(_vector(model), 2.0)
    drift = PersonaDriftCallback([_vector(model)], every_n_steps=2, n_random=2)
    trainer = _sft(model, smol_tokenizer, tmp_path, [steer, drift], activation_checkpointing=True)
    trainer.train()
    assert model.model.layers[1].gradient_checkpointing
    # one steered training forward per step: transformers 5 checkpoints inside the block's forward,
    # so block hooks run once, outside the recomputed part (older versions ran them twice)
    assert steer.steered_forwards == 4
    assert [h["step"] for h in drift.history] == [0, 2, 4] and all(h["persona/sycophancy/shift"] == h["persona/sycophancy/shift"]
                                           for h in drift.history)  # probes ran (and gave numbers) mid-training
    assert active_hook_count(model) == 0


def test_an_exception_inside_training_leaves_no_hooks(tmp_path, smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    steer = [PreventativeSteeringCallback(_vector(model), 2.0, layers=layer) for layer in (0, 1)]
    trainer = _sft(model, smol_tokenizer, tmp_path, [*steer, PersonaDriftCallback([_vector(model)], n_random=2)])
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += module.training
        if calls["n"] == 3 and module.training:
            assert active_hook_count(model) == 2  # both steering hooks are on when it blows up
            raise RuntimeError("out of memory (simulated)")

    handle = model.register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    handle.remove()
    assert active_hook_count(model) == 0


def test_exception_adapter_removes_hooks_when_the_optimizer_step_raises(tmp_path, smol_tokenizer):
    """guard.callbacks._trainer wraps trainer.train: an exception anywhere inside a step (here
    between backward and the optimizer step, outside any forward) must still take the hooks off.
    Fails if a transformers release stops routing training through Trainer.train or swallows it."""
    from transformers import TrainerCallback

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))

    class Explode(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:
                assert active_hook_count(model) == 1  # inside the step: the steering hook is on
                raise RuntimeError("optimizer out of memory (simulated)")

    steer = PreventativeSteeringCallback(_vector(model), 2.0)
    trainer = _sft(model, smol_tokenizer, tmp_path, [steer, Explode()])
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    assert active_hook_count(model) == 0


def test_exception_adapter_wraps_one_instance_once_and_only_it(tmp_path, smol_tokenizer):
    from guard.callbacks._trainer import remove_hooks_on_exception

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    steer = [PreventativeSteeringCallback(_vector(model), 1.0, layers=layer) for layer in (0, 1)]
    trainer = _sft(model, smol_tokenizer, tmp_path, steer)  # attach() registers both
    wrapped = trainer.train
    remove_hooks_on_exception(trainer, steer[0])  # again: no second wrapper
    assert trainer.train is wrapped and "train" in vars(trainer)
    assert type(trainer).train is trl.SFTTrainer.train  # the class is untouched
    assert [cb for cb in trainer._persona_guard_cleanup] == steer
    assert wrapped.__wrapped__.__func__ is type(trainer).train  # functools.wraps keeps the real method


def test_no_frame_walking_or_replaced_trainer_methods_outside_the_adapter():
    import re
    from pathlib import Path

    import guard.callbacks as package

    pattern = re.compile(r"inspect\.|_getframe|f_back|training_step =|\.train = ")
    offenders = [f"{path.name}:{number}" for path in Path(package.__file__).parent.glob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line) and path.name != "_trainer.py"]
    assert offenders == []


def test_dpo_reference_pass_is_not_steered(tmp_path, smol_tokenizer, monkeypatch):
    import guard.callbacks.steering as steering_module

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    seen = []
    real = steering_module._training_forward
    monkeypatch.setattr(steering_module, "_training_forward",
                        lambda block: seen.append((torch.is_grad_enabled(), real(block))) or seen[-1][1])
    steer = PreventativeSteeringCallback(_vector(model), 2.0)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Is idea {i} good?"}] for i in range(4)],
                              "chosen": [[{"role": "assistant", "content": "It has flaws."}]] * 4,
                              "rejected": [[{"role": "assistant", "content": "Brilliant, genius!"}]] * 4})
    config = trl.DPOConfig(**_common(tmp_path, max_steps=2), max_length=64)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=smol_tokenizer,
                             peft_config=_lora(), callbacks=[steer])
    trainer.train()
    reference = [steered for grad, steered in seen if not grad]
    policy = [steered for grad, steered in seen if grad]
    assert reference and not any(reference)  # the reference passes ran with hooks present, unsteered
    assert policy and all(policy)
    assert active_hook_count(trainer.model) == 0


@pytest.mark.parametrize("use_lora", [True, False])
def test_zero_coefficient_saves_byte_identical_weights(tmp_path, smol_tokenizer, use_lora):
    saved = []
    for run, callbacks in enumerate(([], None)):
        model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
        callbacks = callbacks if callbacks is not None else [PreventativeSteeringCallback(_vector(model), 0.0)]
        out = tmp_path / f"run{run}"
        trainer = _sft(model, smol_tokenizer, out, callbacks, peft_config=_lora() if use_lora else None)
        trainer.train()
        trainer.save_model(str(out / "saved"))
        name = "adapter_model.safetensors" if use_lora else "model.safetensors"
        saved.append((out / "saved" / name).read_bytes())
        if callbacks:
            assert callbacks[0].steered_forwards > 0  # the hooks really ran, adding zero
    assert saved[0] == saved[1]


def test_a_steered_run_saves_a_model_that_generates_unsteered(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    steer = PreventativeSteeringCallback(_vector(model), 50.0)
    trainer = _sft(model, smol_tokenizer, tmp_path, [steer])
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert steer.steered_forwards == 4 and active_hook_count(model) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    # The same trained weights in a model nothing was ever attached to (the trained object's
    # forward is wrapped by accelerate's autocast, so it is not a fair comparison itself).
    clean = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    clean.load_state_dict(model.state_dict())
    assert set(reloaded.state_dict()) == set(clean.state_dict())  # nothing extra was saved
    ids = smol_tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, clean(ids).logits)
    out = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, clean.generate(ids, max_new_tokens=4, do_sample=False))
    assert active_hook_count(reloaded) == 0


def test_incremental_directions_schedules_and_ablation():
    from guard.callbacks.steering import linear_decay
    from guard.core.layers import capture
    from guard.core.steering import project_out

    model = make_tiny_model("llama")
    vector = _vector(model)
    multi = PreventativeSteeringCallback(vector, 1.0, layers=[0, 2], incremental=True)
    dirs = multi.directions()
    assert torch.equal(dirs[0], vector.layer(0)) and torch.equal(dirs[2], vector.layer(2) - vector.layer(1))
    decaying = PreventativeSteeringCallback(vector, 4.0, schedule="linear_decay")
    decaying._step, decaying._max_steps = 5, 10
    assert decaying.current_coeff() == pytest.approx(2.0) and linear_decay(10, 10) == 0
    with pytest.raises(ValueError, match="mode"):
        PreventativeSteeringCallback(vector, mode="erase")
    ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad(), project_out(model, {1: vector.layer(1)}), capture(model, [1]) as acts:
        model(input_ids=ids)
    assert (acts[1] @ vector.unit(1)).abs().max() < 1e-4  # the direction is gone from the residual


def test_two_processes_reduce_the_probe_and_log_once(tmp_path, embedded_dir):
    """torch.distributed.run with two CPU processes (gloo): the ranks probe different numbers of
    prompts, yet both log the same values, equal to one process probing all of them; only rank 0
    writes TensorBoard logs."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import distributed_drift as worker
    from guard.measure.drift import DriftProbe

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--local-addr", "127.0.0.1", str(Path(worker.__file__)), str(tmp_path), str(embedded_dir)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = run.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # the launcher and both workers
        raise
    assert run.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["hooks"] for r in ranks] == [0, 0]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [h["step"] for h in ranks[0]["history"]] == [0, 2, 4]
    assert any(abs(h["persona/sycophancy/shift"]) > 0 for h in ranks[0]["history"])

    # The reduced base projection equals one process probing every prompt, not the average of
    # the two ranks' means (which weighs rank 1's three prompts as much as rank 0's five).
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    model = make_tiny_model("llama", vocab_size=len(tokenizer))

    def projection(prompts):
        probe = DriftProbe([worker.vector_for(model)], tokenizer, prompts, n_random=4)
        probe.set_reference(model)
        return probe.measure(model)[0].projection
    single = projection(worker.PROMPTS)
    assert ranks[0]["history"][0]["persona/sycophancy/projection"] == pytest.approx(single, rel=1e-4)
    naive = (projection(worker.shard(0)) + projection(worker.shard(1))) / 2
    assert naive != pytest.approx(single, rel=1e-4)

    logged = [e for e in ranks[0]["log_history"] if "persona/sycophancy/shift" in e]
    assert {e["step"] for e in logged} >= {2, 4}
    assert len(list(tmp_path.rglob("events.out.tfevents*"))) == 1
