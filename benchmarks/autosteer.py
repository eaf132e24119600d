"""Auto-steering on the embedded model: an SAE that knows style, then `autosteer` for the four
shipped traits and four style concepts, each reported on held-out prompts and held-out pairs.

    python benchmarks/autosteer.py corpus     # shipped text + the model's own answers in many styles
    python benchmarks/autosteer.py sae        # a TopK SAE at layer 14 on that corpus (quality, time)
    python benchmarks/autosteer.py run NAME   # one concept (a trait name or a style concept below)
    python benchmarks/autosteer.py run all    # every concept not yet run
    python benchmarks/autosteer.py report     # RESULTS.md section `autosteer`

What is held out from what:
- the SAE's corpus holds no autosteer test prompt and no prompt of a held-out pair (checked);
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
from guard.autosteer.data import greedy_answers, load_prompt_bank  # noqa: E402
from guard.core.chat import format_messages  # noqa: E402
from guard.core.models import load_model  # noqa: E402
from guard.measure.evaluate import NEUTRAL_QA, load_pairs  # noqa: E402
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

# System prompts the SAE corpus is answered under: ordinary assistants and styles, so the SAE sees
# styled text; none is a benchmark concept's description word for word.
CORPUS_SYSTEMS = [
    "You are a helpful assistant.",
    "You are a grumpy old sea captain who speaks like a pirate.",
    "Réponds toujours en français.",
    "You are thrilled about everything and answer with boundless enthusiasm.",
    "You are talking to a small child; use simple words and short sentences.",
    "Answer in a formal, academic register.",
    "Answer in rhyming verse.",
]


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


def corpus_prompts() -> list[str]:
    """The prompts the model answers for the corpus: the bank's dev split, ordinary questions and
    the traits' extraction questions."""
    prompts = list(load_prompt_bank().dev) + [q for q, _ in NEUTRAL_QA]
    for name in list_traits():
        prompts += list(load_trait(name).extraction_questions)
    banned = held_out_prompts()
    return [p for p in dict.fromkeys(prompts) if p not in banned]


def shipped_texts(tokenizer) -> list[str]:
    """The text the project ships: CAA questions, the traits' questions (not their held-out pairs)."""
    texts = []
    for path in sorted(CAA.glob("*/test_dataset_ab.json")):
        for item in json.loads(path.read_text()):
            texts.append(format_messages(tokenizer, [{"role": "user", "content": item["question"]}],
                                         add_generation_prompt=False))
    for name in list_traits():
        trait = load_trait(name)
        for q in trait.evaluation_questions:
            texts.append(format_messages(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=False))
        for e in trait.split().selection_examples:
            for answer in (e.trait, e.non_trait):
                texts.append(format_messages(tokenizer, [{"role": "user", "content": e.question},
                                                         {"role": "assistant", "content": answer}],
                                             add_generation_prompt=False))
    return texts


def build_corpus(args, log) -> None:
    model, tokenizer, _ = load_model()
    prompts = corpus_prompts()
    started = time.perf_counter()
    texts = shipped_texts(tokenizer)
    n_shipped = len(texts)
    for system in CORPUS_SYSTEMS:
        log(f"answering {len(prompts)} prompts under {system!r}")
        for prompt, ids in zip(prompts, greedy_answers(model, tokenizer, prompts, system, args.max_new_tokens,
                                                       batch_size=16, progress=True)):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if answer:
                texts.append(format_messages(tokenizer, [{"role": "system", "content": system},
                                                         {"role": "user", "content": prompt},
                                                         {"role": "assistant", "content": answer}],
                                             add_generation_prompt=False))
    banned = held_out_prompts()
    leaked = [p for p in banned if any(p in t for t in texts[n_shipped:])]
    assert not leaked, f"held-out prompts in the corpus: {leaked[:3]}"
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "corpus.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    meta = {"texts": len(texts), "shipped": n_shipped, "answers": len(texts) - n_shipped, "prompts": len(prompts),
            "systems": CORPUS_SYSTEMS, "max_new_tokens": args.max_new_tokens,
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
    raise NotImplementedError  # filled in below once the library takes held-out pairs


def report(args, log) -> None:
    raise NotImplementedError


if __name__ == "__main__":
    main()
