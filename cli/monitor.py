"""``monitor``: flag prompts that push the model toward a trait before it replies."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from .checks import FINITE
from .common import console, emit_json, friendly_errors, load_model_from, model_options, progress_log

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.option("--vector", "vector_paths", type=FILE, multiple=True, required=True,
              help="Persona vector file (repeat for several traits; one forward serves them all).")
@click.option("--prompts", "prompts_file", type=FILE, default=None,
              help="Prompts to score: .jsonl (prompt/question/text with optional system, or chat messages), "
                   ".csv with a prompt/question/text column, or a text file with one user message per line.")
@click.option("--prompt", "prompts", multiple=True, help="A user message to score (repeat for several).")
@click.option("--reference", type=FILE, default=None,
              help="Ordinary prompts to z-score against (same formats). Default: the traits' evaluation questions.")
@click.option("--layer", type=int, default=None, help="Layer to read (one vector only). Default: the recommended layer.")
@click.option("--threshold", type=FINITE, default=2.0, show_default=True, help="Flag prompts at or above this z-score.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="What to do with a malformed line in --prompts (a malformed --reference always stops).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Prompts per forward.")
@click.option("--fail-on-flag", is_flag=True, help="Exit with status 3 when any prompt is flagged (for CI gates).")
@click.option("--allow-other-weights", is_flag=True, help="Use vectors extracted from another version of the weights.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object with every prompt's readings.")
@click.option("--quiet", is_flag=True, help="No progress bars or messages.")
@friendly_errors
def monitor(vector_paths, prompts_file, prompts, reference, layer, threshold, on_error, batch_size, fail_on_flag,
            allow_other_weights, model_id, dtype, device, layer_path, trust_remote_code, as_json, quiet):
    """Score prompts by how far they push the model toward a trait, before any reply.

    The reading is the paper's pre-response statistic: the residual activation at the last
    prompt token, projected on the unit persona vector at its layer, z-scored against ordinary
    prompts. System prompts, many-shot examples and manipulative conversations that raise it
    tend to raise the trait in the reply.

    \b
        persona-guard monitor --vector vectors/sycophancy.safetensors --prompts prompts.jsonl --json
    """
    from guard.core.data import Prompt, load_prompts
    from guard.errors import MonitorError
    from guard.measure.monitor import PromptMonitor
    from guard.screen.report import trim

    from .checks import read_vectors

    say = progress_log(as_json or quiet)
    if layer is not None and len(vector_paths) > 1:
        raise click.UsageError("--layer applies to a single --vector; each file carries its recommended layer")
    # Everything the arguments say is checked before the model is loaded.
    items = [Prompt.from_user(p) for p in prompts]
    if prompts_file:
        from_file = load_prompts(prompts_file, on_error, warn=lambda m: click.echo(f"warning: {m}", err=True))
        if not from_file:
            readable = " that could be read" if on_error == "skip" else ""
            raise MonitorError(f"--prompts {prompts_file} holds no prompts{readable}; add some, one per line")
        items += from_file
    if not items:
        raise click.UsageError("give prompts with --prompts FILE or --prompt TEXT")
    reference_prompts = None
    if reference:
        reference_prompts = load_prompts(reference, skip_option=None)  # --on-error is for --prompts only
        if len(reference_prompts) < 2:
            raise MonitorError(f"--reference {reference} holds {len(reference_prompts)} prompt(s); z-scores need at "
                               "least two ordinary prompts (or leave out --reference to use the traits' "
                               "evaluation questions)")
    vectors = read_vectors(vector_paths)
    if layer is not None:
        vectors[0].resolve_layer(layer)  # out of range: one line, before the model loads
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    for vector in vectors:
        vector.check_model(model, allow_other_weights=allow_other_weights)
    watcher = PromptMonitor(model, tokenizer, vectors, layers=[layer] if layer is not None else None,
                            threshold=threshold, batch_size=batch_size, layer_path=layer_path)
    watcher.fit_reference(reference_prompts, progress=not (as_json or quiet))
    results = watcher.score(items, progress=not (as_json or quiet))
    flagged = sum(r.flagged for r in results)
    if as_json:
        emit_json(watcher.report(results))
    else:
        table = Table(title=f"{len(results)} prompts, z-scored against {watcher.reference_size} reference prompts")
        # Sized to the terminal (80 columns too): ids fold (never cut), headers stay whole, and the
        # prompt, cut to fit, takes what is left.
        ids = [result.prompt.id or str(i) for i, result in enumerate(results)]
        headers = [f"{v.trait} z (L{lay})" for v, lay in zip(vectors, watcher.layers)]
        id_width = min(20, max(2, *map(len, ids)))
        room = console.width - id_width - sum(map(len, headers)) - 4 - 3 * (len(headers) + 3) - 1
        table.add_column("id", overflow="fold", max_width=id_width)
        table.add_column("prompt", no_wrap=True, max_width=max(12, room))
        for header in headers:
            table.add_column(header, justify="right", no_wrap=True, min_width=len(header))
        table.add_column("", no_wrap=True, min_width=4)
        for i, result in enumerate(results):
            cells = [f"[red]{r.z:+.2f}[/red]" if r.flagged else f"{r.z:+.2f}" for r in result.readings]
            table.add_row(ids[i], trim(result.prompt.text, max(12, room)), *cells, "FLAG" if result.flagged else "")
        console.print(table)
        console.print(f"{flagged} of {len(results)} flagged at z >= {threshold:g}")
    if fail_on_flag and flagged:
        sys.exit(3)
