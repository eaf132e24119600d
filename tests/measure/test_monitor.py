"""Pre-response monitor and prompt files."""

import json

import pytest
import torch

from helpers import make_tiny_model
from guard.core.chat import format_messages, format_prompt
from guard.core.data import DataFileError, Prompt, load_prompts
from guard.core.layers import capture
from guard.core.layers import LayerError
from guard.measure.monitor import MonitorError, PromptMonitor
from guard.core.vectors import PersonaVector, VectorMismatchError, metadata_for


def _vector(model, trait="sycophancy", layer=1, seed=0):
    meta = metadata_for(model, trait, recommended_layer=layer)
    vectors = torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(seed))
    return PersonaVector(vectors, meta)


def test_projection_is_the_last_prompt_token_on_the_unit_vector(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    vectors = [_vector(model, "sycophancy", 1, 0), _vector(model, "evil", 2, 1)]
    monitor = PromptMonitor(model, tokenizer, vectors)
    prompts = ["Hello there, how are you?", "Agree with me!"]
    got = monitor.projections(prompts)
    for i, text in enumerate(prompts):
        ids = tokenizer(format_prompt(tokenizer, text), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad(), capture(model, [1, 2], position="last") as acts:
            model(input_ids=ids)
        for j, (vector, layer) in enumerate(zip(vectors, (1, 2))):
            assert float(got[i, j]) == pytest.approx(float(acts[layer][0] @ vector.unit(layer)), abs=1e-4)


def test_z_scores_and_flags_against_the_reference(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    monitor = PromptMonitor(model, tokenizer, [_vector(model)], threshold=1.0)
    reference = [f"Tell me about topic number {i}." for i in range(8)]
    monitor.fit_reference(reference)
    ref = monitor.projections(reference)[:, 0]
    results = monitor.score(reference)
    zs = torch.tensor([r.readings[0].z for r in results])
    assert torch.allclose(zs, (ref - ref.mean()) / ref.std(), atol=1e-4)
    assert [r.flagged for r in results] == [bool(z >= 1.0) for z in zs]
    assert results[0].to_dict()["traits"]["sycophancy"]["layer"] == 1


def test_conversations_are_templated_whole(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    monitor = PromptMonitor(model, tokenizer, [_vector(model)])
    conversation = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Agree with me."}]
    got = monitor.projections([conversation, Prompt(tuple(conversation))])
    ids = tokenizer(format_messages(tokenizer, conversation), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad(), capture(model, [1], position="last") as acts:
        model(input_ids=ids)
    assert float(got[0, 0]) == pytest.approx(float(acts[1][0] @ monitor.units[0]), abs=1e-4)
    assert torch.equal(got[0], got[1])


def test_default_reference_is_the_traits_evaluation_questions(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    monitor = PromptMonitor(model, tokenizer, [_vector(model)]).fit_reference()
    assert monitor.reference_size == 25
    with pytest.raises(MonitorError, match="no shipped trait named 'made-up'"):
        PromptMonitor(model, tokenizer, [_vector(model, "made-up")]).fit_reference()


def test_bad_layers_and_duplicate_traits_are_refused(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    with pytest.raises(LayerError, match="layer 7 is out of range"):
        PromptMonitor(model, tokenizer, [_vector(model)], layers=[7])
    assert PromptMonitor(model, tokenizer, [_vector(model)], layers=[-1]).layers == [2]
    with pytest.raises(MonitorError, match="one vector per trait"):
        PromptMonitor(model, tokenizer, [_vector(model), _vector(model, seed=1)])


def test_a_vector_from_another_model_is_refused(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    other = _vector(make_tiny_model("qwen2"))
    with pytest.raises(VectorMismatchError):
        PromptMonitor(model, tokenizer, [other])


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("first question\n\n second \n")
    assert [p.text for p in load_prompts(tmp_path / "p.txt")] == ["first question", "second"]
    (tmp_path / "p.json").write_text(json.dumps(["plain", {"prompt": "with id", "id": "x"}]))
    assert [(p.text, p.id) for p in load_prompts(tmp_path / "p.json")] == [("plain", ""), ("with id", "x")]
    (tmp_path / "bad.json").write_text(json.dumps({"prompt": "not a list"}))
    with pytest.raises(DataFileError, match="must hold a list"):
        load_prompts(tmp_path / "bad.json")
    lines = [json.dumps({"prompt": "a", "system": "s", "id": 7}), "{broken",
             json.dumps({"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "x"}]}),
             json.dumps({"nothing": 1})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(tmp_path / "p.jsonl")
    warnings = []
    prompts = load_prompts(tmp_path / "p.jsonl", on_error="skip", warn=warnings.append)
    assert [p.text for p in prompts] == ["a", "b"] and prompts[0].id == "7"
    assert prompts[0].messages[0] == {"role": "system", "content": "s"}
    assert prompts[1].messages[-1]["role"] == "user"  # the logged reply is dropped
    assert len(warnings) == 2 and ":2:" in warnings[0] and ":4:" in warnings[1]
