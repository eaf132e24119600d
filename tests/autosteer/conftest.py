"""Fixtures of the auto-steering tests: a word-level chat tokenizer built in memory (no download,
no embedded model), tiny random models sharing it, and tiny SAEs constructed at a layer."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import make_tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from guard.autosteer.data import NEUTRAL_SYSTEM, PROMPT_BANK
from guard.core.models import model_name, weights_fingerprint

pytest.importorskip("sae_lens")

DESCRIPTION = "Talk like a pirate and say arr in every answer."
LAYER = 1
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of the prompt bank, the descriptions and the template."""
    bank = json.loads(PROMPT_BANK.read_text())
    text = " ".join(bank["dev"] + bank["test"] + [DESCRIPTION, NEUTRAL_SYSTEM, "system user assistant arr"])
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text)))
    specials = ["[PAD]", "<|im_start|>", "<|im_end|>", "[UNK]"]  # ids 0, 1, 2: pad, bos, eos of the tiny configs
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", unk_token="[UNK]")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="session")
def word_tokenizer():
    return build_tokenizer()


def tiny_model(arch: str, tokenizer, seed: int = 0):
    """A tiny random model of ``arch`` over ``tokenizer``'s vocabulary, its weights scaled up so
    its answers depend on the system prompt (at the default 0.02 init they hardly do)."""
    model = make_tiny_model(arch, seed=seed, vocab_size=len(tokenizer))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(8.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_sae(model, layer: int = LAYER, d_sae: int = 64, k: int = 4, seed: int = 0, planted: int | None = None):
    """A TopK SAE with random weights for ``model`` at ``layer``, its metadata as ``train_sae``
    writes it; ``planted`` makes that latent fire on every token with a large activation (an
    always-on latent with the largest mean difference, which the density filter must drop)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    d_in = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        if planted is not None:
            sae.W_enc[:, planted] = torch.randn(d_in) * 50.0
            sae.b_enc[planted] = 1e4
    meta = sae.cfg.metadata
    meta["persona_guard_layer"] = layer
    meta["hook_name"] = f"persona_guard.layer.{layer}"
    meta["model_name"] = model_name(model)
    meta["persona_guard_fingerprint"] = weights_fingerprint(model)
    return sae.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run 10x faster on one thread than on a contended pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
