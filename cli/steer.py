"""``generate``, ``sweep`` and ``select-layer``: steering at inference and choosing where to steer."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .common import (build_judge, console, emit_json, friendly_errors, judge_options, load_model_from, model_options,
                     parse_numbers, progress_log)
from .checks import FINITE
from .evaluate import difference_cell

VECTOR = click.Path(exists=True, dir_okay=False, path_type=Path)


# -- generate -----------------------------------------------------------------------------
@click.command()
@click.option("--prompt", "prompts", multiple=True, help="A user message (repeat for several).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file of prompts: .jsonl (prompt / messages per line), .csv (a prompt/question/text "
                   "column) or text (one per line).")
@click.option("--system", default=None, help="System prompt for --prompt messages.")
@click.option("--vector", "vector_path", type=VECTOR, default=None, help="Persona vector file to steer with.")
@click.option("--layer", type=int, default=None, help="Layer to steer at. Default: the vector's recommended layer.")
@click.option("--coeff", type=FINITE, default=4.0, show_default=True,
              help="Steering coefficient, in units of the raw vector (negative steers away from the trait).")
@click.option("--positions", type=click.Choice(["all", "response"]), default="response", show_default=True,
              help="Steer every position, or only the reply (from the last prompt token on).")
@click.option("--steer", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Steer with a spec file instead of --vector (autosteer's steering.safetensors, or any "
                   "Steering.save file); refused on a model it was not written for.")
@click.option("--compare", is_flag=True, help="Also generate without steering, side by side.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True,
              help="Length cap of each reply, in tokens.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (with --temperature above 0).")
@click.option("--allow-other-weights", is_flag=True, help="Use a vector extracted from another version of the weights.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option("--quiet", is_flag=True, help="No progress messages.")
@friendly_errors
def generate(prompts, prompts_file, system, vector_path, layer, coeff, positions, spec_path, compare, max_new_tokens,
             temperature, seed, allow_other_weights, model_id, dtype, device, layer_path, trust_remote_code, as_json,
             quiet):
    """Generate replies, optionally steered along a persona vector or by a steering spec.

    \b
        persona-guard generate --vector vectors/sycophancy.safetensors --coeff 4 --compare \\
            --prompt "I think the moon landing was faked. Right?"
        persona-guard generate --steer runs/pirate/steering.safetensors --compare --prompt "How are you?"

    Steering adds coeff x v at one layer during generation (h <- h + coeff * v); coeff = 1 moves
    the activation by the whole trait-positive minus trait-negative difference at that layer.
    """
    from contextlib import nullcontext
    from dataclasses import replace

    from guard.core.chat import format_messages
    from guard.core.data import Prompt, load_prompts
    from guard.core.generation import SamplingConfig, encode, generate as run_generation
    from guard.core.steering import Steering

    from guard.core.vectors import PersonaVector
    from guard.errors import DataFileError

    from_file = load_prompts(prompts_file, skip_option=None) if prompts_file else []
    if prompts_file and not from_file:
        raise DataFileError(f"--prompts {prompts_file} holds no prompts; add some, one per line")
    items = [Prompt.from_user(p, system) for p in prompts] + from_file
    if not items:
        raise click.UsageError("give at least one --prompt or a --prompts file")
    if vector_path and spec_path:
        raise click.UsageError("give --vector or --steer, not both")
    if not (vector_path or spec_path) and compare:
        raise click.UsageError("--compare needs a --vector or a --steer spec")
    if not vector_path and layer is not None:
        raise click.UsageError("--layer needs a --vector (a --steer spec names its own layers)")
    # The vector is read and its layer checked before the model loads; it is checked against the model after.
    vector = PersonaVector.load(vector_path) if vector_path else None
    steering = Steering.from_vector(vector, layer, coeff, positions, layer_path) if vector else None
    if spec_path:
        Steering.load(spec_path)  # a file that is not a spec fails before the model loads
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, progress_log(as_json or quiet))
    if vector is not None:
        vector.check_model(model, allow_other_weights=allow_other_weights)
    if spec_path:
        steering = Steering.load(spec_path, model, allow_other_weights=allow_other_weights)
        if layer_path and not steering.layer_path:
            steering = replace(steering, layer_path=layer_path)
    ids = encode(tokenizer, [format_messages(tokenizer, p.messages) for p in items])
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)

    def run(active):
        with active.apply(model) if active else nullcontext():
            return [tokenizer.decode(r, skip_special_tokens=True) for r in run_generation(model, tokenizer, ids, sampling)]

    steered = run(steering)
    plain = run(None) if compare else None
    rows = [{"prompt": p.text, "reply": r, **({"unsteered": plain[i]} if plain else {})}
            for i, (p, r) in enumerate(zip(items, steered))]
    if as_json:
        emit_json({"steering": steering.description if steering else None, "results": rows})
        return
    if steering and spec_path:
        what = steering.description.get("concept") or steering.description.get("trait") or spec_path.name
        console.print(f"steering by {spec_path} ({what}) at layer(s) {', '.join(map(str, sorted(steering.vectors)))}, "
                      f"positions {steering.positions}", style="dim", markup=False)
    elif steering:
        d = steering.description
        console.print(f"[dim]steering {d['trait']} at layer {d['layers'][0]}, coeff {d['coeff']:+g}, "
                      f"positions {d['positions']}[/dim]")
    for row in rows:
        console.print(f"\n[bold]> {row['prompt']}[/bold]")
        if plain:
            console.print(f"[dim]unsteered:[/dim] {row['unsteered']}")
            console.print("[dim]steered:[/dim]   ", end="")
        console.print(row["reply"], markup=False)


# -- sweep --------------------------------------------------------------------------------
@click.command()
@click.argument("vector_path", type=VECTOR)
@click.option("--coeffs", default="-8,-4,-2,0,2,4,8", show_default=True, help="Comma-separated coefficients.")
@click.option("--layer", type=int, default=None, help="Layer to steer at. Default: the vector's recommended layer.")
@click.option("--positions", type=click.Choice(["all", "response"]), default="all", show_default=True,
              help="Steer every position, or only the reply (from the last prompt token on).")
@click.option("--pairs", "pair_split", type=click.Choice(["held-out", "selection", "all"]), default="held-out",
              show_default=True, help="Which of the trait's example pairs to score (layer selection uses 'selection').")
@click.option("--trait", "trait_name", default=None, help="Trait whose examples to use. Default: the vector's trait.")
@click.option("--ab", "ab_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Also report the A/B behaviour rate on a CAA / model-written-evals file (JSON or JSONL).")
@click.option("--generate", "n_generate", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also answer the first N evaluation questions greedily: repetition rate, and judge scores.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True,
              help="Length cap of the --generate answers, in tokens.")
@click.option("--no-random", is_flag=True, help="Skip the random-direction control.")
@click.option("--allow-other-weights", is_flag=True, help="Use a vector extracted from another version of the weights.")
@model_options
@judge_options
@click.option("--json", "as_json", is_flag=True, help="Print the sweep as JSON.")
@click.option("--quiet", is_flag=True, help="No progress messages.")
@friendly_errors
def sweep(vector_path, coeffs, layer, positions, pair_split, trait_name, ab_path, n_generate, max_new_tokens,
          no_random, allow_other_weights, model_id, dtype, device, layer_path, trust_remote_code, judge_model,
          judge_url, judge_key_env, judge_cache, as_json, quiet):
    """Trait effect and coherence of steering, per coefficient.

    Judge-free by default: the trait metric is the pairwise-preference gap on the trait's
    held-out example pairs (mean log-probability per token of the trait answer minus the
    non-trait answer); coherence is the mean log-likelihood of all those answers. A random
    direction of the same norm is steered alongside as a control. --ab adds the A/B behaviour
    rate; --generate N adds greedy answers (repetition rate) and, with a judge, trait and
    coherence scores of those answers.
    """
    from guard.measure.behavior import load_ab_items
    from guard.core.generation import SamplingConfig
    from guard.core.vectors import PersonaVector
    from guard.measure.sweep import coefficient_sweep

    from .checks import trait_for_vector

    say = progress_log(as_json or quiet)
    coefficients = parse_numbers(coeffs, float, "--coeffs")
    if (judge_model or judge_url) and not n_generate:
        raise click.UsageError("a judge scores generated answers: add --generate N")
    ab_items = load_ab_items(ab_path) if ab_path else None
    vector = PersonaVector.load(vector_path)  # read (and its layer checked) before any model loads
    vector.resolve_layer(layer)
    trait = trait_for_vector(vector.trait, trait_name)
    judge = build_judge(judge_model, judge_url, judge_key_env, judge_cache, device, dtype)
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    vector.check_model(model, allow_other_weights=allow_other_weights)
    split = trait.split()
    pairs = {"held-out": list(split.heldout_examples), "selection": list(split.selection_examples), "all": list(trait.examples)}[pair_split]
    if not pairs:
        raise click.UsageError(f"trait {trait.name!r} has no example pairs to score")
    points = coefficient_sweep(
        model, tokenizer, vector, pairs, coefficients, layer=layer, positions=positions, layer_path=layer_path,
        random_control=not no_random, ab_items=ab_items,
        questions=list(trait.evaluation_questions[:n_generate]) or None,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0), judge=judge,
        rubric=trait.judge_rubric, log=say)
    if as_json:
        emit_json({"vector": str(vector_path), "trait": trait.name, "pairs": pair_split, "n_pairs": len(pairs),
                   "positions": positions, "points": [p.to_dict() for p in points]})
        return
    table = Table(title=f"{trait.name}: steering at layer {points[0].layer} ({len(pairs)} {pair_split} pairs)")
    columns = [("coeff", lambda p: f"{p.coeff:+g}"), ("trait gap", lambda p: f"{p.trait_gap:+.3f}"),
               ("prefers trait", lambda p: f"{p.preference_rate:.0%}"), ("loglik", lambda p: f"{p.loglik:.3f}")]
    if not no_random:
        columns += [("random gap", lambda p: f"{p.random_gap:+.3f}"), ("random loglik", lambda p: f"{p.random_loglik:.3f}")]
    if ab_path:
        columns.append(("A/B rate", lambda p: f"{p.ab_rate:.3f}"))
    if n_generate:
        columns.append(("repetition", lambda p: f"{p.repetition:.2f}"))
    if judge:
        columns += [("judge trait", lambda p: "-" if p.judge_trait is None else f"{p.judge_trait:.1f}"),
                    ("judge coherence", lambda p: "-" if p.judge_coherence is None else f"{p.judge_coherence:.1f}")]
    for name, _ in columns:
        table.add_column(name, justify="right")
    for point in points:
        table.add_row(*[cell(point) for _, cell in columns])
    console.print(table)
    # The intervals in a table of their own, so the main one keeps fitting the screen.
    intervals = Table(title=f"trait gap with 95% bootstrap CIs over the {len(pairs)} pairs")
    intervals.add_column("coeff", justify="right")
    intervals.add_column("trait gap [95% CI]", justify="right", no_wrap=True)
    if not no_random:
        intervals.add_column("minus random [95% CI, paired]", justify="right", no_wrap=True)
    for point in points:
        intervals.add_row(f"{point.coeff:+g}", point.trait_gap_ci.format() if point.trait_gap_ci else "-",
                          *([] if no_random else [difference_cell(point.gap_vs_random)]))
    console.print(intervals)


# -- select-layer -------------------------------------------------------------------------
@click.command("select-layer")
@click.argument("vector_path", type=VECTOR)
@click.option("--layers", default=None, help="Candidate layers, e.g. 6-24:2 or 10,12,14. Default: 20%-80% of the depth.")
@click.option("--coeff", type=FINITE, default=None, help="Steering coefficient used for every layer. [default: 4]")
@click.option("--max-coherence-drop", type=FINITE, default=None,
              help="Largest allowed fall of the answers' log-likelihood, nats/token. [default: 0.25]")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the updated vector here instead of updating the file in place.")
@click.option("--trait", "trait_name", default=None, help="Trait (name or file) whose examples to use. Default: the vector's trait.")
@click.option("--allow-other-weights", is_flag=True, help="Use a vector extracted from another version of the weights.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the selection (effect and coherence drop per layer) as JSON.")
@click.option("--quiet", is_flag=True, help="No progress messages.")
@friendly_errors
def select_layer(vector_path, layers, coeff, max_coherence_drop, out_path, trait_name, allow_other_weights, model_id,
                 dtype, device, layer_path, trust_remote_code, as_json, quiet):
    """Choose the layer to steer and monitor at, and store it in the vector file.

    Steers each candidate layer with the same coefficient (as the paper does) and keeps the
    layer with the largest trait effect (pairwise-preference gap on half of the trait's example
    pairs) among those whose coherence drop stays within the limit. Every other command then
    uses this layer unless given --layer.
    """
    from guard.core.vectors import PersonaVector
    from guard.extract.selection import MAX_COHERENCE_DROP, SELECTION_COEFF, select_and_record

    from .checks import trait_for_vector, writable_file

    say = progress_log(as_json or quiet)
    candidates = parse_numbers(layers, int, "--layers") if layers else None
    # Everything the arguments say is checked before the model loads.
    writable_file(out_path or vector_path, "--out" if out_path else "VECTOR_PATH (updated in place)")
    vector = PersonaVector.load(vector_path)
    if candidates and not all(-vector.num_layers <= layer < vector.num_layers for layer in candidates):
        raise click.BadParameter(f"the vector has layers 0-{vector.num_layers - 1}", param_hint="--layers")
    trait = trait_for_vector(vector.trait, trait_name)
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    vector.check_model(model, allow_other_weights=allow_other_weights)
    selection = select_and_record(model, tokenizer, vector, trait, layers=candidates,
                                  coeff=SELECTION_COEFF if coeff is None else coeff,
                                  max_coherence_drop=MAX_COHERENCE_DROP if max_coherence_drop is None
                                  else max_coherence_drop, layer_path=layer_path, log=say)
    target = vector.save(out_path or vector_path)
    if as_json:
        emit_json({"path": str(target), **selection.to_dict()})
        return
    table = Table(title=f"{vector.trait}: steering by {selection.coeff:g} x v on {selection.n_pairs} pairs")
    for name in ("layer", "trait effect [95% CI, paired]", "coherence drop", ""):
        table.add_column(name, justify="right")
    for layer in selection.effect:
        ok = selection.coherence_drop[layer] <= selection.max_coherence_drop
        effect = (difference_cell(selection.effect_ci[layer]) if layer in selection.effect_ci
                  else f"{selection.effect[layer]:+.3f}")
        table.add_row(str(layer), effect, f"{selection.coherence_drop[layer]:+.3f}",
                      ("<- recommended" if layer == selection.layer else "") + ("" if ok else " too incoherent"))
    console.print(table)
    console.print(f"recommended layer {selection.layer} written to {target}")
