"""Extraction wall time (default and --fast presets) and the pre-generation signal check.

For each trait: time `persona-guard extract` end to end (a fresh process: model load from the
cache, generation, activations, saving), then score the trait's held-out evaluation questions
under every trait-positive and trait-negative system prompt by the last-prompt-token projection
(before any generation) and report, per layer, the AUROC of positive vs negative prompts for the
persona vector and for 20 random directions of equal norm.

    .venv/bin/python benchmarks/extraction.py            # sycophancy and evil, both presets
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, machine, write_section  # noqa: E402

from guard.core.forward import prompt_activations  # noqa: E402
from guard.core.chat import format_prompt  # noqa: E402
from guard.core.stats import auroc, random_directions  # noqa: E402
from guard.core.models import load_model  # noqa: E402
from guard.traits import load_trait  # noqa: E402
from guard.core.vectors import PersonaVector  # noqa: E402

N_RANDOM = 20


def timed_extract(trait: str, fast: bool) -> tuple[float, Path]:
    path = OUT / f"{trait}{'-fast' if fast else ''}.safetensors"
    cmd = [str(Path(sys.executable).parent / "persona-guard"), "extract", "--trait", trait, "--out", str(path),
           "--json"] + (["--fast"] if fast else [])
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, path


def signal(model, tokenizer, trait_name: str, vector: PersonaVector) -> list[dict]:
    trait = load_trait(trait_name)
    vector.check_model(model)
    pos = [format_prompt(tokenizer, q, p.pos) for p in trait.instruction_pairs for q in trait.evaluation_questions]
    neg = [format_prompt(tokenizer, q, p.neg) for p in trait.instruction_pairs for q in trait.evaluation_questions]
    acts = prompt_activations(model, tokenizer, pos + neg, batch_size=32)  # (n, layers, d)
    n = len(pos)
    rows = []
    for layer in range(vector.num_layers):
        unit = vector.unit(layer)
        proj = acts[:, layer] @ unit
        rand = acts[:, layer] @ random_directions(N_RANDOM, vector.hidden_size, seed=layer).T  # (n, N_RANDOM)
        rand_auc = torch.tensor([auroc(rand[:n, k], rand[n:, k]) for k in range(N_RANDOM)])
        folded = torch.maximum(rand_auc, 1 - rand_auc)
        rows.append({"layer": layer, "auroc": auroc(proj[:n], proj[n:]),
                     "random_mean": float(rand_auc.mean()), "random_folded_max": float(folded.max()),
                     "effect_size": vector.meta.layer_stats.get("effect_size", [None] * vector.num_layers)[layer]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traits", nargs="+", default=["sycophancy", "evil"])
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    load_model()  # make sure the embedded model is converted and cached before anything is timed

    timings, results = {}, {}
    for trait in args.traits:
        for fast in (True, False):
            seconds, path = timed_extract(trait, fast)
            timings[(trait, fast)] = seconds
            print(f"{trait:12s} {'fast' if fast else 'default':8s} {seconds:7.1f} s", flush=True)
    model, tokenizer, _ = load_model()
    for trait in args.traits:
        results[trait] = signal(model, tokenizer, trait, PersonaVector.load(OUT / f"{trait}.safetensors"))

    lines = ["## Extraction: wall time and pre-generation signal", "",
             "Command: `.venv/bin/python benchmarks/extraction.py` (embedded SmolLM2-135M-Instruct, float32, CPU).",
             f"Machine: {machine()}.", "",
             "### Wall time of `persona-guard extract --trait T` (fresh process, model loaded from the cache)", "",
             "| trait | preset | answers | seconds | limit |", "|---|---|---:|---:|---:|"]
    for (trait, fast), seconds in timings.items():
        path = OUT / f"{trait}{'-fast' if fast else ''}.safetensors"
        counts = PersonaVector.load(path).meta.counts
        answers = counts["pos_generated"] + counts["neg_generated"]
        lines.append(f"| {trait} | {'--fast' if fast else 'default'} | {answers} | {seconds:.0f} | "
                     f"{120 if fast else 600} |")
    lines += ["", "### Signal check on held-out evaluation questions", "",
              "Each trait's evaluation questions (disjoint from the extraction questions) are asked under each of "
              "its trait-positive and trait-negative system prompts. Score = projection of the last prompt token "
              "(before any generation) on the unit vector of the default-preset extraction. AUROC = P(positive-prompt "
              f"score > negative-prompt score). Random: {N_RANDOM} random directions of the same norm per layer; "
              "`mean` is their mean AUROC, `max |.|` the largest of max(A, 1-A), i.e. the best separation any of "
              "them reached in either direction.", ""]
    summary = {}
    for trait, rows in results.items():
        best = max(rows, key=lambda r: r["auroc"])
        summary[trait] = best
        n_prompts = len(load_trait(trait).evaluation_questions) * len(load_trait(trait).instruction_pairs)
        lines += [f"**{trait}** ({n_prompts} positive vs {n_prompts} negative prompts): best layer {best['layer']}, "
                  f"AUROC {best['auroc']:.3f}; random directions at that layer: mean {best['random_mean']:.3f}, "
                  f"max |.| {best['random_folded_max']:.3f}.", "",
                  "| layer | persona AUROC | random mean | random max \\|.\\| | in-sample effect size d |",
                  "|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['layer']} | {r['auroc']:.3f} | {r['random_mean']:.3f} | {r['random_folded_max']:.3f} "
                         f"| {r['effect_size']:.2f} |")
        lines.append("")
    write_section("extraction", "\n".join(lines))
    print(json.dumps({t: {"best_layer": b["layer"], "auroc": round(b["auroc"], 3),
                          "random_mean": round(b["random_mean"], 3)} for t, b in summary.items()}, indent=1))
    print(json.dumps({f"{t}/{'fast' if f else 'default'}": round(s, 1) for (t, f), s in timings.items()}))


if __name__ == "__main__":
    main()
