import pytest
import torch
from torch import nn

from helpers import final_norm, make_tiny_model

from guard.core.layers import (
    LayerError, active_hook_count, capture, find_decoder_layers, hidden_size, reduce_positions, resolve_layers,
)
from guard.core.steering import add_vectors


def _inputs(batch=2, seq=7, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def test_finds_every_decoder_block(tiny_model):
    blocks = find_decoder_layers(tiny_model)
    assert len(blocks) == 3
    assert resolve_layers(tiny_model, [-1]) == [2]


def test_captured_activations_equal_output_hidden_states(tiny_model):
    ids = _inputs()
    with torch.no_grad():
        with capture(tiny_model, position="all") as acts:
            out = tiny_model(ids, output_hidden_states=True)
    hs = out.hidden_states
    n = len(find_decoder_layers(tiny_model))
    assert sorted(acts) == list(range(n))
    for layer in range(n - 1):
        assert (acts[layer] - hs[layer + 1]).abs().max().item() < 1e-5
    # transformers applies the final norm to the last hidden_states entry; we keep the raw block output.
    with torch.no_grad():
        normed = final_norm(tiny_model)(acts[n - 1])
    assert (normed - hs[n]).abs().max().item() < 1e-5


def test_adding_zero_vector_changes_nothing(tiny_model):
    ids = _inputs()
    d = hidden_size(tiny_model)
    with torch.no_grad():
        base = tiny_model(ids).logits
        with add_vectors(tiny_model, {0: torch.zeros(d), 2: torch.zeros(d)}):
            steered = tiny_model(ids).logits
    assert torch.equal(base, steered)


def test_added_vector_reaches_the_residual_stream(tiny_model):
    ids = _inputs()
    d = hidden_size(tiny_model)
    vec = torch.randn(d)
    with torch.no_grad():
        with capture(tiny_model, [1]) as base:
            tiny_model(ids)
        with add_vectors(tiny_model, {1: vec}, coeff=2.0), capture(tiny_model, [1]) as steered:
            logits = tiny_model(ids).logits
    assert torch.allclose(steered[1] - base[1], 2.0 * vec.expand_as(base[1]), atol=1e-5)
    assert not torch.equal(logits, tiny_model(ids).logits)


def test_steering_mask_limits_positions():
    model = make_tiny_model("llama")
    ids = _inputs(batch=2, seq=5)
    mask = torch.zeros(2, 5)
    mask[0, 3:] = 1
    vec = torch.ones(hidden_size(model))
    with torch.no_grad():
        with capture(model, [0]) as base:
            model(ids)
        with add_vectors(model, {0: vec}, mask=mask), capture(model, [0]) as steered:
            model(ids)
    delta = (steered[0] - base[0]).abs().sum(-1)
    assert torch.equal(delta > 1e-6, mask.bool())


def test_steering_is_out_of_place_and_trains():
    model = make_tiny_model("llama").train()
    ids = _inputs()
    with add_vectors(model, {0: torch.randn(hidden_size(model)), 1: torch.randn(hidden_size(model))}):
        loss = model(ids, labels=ids).loss
        loss.backward()  # an in-place edit of a saved activation would raise here
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_steering_follows_activation_dtype():
    model = make_tiny_model("llama").to(torch.bfloat16)
    ids = _inputs()
    with torch.no_grad(), add_vectors(model, {0: torch.randn(hidden_size(model), dtype=torch.float64)}):
        out = model(ids).logits
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("context", ["capture", "add_vectors"])
def test_hooks_are_removed_after_an_exception(tiny_model, context):
    d = hidden_size(tiny_model)
    manager = capture(tiny_model) if context == "capture" else add_vectors(tiny_model, {0: torch.ones(d), 2: torch.ones(d)})
    with pytest.raises(RuntimeError, match="boom"):
        with manager:
            assert active_hook_count(tiny_model) > 0
            tiny_model(_inputs())
            raise RuntimeError("boom")
    assert active_hook_count(tiny_model) == 0


def test_bad_vector_shape_registers_nothing():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="expected \\(32,\\)"):
        with add_vectors(model, {0: torch.ones(7)}):
            pass
    assert active_hook_count(model) == 0


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return (x + self.linear(x), "aux")


class _ToyModel(nn.Module):
    """Blocks returning tuples, stored under a name no known path covers."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": 4, "num_hidden_layers": 2})()
        self.stack = nn.ModuleList([_TupleBlock(), _TupleBlock()])

    def forward(self, x):
        for block in self.stack:
            x, aux = block(x)
            assert aux == "aux"  # the tuple shape survives steering
        return x


def test_tuple_outputs_and_structural_discovery():
    model = _ToyModel()
    x = torch.randn(1, 3, 4)
    assert find_decoder_layers(model) is model.stack
    with torch.no_grad():
        base = model(x)
        with add_vectors(model, {1: torch.ones(4)}):
            steered = model(x)
        with capture(model, [0, 1]) as acts:
            model(x)
    assert torch.allclose(steered - base, torch.ones(4).expand_as(base))
    assert torch.allclose(acts[1], base)


def test_layer_path_override_and_clear_errors():
    model = make_tiny_model("llama")
    assert find_decoder_layers(model, "model.layers") is model.model.layers
    with pytest.raises(LayerError, match="does not name a ModuleList"):
        find_decoder_layers(model, "model.norm")
    with pytest.raises(LayerError, match="out of range"):
        resolve_layers(model, [3])
    with pytest.raises(LayerError, match="--layer-path"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_peft_wrapped_model_finds_the_same_blocks():
    peft = pytest.importorskip("peft")
    model = make_tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(find_decoder_layers(wrapped)) == 3
    with capture(wrapped, [0]) as acts:
        wrapped(_inputs())
    assert acts[0].shape == (2, 7, 32)


def test_position_reductions_agree_under_left_and_right_padding():
    torch.manual_seed(0)
    hidden = torch.randn(1, 4, 3)  # one sequence: 2 prompt tokens + 2 response tokens
    pad = torch.zeros(1, 2, 3)
    right = torch.cat([hidden, pad], dim=1)
    left = torch.cat([pad, hidden], dim=1)
    attn_r, attn_l = torch.tensor([[1, 1, 1, 1, 0, 0]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    resp_r, resp_l = torch.tensor([[0, 0, 1, 1, 0, 0]]), torch.tensor([[0, 0, 0, 0, 1, 1]])
    expected = {
        "last": hidden[:, 3], "last_prompt": hidden[:, 1],
        "prompt_mean": hidden[:, :2].mean(1), "response_mean": hidden[:, 2:].mean(1),
    }
    for position, want in expected.items():
        for h, a, r in ((right, attn_r, resp_r), (left, attn_l, resp_l)):
            assert torch.allclose(reduce_positions(h, position, a, r), want), position
    # without a response mask, last_prompt is the last attended token (the pre-generation state)
    assert torch.allclose(reduce_positions(right[:, :2], "last_prompt", attn_r[:, :2]), hidden[:, 1])
    with pytest.raises(ValueError, match="needs a response_mask"):
        reduce_positions(right, "response_mean", attn_r)
    with pytest.raises(ValueError, match="does not match"):
        reduce_positions(right, "last", attn_r[:, :3])


def test_negative_layer_keys_count_from_the_end():
    model = make_tiny_model("llama")
    ids = _inputs()
    vec = torch.randn(hidden_size(model))
    with torch.no_grad():
        with add_vectors(model, {-1: vec}), capture(model, [2]) as neg:
            model(ids)
        with add_vectors(model, {2: vec}), capture(model, [2]) as pos:
            model(ids)
    assert torch.equal(neg[2], pos[2])
    with pytest.raises(LayerError, match="same block twice"):
        with add_vectors(model, {2: vec, -1: vec}):
            pass
    assert active_hook_count(model) == 0


def test_fp16_means_do_not_overflow():
    hidden = torch.full((1, 400, 2), 300.0, dtype=torch.float16)
    resp = torch.ones(1, 400)
    resp[0, 0] = 0
    assert torch.allclose(reduce_positions(hidden, "response_mean", None, resp), torch.full((1, 2), 300.0))
