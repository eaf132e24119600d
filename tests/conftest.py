"""Shared fixtures: a tiny random model per architecture, and the embedded model (helpers.py has the builders)."""

from __future__ import annotations

import pytest
import transformers

from helpers import ARCHITECTURES, make_tiny_model


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def embedded_dir():
    """The cached safetensors copy of the embedded SmolLM2 (converted once per machine)."""
    from guard.core.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def smol_tokenizer(embedded_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_dir)
    return tokenizer


@pytest.fixture(scope="session")
def embedded():
    from guard.core.models import load_model

    return load_model()


@pytest.fixture
def tiny_chat_model(smol_tokenizer):
    """A tiny random Llama sharing SmolLM2's tokenizer and chat template (for extraction mechanics)."""
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    return model, smol_tokenizer
