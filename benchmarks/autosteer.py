"""Auto-steering on the embedded model: an SAE that knows style, then `autosteer` for the four
shipped traits and four style concepts, each reported on held-out prompts and held-out pairs.

    python benchmarks/autosteer.py corpus     # shipped text + the model's own answers in many styles
    python benchmarks/autosteer.py sae        # a TopK SAE at layer 14 on that corpus (quality, time)
    python benchmarks/autosteer.py run NAME   # one concept (a trait name or a style concept below)
    python benchmarks/autosteer.py run all    # every concept not yet run
    python benchmarks/autosteer.py report     # RESULTS.md section `autosteer`

What is held out from what:
- the SAE's corpus (guard.sae.corpus, plus the CAA questions) holds no autosteer test prompt and no prompt of a held-out pair (checked);
- retrieval and weight tuning read only the shipped bank's dev prompts (the library refuses others);
- the report's concept figures come from the bank's test prompts and from held-out pairs: the
  trait's held-out example pairs (Trait.split) or the hand-written pairs of
  benchmarks/data/autosteer_pairs.jsonl, none of which tuning reads.
Runs are saved under benchmarks/out/autosteer/runs/NAME and are not run again once saved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, machine, write_section  # noqa: E402

from guard.autosteer import AutosteerConfig, AutosteerResult, autosteer  # noqa: E402
from guard.autosteer.data import load_prompt_bank  # noqa: E402
from guard.core.chat import format_messages  # noqa: E402
from guard.core.models import load_model  # noqa: E402
from guard.sae.corpus import STYLE_SYSTEMS, corpus_prompts, shipped_texts, write_corpus  # noqa: E402
from guard.sae.corpus import build_corpus as build_corpus_texts  # noqa: E402
from guard.sae.lens import SAETrainConfig, load_sae, save_sae, train_sae  # noqa: E402
from guard.traits import list_traits, load_trait  # noqa: E402

HERE = Path(__file__).parent
WORK = OUT / "autosteer"
CAA = HERE.resolve().parents[1] / "shared" / "data" / "caa" / "test"
PAIRS = HERE / "data" / "autosteer_pairs.jsonl"
LAYER = 14

# The style concepts: a description each; their held-out pairs are in PAIRS under the same name.
STYLES = {
    "pirate": "Talk like a pirate.",
    "french": "Always answer in French.",
    "enthusiasm": "Answer with wild excitement and lots of exclamation marks!",
    "child": "Explain everything as if you were talking to a five-year-old child.",
}


def style_pairs() -> dict[str, list[tuple[str, str, str]]]:
    """Each style concept's held-out (prompt, reply showing it, neutral reply) pairs."""
    by: dict[str, list] = {name: [] for name in STYLES}
    for line in PAIRS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by[record["concept"]].append((record["prompt"], record["positive"], record["negative"]))
    return by


def concepts() -> dict[str, tuple[str, list[tuple[str, str, str]]]]:
    """name -> (description, held-out pairs): the shipped traits, then the style concepts."""
    out = {}
    for name in list_traits():
        trait = load_trait(name)
        out[name] = (trait.instruction_pairs[0].pos,
                     [(e.question, e.trait, e.non_trait) for e in trait.split().heldout_examples])
    pairs = style_pairs()
    for name, description in STYLES.items():
        out[name] = (description, pairs[name])
    return out


def held_out_prompts() -> set[str]:
    """Prompts no SAE-corpus text may contain: the bank's test split and every held-out pair's."""
    prompts = set(load_prompt_bank().test)
    for _, pairs in concepts().values():
        prompts.update(p for p, _, _ in pairs)
    return prompts


def caa_texts(tokenizer) -> list[str]:
    """The CAA A/B questions in ../shared/data, as user turns (text the library does not ship)."""
    return [format_messages(tokenizer, [{"role": "user", "content": item["question"]}], add_generation_prompt=False)
            for path in sorted(CAA.glob("*/test_dataset_ab.json")) for item in json.loads(path.read_text())]


def build_corpus(args, log) -> None:
    model, tokenizer, _ = load_model()
    banned = held_out_prompts()
    prompts = corpus_prompts(exclude=banned)
    started = time.perf_counter()
    shipped = caa_texts(tokenizer) + shipped_texts(tokenizer)
    answers = build_corpus_texts(model, tokenizer, prompts=prompts, max_new_tokens=args.max_new_tokens, shipped=False,
                                 progress=True, log=log)
    leaked = [p for p in banned if any(p in t for t in shipped + answers)]
    assert not leaked, f"held-out prompts in the corpus: {leaked[:3]}"
    write_corpus(shipped + answers, WORK / "corpus.jsonl")
    meta = {"texts": len(shipped) + len(answers), "shipped": len(shipped), "answers": len(answers),
            "prompts": len(prompts), "systems": list(STYLE_SYSTEMS), "max_new_tokens": args.max_new_tokens,
            "seconds": round(time.perf_counter() - started, 1)}
    (WORK / "corpus.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    log(json.dumps(meta))


def build_sae(args, log) -> None:
    model, tokenizer, _ = load_model()
    texts = [json.loads(line)["text"] for line in (WORK / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    config = SAETrainConfig(training_tokens=args.training_tokens, max_buffer_tokens=args.buffer_tokens)
    started = time.perf_counter()
    sae, stats = train_sae(model, tokenizer, texts, LAYER, config, progress=True, log=log)
    seconds = time.perf_counter() - started
    save_sae(sae, WORK / f"sae-L{LAYER}")
    meta = {"layer": LAYER, "config": config.to_dict(), "stats": stats, "seconds": round(seconds, 1),
            "d_sae": int(sae.cfg.d_sae), "buffer_tokens": sae.cfg.metadata["persona_guard_training"]["buffer_tokens"]}
    (WORK / "sae.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(json.dumps(meta))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--max-new-tokens", type=int, default=64)
    s = sub.add_parser("sae")
    s.add_argument("--training-tokens", type=int, default=600_000)
    s.add_argument("--buffer-tokens", type=int, default=200_000)
    r = sub.add_parser("run")
    r.add_argument("names", nargs="+")
    r.add_argument("--budget", type=int, default=16)
    r.add_argument("--dev", type=int, default=12)
    r.add_argument("--test", type=int, default=24)
    r.add_argument("--max-new-tokens", type=int, default=32)
    sub.add_parser("report")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    {"corpus": build_corpus, "sae": build_sae, "run": run_concepts, "report": report}[args.step](args, log)


def run_concepts(args, log) -> None:
    table = concepts()
    names = list(table) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown concept(s) {unknown}; known: {', '.join(table)}")
    model, tokenizer, _ = load_model()
    sae = load_sae(str(WORK / f"sae-L{LAYER}"))
    config = AutosteerConfig(budget=args.budget, n_dev=args.dev, n_test=args.test, max_new_tokens=args.max_new_tokens)
    for name in names:
        out = WORK / "runs" / name
        if (out / "report.json").is_file():
            log(f"{name}: already run ({out})")
            continue
        description, pairs = table[name]
        log(f"{name}: {description!r}, {len(pairs)} held-out pairs")
        started = time.perf_counter()
        result = autosteer(model, tokenizer, sae, description, config, sae_source=f"benchmarks/out/autosteer/sae-L{LAYER}",
                           pairs=pairs, progress=True, log=log)
        result.timings["total"] = round(time.perf_counter() - started, 1)
        result.save(out, model)
        log(f"{name}: done in {result.timings['total']:.0f} s")


def _cell(estimate, digits=2) -> str:
    return f"{estimate.value:.{digits}f} [{estimate.low:.{digits}f}, {estimate.high:.{digits}f}]"


def _above(a, b) -> bool:
    """a's CI lies wholly above b's (the acceptance's "non-overlapping 95% CIs")."""
    return a.low > b.high


def report(args, log) -> None:
    corpus = json.loads((WORK / "corpus.json").read_text())
    sae = json.loads((WORK / "sae.json").read_text())
    runs = {}
    for name in concepts():
        path = WORK / "runs" / name
        if (path / "report.json").is_file():
            runs[name] = AutosteerResult.load(path)
    if not runs:
        raise SystemExit("no runs yet: python benchmarks/autosteer.py run all")
    first = next(iter(runs.values()))
    cfg = first.config
    stats = sae["stats"]
    lines = ["## SAE auto-steering from a description (embedded SmolLM2-135M-Instruct)", "",
             f"Commands: `python benchmarks/autosteer.py corpus`, `... sae`, `... run all --budget {cfg.budget} --dev "
             f"{cfg.n_dev} --test {cfg.n_test} --max-new-tokens {cfg.max_new_tokens}`, `... report`, on {machine()}; "
             "the `run` steps alone on the machine; the `corpus` and `sae` steps had short unit-test runs (tiny models, a package build) beside them, so their seconds are upper bounds.", "",
             "### The SAE", "",
             f"Corpus: {corpus['texts']} texts, {corpus['shipped']} shipped (CAA questions, the traits' evaluation "
             f"questions and selection example pairs) and {corpus['answers']} of the model's own greedy answers "
             f"(up to {corpus['max_new_tokens']} tokens) to {corpus['prompts']} prompts (the bank's dev split, "
             f"ordinary questions, the traits' extraction questions) under {len(corpus['systems'])} system prompts: "
             + ", ".join(f"`{s}`" for s in corpus["systems"]) + f" ({corpus['seconds']:.0f} s). No test prompt of the "
             "bank and no prompt of a held-out pair is in it (checked).", "",
             f"TopK SAE at layer {sae['layer']}: {sae['d_sae']} latents, k = {sae['config']['k']}, "
             f"{sae['config']['training_tokens']:,} training tokens over a buffer of {sae['buffer_tokens']:,} "
             f"activations, {sae['seconds']:.0f} s on the CPU. Held-out tokens: variance explained "
             f"{stats['variance_explained']:.3f}, L0 {stats['l0']:.1f}, dead latents {stats['dead_fraction']:.1%}.", "",
             "### Held-out results", "",
             f"Per concept: tuned on {cfg.n_dev} dev prompts (budget {cfg.budget} per search), reported on "
             f"{cfg.n_test} test prompts of the shipped bank and on the concept's held-out pairs (the traits' held-out "
             "example pairs; 22 hand-written pairs per style concept, benchmarks/data/autosteer_pairs.jsonl). Means "
             "with 95% bootstrap CIs over items. *concept* (test prompts, judge-free): sigmoid of the preference for "
             "the prompted model's answer over the neutral one, /0.5 nats; *pair gap*: the concept reply's minus the "
             "neutral reply's log-probability on the held-out pairs (nats/token); *harmonic*: of concept, fluency and "
             "relevance (0 if any is 0); *capability*: change in log-likelihood of ordinary answers (nats/token, "
             "paired, autosteer minus none).", "",
             "| concept | condition | concept | pair gap | harmonic | capability change |",
             "|---|---|---:|---:|---:|---:|"]
    verdicts = []
    for name, result in runs.items():
        by = {c.name: c for c in result.conditions}
        for cname in ("none", "prompt", "autosteer", "prompt + autosteer", "diffmean", "random latents"):
            if cname not in by:
                continue
            c = by[cname]
            cap = c.vs_none.get("capability")
            lines.append(f"| {name} | {cname} | {_cell(c.estimates['concept'])} | {_cell(c.estimates['pair_gap'], 3)} | "
                         f"{_cell(c.estimates['harmonic'])} | {cap.format(3) if cap else ''} |")
        auto, none, rand, prompt = by["autosteer"], by["none"], by["random latents"], by["prompt"]
        verdicts.append({
            "name": name,
            "concept_above_none": _above(auto.estimates["concept"], none.estimates["concept"]),
            "concept_above_random": _above(auto.estimates["concept"], rand.estimates["concept"]),
            "pairs_above_none": _above(auto.estimates["pair_gap"], none.estimates["pair_gap"]),
            "pairs_above_random": _above(auto.estimates["pair_gap"], rand.estimates["pair_gap"]),
            "harmonic_vs_prompt": result.comparisons["prompt"]["harmonic"],
            "latents": len(result.latents), "timings": result.timings})
    lines += ["", "### Against the acceptance targets", "",
              "Non-overlapping 95% CIs, autosteer against no steering and against the tuned random-latent control; "
              "harmonic mean against prompting as the paired difference (autosteer minus prompt) over the test prompts.",
              "", "| concept | latents | concept > none | concept > random | pair gap > none | pair gap > random | "
              "harmonic, autosteer minus prompt |", "|---|---:|---|---|---|---|---|"]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for v in verdicts:
        h = v["harmonic_vs_prompt"]
        lines.append(f"| {v['name']} | {v['latents']} | {yes(v['concept_above_none'])} | "
                     f"{yes(v['concept_above_random'])} | {yes(v['pairs_above_none'])} | {yes(v['pairs_above_random'])} "
                     f"| {h.format(2)} ({h.verdict()}) |")
    stages = list(first.timings)
    lines += ["", "### Seconds per stage (2 CPU cores)", "", "| concept | " + " | ".join(stages) + " |",
              "|---|" + "---:|" * len(stages)]
    for v in verdicts:
        lines.append(f"| {v['name']} | " + " | ".join(f"{v['timings'].get(s, 0):.0f}" for s in stages) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section("autosteer", text)


if __name__ == "__main__":
    main()
