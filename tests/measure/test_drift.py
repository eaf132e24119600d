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
