"""The drift probe read at every layer of one vector (the demo's per-layer table)."""

import torch

from helpers import make_tiny_model

from guard.core.vectors import PersonaVector, metadata_for
from guard.measure.drift import DriftProbe


def test_one_vector_at_every_layer(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    meta = metadata_for(model, "evil", recommended_layer=1)
    vector = PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)),
                           meta)
    probe = DriftProbe([vector], smol_tokenizer, ["Hello there.", "How do I bake bread?"], each_at=[0, 1, 2])
    probe.set_reference(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.05)  # a change that moves every later layer
    shifts = probe.measure(model)
    assert [s.layer for s in shifts] == [0, 1, 2] and {s.trait for s in shifts} == {"evil"}
    assert all(abs(s.shift) > 0 for s in shifts)
    alone = DriftProbe([vector], smol_tokenizer, ["Hello there.", "How do I bake bread?"], layers=[2])
    alone.base = {2: probe.base[2]}
    assert abs(alone.measure(model)[0].shift - shifts[2].shift) < 1e-5


def test_specific_shift_leaves_out_a_change_every_prompt_shares(smol_tokenizer):
    from guard.core.steering import Steering

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    meta = metadata_for(model, "evil", recommended_layer=1)
    vector = PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)),
                           meta)
    probe = DriftProbe([vector], smol_tokenizer, ["Hello there.", "How do I bake bread?"],
                       control_prompts=["What is 2 + 2?", "Name a colour."])
    probe.set_reference(model)
    # The same vector added to every prompt's activation at the read layer: a generic change.
    generic = torch.randn(meta.hidden_size, generator=torch.Generator().manual_seed(1))
    with Steering({1: generic}, coeff=1.0).apply(model):
        shift = probe.measure(model)[0]
    unit = vector.unit(1)
    assert abs(shift.shift - float(generic @ unit)) < 1e-3  # the raw shift reads it
    assert abs(shift.specific_shift) < 1e-3 and shift.specific_frac == shift.specific_shift / float(vector.layer(1).norm())
    assert shift.metrics()["persona/evil/specific_shift"] == shift.specific_shift
    # The reference, control means included, survives state_dict / load_state_dict.
    again = DriftProbe([vector], smol_tokenizer, ["Hello there.", "How do I bake bread?"],
                       control_prompts=["What is 2 + 2?", "Name a colour."])
    again.load_state_dict(probe.state_dict())
    with Steering({1: generic}, coeff=1.0).apply(model):
        assert abs(again.measure(model)[0].specific_shift - shift.specific_shift) < 1e-6
    without = DriftProbe([vector], smol_tokenizer, ["Hello there."])
    without.set_reference(model)
    assert without.measure(model)[0].specific_shift is None and "persona/evil/specific_shift" not in \
        without.measure(model)[0].metrics()


def test_shift_interval_is_the_bootstrap_over_probe_prompts(smol_tokenizer):
    from guard.core.stats import bootstrap_ci
    from guard.core.steering import Steering

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    meta = metadata_for(model, "evil", recommended_layer=1)
    vector = PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)),
                           meta)
    prompts = ["Hello there.", "How do I bake bread?", "Tell me a joke.", "Why is the sky blue?", "Plan my week."]
    probe = DriftProbe([vector], smol_tokenizer, prompts, n_random=4)
    probe.set_reference(model)
    still = probe.measure(model)[0]
    assert (still.shift_low, still.shift_high) == (0.0, 0.0) and still.clears_floor is False
    unit = vector.unit(1)
    with torch.no_grad():
        weight = model.model.layers[0].mlp.down_proj.weight  # moves each prompt differently
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)))
    with Steering({1: 3.0 * unit}, coeff=1.0).apply(model):
        moved = probe.measure(model)[0]
        rows = probe._means(model)[2][1]
    per_prompt = ((rows - probe.base_rows[1]) @ unit).numpy()
    expected = bootstrap_ci(per_prompt, n_boot=1000)
    assert per_prompt.std() > 1e-3 and abs(float(per_prompt.mean()) - moved.shift) < 1e-4
    assert (moved.shift_low, moved.shift_high) == (expected.low, expected.high)
    assert moved.shift_low < moved.shift < moved.shift_high and moved.clears_floor is True
    assert moved.metrics()["persona/evil/shift_ci_low"] == moved.shift_low
    # The per-prompt reference travels with the state; an older state without it measures without an interval.
    again = DriftProbe([vector], smol_tokenizer, prompts, n_random=4)
    again.load_state_dict(probe.state_dict())
    older = DriftProbe([vector], smol_tokenizer, prompts, n_random=4)
    state = probe.state_dict()
    state.pop("base_rows")
    older.load_state_dict(state)
    with Steering({1: 3.0 * unit}, coeff=1.0).apply(model):
        assert again.measure(model)[0].shift_low == moved.shift_low
        old = older.measure(model)[0]
    assert old.shift_low is None and old.clears_floor is None and "persona/evil/shift_ci_low" not in old.metrics()
