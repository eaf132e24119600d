"""Fixtures of the screening tests: a tiny model saved as a directory with a vector that fits it."""

import pytest
import torch

from helpers import make_tiny_model


@pytest.fixture
def tiny_dir(tmp_path, smol_tokenizer):
    """``(model directory, vector file)``: a tiny random Llama with SmolLM2's tokenizer, and a random
    sycophancy vector for it (recommended layer 1), made without an extraction."""
    from guard.core.models import load_model
    from guard.core.vectors import PersonaVector, metadata_for

    make_tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path / "tiny")
    smol_tokenizer.save_pretrained(tmp_path / "tiny")
    model, _, _ = load_model(str(tmp_path / "tiny"))
    meta = metadata_for(model, "sycophancy", recommended_layer=1)
    vector = torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0))
    PersonaVector(vector, meta).save(tmp_path / "v.safetensors")
    return tmp_path / "tiny", tmp_path / "v.safetensors"
