"""``autosteer``: steer a model from a one-sentence description with an SAE, and report it honestly."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .checks import FINITE, PathError, distinct_outputs, writable_dir
from .common import (
    build_judge,
    console,
    emit_json,
    friendly_errors,
    judge_options,
    load_model_from,
    model_options,
    progress_log,
)


def _check_sae_source(sae_source: str, sae_id: str | None) -> None:
    """A local SAE directory exists and holds cfg.json; anything else needs --sae-id (a sae-lens release)."""
    from guard.errors import SAEError

    path = Path(sae_source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "cfg.json").is_file():
            raise SAEError(f"--sae {path} is not an SAE directory (no cfg.json); give the directory "
                           "`persona-guard sae train ... --out DIR` wrote")
    elif sae_id is None:
        raise SAEError(f"--sae {path} does not exist; train one with `persona-guard sae train TEXT --layer L "
                       f"--out {path}`, or give a sae-lens release with --sae-id")


def _check_out(out_dir: Path) -> None:
    """--out is a new or empty directory that can be created (nothing is written there until the end)."""
    writable_dir(out_dir, "--out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise PathError(f"--out {out_dir} exists and is not empty; give a new directory (nothing is overwritten)")


@click.command()
@click.argument("description")
@click.option("--sae", "sae_source", required=True,
              help="SAE directory (as `persona-guard sae train` writes it), or a sae-lens release with --sae-id.")
@click.option("--sae-id", default=None, help="SAE id within a sae-lens release.")
@click.option("--layer", type=int, default=None, help="Layer the SAE reads. Default: the SAE's own (checked).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New directory for steering.safetensors (the spec), report.json and report.md.")
@click.option("--latents", "k", type=click.IntRange(min=1), default=4, show_default=True,
              help="Latents chosen at most.")
@click.option("--candidates", type=click.IntRange(min=1), default=12, show_default=True,
              help="Candidate latents by mean difference, before the output score.")
@click.option("--max-density", type=click.FloatRange(0, 1, min_open=True), default=0.25, show_default=True,
              help="Drop latents firing on more than this fraction of answer tokens.")
@click.option("--min-output-score", type=FINITE, default=0.0, show_default=True,
              help="Drop candidates whose output score (nats/token toward the prompted answers) is not above this.")
@click.option("--budget", type=click.IntRange(min=1), default=24, show_default=True,
              help="Evaluations per weight search (each generates answers to every dev prompt).")
@click.option("--max-strength", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Upper end of each latent's strength, in units of the mean residual norm at the layer.")
@click.option("--dev", "n_dev", type=click.IntRange(min=1), default=16, show_default=True,
              help="Dev prompts (selection and tuning) taken from the bank.")
@click.option("--test", "n_test", type=click.IntRange(min=1), default=24, show_default=True,
              help="Held-out test prompts the report is measured on.")
@click.option("--prompts", "prompt_bank", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Your own prompt bank: a JSON object with 'dev' and 'test' lists. Default: the shipped one.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True,
              help="Length cap of every greedy answer.")
@click.option("--positions", type=click.Choice(["response", "all"]), default="response", show_default=True,
              help="Steer the reply only (from the last prompt token on) or every position.")
@click.option("--neutral-system", default=None,
              help="The neutral system prompt the unsteered answers are written under. "
                   "[default: You are a helpful assistant.]")
@click.option("--control", type=click.Choice(["tuned", "equal-norm"]), default="tuned", show_default=True,
              help="Random-latent control: searched with the same budget, or the chosen strengths at equal norm.")
@click.option("--no-diffmean", is_flag=True, help="Skip tuning and reporting the DiffMean direction.")
@click.option("--allow-other-weights", is_flag=True,
              help="Accept an SAE trained on other weights of the same model (a finetune of it).")
@click.option("--pairs", "pairs_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Held-out JSONL pairs (a prompt, a reply showing the behaviour, a neutral reply) scored under "
                   "every condition as pair_gap; never read by tuning, and no pair may share a dev prompt.")
@click.option("--prompt-field", default=None, help="--pairs key of the prompt. [default: question, or prompt]")
@click.option("--positive-field", default=None,
              help="--pairs key of the reply showing the behaviour. [default: trait, or positive]")
@click.option("--negative-field", default=None, help="--pairs key of the neutral reply. [default: non_trait, or negative]")
@click.option("--proposer-model", default=None,
              help="An OpenAI-compatible chat model that proposes the latents' strengths from past trials "
                   "(the hackathon's loop) instead of the coordinate search; needs --proposer-url.")
@click.option("--proposer-url", default=None, help="Base URL of the proposer's endpoint, e.g. http://127.0.0.1:8080/v1.")
@click.option("--proposer-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the proposer's API key (unset: no key sent).")
@model_options
@judge_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the search, the control and the bootstrap.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap resamples per confidence interval.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Sequences per forward.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary instead of the tables.")
@click.option("--quiet", is_flag=True, help="No progress bars or messages.")
@friendly_errors
def autosteer(description, sae_source, sae_id, layer, out_dir, k, candidates, max_density, min_output_score, budget,
              max_strength, n_dev, n_test, prompt_bank, max_new_tokens, positions, neutral_system, control, no_diffmean,
              allow_other_weights, pairs_path, prompt_field, positive_field, negative_field, proposer_model,
              proposer_url, proposer_key_env, model_id, dtype, device, layer_path, trust_remote_code, judge_model,
              judge_url, judge_key_env, judge_cache, seed, n_boot, batch_size, as_json, quiet):
    """Steer the model toward the behaviour DESCRIPTION says, with SAE latents, offline.

    \b
    1. The model answers ordinary dev prompts twice, greedily: with DESCRIPTION as the system
       prompt and with a neutral one.
    2. Latents: the SAE's mean activation difference between the two sets of answers; dead
       latents and latents firing on more than --max-density of tokens dropped; AUROC and
       cosine with the DiffMean direction recorded; each candidate steered alone, and those
       that do not move the output toward the prompted answers (output score) dropped.
    3. Weights: a search over the chosen latents' strengths on the dev prompts, maximising the
       harmonic mean of concept, fluency and relevance; the best judged weights are kept.
    4. Report on held-out test prompts (never used above): none, prompting with DESCRIPTION,
       autosteer, prompt + autosteer, the DiffMean direction and random latents tuned the same
       way, each with 95% CIs, paired differences and capability (ordinary answers' log-lik).

    Concept is judge-free unless a judge is given: the preference for the prompted model's
    answers over the unprompted model's. Plain prompting is its ceiling; AxBench found prompting
    beats SAE steering, and the report says where it does here. --pairs adds a concept figure
    that does not depend on the prompted model's answers: the gap on your own held-out pairs.

    \b
        persona-guard sae train corpus.txt --layer 14 --out saes/layer14
        persona-guard autosteer "Talk like a pirate." --sae saes/layer14 --out runs/pirate
        persona-guard evaluate --steer runs/pirate/steering.safetensors --pairs pirate_pairs.jsonl

    On the embedded model with the defaults this takes minutes on a CPU (each search evaluation
    answers every dev prompt); --budget, --dev and --max-new-tokens trade time for quality.
    """
    from guard.autosteer import AutosteerConfig, AutosteerError, ChatProposer, load_prompt_bank
    from guard.measure.evaluate import load_pairs
    from guard.autosteer import autosteer as run_autosteer
    from guard.core.models import input_device
    from guard.sae.lens import load_sae

    # Everything the options say is checked before any model is loaded.
    if not description.strip():
        raise AutosteerError("DESCRIPTION is empty; describe the behaviour in a sentence, e.g. "
                             "persona-guard autosteer \"Talk like a pirate.\" --sae DIR --out DIR")
    _check_sae_source(sae_source, sae_id)
    _check_out(out_dir)
    distinct_outputs({"--out": out_dir}, {"--sae": sae_source, "--prompts": prompt_bank, "--pairs": pairs_path})
    if not pairs_path and (prompt_field or positive_field or negative_field):
        raise AutosteerError("--prompt-field/--positive-field/--negative-field name --pairs keys; add --pairs FILE")
    if bool(proposer_model) != bool(proposer_url):
        raise AutosteerError("the proposer needs both --proposer-model NAME and --proposer-url URL")
    pairs = load_pairs(pairs_path, prompt_field, positive_field, negative_field) if pairs_path else None
    proposer = ChatProposer(proposer_url, proposer_model, api_key_env=proposer_key_env) if proposer_model else None
    options = {"k": k, "candidates": candidates, "max_density": max_density, "min_output_score": min_output_score,
               "budget": budget, "max_strength": max_strength, "n_dev": n_dev, "n_test": n_test,
               "max_new_tokens": max_new_tokens, "positions": positions, "control": control,
               "tune_diffmean": not no_diffmean, "seed": seed, "n_boot": n_boot, "batch_size": batch_size,
               "prompt_bank": str(prompt_bank) if prompt_bank else None}
    if neutral_system is not None:
        options["neutral_system"] = neutral_system
    config = AutosteerConfig(**options)
    load_prompt_bank(config.prompt_bank)  # a malformed --prompts fails now, not after the model loads

    say = progress_log(quiet or as_json)
    judge = build_judge(judge_model, judge_url, judge_key_env, judge_cache, device, dtype)
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    say(f"loading the SAE {sae_source}")
    sae = load_sae(sae_source, sae_id, device=input_device(model))
    result = run_autosteer(model, tokenizer, sae, description, config, layer=layer, sae_source=sae_source, judge=judge,
                           pairs=pairs, proposer=proposer, allow_other_weights=allow_other_weights, layer_path=layer_path,
                           progress=not (quiet or as_json), log=say)
    result.save(out_dir, model)  # written beside --out and renamed into place: never half-written
    if as_json:
        emit_json(summary(result, out_dir))
        return
    print_result(result, out_dir)


def summary(result, out_dir: Path) -> dict:
    """What ``--json`` prints: the latents, every condition's means with CIs, autosteer's paired
    differences, the time per stage and the files written.

    Args:
        result: the :class:`~guard.autosteer.AutosteerResult`.
        out_dir: where it was saved.
    """
    data = result.to_dict()
    return {"out": str(out_dir), "spec": str(out_dir / data["files"]["spec"]), "description": result.description,
            "model": result.model, "sae": result.sae, "latents": data["latents"], "retrieval": result.retrieval,
            "conditions": {c.name: {k: e.to_dict() for k, e in c.estimates.items()} for c in result.conditions},
            "vs_none": {c.name: data["conditions"][i]["vs_none"] for i, c in enumerate(result.conditions) if i},
            "autosteer_minus": data["comparisons"], "dev_score": result.searches["autosteer"].best.to_dict(),
            "timings": result.timings}


def print_result(result, out_dir: Path) -> None:
    """The latents chosen, then one table of the test-prompt figures (means with CIs), then the verdicts."""
    from rich.markup import escape

    level = f"{result.config.level:.0%}"
    latents = Table(title=escape(f"Latents at layer {result.sae['layer']} (strengths in units of the residual norm "
                                 f"{result.retrieval['residual_norm']:.2f})"), title_justify="left")
    for column in ("latent", "strength", "output score", "density", "picked by", "snippet"):
        latents.add_column(column, overflow="fold", justify="left" if column in ("picked by", "snippet") else "right")
    for record, strength in zip(result.latents, result.strengths):
        latents.add_row(str(record.latent), f"{strength:.3f}", f"{record.output_score:+.3f}", f"{record.density:.3f}",
                        ", ".join(record.picked_by), escape(record.snippets[0] if record.snippets else ""))
    console.print(latents)
    dropped = [r for r in result.records if r.status == "dropped"]
    if dropped:
        rules = sorted({r.rule for r in dropped})
        console.print("dropped: " + "; ".join(f"{rule}: {', '.join(str(r.latent) for r in dropped if r.rule == rule)}"
                                               for rule in rules), markup=False)
    def cell(estimate) -> str:  # the mean over its CI: the table fits 80 columns
        return "n/a" if estimate.n == 0 else f"{estimate.value:.2f}\n[{estimate.low:.2f}, {estimate.high:.2f}]"

    table = Table(title=escape(f"{len(result.prompts['test'])} held-out test prompts: means [{level} CI], 0-1"),
                  title_justify="left")
    table.add_column("condition", overflow="fold", max_width=18)
    scores = ("concept", "fluency", "relevance", "harmonic")
    for key in scores:
        table.add_column(key, justify="right")
    for c in result.conditions:
        table.add_row(escape(c.name), *[cell(c.estimates[k]) for k in scores])
    console.print(table)
    capability = Table(title=escape(f"capability: nats/token of ordinary answers [{level} CI]"), title_justify="left")
    capability.add_column("condition", overflow="fold", max_width=18)
    capability.add_column("mean", justify="right")
    capability.add_column("minus none (paired)", justify="right")
    for c in result.conditions:
        difference = c.vs_none.get("capability")
        capability.add_row(escape(c.name), c.estimates["capability"].format(3),
                           difference.format(3) if difference is not None else "")
    console.print(capability)
    for name, differences in result.comparisons.items():
        harmonic, concept = differences["harmonic"], differences["concept"]
        console.print(f"autosteer vs {name}: harmonic {harmonic.verdict()} ({harmonic.format(2)}), "
                      f"concept {concept.verdict()} ({concept.format(2)})", markup=False)
    if "pair_gap" in result.condition("none").estimates:
        gap = result.comparisons["none"]["pair_gap"]
        console.print(f"held-out pairs ({result.prompts.get('pairs')}): pair_gap autosteer minus none "
                      f"{gap.verdict()} ({gap.format(3)} nats/token)", markup=False)
    cost = result.condition("autosteer").vs_none["capability"]
    console.print(f"capability cost (autosteer minus none): {cost.format(3)} nats/token", markup=False)
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items()), markup=False)
    console.print(f"spec: {out_dir / 'steering.safetensors'}; report: {out_dir / 'report.md'}", markup=False)
