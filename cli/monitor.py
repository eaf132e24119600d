"""``monitor``: flag prompts that push the model toward a trait before it replies."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from .common import console, emit_json, friendly_errors, load_model_from, model_options, progress_log

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.option("--vector", "vector_paths", type=FILE, multiple=True, required=True,
              help="Persona vector file (repeat for several traits; one forward serves them all).")
@click.option("--prompts", "prompts_file", type=FILE, default=None,
              help="Prompts to score: .jsonl (prompt/question/text with optional system, or chat messages) "
                   "or a text file with one user message per line.")
@click.option("--prompt", "prompts", multiple=True, help="A user message to score (repeat for several).")
@click.option("--reference", type=FILE, default=None,
              help="Ordinary prompts to z-score against (same formats). Default: the traits' evaluation questions.")
@click.option("--layer", type=int, default=None, help="Layer to read (one vector only). Default: the recommended layer.")
@click.option("--threshold", type=float, default=2.0, show_default=True, help="Flag prompts at or above this z-score.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="What to do with a malformed line in --prompts.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--fail-on-flag", is_flag=True, help="Exit with status 3 when any prompt is flagged (for CI gates).")
@click.option("--allow-other-weights", is_flag=True, help="Use vectors extracted from another version of the weights.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object with every prompt's readings.")
@friendly_errors
def monitor(vector_paths, prompts_file, prompts, reference, layer, threshold, on_error, batch_size, fail_on_flag,
            allow_other_weights, model_id, dtype, device, layer_path, trust_remote_code, as_json):
    """Score prompts by how far they push the model toward a trait, before any reply.

    The reading is the paper's pre-response statistic: the residual activation at the last
    prompt token, projected on the unit persona vector at its layer, z-scored against ordinary
    prompts. System prompts, many-shot examples and manipulative conversations that raise it
    tend to raise the trait in the reply.

    \b
        persona-guard monitor --vector vectors/sycophancy.safetensors --prompts prompts.jsonl --json
    """
    from guard.core.data import Prompt, load_prompts
    from guard.measure.monitor import PromptMonitor
    from guard.core.vectors import PersonaVector

    say = progress_log(as_json)
    items = [Prompt.from_user(p) for p in prompts]
    if prompts_file:
        items += load_prompts(prompts_file, on_error, warn=lambda m: click.echo(f"warning: {m}", err=True))
    if not items:
        raise click.UsageError("give prompts with --prompts FILE or --prompt TEXT")
    if layer is not None and len(vector_paths) > 1:
        raise click.UsageError("--layer applies to a single --vector; each file carries its recommended layer")
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    vectors = [PersonaVector.load(p, model, allow_other_weights=allow_other_weights) for p in vector_paths]
    watcher = PromptMonitor(model, tokenizer, vectors, layers=[layer] if layer is not None else None,
                            threshold=threshold, batch_size=batch_size, layer_path=layer_path)
    watcher.fit_reference(load_prompts(reference) if reference else None)
    results = watcher.score(items, progress=not as_json)
    flagged = sum(r.flagged for r in results)
    if as_json:
        emit_json(watcher.report(results))
    else:
        table = Table(title=f"{len(results)} prompts, z-scored against {watcher.reference_size} reference prompts")
        table.add_column("#", justify="right")
        table.add_column("prompt", max_width=60, overflow="ellipsis", no_wrap=True)
        for v, lay in zip(vectors, watcher.layers):
            table.add_column(f"{v.trait} z (L{lay})", justify="right")
        table.add_column("")
        for i, result in enumerate(results):
            cells = [f"[red]{r.z:+.2f}[/red]" if r.flagged else f"{r.z:+.2f}" for r in result.readings]
            table.add_row(result.prompt.id or str(i), result.prompt.text.replace("\n", " "), *cells,
                          "FLAG" if result.flagged else "")
        console.print(table)
        console.print(f"{flagged} of {len(results)} flagged at z >= {threshold:g}")
    if fail_on_flag and flagged:
        sys.exit(3)
