"""Data screening on the embedded model: separation on a labelled set, and throughput.

Separation: benchmarks/data/screen_eval.jsonl holds 36 prompts per trait (sycophancy, evil,
hallucination), each with a trait-expressing and a normal response, written for this benchmark
(6 multi-turn per trait). All 216 samples go through one screen with the three vectors (one
forward per sample serves all of them); per trait, AUROC of trait vs normal responses on that
trait's 72 samples, for the full ΔP, the generation-free approximation and the raw projection.

Throughput, in one run, on the same samples and layers:

(a) our approximation mode (Screener, approx): length-planned batches, stopped after the
    deepest layer needed;
(b) a plain batch-1 loop computing the same numbers the way the reference scripts do
    (eval/cal_projection.py): per sample, a full forward with output_hidden_states=True;
(c) the raw forward throughput of the model alone over the same batches (no hooks, no
    tokenisation; every block, the LM head at the last position only, as in a prefill): the
    ceiling for an implementation that runs the whole model.

Base generation (full mode): our batched greedy generation (left padding, KV cache,
length-sorted) against a batch-1 `generate` loop, on the same prompts and token cap.

    .venv/bin/python benchmarks/screening.py             # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, raw_forward, reference_projections, vector_with_layer, write_section  # noqa: E402

from guard.core.chat import format_messages  # noqa: E402
from guard.core.generation import GenerationCache, SamplingConfig, cached_generate  # noqa: E402
from guard.core.stats import Estimate, auroc, auroc_ci  # noqa: E402
from guard.core.models import load_model  # noqa: E402
from guard.screen.samples import load_samples  # noqa: E402
from guard.screen.scoring import ScreenConfig, Screener  # noqa: E402

HERE = Path(__file__).parent
DATA = HERE / "data" / "screen_eval.jsonl"
TRAITS = ["sycophancy", "evil", "hallucination"]


def vectors_with_layers(model, tokenizer, log):
    return [vector_with_layer(model, tokenizer, name, log) for name in TRAITS]


def _scores(result, name, field, idx, labels):
    pos = [result.samples[i].scores[name][field] for i in idx if labels[i] == 1]
    neg = [result.samples[i].scores[name][field] for i in idx if labels[i] == 0]
    return pos, neg


def _auroc(result, name, field, idx, labels) -> float:
    return auroc(*_scores(result, name, field, idx, labels))


def _auroc_ci(result, name, field, idx, labels) -> Estimate:
    """AUROC of trait vs normal responses with its stratified bootstrap 95% CI (classes resampled apart)."""
    return auroc_ci(*_scores(result, name, field, idx, labels))


def _cell(estimate: Estimate) -> str:
    """``0.812 [0.70, 0.90]``: the AUROC and its 95% CI."""
    return f"{estimate.value:.3f} [{estimate.low:.2f}, {estimate.high:.2f}]"


def separation(model, tokenizer, vectors, samples, labels, traits, pair_ids, max_new_tokens, log):
    """One full-mode screen at every layer. Per trait: AUROC at the recommended (steering)
    layer; and at a reading layer chosen by ΔP AUROC on half of the trait's prompts (even pair
    numbers), reported on the other half."""
    n_layers = vectors[0].num_layers
    with tempfile.TemporaryDirectory() as tmp:
        screener = Screener(model, tokenizer, vectors, ScreenConfig(mode="full", max_new_tokens=max_new_tokens),
                            layers=list(range(n_layers)), generation_cache=Path(tmp) / "gen.sqlite")
        started = time.perf_counter()
        result = screener.score(samples, progress=True)
        seconds = time.perf_counter() - started
    rows, numbers = [], {"seconds": seconds}
    for vector in vectors:
        trait = vector.trait
        idx = [i for i, t in enumerate(traits) if t == trait]
        val = [i for i in idx if pair_ids[i] % 2 == 0]
        test = [i for i in idx if pair_ids[i] % 2 == 1]
        others = [i for i, t in enumerate(traits) if t != trait]
        rec = vector.default_layer()
        name = lambda layer: f"{trait}@L{layer}"  # noqa: E731
        chosen = max(range(n_layers), key=lambda layer: _auroc(result, name(layer), "delta_p", val, labels))
        entry, cells = {"recommended_layer": rec, "reading_layer": chosen}, {}

        def record(key, layer, field, subset):
            estimate = _auroc_ci(result, name(layer), field, subset, labels)
            entry[key], entry[f"{key}_ci"] = estimate.value, estimate.to_dict()
            cells[key] = _cell(estimate)

        for field in ("delta_p", "approx", "projection"):
            record(f"{field}@recommended", rec, field, idx)
            record(f"{field}@reading_test", chosen, field, test)
        record("delta_p_other_traits", rec, "delta_p", others)
        entry["delta_p_by_layer"] = [_auroc(result, name(layer), "delta_p", idx, labels) for layer in range(n_layers)]
        numbers[trait] = entry
        rows.append(f"| {trait} | {rec} | {len(idx) // 2} | {cells['delta_p@recommended']} | "
                    f"{cells['approx@recommended']} | {cells['projection@recommended']} | {chosen} | "
                    f"{cells['delta_p@reading_test']} | {cells['approx@reading_test']} | "
                    f"{cells['projection@reading_test']} | {cells['delta_p_other_traits']} |")
        log(f"{trait}: {entry}")
    return rows, numbers


def throughput(model, tokenizer, vectors, samples, repeats: int, log) -> tuple[list[str], dict]:
    config = ScreenConfig(mode="approx")
    screener = Screener(model, tokenizer, vectors, config)
    tokens = sum(p + r for p, r in (
        (len(tokenizer(format_messages(tokenizer, list(s.prompt)), add_special_tokens=False)["input_ids"]),
         len(tokenizer(s.response, add_special_tokens=False)["input_ids"])) for s in samples))
    timings = {"ours (approx mode)": [], "batch-1 loop (reference way)": [], "raw forward (model alone)": []}
    model.eval()
    screener.score(samples[:16])  # warm-up
    ours = reference = None
    for _ in range(repeats):  # interleaved, so drifting machine load hits all three alike
        started = time.perf_counter()
        ours = screener.score(samples)
        timings["ours (approx mode)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        reference = reference_projections(model, tokenizer, samples, vectors)
        timings["batch-1 loop (reference way)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        raw_forward(model, tokenizer, samples, config)
        timings["raw forward (model alone)"].append(time.perf_counter() - started)
    diff = max(abs(ours.samples[i].scores[v.trait]["approx"] - (reference[i][k][0] - reference[i][k][1]))
               for i in range(len(samples)) for k, v in enumerate(vectors))
    best = {name: min(values) for name, values in timings.items()}
    ours_rate = tokens / best["ours (approx mode)"]
    rows = []
    for name, seconds in best.items():
        rate = tokens / seconds
        rows.append(f"| {name} | {seconds:.2f} | {rate:,.0f} | {ours_rate / rate:.2f}x |")
        log(f"{name}: {seconds:.2f} s, {rate:,.0f} tokens/s")
    numbers = {"tokens": tokens, "seconds": best, "max_abs_difference": diff,
               "vs_batch1": best["batch-1 loop (reference way)"] / best["ours (approx mode)"],
               "vs_raw_forward": best["raw forward (model alone)"] / best["ours (approx mode)"]}
    return rows, numbers


def generation_speed(model, tokenizer, samples, n_prompts: int, max_new_tokens: int, log) -> tuple[list[str], dict]:
    unique = list(dict.fromkeys(format_messages(tokenizer, list(s.prompt)) for s in samples))[:n_prompts]
    prompt_ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tempfile.TemporaryDirectory() as tmp:
        cache = GenerationCache(Path(tmp) / "gen.sqlite")
        started = time.perf_counter()
        batched, made = cached_generate(model, tokenizer, prompt_ids, sampling, cache, "bench", batch_size=32)
        ours = time.perf_counter() - started
        cache.close()
    started = time.perf_counter()
    single = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            single.append(out[0, len(ids):].tolist())
    loop = time.perf_counter() - started
    new_tokens = sum(len(r) for r in batched)
    same = sum(a == b[:len(a)] for a, b in zip(batched, single))
    log(f"generation: batched {ours:.1f} s, batch-1 {loop:.1f} s ({loop / ours:.1f}x); "
        f"{same}/{len(unique)} responses token-identical")
    rows = [f"| ours: batched, KV cache, length-sorted (batch 32) | {ours:.1f} | {new_tokens / ours:,.0f} | {loop / ours:.1f}x |",
            f"| batch-1 `generate` loop | {loop:.1f} | {new_tokens / loop:,.0f} | 1.0x |"]
    return rows, {"prompts": len(unique), "new_tokens": new_tokens, "ours": ours, "batch1": loop,
                  "ratio": loop / ours, "identical": same}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="base-response cap for the separation run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gen-prompts", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    model, tokenizer, _ = load_model()
    vectors = vectors_with_layers(model, tokenizer, log)
    source = load_samples(DATA)
    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    labels, traits = [r["label"] for r in records], [r["trait"] for r in records]
    pair_ids = [int(r["id"].split("-")[-2]) for r in records]

    sep_rows, sep = separation(model, tokenizer, vectors, source.samples, labels, traits, pair_ids,
                               args.max_new_tokens, log)
    tp_rows, tp = throughput(model, tokenizer, vectors, source.samples, args.repeats, log)
    gen_rows, gen = generation_speed(model, tokenizer, source.samples, args.gen_prompts, args.gen_tokens, log)
    command = "python benchmarks/screening.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = "\n".join([
        "## Data screening (embedded SmolLM2-135M-Instruct)", "",
        f"Command: `{command.strip()}` on {machine()}.", "",
        f"### Separation on a labelled set ({DATA.relative_to(HERE.parent)})", "",
        "36 prompts per trait, each with a trait-expressing and a normal response, written for this benchmark "
        "(6 multi-turn per trait). One full-mode screen of all 216 samples with the three vectors at every layer "
        f"(one forward per sample); base responses greedy, up to {args.max_new_tokens} tokens "
        f"({sep['seconds']:.0f} s including generation). AUROC of trait vs normal responses within each trait's "
        "samples: at the vector's recommended layer (chosen for steering, all 36 pairs), and at a reading layer "
        "chosen by ΔP AUROC on the even-numbered pairs and reported on the odd-numbered ones (18 pairs). The last "
        "column ranks the *other* traits' pairs with this vector at its recommended layer (a control). Brackets: "
        "95% CIs from a stratified bootstrap (trait and normal responses resampled apart, 2000 resamples); an AUROC "
        "whose CI contains 0.5 does not separate better than chance.",
        "", "| trait | rec. layer | pairs | ΔP | approx. | raw proj. | reading layer | ΔP (test half) | approx. "
        "(test half) | raw proj. (test half) | ΔP on other traits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *sep_rows, "",
        "ΔP AUROC by layer (all pairs): " + "; ".join(
            f"{v.trait}: " + " ".join(f"{a:.2f}" for a in sep[v.trait]["delta_p_by_layer"]) for v in vectors), "",
        "### Throughput, approximation mode", "",
        f"{len(source.samples)} samples, {tp['tokens']:,} real tokens, three vectors at layers "
        f"{', '.join(str(v.default_layer()) for v in vectors)}. Best of {args.repeats} interleaved repeats. "
        f"Ours and the batch-1 loop agree to {tp['max_abs_difference']:.1e} on every approximation score.", "",
        "| method | seconds | tokens/s | ours is |", "|---|---:|---:|---:|", *tp_rows, "",
        f"Ours vs the batch-1 loop: {tp['vs_batch1']:.1f}x; vs the raw forward ceiling: {tp['vs_raw_forward']:.2f}x "
        "(above 1 because screening stops after the deepest layer it reads and never runs the LM head).", "",
        "### Base generation, full mode", "",
        f"{gen['prompts']} distinct prompts, greedy, up to {args.gen_tokens} new tokens ({gen['new_tokens']:,} generated); "
        f"{gen['identical']}/{gen['prompts']} batched responses are token-identical to batch-1 ones.", "",
        "| method | seconds | new tokens/s | speed-up |", "|---|---:|---:|---:|", *gen_rows,
    ])
    print(body)
    if not args.no_record:
        write_section("screening", body)


if __name__ == "__main__":
    main()
