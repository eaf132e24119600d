import json
import struct

import pytest
import torch

from helpers import make_tiny_model
from guard.core.vectors import PersonaVector, VectorFileError, VectorMismatchError, metadata_for


def _vector_for(model, trait="sycophancy", seed=0):
    meta = metadata_for(model, trait, positions="response_mean", counts={"pos_kept": 3, "neg_kept": 3})
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(meta.num_layers, meta.hidden_size, generator=g)
    return PersonaVector(vectors, meta, vectors + 1, torch.ones_like(vectors))


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    model = make_tiny_model("qwen2")
    vec = _vector_for(model)
    path = vec.save(tmp_path / "v.safetensors")
    back = PersonaVector.load(path)
    assert torch.equal(back.vectors, vec.vectors)
    assert torch.equal(back.pos_mean, vec.pos_mean) and torch.equal(back.neg_mean, vec.neg_mean)
    assert back.meta == vec.meta
    assert back.meta.layer_convention == "block_output"
    assert back.meta.norms == pytest.approx(vec.vectors.norm(dim=-1).tolist())
    assert back.meta.package_version and back.meta.model_type == "qwen2"
    back.check_model(model)  # same model: accepted


def test_file_is_plain_safetensors_with_json_header(tmp_path):
    path = _vector_for(make_tiny_model("llama")).save(tmp_path / "v.safetensors")
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    meta = json.loads(header["__metadata__"]["persona_guard"])
    assert meta["format"] == "persona-guard/vector" and meta["trait"] == "sycophancy"
    assert header["vectors"]["dtype"] == "F32" and header["vectors"]["shape"] == [3, 32]


def test_unknown_metadata_keys_survive_a_round_trip(tmp_path):
    vec = _vector_for(make_tiny_model("llama"))
    vec.meta.extra["from_the_future"] = 1
    back = PersonaVector.load(vec.save(tmp_path / "v.safetensors"))
    assert back.meta.extra == {"from_the_future": 1}


def test_mismatched_hidden_size_is_refused_and_named():
    vec = _vector_for(make_tiny_model("llama"))
    other = make_tiny_model("gpt2")  # n_embd 32 but another architecture
    with pytest.raises(VectorMismatchError, match="architecture: vector llama, model gpt2"):
        vec.check_model(other)
    bigger = make_tiny_model("llama")
    bigger.config.hidden_size = 64
    with pytest.raises(VectorMismatchError, match="hidden size: vector 32, model 64"):
        vec.check_model(bigger)


def test_other_weights_are_refused_unless_allowed():
    vec = _vector_for(make_tiny_model("llama", seed=0))
    other = make_tiny_model("llama", seed=1)
    with pytest.raises(VectorMismatchError, match="different weights.*allow_other_weights"):
        vec.check_model(other)
    vec.check_model(other, allow_other_weights=True)


def test_load_with_a_model_checks_it(tmp_path):
    path = _vector_for(make_tiny_model("llama", seed=0)).save(tmp_path / "v.safetensors")
    PersonaVector.load(path, make_tiny_model("llama", seed=0))
    with pytest.raises(VectorMismatchError, match="fingerprint"):
        PersonaVector.load(path, make_tiny_model("llama", seed=1))
    assert PersonaVector.load(path, make_tiny_model("llama", seed=1), allow_other_weights=True).trait == "sycophancy"


def test_lora_wrapped_base_model_still_matches():
    peft = pytest.importorskip("peft")
    model = make_tiny_model("llama")
    vec = _vector_for(model)
    vec.check_model(peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))


def test_cosine_between_vectors():
    model = make_tiny_model("llama")
    a, b = _vector_for(model, seed=0), _vector_for(model, seed=1)
    assert torch.allclose(a.cosine(a), torch.ones(3), atol=1e-6)
    assert a.cosine(b).abs().max() < 1
    assert torch.allclose(a.unit(1).norm(), torch.tensor(1.0))


def test_bad_files_give_clear_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(VectorFileError, match="does not exist"):
        PersonaVector.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(VectorFileError, match="not a safetensors file"):
        PersonaVector.load(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(VectorFileError, match="not a persona-guard vector"):
        PersonaVector.load(plain)


def test_resolve_layer_is_the_one_range_check():
    from guard.core.layers import LayerError

    vec = _vector_for(make_tiny_model("llama"))  # 3 layers, no recommendation
    assert [vec.resolve_layer(layer) for layer in (0, 2, -1, -3)] == [0, 2, 2, 0]
    for bad in (3, -4):
        with pytest.raises(LayerError, match=f"layer {bad} is out of range"):
            vec.resolve_layer(bad)
    with pytest.raises(VectorFileError, match="no recommended layer"):
        vec.resolve_layer(None)
    vec.meta.recommended_layer = 1
    assert vec.resolve_layer(None) == 1
