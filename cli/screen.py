"""``screen``: rank finetuning samples by how far they would push the model toward a trait, and
write a filtered copy of the data."""

from __future__ import annotations

import heapq
import os
from pathlib import Path

import click
from rich.table import Table

from .common import (_DEVICE_MAP, console, emit_json, friendly_errors, load_model_from, model_options, parse_numbers,
                     progress_log)

VECTOR = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.argument("data")
@click.option("--vector", "vector_paths", type=VECTOR, multiple=True, required=True,
              help="Persona vector file (repeat for several traits: one forward per sample serves them all).")
@click.option("--mode", type=click.Choice(["full", "approx"]), default="approx", show_default=True,
              help="approx: generation-free, response projection minus last-prompt-token projection. "
                   "full: the paper's ΔP against the base model's own greedy responses (generated once, cached "
                   "on disk).")
@click.option("--score", "score", type=click.Choice(["relative", "delta_p", "approx", "projection"]),
              default="relative", show_default=True,
              help="What ranks and thresholds use. relative: the mode's z-score minus the mean z-score of the other "
                   "screened traits (screen several traits together: on mixed data this is what keeps code, "
                   "recipes and math from ranking with the trait samples). delta_p (--mode full), approx, "
                   "projection: that raw reading.")
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
@click.option("--config", "dataset_config", default=None, help="Configuration name of a hub dataset.")
@click.option("--data-files", "data_files", multiple=True,
              help="Files or glob patterns for a datasets builder given as DATA (json, csv, parquet) or a hub id "
                   "(datasets' data_files). Repeatable.")
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
              help="Prompts per base-response generation batch (full mode; per request with --base-url); each "
                   "finished batch is cached.")
@click.option("--base-url", default=None,
              help="Get the base responses (full mode) from an OpenAI-compatible server serving the same model, e.g. "
                   "http://127.0.0.1:8000/v1 (/completions, greedy). Default: generate them in this process.")
@click.option("--base-model", default=None, help="With --base-url: the name the server serves the model under "
                                                 "(checked against its /models).")
@click.option("--base-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the --base-url server's API key (unset: no key sent).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Samples scored and checkpointed together; memory does not grow with the data beyond a few "
                   "numbers per sample. Under torchrun/accelerate launch, chunk i goes to process i % world.")
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
def screen(data, vector_paths, mode, score, layers, thresholds, reference, out_dir, keep_path, drop_path, messages_field,
           prompt_field, response_field, split, dataset_config, data_files, on_error, max_new_tokens, max_length,
           token_budget, max_batch_size, generation_batch_size, base_url, base_model, base_key_env, chunk_size, restart,
           no_plots, explain_top, allow_other_weights, model_id, dtype, device, layer_path, trust_remote_code, as_json,
           quiet):
    """Score every sample of DATA by how far it would move the model toward each trait.

    DATA is a .jsonl, .csv or .parquet file, a directory saved by `datasets`, a hub dataset id
    already in the local cache (--config for its configuration), or a datasets builder (json,
    csv, parquet) with --data-files. A sample is chat `messages` (the last assistant turn is the
    response) or prompt/response fields. The data is read again for each pass rather than held
    in memory, and scored --chunk-size samples at a time.

    Each sample gets, per vector, the generation-free approximation (response projection minus
    last-prompt-token projection; with --mode full, the paper's projection difference
    ΔP = (a(x, y) − a(x, y_base))·v̂ against the model's own answer to the same prompt), and a
    score that ranks: by default the z-score relative to the other screened traits, which is what
    works on a dataset mixing kinds of content (benchmarks/RESULTS.md, screening_mixed). Screen
    every trait you care about in one run. Samples above --threshold are dropped from the --keep
    output.

    An interrupted run picks up where it stopped (the checkpoints live in --out), and base
    responses are cached, so screening the same data again generates nothing. Run it under
    `torchrun --nproc-per-node N -m guard.cli.main screen ...` or `accelerate launch ...
    persona-guard screen ...` to share the chunks between N processes (one per GPU with --device
    auto): process 0 merges them and writes the one report, the same as a single process's.

    \b
        persona-guard screen train.jsonl --vector vectors/evil.safetensors --threshold p95 \\
            --keep train.clean.jsonl --drop train.flagged.jsonl
        persona-guard screen train.csv --vector v1.safetensors --vector v2.safetensors --mode approx --json
    """
    from guard.screen.pipeline import check_output_paths, parse_threshold_specs, screen as run_screen
    from guard.screen.report import trim
    from guard.screen.samples import FieldNames, check_dataset_copy_path, open_samples
    from guard.screen.scoring import ScreenConfig, check_thresholds, score_keys
    from guard.screen.stream import distributed_from_env

    from .checks import read_vectors, writable_dir, writable_file

    if (keep_path or drop_path) and not thresholds:
        raise click.UsageError("--keep/--drop need a --threshold (for example --threshold p95)")
    if score == "delta_p" and mode != "full":
        raise click.UsageError("--score delta_p needs --mode full (ΔP compares against the base model's own answers)")
    if base_url and mode != "full":
        raise click.UsageError("--base-url gives the base responses of full mode: add --mode full (approx mode generates nothing)")
    if base_url and not base_model:
        raise click.UsageError("--base-url needs --base-model (the name the server serves the model under)")
    if base_model and not base_url:
        raise click.UsageError("--base-model goes with --base-url (the server to ask)")
    with distributed_from_env() as shard:
        # Under torchrun / accelerate launch every process runs this; process 0 alone talks.
        quiet_rank = as_json or quiet or not shard.main
        say = progress_log(quiet_rank)
        prefix = "" if shard.world == 1 else f"[process {shard.rank}] "
        warn = (lambda message: click.echo(f"warning: {prefix}{message}", err=True)) if shard.main or not (as_json or quiet) \
            else (lambda message: None)
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
        generator = None
        if base_url:
            from guard.core.generation import RemoteGenerator
            from guard.errors import ScreenError

            generator = RemoteGenerator(base_url, base_model, api_key_env=base_key_env, error=ScreenError)
            generator.check()  # the server must serve --base-model, before the model loads
        fields = FieldNames(messages=messages_field, prompt=prompt_field, response=response_field)
        files = list(data_files) or None
        source = open_samples(data, fields=fields, on_error=on_error, split=split, config=dataset_config,
                              data_files=files, warn=warn)
        ref_source = open_samples(reference, fields=fields, on_error=on_error, split=split, warn=warn) if reference else None
        say(f"{source.count} samples from {data}" + (f" ({source.n_skipped} malformed, skipped)" if source.n_skipped else "")
            + (f"; {shard.world} processes share the chunks" if shard.world > 1 else ""))

        if shard.world > 1 and device == "auto":
            import torch

            if torch.cuda.is_available():  # one GPU per process
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', shard.rank)) % torch.cuda.device_count()}"
        if dtype == "auto" and click.get_current_context().meta.get(_DEVICE_MAP) is None:
            from guard.screen.pipeline import screening_dtype

            dtype = screening_dtype(mode, device)  # bfloat16 for approx mode on an AMX CPU
        model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
        for vector in vectors:
            vector.check_model(model, allow_other_weights=allow_other_weights)
        config = ScreenConfig(mode=mode, score=score, token_budget=token_budget, max_batch_size=max_batch_size, max_length=max_length,
                              max_new_tokens=max_new_tokens, generation_batch_size=generation_batch_size,
                              layer_path=layer_path)
        try:
            run = run_screen(source, model, tokenizer, vectors, config, layers=layer_list, thresholds=specs,
                             reference=ref_source, out_dir=out_dir, keep_path=keep_path, drop_path=drop_path,
                             restart=restart, plots=not no_plots, explain_top=explain_top, chunk_size=chunk_size,
                             generator=generator, progress=not quiet_rank, warn=warn)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"interrupted; rerun the same command{' without --restart' if restart else ''} to resume: finished "
                f"scoring batches are kept in {out_dir}/checkpoint-*.jsonl and base responses in the generation "
                "cache") from None
    if not shard.main:
        return
    summary, result, limits, paths = run.summary, run.result, run.thresholds, run.report
    dropped, kept, written = run.dropped, run.kept, run.written
    if as_json:
        emit_json(summary)
        return
    what = "ΔP" if mode == "full" else "approx ΔP"
    table = Table(title=f"{source.count} samples, {mode} mode ({what} against the base model's own answers)"
                  if mode == "full" else f"{source.count} samples, approximation mode (no generation)",
                  caption=f"thresholds and ranking on the {score} score")
    for column in ("trait", "layer", f"dataset {what}", "mean projection", "threshold", "over"):
        table.add_column(column, justify="left" if column == "trait" else "right")
    for name, entry in summary["traits"].items():
        threshold = entry["threshold"]
        table.add_row(name, str(entry["layer"]), _num(entry["mean_score"]), _num(entry["mean_projection"]),
                      "-" if threshold is None else f"{threshold:+.3f}", str(entry["over_threshold"]))
    console.print(table)
    first = result.keys[0].name
    ranked = heapq.nsmallest(5, (s for s in result.samples if s.scores[first]["score"] is not None),
                             key=lambda s: -s.scores[first]["score"])
    if ranked:
        texts = source.fetch(s.index for s in ranked)
        top = Table(title=f"highest {first} scores")
        # Whole ids (folded when long) and headers first; the response gets what is left of the
        # terminal (80 columns when piped), so a narrow terminal loses response text, never the id.
        id_width = min(24, max(4, *(len(s.id) for s in ranked)))
        score_width = max(7, len(score))
        response_width = max(10, console.width - id_width - score_width - 5 - 13)  # 13: borders and padding
        top.add_column("id", overflow="fold", min_width=id_width, max_width=id_width)  # long ids fold, whole
        top.add_column(score, justify="right", no_wrap=True, min_width=score_width)
        top.add_column("z", justify="right", no_wrap=True, min_width=5)
        top.add_column("response", no_wrap=True, overflow="ellipsis", max_width=response_width)
        for s in ranked:
            z = s.scores[first]["z"]
            top.add_row(s.id, f"{s.scores[first]['score']:+.3f}", "-" if z is None else f"{z:+.2f}",
                        trim(texts[s.index].response, response_width))
        console.print(top)
    flags = ", ".join(f"{n} {flag}" for flag, n in summary["flags"].items() if n)
    if flags:
        console.print(f"flagged samples: {flags} (see report)")
    console.print(f"dropped {len(dropped)}, kept {len(kept)}" if limits else "no --threshold: nothing dropped")
    for kind, path in written.items():
        console.print(f"{kind}: {path}")
    console.print(f"report: {paths['jsonl']}, {paths['csv']}, {paths['summary']}"
                  + (f", {paths['html']}" if "html" in paths else ""))


# --dtype auto means something more specific here than in the other commands (see screening_dtype).
for _param in screen.params:
    if _param.name == "dtype":
        _param.help = ("auto: in approx mode on a CPU with AMX (Sapphire Rapids and later), bfloat16 (measured 1.95x "
                       "float32's tokens/s with Spearman 0.9995 of the scores); otherwise float32 on CPU (full mode "
                       "too: bfloat16 base responses moved the ΔP ranking, Spearman 0.96) and on a GPU the "
                       "checkpoint's half precision, bfloat16 where supported.")


def _num(value) -> str:
    return "-" if value is None else f"{value:+.3f}"
