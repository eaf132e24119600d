"""Steering sweep on the embedded model: trait effect and coherence per coefficient.

For each trait: extract the persona vector (default preset; reused from benchmarks/out when it
matches the model), choose the layer on the selection half of the trait's example pairs, then
steer at that layer with every coefficient and measure on the held-out half:

* trait gap: pairwise preference, mean log-prob per token of the trait answer minus the
  non-trait answer (nats/token), and the same for a random direction of equal norm;
* coherence: mean log-likelihood of all held-out answers, and the repetition rate of greedy
  48-token answers to 10 evaluation questions;
* for sycophancy, the A/B behaviour rate on CAA's sycophancy test set (../shared/data, by path).

    .venv/bin/python benchmarks/steering.py                  # sycophancy and evil
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, machine, vector_for, write_section  # noqa: E402

from guard.measure.behavior import load_ab_items  # noqa: E402
from guard.core.generation import SamplingConfig  # noqa: E402
from guard.core.models import load_model  # noqa: E402
from guard.extract.selection import record_selection, select_layer  # noqa: E402
from guard.measure.sweep import coefficient_sweep  # noqa: E402
from guard.traits import load_trait  # noqa: E402

CAA = Path(__file__).resolve().parents[2] / "shared/data/caa/test/{behaviour}/test_dataset_ab.json"
COEFFS = [-8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0]


def run_trait(model, tokenizer, trait_name: str, log) -> tuple[str, dict]:
    trait = load_trait(trait_name)
    vector = vector_for(model, tokenizer, trait_name, log)
    split = trait.split()
    selection_pairs, held_out = list(split.selection_examples), list(split.heldout_examples)
    started = time.perf_counter()
    selection = select_layer(model, tokenizer, vector, selection_pairs, log=log)
    selection_seconds = time.perf_counter() - started
    record_selection(vector, selection)
    vector.save(OUT / f"{trait_name}.safetensors")

    behaviour = {"sycophancy": "sycophancy", "hallucination": "hallucination"}.get(trait_name)
    ab_path = Path(str(CAA).format(behaviour=behaviour)) if behaviour else None
    ab_items = load_ab_items(ab_path) if ab_path and ab_path.exists() else None
    started = time.perf_counter()
    points = coefficient_sweep(model, tokenizer, vector, held_out, COEFFS, ab_items=ab_items,
                               questions=list(trait.evaluation_questions[:10]),
                               sampling=SamplingConfig(max_new_tokens=48, temperature=0.0), log=log)
    sweep_seconds = time.perf_counter() - started

    gaps = [p.trait_gap for p in points]
    monotone = all(a < b for a, b in zip(gaps, gaps[1:]))
    base = next(p for p in points if p.coeff == 0)
    moved = points[-1].trait_gap - points[0].trait_gap
    random_moved = points[-1].random_gap - points[0].random_gap
    lines = [f"### {trait_name}: layer {selection.layer}, {len(held_out)} held-out pairs", "",
             "Layer selection (steer by 4 x v, selection half of the pairs; allowed coherence drop "
             f"{selection.max_coherence_drop} nats/token): " + ", ".join(
                 f"L{layer} {selection.effect_ci[layer] if layer in selection.effect_ci else f'{selection.effect[layer]:+.3f}'}"
                 f"/{selection.coherence_drop[layer]:+.3f}"
                 for layer in selection.effect) + f" (effect [95% CI over pairs]/drop) -> layer {selection.layer}, "
             f"{selection_seconds:.0f} s.", "",
             "| coeff | trait gap [95% CI] | Δ vs 0 | prefers trait | random gap [95% CI] | persona minus random, paired [95% CI] "
             "| loglik | random loglik | repetition |" + (" A/B rate |" if ab_items else ""),
             "|---:|---|---:|---:|---|---|---:|---:|---:|" + ("---:|" if ab_items else "")]

    def shown(estimate, value):
        return str(estimate) if estimate is not None else f"{value:+.3f}"
    for p in points:
        versus = f"{p.gap_vs_random} ({p.gap_vs_random.verdict()})" if p.gap_vs_random is not None else "n/a"
        lines.append(f"| {p.coeff:+g} | {shown(p.trait_gap_ci, p.trait_gap)} | {p.trait_gap - base.trait_gap:+.3f} | "
                     f"{p.preference_rate:.0%} | {shown(p.random_gap_ci, p.random_gap)} | {versus} | "
                     f"{p.loglik:.3f} | {p.random_loglik:.3f} | {p.repetition:.2f} |"
                     + (f" {p.ab_rate:.3f} |" if ab_items else ""))
    lines += ["", f"Trait gap strictly increasing over all {len(points)} coefficients: **{'yes' if monotone else 'no'}**. "
              f"From -8 to +8 it moves {moved:+.3f} along the persona vector and {random_moved:+.3f} along the "
              f"random direction ({abs(moved) / max(abs(random_moved), 1e-9):.1f}x). Sweep time {sweep_seconds:.0f} s."]
    low, high = points[0].samples, points[-1].samples
    if low and high:
        lines += ["", f"Greedy answer to \"{low[0][0]}\":", "",
                  f"- coeff -8: {low[0][1][:160]!r}", f"- coeff 0: {base.samples[0][1][:160]!r}",
                  f"- coeff +8: {high[0][1][:160]!r}"]
    summary = {"layer": selection.layer, "monotone": monotone, "moved": moved, "random_moved": random_moved}
    return "\n".join(lines), summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traits", nargs="+", default=["sycophancy", "evil"])
    args = parser.parse_args()
    model, tokenizer, _ = load_model()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    sections = []
    for trait_name in args.traits:
        text, summary = run_trait(model, tokenizer, trait_name, log)
        print(text + "\n", flush=True)
        sections.append(text)
    body = "\n".join([
        "## Steering sweep (embedded SmolLM2-135M-Instruct)", "",
        f"Command: `.venv/bin/python benchmarks/steering.py --traits {' '.join(args.traits)}` on {machine()}.", "",
        "Steering adds coeff x v (raw persona vector, all positions) at the recommended layer. Trait gap: "
        "mean log-prob per token of the trait answer minus the non-trait answer, over the held-out half of the "
        "trait's example pairs (never used for extraction or layer selection). Loglik: mean log-prob per token of "
        "all those answers (falls when steering damages the model). Repetition: share of repeated 3-grams in "
        "greedy 48-token answers to 10 evaluation questions. Random: the same steering along a random direction "
        "of equal norm.", "", *sections])
    write_section("steering", body)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
