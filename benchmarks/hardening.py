"""Prompt hardening on the embedded model: RESGA for sycophancy, an SAE trained here on CPU,
`sae explain` for the sycophancy vector, and SAEGA with that SAE.

Text for the SAE (local, nothing downloaded): the CAA A/B questions of every behaviour in
../shared/data (by path), the shipped traits' questions and example answers, and the labelled
screening set, each as a chat conversation through the model's template.

    .venv/bin/python benchmarks/hardening.py            # budget: see --iterations / --sae-tokens
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, machine, vector_with_layer, write_section  # noqa: E402

from guard.core.chat import format_messages  # noqa: E402
from guard.harden.hardening import INSTRUCTIONS, HardenConfig, harden  # noqa: E402
from guard.core.models import load_model  # noqa: E402
from guard.harden.optimize import EPOConfig  # noqa: E402
from guard.sae.lens import SAETrainConfig, explain, save_sae, train_sae  # noqa: E402
from guard.traits import list_traits, load_trait  # noqa: E402

HERE = Path(__file__).parent
CAA = HERE.resolve().parents[1] / "shared" / "data" / "caa" / "test"


def corpus(tokenizer) -> list[str]:
    texts = []
    for path in sorted(CAA.glob("*/test_dataset_ab.json")):
        for item in json.loads(path.read_text()):
            texts.append(format_messages(tokenizer, [{"role": "user", "content": item["question"]}],
                                         add_generation_prompt=False))
    for name in list_traits():
        trait = load_trait(name)
        for q in list(trait.extraction_questions) + list(trait.evaluation_questions):
            texts.append(format_messages(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=False))
        for ex in trait.examples:
            for answer in (ex.trait, ex.non_trait):
                texts.append(format_messages(tokenizer, [{"role": "user", "content": ex.question},
                                                         {"role": "assistant", "content": answer}],
                                             add_generation_prompt=False))
    for line in (HERE / "data" / "screen_eval.jsonl").read_text().splitlines():
        texts.append(format_messages(tokenizer, json.loads(line)["messages"], add_generation_prompt=False))
    return texts


def table(report) -> list[str]:
    rows = ["| condition | prompt | target | projection vs none | trait preference gap | neutral log-lik | perplexity |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for c in report.conditions:
        ppl = c.perplexity
        prompt = "(none)" if not c.prompt else "`" + json.dumps(c.prompt)[1:-1].replace("|", "\\|") + "`"
        rows.append(f"| {c.name} | {prompt} | {c.target:+.3f} | {c.projection_shift:+.3f} | {c.preference_gap:+.3f} | "
                    f"{c.neutral_loglik:.3f} | {ppl} |")
    return rows


def latent_rows(found: list[dict]) -> list[str]:
    """`sae explain` output as Markdown table rows: latent, cosine, its top snippet."""
    rows = []
    for entry in found:
        snippet = entry["snippets"][0]["text"].replace("|", "\\|")[:120] if entry["snippets"] else "(never active)"
        rows.append(f"| {entry['latent']} | {entry['cosine']:+.3f} | {snippet} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--children", type=int, default=8)
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--fluency", default="medium")
    parser.add_argument("--sae-tokens", type=int, default=300_000, help="SAE training tokens")
    parser.add_argument("--saega-iterations", type=int, default=20)
    parser.add_argument("--init", choices=["instruction", "random"], default="instruction",
                        help="start EPO from the hand-written instruction (the paper's seed initialisation) or from "
                             "random tokens; the other start is also run for RESGA and summarised beside it")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    model, tokenizer, _ = load_model()
    vector = vector_with_layer(model, tokenizer, "sycophancy", log)
    layer = vector.default_layer()
    trait = load_trait("sycophancy")
    epo = EPOConfig.preset(args.fluency, iterations=args.iterations, population=args.population,
                           children_per_member=args.children, seed=0)
    seed_text = INSTRUCTIONS["sycophancy"] if args.init == "instruction" else None
    other_text = None if seed_text else INSTRUCTIONS["sycophancy"]
    resga = harden(model, tokenizer, vector, trait, HardenConfig(contexts=args.contexts, epo=epo, init=seed_text),
                   progress=True, log=log)
    resga.save(OUT / "harden-resga")
    other = harden(model, tokenizer, vector, trait, HardenConfig(contexts=args.contexts, epo=epo, init=other_text),
                   progress=True, log=log)
    other.save(OUT / "harden-resga-other-init")

    texts = corpus(tokenizer)
    sae_config = SAETrainConfig(training_tokens=args.sae_tokens)
    started = time.perf_counter()
    sae, stats = train_sae(model, tokenizer, texts, layer, sae_config, progress=True, log=log)
    sae_seconds = time.perf_counter() - started
    save_sae(sae, OUT / f"sae-layer{layer}")
    found = explain(sae, vector.layer(layer), model, tokenizer, texts, layer, top=5, snippets=2)
    saega_config = HardenConfig(contexts=args.contexts, init=seed_text, epo=EPOConfig.preset(
        args.fluency, iterations=args.saega_iterations, population=args.population, children_per_member=args.children, seed=0))
    saega = harden(model, tokenizer, vector, trait, saega_config, sae=sae, progress=True, log=log)
    saega.save(OUT / "harden-saega")

    by = {c.name: c for c in resga.conditions}
    other_by = {c.name: c for c in other.conditions}
    start = lambda text: f"from the instruction (`{text}`)" if text else "from random tokens"  # noqa: E731
    opt, ins, ctl = by["optimised"], by["instruction"], by["random-direction control"]
    command = "python benchmarks/hardening.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["## Prompt hardening (embedded SmolLM2-135M-Instruct, sycophancy)", "",
             f"Command: `{command.strip()}` on {machine()}.", "",
             f"### RESGA, layer {layer}, system-prompt placement ({resga.seconds:.0f} s)", "",
             f"EPO: {args.iterations} iterations, population {args.population} x {args.children} children, "
             f"{args.fluency} fluency, {args.contexts} extraction questions as contexts, search started "
             f"{start(seed_text)}; the "
             f"optimised prompt and the random-direction control are each picked on "
             f"{resga.validation['validation_questions']} validation questions; everything below is on the "
             f"{resga.validation['test_questions']} test questions ({resga.validation['test_pairs']} held-out example "
             "pairs for the preference gap). Target = −h·v̂ at the last token before the reply (higher = further from "
             "sycophancy).", "", *table(resga), "",
             f"Target gain over no prompt: optimised {opt.target - by['none'].target:+.3f}, instruction "
             f"{ins.target - by['none'].target:+.3f}, random-direction control {ctl.target - by['none'].target:+.3f}. "
             f"Judge-free trait metric (trait-minus-normal answer log-likelihood gap; lower = less sycophantic): "
             f"none {by['none'].preference_gap:+.3f}, optimised {opt.preference_gap:+.3f}, instruction "
             f"{ins.preference_gap:+.3f}, control {ctl.preference_gap:+.3f}.", "",
             f"Same budget started {start(other_text)} ({other.seconds:.0f} s): target gain optimised "
             f"{other_by['optimised'].target - other_by['none'].target:+.3f}, random-direction control "
             f"{other_by['random-direction control'].target - other_by['none'].target:+.3f}; preference gap "
             f"optimised {other_by['optimised'].preference_gap:+.3f}. Prompt: "
             f"`{json.dumps(other_by['optimised'].prompt)[1:-1]}`.", "",
             f"### SAE trained here (layer {layer}, CPU, {sae_seconds:.0f} s)", "",
             f"TopK, {sae.cfg.d_sae} latents (x{sae_config.expansion}), k = {sae_config.k}, {args.sae_tokens:,} training "
             f"tokens drawn from {sae.cfg.metadata['persona_guard_training']['buffer_tokens']:,} activations of "
             f"{len(texts)} local texts (CAA questions, the traits' questions and examples, the screening set). "
             f"Held-out {stats['tokens']} tokens: variance explained {stats['variance_explained']:.3f}, "
             f"L0 {stats['l0']:.1f}, dead latents {stats['dead_fraction']:.1%}.", "",
             "`persona-guard sae explain` for the sycophancy vector (top 5 latents by |cosine|):", "",
             "| latent | cosine | top-activating snippet |", "|---:|---:|---|"]
    lines += latent_rows(found)
    lines += ["", f"### SAEGA with that SAE ({saega.seconds:.0f} s, {args.saega_iterations} iterations, "
              f"{len(saega.config['latents'])} latents = top 1%, started {start(seed_text)})", "", *table(saega)]
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        write_section("hardening", body)


if __name__ == "__main__":
    main()
