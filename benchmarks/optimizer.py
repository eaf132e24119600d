"""EPO speed on the embedded model: ours against a straightforward implementation of the same
algorithm (no prefix KV cache, no batching: one full forward per candidate and context), in
one run, under the same wall-clock budget.

Setting: RESGA for sycophancy, the prompt as the system prompt, extraction questions as
contexts, 8-token prompts; CPU-sized population by default (8 x 8 children, 2 contexts). Both
runs start from the same seed, so until they diverge through floating-point ties they walk the
same path; the table reports iterations per second and the best target each reached in the
budget.

    .venv/bin/python benchmarks/optimizer.py --budget 240
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from common import machine, straightforward_scores, vector_with_layer, write_section  # noqa: E402

from guard.harden.hardening import away_from, in_context_check, system_slot  # noqa: E402
from guard.core.models import load_model  # noqa: E402
from guard.harden.optimize import EPO, EPOConfig  # noqa: E402
from guard.traits import load_trait  # noqa: E402



class Budget(Exception):
    pass


class TimedEPO(EPO):
    """Stops (by exception, keeping what it found) when the budget is spent."""

    def __init__(self, *args, budget: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = time.perf_counter() + budget
        self.best = -float("inf")
        self.iterations = 0

    def _evaluate(self, forward, ids):
        if time.perf_counter() > self.deadline:
            raise Budget
        targets, xents = self._evaluate_impl(forward, ids)
        self.best = max(self.best, float(targets.max()))
        self.iterations += 1
        return targets, xents

    def _evaluate_impl(self, forward, ids):
        return EPO._evaluate(self, forward, ids)


class NaiveEPO(TimedEPO):
    """The same algorithm, evaluated the straightforward way: one candidate and one context per
    full forward (prefix recomputed every time), full logits."""

    def _evaluate_impl(self, forward, ids):
        return straightforward_scores(self, ids)


def run(cls, model, tokenizer, objective, layer, slot, config, budget, check):
    epo = cls(model, tokenizer, objective, layer, slot, config, validate=check, budget=budget)
    started = time.perf_counter()
    try:
        epo.run()
    except Budget:
        pass
    seconds = time.perf_counter() - started
    return {"iterations": epo.iterations, "seconds": seconds, "best": epo.best}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=150.0, help="seconds per implementation")
    # CPU-sized defaults; the paper's setting is population 16 x 32 children (about 100 s per
    # iteration with 4 contexts on 2 CPU cores).
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--children", type=int, default=8)
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    model, tokenizer, _ = load_model()
    vector = vector_with_layer(model, tokenizer, "sycophancy", log)  # extracted if missing
    layer = vector.default_layer()
    trait = load_trait("sycophancy")
    questions = list(trait.extraction_questions[:args.contexts])
    slot = system_slot(tokenizer, questions)
    check = in_context_check(tokenizer, slot, questions[0], "system")
    config = EPOConfig.preset("medium", iterations=10_000, population=args.population,
                              children_per_member=args.children, seed=0)
    objective = away_from(vector.layer(layer))
    model.eval()
    results = {}
    for name, cls in (("ours: prefix KV cache, batched candidates", TimedEPO),
                      ("straightforward: full forward per candidate and context", NaiveEPO)):
        log(f"running {name} for {args.budget:.0f} s")
        results[name] = run(cls, model, tokenizer, objective, layer, slot, config, args.budget, check)
        log(f"  {results[name]}")
    ours, naive = results.values()
    rate = lambda r: r["iterations"] / r["seconds"]  # noqa: E731
    rows = [f"| {name} | {r['iterations']} | {rate(r):.3f} | {r['best']:+.3f} |" for name, r in results.items()]
    command = "python benchmarks/optimizer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = "\n".join([
        "## Prompt optimiser speed (EPO, embedded SmolLM2-135M-Instruct)", "",
        f"Command: `{command.strip()}` on {machine()}.", "",
        f"RESGA for sycophancy at layer {layer}, system-prompt placement, {slot.contexts} contexts, "
        f"{config.prompt_length}-token prompts, population {config.population} x {config.children_per_member} children "
        f"({config.population * config.children_per_member} candidates per iteration), medium fluency, seed 0; "
        f"{args.budget:.0f} s of wall time each. Target = −h·v̂ at the last token before the reply (higher = further "
        "from the trait).", "",
        "| implementation | iterations | iterations/s | best target reached |", "|---|---:|---:|---:|", *rows, "",
        f"Ours runs {rate(ours) / max(rate(naive), 1e-12):.1f}x as many iterations per second.",
    ])
    print(body)
    if not args.no_record:
        write_section("optimizer", body)


if __name__ == "__main__":
    main()
