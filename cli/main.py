"""The ``persona-guard`` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.table import Table

from .checks import FINITE
from .common import (build_judge, console, emit_json, friendly_errors, judge_options, load_model_from, model_options,
                     progress_log)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="persona-guard")
def main():
    """Keep a language model's character from drifting while it is finetuned.

    A persona vector is a direction in the model's residual stream that tracks a trait such as
    sycophancy. Start by extracting one (the embedded SmolLM2-135M-Instruct is used when no
    --model is given), then look at it:

    \b
        persona-guard extract --trait sycophancy --out vectors/sycophancy.safetensors
        persona-guard inspect vectors/sycophancy.safetensors
        persona-guard generate --vector vectors/sycophancy.safetensors --coeff -4 --compare --prompt "..."
        persona-guard sweep vectors/sycophancy.safetensors
        persona-guard monitor --vector vectors/sycophancy.safetensors --prompts prompts.jsonl
        persona-guard screen train.jsonl --vector vectors/sycophancy.safetensors --threshold p95 \\
            --keep train.clean.jsonl
        persona-guard harden --vector vectors/sycophancy.safetensors --iterations 100 --out hardened/
        persona-guard traits list
    """


# -- extract ------------------------------------------------------------------------------
@main.command()
@click.option("--trait", "trait_name", required=True,
              help="A shipped trait name (see `persona-guard traits list`) or the path of your own trait .json.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the vector file. Default: vectors/<trait>.safetensors")
@click.option("--fast", is_flag=True, help="Quick preset: first 10 questions, answers of up to 48 tokens (about a minute on CPU).")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Rollouts per (pair, question, polarity).")
@click.option("--questions", type=click.IntRange(min=1), default=None, help="Use only the first N extraction questions.")
@click.option("--pairs", type=click.IntRange(min=1), default=None, help="Use only the first N instruction pairs.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Length cap of each generated answer.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=None, help="Sampling seed (runs are reproducible).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Generation batch size.")
@model_options
@judge_options
@click.option("--pos-threshold", type=FINITE, default=50.0, show_default=True,
              help="With a judge: keep trait-positive answers scoring above this.")
@click.option("--neg-threshold", type=FINITE, default=50.0, show_default=True,
              help="With a judge: keep trait-negative answers scoring below this.")
@click.option("--coherence-threshold", type=FINITE, default=50.0, show_default=True,
              help="With a judge: drop answers whose coherence is below this (negative: no coherence check).")
@click.option("--select-layer/--no-select-layer", default=True, show_default=True,
              help="Choose the layer to steer and monitor at (see `persona-guard select-layer`) and store it.")
@click.option("--responses", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every generated answer (with its polarity, scores and kept flag) to this JSONL file.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary instead of the table.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def extract(trait_name, out_path, fast, samples, questions, pairs, max_new_tokens, temperature, top_p, seed,
            batch_size, model_id, dtype, device, layer_path, trust_remote_code, judge_model, judge_url, judge_key_env,
            judge_cache, pos_threshold, neg_threshold, coherence_threshold, select_layer, responses, as_json, quiet):
    """Extract a persona vector for every layer of a model.

    The model answers the trait's extraction questions under each trait-positive and
    trait-negative system prompt; the vector at layer i is the mean response-token activation
    (output of decoder block i) of positive answers minus that of negative answers. The file is
    safetensors with JSON metadata: model fingerprint, layer convention, settings, counts, norms.

    With a judge (--judge-model or --judge-url) only answers that show the trait (positive) or
    avoid it (negative), and are coherent, are kept, as in the paper.

    The per-layer table shows each vector's norm and the in-sample effect size (Cohen's d of the
    positive vs negative answers projected on it): how cleanly that layer separates the two.
    Layer selection then steers candidate layers and recommends the one with the largest effect
    on the trait's example pairs at acceptable coherence (75-90 s for sycophancy on the embedded
    model, 2 CPU cores).
    """
    from dataclasses import replace

    from guard.extract.extraction import ExtractionConfig, extract_vector
    from guard.judges import JudgeFilter
    from guard.errors import SelectionError
    from guard.extract.selection import select_and_record
    from guard.traits import load_trait

    from .checks import distinct_outputs, trait_source, writable_file

    trait = load_trait(trait_source(trait_name))
    config = ExtractionConfig.preset("fast" if fast else "default")
    sampling = config.sampling
    sampling = replace(sampling, **{k: v for k, v in dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          top_p=top_p, seed=seed).items() if v is not None})
    config = replace(config, sampling=sampling, layer_path=layer_path,
                     **{k: v for k, v in dict(samples_per_prompt=samples, max_questions=questions, max_pairs=pairs,
                                              generation_batch_size=batch_size).items() if v is not None})
    out_path = out_path or Path("vectors") / f"{trait.name}.safetensors"
    # Every output is checked before minutes of generation.
    writable_file(out_path, "--out")
    writable_file(responses, "--responses")
    distinct_outputs({"--out": out_path, "--responses": responses, "--judge-cache": judge_cache},
                     {"--trait": trait_name})
    say = progress_log(as_json or quiet)

    started = time.perf_counter()
    judge = build_judge(judge_model, judge_url, judge_key_env, judge_cache, device, dtype)
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    rule = JudgeFilter(judge, pos_threshold, neg_threshold,
                       coherence_threshold if coherence_threshold >= 0 else None) if judge else None
    try:
        result = extract_vector(model, tokenizer, trait, config, judge=rule, progress=not (quiet or as_json), log=say)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted; extraction does not resume: rerunning the command starts it over"
                                ) from None
    vector = result.vector
    vector.save(out_path)  # saved before layer selection, so a failure there loses no extraction
    if select_layer:
        say("selecting the layer to steer on the trait's example pairs")
        try:
            select_and_record(model, tokenizer, vector, trait, layer_path=layer_path, log=say)
        except SelectionError as exc:
            click.echo(f"warning: {exc}; the vector is saved without a recommended layer", err=True)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted during layer selection; the vector is saved in {out_path} without "
                                    f"a recommended layer: `persona-guard select-layer {out_path}` chooses one"
                                    ) from None
    vector.meta.extra["wall_seconds"] = round(time.perf_counter() - started, 1)
    vector.save(out_path)
    if responses:
        responses.parent.mkdir(parents=True, exist_ok=True)
        partial = responses.with_name(f".{responses.name}.tmp")
        with partial.open("w", encoding="utf-8") as f:  # renamed into place once complete
            for sample in result.samples:
                f.write(json.dumps(sample.__dict__, ensure_ascii=False) + "\n")
        partial.replace(responses)
    if as_json:
        emit_json({"path": str(out_path), **vector.meta.to_dict()})
    else:
        print_vector_summary(vector, out_path)


# -- inspect ------------------------------------------------------------------------------
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print metadata, norms and cosines as JSON.")
@friendly_errors
def inspect(files, as_json):
    """Show what a vector file holds: metadata and per-layer norms.

    Given two or more files of the same model, also prints the per-layer cosine similarity
    between every pair (traits that share a direction move together under finetuning).
    """
    from guard.core.vectors import PersonaVector

    vectors = [PersonaVector.load(path) for path in files]
    cosines = {}
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            key = f"{files[i].name} vs {files[j].name}"
            cosines[key] = [round(float(c), 4) for c in vectors[i].cosine(vectors[j])]
    if as_json:
        emit_json({"vectors": [{"path": str(p), **v.meta.to_dict()} for p, v in zip(files, vectors)],
                   "cosine": cosines})
        return
    for path, vector in zip(files, vectors):
        print_vector_summary(vector, path)
    if cosines:
        # Columns are numbered pairs ("1 vs 2") so the table fits a narrow terminal; the files are listed below it.
        title = "Cosine similarity per layer"
        table = Table(title=title, min_width=len(title) + 4)  # a narrow table would wrap its title
        table.add_column("layer", justify="right", no_wrap=True)
        for i in range(len(vectors)):
            for j in range(i + 1, len(vectors)):
                table.add_column(f"{i + 1} vs {j + 1}", justify="right", no_wrap=True)
        for layer in range(vectors[0].num_layers):
            table.add_row(str(layer), *[f"{values[layer]:+.3f}" for values in cosines.values()])
        console.print(table)
        for i, path in enumerate(files, start=1):
            console.print(f"  {i}: {path}", overflow="fold", markup=False)


def print_vector_summary(vector, path) -> None:
    meta = vector.meta
    console.print(f"[bold]{meta.trait}[/bold] vector -> {path}")
    console.print(f"  model        {meta.model_name} ({meta.model_type})")
    console.print(f"  fingerprint  {meta.model_fingerprint}")
    console.print(f"  shape        {meta.num_layers} layers x {meta.hidden_size}, positions {meta.positions}")
    console.print(f"  convention   {meta.layer_convention}: layer i = output of decoder block i")
    if meta.counts:
        c = meta.counts
        console.print(f"  answers      positive {c.get('pos_kept')}/{c.get('pos_generated')} kept, "
                      f"negative {c.get('neg_kept')}/{c.get('neg_generated')} kept")
        console.print(f"  mean length  {c.get('mean_response_tokens')} tokens")
    if "wall_seconds" in meta.extra:
        console.print(f"  time         {meta.extra['wall_seconds']} s")
    effect = meta.layer_stats.get("effect_size") or [float("nan")] * meta.num_layers
    norms = vector.norms().tolist()
    best = max(range(len(effect)), key=lambda i: effect[i] if effect[i] == effect[i] else float("-inf"))
    selection = meta.layer_stats.get("selection") or {}
    steer_effect, steer_drop = selection.get("effect", {}), selection.get("coherence_drop", {})
    if selection:
        console.print(f"  recommended  layer {meta.recommended_layer}: largest pairwise-preference effect when "
                      f"steered by {selection['coeff']:g} x v with a coherence drop <= "
                      f"{selection['max_coherence_drop']:g} nats/token" + ("" if selection["gated"] else
                                                                          " (no layer met it; least damaging taken)"))
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right")
    table.add_column("norm", justify="right")
    table.add_column("effect size d", justify="right")
    if selection:
        table.add_column("steer effect", justify="right")
        table.add_column("coh. drop", justify="right")
    table.add_column("")
    top = max((e for e in effect if e == e), default=1.0) or 1.0
    for layer, (norm, d) in enumerate(zip(norms, effect)):
        bar = "#" * max(0, int(round(12 * d / top))) if d == d else ""
        mark = " <- largest d" if layer == best and effect[best] == effect[best] else ""  # not when all NaN
        if meta.recommended_layer == layer:
            mark += "  (recommended)"
        steer_cells = []
        if selection:
            steer_cells = [f"{steer_effect[str(layer)]:+.3f}" if str(layer) in steer_effect else "",
                           f"{steer_drop[str(layer)]:+.3f}" if str(layer) in steer_drop else ""]
        table.add_row(str(layer), f"{norm:.3f}", f"{d:.2f}", *steer_cells, bar + mark)
    console.print(table)


from .autosteer import autosteer  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .harden import harden  # noqa: E402
from .monitor import monitor  # noqa: E402
from .sae import sae  # noqa: E402  (commands in their own modules, registered here)
from .screen import screen  # noqa: E402
from .steer import generate, select_layer, sweep  # noqa: E402
from .traits import traits  # noqa: E402

for command in (generate, sweep, select_layer, monitor, screen, harden, evaluate, sae, traits, autosteer):
    main.add_command(command)

if __name__ == "__main__":
    main()
