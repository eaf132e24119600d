"""Helpers shared by the tests: tiny random models of several architectures, and paths."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BENCHMARK_DATA = REPO / "benchmarks" / "data"
# Extraction options that keep a CLI extraction on a tiny model to a second.
SMALL = ["--questions", "2", "--pairs", "2", "--max-new-tokens", "4", "--quiet"]

VOCAB = 128
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)


def _tiny_configs():
    t = transformers
    return {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, TINY),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, TINY),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, TINY),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, {**TINY, "head_dim": 8}),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, {**TINY, "head_dim": 8}),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {**TINY, "pad_token_id": 0}),
        "gpt2": (t.GPT2Config, t.GPT2LMHeadModel, dict(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB,
                                                         n_positions=128, bos_token_id=1, eos_token_id=2)),
        "gpt_neox": (t.GPTNeoXConfig, t.GPTNeoXForCausalLM, dict(hidden_size=32, intermediate_size=64,
                                                                  num_hidden_layers=3, num_attention_heads=4,
                                                                  vocab_size=VOCAB, max_position_embeddings=128,
                                                                  bos_token_id=1, eos_token_id=2)),
    }


ARCHITECTURES = list(_tiny_configs())


def make_tiny_model(arch: str, seed: int = 0, vocab_size: int = VOCAB):
    config_cls, model_cls, kwargs = _tiny_configs()[arch]
    kwargs = dict(kwargs)
    kwargs["vocab_size"] = vocab_size
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    return model.eval()


def final_norm(model):
    """The final norm module, to relate the last block's output to hidden_states[-1]."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise AssertionError("no final norm found")
