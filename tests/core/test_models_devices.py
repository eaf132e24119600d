"""Devices, dtypes, device maps and the offline switch of load_model, and the CLI options for them."""

import click
import pytest
import torch
from click.testing import CliRunner

from helpers import make_tiny_model
from guard.core import models
from guard.core.models import ModelLoadError, auto_dtype, input_device, load_model, resolve_device


@pytest.fixture
def model_dir(tmp_path, smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    model.to(torch.bfloat16).save_pretrained(tmp_path)  # a bfloat16 checkpoint, as most hub models are
    smol_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("gpu please")


def test_auto_dtype_is_float32_off_gpu_and_half_on_gpus_that_have_it(monkeypatch):
    for device in ("cpu", "mps"):
        assert auto_dtype(torch.device(device), torch.bfloat16) == torch.float32
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto_dtype(cuda, torch.bfloat16) == torch.bfloat16
    assert auto_dtype(cuda, torch.float32) == torch.bfloat16 and auto_dtype(cuda, None) == torch.bfloat16
    assert auto_dtype(cuda, torch.float16) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100 or T4
    assert auto_dtype(cuda, torch.bfloat16) == torch.float32 and auto_dtype(cuda, torch.float16) == torch.float16


def test_load_model_auto_on_cpu_reads_float32(model_dir):
    loaded = load_model(model_dir, dtype="auto", device="auto")
    assert loaded.model.dtype == torch.float32 and input_device(loaded.model) == torch.device("cpu")
    assert models._checkpoint_dtype(str(model_dir), {}) == torch.bfloat16  # what "auto" reads on a GPU


def test_load_model_auto_dtype_on_cuda_takes_the_checkpoints(model_dir, monkeypatch):
    """The dtype decision for a CUDA target, without a GPU: resolve to cuda, keep the model on CPU."""
    monkeypatch.setattr(models, "resolve_device", lambda device="auto": torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    assert load_model(model_dir, dtype="auto", device="auto").model.dtype == torch.bfloat16


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """The keyword arguments every AutoModelForCausalLM.from_pretrained call gets."""
    from transformers import AutoModelForCausalLM

    calls, real = [], AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return calls


def test_device_map_is_passed_through_and_excludes_a_device(model_dir, from_pretrained_calls):
    pytest.importorskip("accelerate")
    loaded = load_model(model_dir, device_map="auto")
    assert from_pretrained_calls[-1]["device_map"] == "auto" and input_device(loaded.model) == torch.device("cpu")
    load_model(model_dir)
    assert "device_map" not in from_pretrained_calls[-1]
    with pytest.raises(ModelLoadError, match="not both") as error:
        load_model(model_dir, device="cuda:0", device_map="auto")
    assert "\n" not in str(error.value)


def test_offline_follows_huggingface_hubs_own_switch(monkeypatch):
    import huggingface_hub.constants as hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    assert not models._offline()
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # e.g. set before the process imported the hub
    assert models._offline()
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set later in the process
    assert models._offline()


def test_cli_model_options_default_to_auto_and_pass_the_device_map(model_dir, from_pretrained_calls):
    from guard.cli.common import load_model_from, model_options

    @click.command()
    @model_options
    def show(model_id, dtype, device, layer_path, trust_remote_code):
        loaded = load_model_from(model_id, dtype, device, trust_remote_code)
        click.echo(f"{dtype} {device} {loaded.model.dtype}")

    result = CliRunner().invoke(show, ["--model", str(model_dir)], catch_exceptions=False)
    assert result.stdout.split() == ["auto", "auto", "torch.float32"]
    assert "device_map" not in from_pretrained_calls[-1]
    pytest.importorskip("accelerate")
    CliRunner().invoke(show, ["--model", str(model_dir), "--device-map", "auto"], catch_exceptions=False)
    assert from_pretrained_calls[-1]["device_map"] == "auto"
