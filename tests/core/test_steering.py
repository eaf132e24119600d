"""Inference steering: which positions get the vector, in plain forwards and in cached generation."""

import pytest
import torch

from helpers import make_tiny_model
from guard.core.generation import SamplingConfig, encode, generate
from guard.core.layers import LayerError, active_hook_count, capture
from guard.core.steering import Steering, steer
from guard.core.vectors import PersonaVector, VectorFileError, metadata_for


def _vector(model, recommended=None):
    meta = metadata_for(model, "sycophancy", recommended_layer=recommended)
    vectors = torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(3))
    return PersonaVector(vectors, meta)


def _delta(model, steering, ids, layer, **apply_kwargs):
    """Steered minus unsteered output of block ``layer`` for one forward."""
    with torch.no_grad(), capture(model, [layer]) as plain:
        model(input_ids=ids)
    with torch.no_grad(), steering.apply(model, **apply_kwargs), capture(model, [layer]) as steered:
        model(input_ids=ids)
    return steered[layer] - plain[layer]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_positions_add_coeff_times_vector_everywhere(arch):
    model = make_tiny_model(arch)
    vec = _vector(model)
    delta = _delta(model, Steering.from_vector(vec, 1, coeff=2.5), torch.randint(3, 100, (2, 6)), 1)
    assert torch.allclose(delta, (2.5 * vec.layer(1)).expand_as(delta), atol=1e-5)


def test_response_mode_without_mask_steers_the_last_prefill_position_and_every_decode_step():
    model = make_tiny_model("llama")
    steering = Steering.from_vector(_vector(model), 1, coeff=1.0, positions="response")
    delta = _delta(model, steering, torch.randint(3, 100, (2, 6)), 1)
    assert delta[:, :-1].abs().max() == 0
    assert torch.allclose(delta[:, -1], _vector(model).layer(1).expand(2, -1), atol=1e-5)
    single = _delta(model, steering, torch.randint(3, 100, (2, 1)), 1)  # a decoding step's shape
    assert torch.allclose(single[:, 0], _vector(model).layer(1).expand(2, -1), atol=1e-5)


def test_response_mode_with_mask_steers_response_and_the_token_before_it():
    model = make_tiny_model("llama")
    steering = Steering.from_vector(_vector(model), 1, positions="response")
    ids = torch.randint(3, 100, (2, 7))
    response = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1]])
    delta = _delta(model, steering, ids, 1, response_mask=response)
    steered = delta.abs().amax(dim=-1) > 0
    assert steered.tolist() == [[False, False, True, True, True, True, False],
                                [False, False, False, False, True, True, True]]


def test_generation_under_zero_coefficient_is_unchanged_and_steering_changes_it(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    prompts = encode(smol_tokenizer, ["Hello there", "What is two plus two?"])
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    plain = generate(model, smol_tokenizer, prompts, greedy)
    vec = _vector(model)
    for positions in ("all", "response"):
        with steer(model, vec, layer=1, coeff=0.0, positions=positions):
            assert generate(model, smol_tokenizer, prompts, greedy) == plain
        with steer(model, vec, layer=1, coeff=50.0, positions=positions):
            assert generate(model, smol_tokenizer, prompts, greedy) != plain
    assert active_hook_count(model) == 0


def test_hooks_are_gone_after_an_exception_inside_steering():
    model = make_tiny_model("qwen2")
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, _vector(model), layer=0, coeff=1.0):
            assert active_hook_count(model) == 1
            raise RuntimeError("boom")
    assert active_hook_count(model) == 0


def test_default_layer_comes_from_the_vector_file():
    model = make_tiny_model("llama")
    assert set(Steering.from_vector(_vector(model, recommended=2)).vectors) == {2}
    with pytest.raises(VectorFileError, match="no recommended layer.*select-layer"):
        Steering.from_vector(_vector(model))
    with pytest.raises(LayerError, match="out of range"):
        Steering.from_vector(_vector(model), 5)
    with pytest.raises(ValueError, match="positions"):
        Steering.from_vector(_vector(model), 1, positions="prompt")


def test_random_control_has_the_same_norm_and_another_direction():
    model = make_tiny_model("llama")
    steering = Steering.from_vector(_vector(model), [0, 2], coeff=3.0)
    control = steering.random_like(seed=1)
    assert control.coeff == 3.0 and set(control.vectors) == {0, 2}
    for layer in (0, 2):
        assert control.vectors[layer].norm() == pytest.approx(float(steering.vectors[layer].norm()), rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(control.vectors[layer], steering.vectors[layer], dim=0)
        assert abs(float(cos)) < 0.7
    assert torch.equal(control.vectors[0], steering.random_like(seed=1).vectors[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
def test_operators_ablate_and_ablate_add(arch):
    """ablate leaves no component along v; ablate_add sets it to coeff * |v|; both leave the
    orthogonal part alone."""
    model = make_tiny_model(arch)
    vec = _vector(model)
    ids = torch.randint(3, 100, (2, 6))
    unit = vec.unit(1)
    with torch.no_grad(), capture(model, [1]) as plain:
        model(input_ids=ids)
    for operator, coeff, expected in [("ablate", 1.0, 0.0), ("ablate_add", 0.5, 0.5 * float(vec.layer(1).norm()))]:
        steering = Steering.from_vector(vec, 1, coeff=coeff, operator=operator)
        with torch.no_grad(), steering.apply(model), capture(model, [1]) as steered:
            model(input_ids=ids)
        along = steered[1] @ unit
        assert torch.allclose(along, torch.full_like(along, expected), atol=1e-4), operator
        orthogonal = lambda h: h - (h @ unit).unsqueeze(-1) * unit  # noqa: E731
        assert torch.allclose(orthogonal(steered[1]), orthogonal(plain[1]), atol=1e-4)
    assert active_hook_count(model) == 0


def test_incremental_steering_adds_layer_differences():
    model = make_tiny_model("llama")
    vec = _vector(model)
    steering = Steering.from_vector(vec, [0, 2], incremental=True)
    assert torch.equal(steering.vectors[0], vec.layer(0))
    assert torch.equal(steering.vectors[2], vec.layer(2) - vec.layer(1))


def test_spec_file_round_trip_and_refusal_on_another_model(tmp_path):
    from guard.core.vectors import VectorMismatchError

    model = make_tiny_model("llama")
    steering = Steering.from_vector(_vector(model), 1, coeff=-3.0, positions="response", operator="ablate_add")
    path = steering.save(tmp_path / "steer.safetensors", model)
    back = Steering.load(path, model)
    assert (back.coeff, back.positions, back.operator) == (-3.0, "response", "ablate_add")
    assert torch.equal(back.vectors[1], steering.vectors[1]) and back.description["trait"] == "sycophancy"
    other = make_tiny_model("llama", seed=1)
    with pytest.raises(VectorMismatchError, match="steering spec steer.safetensors.*different weights"):
        Steering.load(path, other)
    Steering.load(path, other, allow_other_weights=True)
    with pytest.raises(VectorMismatchError, match="architecture: vector llama, model gpt2"):
        Steering.load(path, make_tiny_model("gpt2"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(VectorFileError, match="not a steering spec"):
        Steering.load(tmp_path / "junk.safetensors")
