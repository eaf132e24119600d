"""What the benchmarks share: the machine line, RESULTS.md sections, and reusable vectors.

Benchmarks import the library and this module only, never each other."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from guard.core.chat import format_messages
from guard.core.forward import pad_batch, plan_batches
from guard.core.layers import capture
from guard.extract.cached import load_or_extract
from guard.traits import load_trait

RESULTS = Path(__file__).with_name("RESULTS.md")
OUT = Path(__file__).parent / "out"  # vectors and SAEs reused between benchmark runs
HEADER = ("# Benchmark results\n\nEvery section is written by the script named in it, on the machine it names; "
          "rerun the command to refresh it.\n")


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def write_section(name: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"<!-- begin {name} -->\n{body.rstrip()}\n<!-- end {name} -->"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def vector_for(model, tokenizer, trait_name: str, log, select_layer: bool = False):
    """The trait's vector from benchmarks/out (default preset), extracted when missing or from
    other weights; with ``select_layer``, its layer selected and stored the first time."""
    return load_or_extract(OUT / f"{trait_name}.safetensors", model, tokenizer, load_trait(trait_name),
                           select_layer=select_layer, log=log)


def vector_with_layer(model, tokenizer, trait_name: str, log):
    """:func:`vector_for` with a recommended layer."""
    return vector_for(model, tokenizer, trait_name, log, select_layer=True)


# -- the straightforward implementations our code is measured against ------------------------------

def reference_projections(model, tokenizer, samples, vectors, device="cpu") -> list[list[tuple[float, float]]]:
    """The reference scripts' way of screening: one sample per forward, every hidden state
    returned. Per sample and vector: (mean response-token projection, last-prompt-token projection)."""
    units = [(v.default_layer(), v.unit(v.default_layer()).to(device)) for v in vectors]
    out = []
    with torch.inference_mode():
        for sample in samples:
            prompt_text = format_messages(tokenizer, list(sample.prompt))
            prompt_len = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
            ids = tokenizer(prompt_text + sample.response, add_special_tokens=False, return_tensors="pt")["input_ids"]
            hidden = model(input_ids=ids.to(device), output_hidden_states=True).hidden_states
            row = []
            for layer, unit in units:
                h = hidden[layer + 1][0].float()  # block_output convention: layer i = hidden_states[i + 1]
                row.append((float(h[prompt_len:].mean(0) @ unit), float(h[prompt_len - 1] @ unit)))
            out.append(row)
    return out


def raw_forward(model, tokenizer, samples, config, device="cpu") -> int:
    """The model alone over the screen's length-planned batches (every block, and the LM head at
    the last position only, as a prefill does: logits over every padded position would make this
    "ceiling" slower than batch 1). Returns the real tokens pushed through (padding not counted)."""
    prompts = tokenizer([format_messages(tokenizer, list(s.prompt)) for s in samples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([s.response for s in samples], add_special_tokens=False)["input_ids"]
    seqs = [p + r for p, r in zip(prompts, responses)]
    padded = [pad_batch([seqs[i] for i in batch], 0, device, side="right")
              for batch in plan_batches([len(s) for s in seqs], config.max_batch_size, config.token_budget)]
    with torch.inference_mode():
        for ids, attn in padded:
            model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=1)
    return sum(len(s) for s in seqs)


def straightforward_scores(epo, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """EPO's (target, xent) of each candidate row computed the straightforward way: one candidate
    and one context per full forward (the prefix recomputed every time), full logits."""
    targets, xents = [], []
    device = next(epo.model.parameters()).device
    with torch.no_grad():
        for row in ids.tolist():
            t_sum = x_sum = 0.0
            for prefix, suffix in zip(epo.slot.prefixes, epo.slot.suffixes):
                full = torch.tensor([list(prefix) + row + list(suffix)], device=device)
                with capture(epo.model, [epo.layer], position="all", dtype=None) as acts:
                    logits = epo.model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0].float()
                t_sum += float(epo.objective(acts[epo.layer][:, -1].float())[0])
                logp = torch.log_softmax(logits, -1)
                scored = [logp[len(prefix) + k - 1, row[k]] for k in range(0 if prefix else 1, len(row))]
                x_sum += -float(torch.stack(scored).mean())
            targets.append(t_sum / epo.slot.contexts)
            xents.append(x_sum / epo.slot.contexts)
    return torch.tensor(targets), torch.tensor(xents)
