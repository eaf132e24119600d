"""``screen``: rank finetuning samples by how far they would push the model toward a trait, and
write a filtered copy of the data."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .common import console, emit_json, friendly_errors, load_model_from, model_options, parse_numbers, progress_log

VECTOR = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.argument("data")
@click.option("--vector", "vector_paths", type=VECTOR, multiple=True, required=True,
              help="Persona vector file (repeat for several traits: one forward per sample serves them all).")
@click.option("--mode", type=click.Choice(["full", "approx"]), default="full", show_default=True,
              help="full: ΔP against the base model's own greedy responses (generated once, cached on disk). "
                   "approx: generation-free, response projection minus last-prompt-token projection.")
@click.option("--layer", "layers", default=None,
              help="Layers to score, e.g. 14 or 12,16 or 10-20:2. Default: each vector's recommended layer.")
@click.option("--threshold", "thresholds", multiple=True,
              help="Drop samples scoring above this: a value (2.5) or a percentile of the reference (p95); "
                   "TRAIT=SPEC for one trait (evil=p90). Repeatable.")
@click.option("--reference", default=None,
              help="Ordinary data (same formats) for z-scores and percentile thresholds. Default: the screened data.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("screen-report"),
              show_default=True, help="Report directory (report.jsonl/.csv, summary.json, histograms, checkpoint).")
@click.option("--keep", "keep_path", type=click.Path(path_type=Path), default=None,
              help="Write the samples that pass every threshold here, in the input's format.")
@click.option("--drop", "drop_path", type=click.Path(path_type=Path), default=None,
              help="Write the samples over a threshold here, in the input's format.")
@click.option("--messages-field", default="messages", show_default=True, help="Field holding chat messages.")
@click.option("--prompt-field", default=None, help="Prompt field. Default: prompt, question, instruction or input.")
@click.option("--response-field", default=None,
              help="Response field. Default: response, completion, answer, output or chosen.")
@click.option("--split", default=None, help="Split of a datasets dataset (default: train).")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="A malformed line or record: stop with its line number, or report it and go on.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Length cap of the base responses (full mode).")
@click.option("--max-length", type=click.IntRange(min=8), default=None,
              help="Token window for prompt + response; longer samples are truncated and flagged. "
                   "Default: the model's context length.")
@click.option("--token-budget", type=click.IntRange(min=64), default=16384, show_default=True,
              help="Padded tokens per forward batch (the batch size adapts to sample length).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Rows per forward batch at most.")
@click.option("--generation-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompts per base-response generation batch (full mode); each finished batch is cached.")
@click.option("--restart", is_flag=True, help="Ignore the checkpoint of an interrupted run and start over.")
@click.option("--no-plots", is_flag=True, help="Skip the histogram and scatter PNGs.")
@click.option("--explain-top", type=click.IntRange(min=0), default=20, show_default=True,
              help="Write report.html in --out: the response tokens of the N highest-scoring samples per trait, "
                   "shaded by their projection on the vector (why each is flagged). 0 skips it.")
@click.option("--allow-other-weights", is_flag=True, help="Use vectors extracted from another version of the weights.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (the report files are written too).")
@click.option("--quiet", is_flag=True, help="No progress bars or messages.")
@friendly_errors
def screen(data, vector_paths, mode, layers, thresholds, reference, out_dir, keep_path, drop_path, messages_field,
           prompt_field, response_field, split, on_error, max_new_tokens, max_length, token_budget, max_batch_size,
           generation_batch_size, restart, no_plots, explain_top, allow_other_weights, model_id, dtype, device,
           layer_path, trust_remote_code, as_json, quiet):
    """Score every sample of DATA by how far it would move the model toward each trait.

    DATA is a .jsonl or .csv file, a directory saved by `datasets`, or a hub dataset id already
    in the local cache. A sample is chat `messages` (the last assistant turn is the response) or
    prompt/response fields.

    The score is the paper's projection difference ΔP = (a(x, y) − a(x, y_base))·v̂: how much
    further along the persona vector the training response sits than the model's own answer
    to the same prompt. Samples above --threshold are dropped from the --keep output.

    An interrupted run picks up where it stopped (the checkpoint lives in --out), and base
    responses are cached, so screening the same data again generates nothing.

    \b
        persona-guard screen train.jsonl --vector vectors/evil.safetensors --threshold p95 \\
            --keep train.clean.jsonl --drop train.flagged.jsonl
        persona-guard screen train.csv --vector v1.safetensors --vector v2.safetensors --mode approx --json
    """
    from guard.screen.pipeline import check_output_paths, parse_threshold_specs, screen as run_screen
    from guard.screen.report import trim
    from guard.screen.samples import FieldNames, check_dataset_copy_path, load_samples
    from guard.screen.scoring import ScreenConfig, check_thresholds, score_keys

    from .checks import read_vectors, writable_dir, writable_file

    say = progress_log(as_json or quiet)
    warn = lambda message: click.echo(f"warning: {message}", err=True)  # noqa: E731
    if (keep_path or drop_path) and not thresholds:
        raise click.UsageError("--keep/--drop need a --threshold (for example --threshold p95)")
    # Everything the arguments say is checked before the data is read or the model is loaded.
    specs = parse_threshold_specs(thresholds)
    layer_list = parse_numbers(layers, int, "--layer") if layers else None
    check_output_paths(data, out_dir=out_dir, keep_path=keep_path, drop_path=drop_path, reference=reference)
    writable_dir(out_dir, "--out")
    copy_target = writable_file if Path(data).is_file() else writable_dir  # a dataset is copied as a directory
    for path, option in ((keep_path, "--keep"), (drop_path, "--drop")):
        copy_target(path, option)
        if path is not None and copy_target is writable_dir:
            check_dataset_copy_path(path)
    if mode == "full":  # base responses are cached (and resumed from) there
        from guard.core.models import cache_dir

        writable_file(cache_dir() / "base_responses.sqlite", "the base-response cache",
                      "point $PERSONA_GUARD_CACHE at a writable directory, or use --mode approx")
    vectors = read_vectors(vector_paths)
    check_thresholds(score_keys(vectors, layer_list), specs)  # layers in range, thresholds for screened traits
    fields = FieldNames(messages=messages_field, prompt=prompt_field, response=response_field)
    source = load_samples(data, fields=fields, on_error=on_error, split=split, warn=warn)
    ref_source = load_samples(reference, fields=fields, on_error=on_error, split=split, warn=warn) if reference else None
    say(f"{len(source.samples)} samples from {data}" + (f" ({len(source.skipped)} malformed, skipped)" if source.skipped else ""))

    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    for vector in vectors:
        vector.check_model(model, allow_other_weights=allow_other_weights)
    config = ScreenConfig(mode=mode, token_budget=token_budget, max_batch_size=max_batch_size, max_length=max_length,
                          max_new_tokens=max_new_tokens, generation_batch_size=generation_batch_size,
                          layer_path=layer_path)
    try:
        run = run_screen(source, model, tokenizer, vectors, config, layers=layer_list, thresholds=specs,
                         reference=ref_source, out_dir=out_dir, keep_path=keep_path, drop_path=drop_path,
                         restart=restart, plots=not no_plots, explain_top=explain_top,
                         progress=not (as_json or quiet), warn=warn)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted; rerun the same command{' without --restart' if restart else ''} to resume: finished "
            f"scoring batches are kept in {out_dir}/checkpoint-*.jsonl and base responses in the generation "
            "cache") from None
    summary, result, limits, paths = run.summary, run.result, run.thresholds, run.report
    dropped, kept, written = run.dropped, run.kept, run.written
    if as_json:
        emit_json(summary)
        return
    what = "ΔP" if mode == "full" else "approx ΔP"
    table = Table(title=f"{len(source.samples)} samples, {mode} mode ({what} against the base model's own answers)"
                  if mode == "full" else f"{len(source.samples)} samples, approximation mode (no generation)")
    for column in ("trait", "layer", f"dataset {what}", "mean projection", "threshold", "over"):
        table.add_column(column, justify="left" if column == "trait" else "right")
    for name, entry in summary["traits"].items():
        threshold = entry["threshold"]
        table.add_row(name, str(entry["layer"]), _num(entry["mean_score"]), _num(entry["mean_projection"]),
                      "-" if threshold is None else f"{threshold:+.3f}", str(entry["over_threshold"]))
    console.print(table)
    first = result.keys[0].name
    ranked = sorted((s for s in result.samples if s.scores[first]["score"] is not None),
                    key=lambda s: -s.scores[first]["score"])[:5]
    if ranked:
        top = Table(title=f"highest {first} scores")
        top.add_column("id", overflow="fold", min_width=4)
        top.add_column(what, justify="right", no_wrap=True, min_width=7)
        top.add_column("z", justify="right", no_wrap=True, min_width=5)
        top.add_column("response", max_width=60, no_wrap=True, overflow="ellipsis")
        for s in ranked:
            z = s.scores[first]["z"]
            top.add_row(s.id, f"{s.scores[first]['score']:+.3f}", "-" if z is None else f"{z:+.2f}",
                        trim(source.samples[s.index].response, 70))
        console.print(top)
    flags = ", ".join(f"{n} {flag}" for flag, n in summary["flags"].items() if n)
    if flags:
        console.print(f"flagged samples: {flags} (see report)")
    console.print(f"dropped {len(dropped)}, kept {len(kept)}" if limits else "no --threshold: nothing dropped")
    for kind, path in written.items():
        console.print(f"{kind}: {path}")
    console.print(f"report: {paths['jsonl']}, {paths['csv']}, {paths['summary']}"
                  + (f", {paths['html']}" if "html" in paths else ""))


def _num(value) -> str:
    return "-" if value is None else f"{value:+.3f}"
