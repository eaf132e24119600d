"""``harden``: find a short corrective system prompt that points the model away from a trait."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .checks import FINITE
from .common import console, emit_json, friendly_errors, load_model_from, model_options, progress_log
from .evaluate import difference_cell

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.option("--vector", "vector_path", type=FILE, required=True, help="Persona vector of the trait to move away from.")
@click.option("--trait", "trait_name", default=None,
              help="Trait (name or file) whose questions and example pairs to use. Default: the vector's trait.")
@click.option("--layer", type=int, default=None, help="Layer to optimise at. Default: the vector's recommended layer.")
@click.option("--ab", "ab_path", type=FILE, default=None,
              help="Use the paper's direction instead of the vector: good-minus-bad last-token residuals of "
                   "these A/B items (CAA JSON or model-written-evals JSONL).")
@click.option("--sae", "sae_source", default=None,
              help="SAEGA: optimise SAE latents instead of the residual direction. An SAE directory "
                   "(e.g. from `persona-guard sae train`) or a sae-lens release with --sae-id.")
@click.option("--sae-id", default=None, help="SAE id within a sae-lens release.")
@click.option("--sae-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.01, show_default=True,
              help="SAEGA: fraction of latents kept, by |trait - normal mean activation| (the paper: top 1%).")
@click.option("--placement", type=click.Choice(["system", "suffix"]), default="system", show_default=True,
              help="system: the prompt is the system prompt (deployment); suffix: appended to the user turn (the paper).")
@click.option("--fluency", type=click.Choice(["strict", "medium", "loose"]), default="medium", show_default=True,
              help="Range of fluency weights of the population (strict: readable prompts, loose: strongest target).")
@click.option("--prompt-length", type=click.IntRange(min=1), default=8, show_default=True, help="Tokens in the prompt.")
@click.option("--iterations", type=click.IntRange(min=1), default=300, show_default=True,
              help="Search iterations (each evaluates population x children prompts).")
@click.option("--population", type=click.IntRange(min=1), default=16, show_default=True,
              help="Prompts kept per iteration, each with its own fluency weight.")
@click.option("--children", type=click.IntRange(min=1), default=32, show_default=True,
              help="Children per population member per iteration (each swaps one token).")
@click.option("--topk", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per position a swap is drawn from (by gradient).")
@click.option("--contexts", type=click.IntRange(min=1), default=4, show_default=True,
              help="Extraction questions the target is averaged over while optimising.")
@click.option("--candidates", type=click.IntRange(min=1), default=8, show_default=True,
              help="Frontier prompts compared on validation questions.")
@click.option("--max-xent", type=FINITE, default=None,
              help="Only consider frontier prompts at most this disfluent (mean nats/token).")
@click.option("--instruction", default=None, help="Hand-written baseline prompt. Default: one written for the trait.")
@click.option("--init", "init_text", default=None,
              help="Start the search from this text instead of random tokens (its length sets the prompt length).")
@click.option("--init-from-instruction", is_flag=True, help="Start the search from the instruction baseline.")
@click.option("--allow-non-ascii", is_flag=True, help="Let the prompt use tokens outside printable ASCII.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the search and the random control.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("harden-report"),
              show_default=True, help="Directory for harden.json and harden.md.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--allow-other-weights", is_flag=True,
              help="Accept a vector extracted from other weights of the same model (a finetune of it).")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly_errors
def harden(vector_path, trait_name, layer, ab_path, sae_source, sae_id, sae_fraction, placement, fluency, prompt_length, iterations, population, children,
           topk, contexts, candidates, max_xent, instruction, init_text, init_from_instruction, allow_non_ascii, seed, out_dir, quiet, allow_other_weights, model_id, dtype,
           device, layer_path, trust_remote_code, as_json):
    """Optimise a short prompt (RESGA with fluent gradient ascent) that pushes the model's
    pre-reply representation away from a trait, and show what it does.

    The target is the projection of the residual at the last token before the reply, at the
    vector's layer, on the trait direction (lower is further away). The search (EPO) keeps a
    population of prompts with different fluency weights and returns a Pareto frontier of
    target against fluency; one prompt is picked on validation questions. On held-out test
    questions the report compares no prompt, a hand-written instruction, the optimised prompt
    and a control optimised the same way toward a random direction of equal norm: only an
    effect beyond the control's is the prompt's doing.

    \b
        persona-guard harden --vector vectors/sycophancy.safetensors --iterations 100 --out hardened/
    """
    from guard.core.data import load_ab_items
    from guard.harden.hardening import HardenConfig, ab_direction
    from guard.harden.hardening import harden as run_harden
    from guard.harden.optimize import EPOConfig
    from guard.core.vectors import PersonaVector

    from .checks import distinct_outputs, trait_for_vector, writable_dir

    say = progress_log(quiet or as_json)
    # Everything the arguments say is checked before the model loads.
    writable_dir(out_dir, "--out")
    distinct_outputs({"--out": out_dir}, {"--sae": sae_source})
    vector = PersonaVector.load(vector_path)
    trait = trait_for_vector(vector.trait, trait_name)
    layer = vector.resolve_layer(layer)
    if init_from_instruction:
        from guard.harden.hardening import INSTRUCTIONS

        init_text = instruction or INSTRUCTIONS.get(trait.name)
        if not init_text:
            raise click.UsageError(f"no instruction written for {trait.name}; pass --instruction or --init")
    ab_items = load_ab_items(ab_path) if ab_path else None
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    vector.check_model(model, allow_other_weights=allow_other_weights)
    direction = None
    if ab_path:
        direction = ab_direction(model, tokenizer, ab_items, layer, layer_path)
        say(f"direction from {ab_path}: cosine with the persona vector "
            f"{float(direction @ vector.unit(layer) / direction.norm()):+.3f}")
    epo = EPOConfig.preset(fluency, prompt_length=prompt_length, iterations=iterations, population=population,
                           children_per_member=children, topk=topk, ascii_only=not allow_non_ascii, seed=seed)
    config = HardenConfig(placement=placement, contexts=contexts, candidates=candidates, max_xent=max_xent, seed=seed,
                          init=init_text, epo=epo)
    loaded_sae = None
    if sae_source:
        from guard.core.models import input_device
        from guard.sae.lens import check_sae, load_sae

        loaded_sae = load_sae(sae_source, sae_id, device=input_device(model))  # where its activations are
        check_sae(loaded_sae, model, layer, allow_other_weights=allow_other_weights)
    report = run_harden(model, tokenizer, vector, trait, config, layer=layer, direction=direction, sae=loaded_sae,
                        sae_fraction=sae_fraction,
                        instruction=instruction, layer_path=layer_path, progress=not (quiet or as_json), log=say)
    paths = report.save(out_dir)
    if as_json:
        emit_json({**report.to_dict(), "files": {k: str(v) for k, v in paths.items()}})
        return
    table = Table(title=f"{trait.name}, layer {report.layer}, {placement} prompt, test questions")
    for column in ("condition", "prompt", "projection", "vs none", "trait gap [95% CI]", "neutral log-lik [95% CI]",
                   "perplexity"):
        table.add_column(column, justify="left" if column in ("condition", "prompt") else "right",
                         max_width=48 if column == "prompt" else None, overflow="fold")
    for c in report.conditions:
        ppl = c.perplexity
        gap = c.estimates["preference_gap"].format() if "preference_gap" in c.estimates else f"{c.preference_gap:+.3f}"
        neutral = (c.estimates["neutral_loglik"].format() if "neutral_loglik" in c.estimates
                   else f"{c.neutral_loglik:.3f}")
        table.add_row(c.name, repr(c.prompt) if c.prompt else "(none)", f"{c.projection:+.3f}",
                      f"{c.projection_shift:+.3f}", gap, neutral, ppl)
    console.print(table)
    paired = Table(title="minus none, paired over the same test items (95% CI)")
    for column in ("condition", "projection", "trait gap", "neutral log-lik"):
        paired.add_column(column, justify="left" if column == "condition" else "right")
    for c in report.conditions[1:]:
        paired.add_row(c.name, *[difference_cell(c.vs_none.get(key))
                                 for key in ("projection", "preference_gap", "neutral_loglik")])
    console.print(paired)
    console.print(f"report: {paths['markdown']} and {paths['json']}")

