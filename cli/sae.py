"""``sae train`` and ``sae explain``: sparse autoencoders for models with no published SAE."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .checks import FINITE
from .common import console, emit_json, friendly_errors, load_model_from, model_options, progress_log


@click.group()
def sae():
    """Train a small SAE on a model's residual stream, and read persona vectors through it."""


@sae.command("corpus")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--system", "systems", multiple=True,
              help="A system prompt the model answers under (repeat for several). Default: a plain assistant and "
                   "six styles (pirate, French, enthusiastic, to a child, formal, verse).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Prompts to answer instead of the default bank (.jsonl, .csv or one per line).")
@click.option("--exclude", "exclude_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Prompts to leave out (same formats): your evaluation's held-out prompts.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Length cap of each answer.")
@click.option("--no-shipped", is_flag=True, help="Only the model's answers, without the traits' shipped text.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Prompts per batch.")
@click.option("--quiet", is_flag=True, help="No progress bars or messages.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the corpus's counts as JSON.")
@friendly_errors
def sae_corpus(out, systems, prompts_file, exclude_file, max_new_tokens, no_shipped, batch_size, quiet, model_id,
               dtype, device, layer_path, trust_remote_code, as_json):
    """Write a broad training corpus for `sae train` to OUT (.jsonl): the traits' shipped text
    and the model's own greedy answers to a bank of ordinary prompts (the auto-steering bank's
    dev split, plain questions, the traits' extraction questions) under a plain system prompt
    and several styles, so the SAE learns style latents too. Never the bank's test prompts.

    \b
        persona-guard sae corpus corpus.jsonl
        persona-guard sae train corpus.jsonl --layer 14 --out saes/layer14 --training-tokens 600000 \\
            --buffer-tokens 200000

    The default bank takes a few minutes per system prompt for a 135M model on a CPU.
    """
    import time

    from guard.core.data import load_prompts
    from guard.errors import DataFileError
    from guard.sae.corpus import STYLE_SYSTEMS, build_corpus, corpus_prompts, write_corpus

    from .checks import distinct_outputs, writable_file

    if out.suffix != ".jsonl":
        raise DataFileError(f"{out}: the corpus is written as JSONL; name it something.jsonl")
    writable_file(out, "OUT")
    distinct_outputs({"OUT": out}, {"--prompts": prompts_file, "--exclude": exclude_file})

    def read(path, option):
        items = [p.text for p in load_prompts(path, skip_option=None)]
        if not items:
            raise DataFileError(f"{option} {path} holds no prompts; add some, one per line")
        return items

    exclude = read(exclude_file, "--exclude") if exclude_file else []
    banned = set(exclude)
    prompts = [p for p in read(prompts_file, "--prompts") if p not in banned] if prompts_file \
        else corpus_prompts(banned)
    say = progress_log(quiet or as_json)
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    started = time.perf_counter()
    texts = build_corpus(model, tokenizer, prompts=prompts, systems=list(systems) or STYLE_SYSTEMS,
                         max_new_tokens=max_new_tokens, shipped=not no_shipped, batch_size=batch_size,
                         progress=not (quiet or as_json), log=say)
    write_corpus(texts, out)
    summary = {"out": str(out), "texts": len(texts), "prompts": len(prompts),
               "systems": list(systems) or list(STYLE_SYSTEMS), "seconds": round(time.perf_counter() - started, 1)}
    if as_json:
        emit_json(summary)
        return
    console.print(f"{len(texts)} texts ({len(prompts)} prompts x {len(summary['systems'])} system prompts, plus "
                  f"shipped text) -> {out}", markup=False)


@sae.command("train")
@click.argument("text", type=click.Path(exists=True, path_type=Path))
@click.option("--layer", type=int, required=True, help="Decoder block whose output the SAE reads.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the SAE (sae-lens format: sae_weights.safetensors + cfg.json).")
@click.option("--expansion", type=click.IntRange(min=1), default=8, show_default=True, help="Latents per model dimension.")
@click.option("--k", type=click.IntRange(min=1), default=32, show_default=True, help="Active latents per token (TopK).")
@click.option("--training-tokens", type=click.IntRange(min=1), default=300_000, show_default=True,
              help="Activations the SAE trains on (revisiting the buffer when it is smaller).")
@click.option("--buffer-tokens", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Activations collected and kept in memory; more training tokens revisit them.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Activations per optimisation step.")
@click.option("--lr", type=FINITE, default=5e-4, show_default=True, help="Learning rate.")
@click.option("--context-size", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens per window the text is cut into.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds initialisation and shuffling.")
@click.option("--quiet", is_flag=True, help="No progress bars or messages.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the training statistics as JSON.")
@friendly_errors
def sae_train(text, layer, out_dir, expansion, k, training_tokens, buffer_tokens, batch_tokens, lr, context_size, seed,
              quiet, model_id, dtype, device, layer_path, trust_remote_code, as_json):
    """Train a TopK SAE on the residual stream at LAYER from local TEXT (a .jsonl file with
    `text` or chat `messages`, a text file of blank-line-separated documents, or a saved
    `datasets` directory). Runs on CPU; the defaults take a few minutes for a 135M model.

    \b
        persona-guard sae train corpus.txt --layer 14 --out saes/layer14
    """
    from guard.sae.lens import SAETrainConfig, read_texts, save_sae, train_sae

    from .checks import distinct_outputs, writable_dir

    writable_dir(out_dir, "--out")  # before minutes of training
    distinct_outputs({"--out": out_dir}, {"TEXT": text})
    say = progress_log(quiet or as_json)
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    texts = read_texts(text, tokenizer)
    config = SAETrainConfig(expansion=expansion, k=k, training_tokens=training_tokens, batch_tokens=batch_tokens, lr=lr,
                            context_size=context_size, max_buffer_tokens=buffer_tokens, seed=seed)
    trained, stats = train_sae(model, tokenizer, texts, layer, config, layer_path=layer_path,
                               progress=not (quiet or as_json), log=say)
    save_sae(trained, out_dir)
    summary = {"out": str(out_dir), "layer": layer, "d_sae": trained.cfg.d_sae, "texts": len(texts), **stats}
    if as_json:
        emit_json(summary)
        return
    console.print(f"SAE with {trained.cfg.d_sae} latents at layer {layer} -> {out_dir}")
    console.print(f"held-out tokens {stats['tokens']}: variance explained {stats['variance_explained']:.3f}, "
                  f"L0 {stats['l0']:.1f}, dead latents {stats['dead_fraction']:.1%}")


@sae.command("explain")
@click.option("--sae", "sae_source", required=True, help="SAE directory, or a sae-lens release with --sae-id.")
@click.option("--sae-id", default=None, help="SAE id within a sae-lens release.")
@click.option("--vector", "vector_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Persona vector file to compare the SAE's latents with.")
@click.option("--text", "text_path", type=click.Path(exists=True, path_type=Path), required=True,
              help="Text to find top-activating snippets in (same formats as `sae train`).")
@click.option("--layer", type=int, default=None, help="Default: the SAE's layer.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Latents to list.")
@click.option("--snippets", type=click.IntRange(min=1), default=3, show_default=True, help="Snippets per latent.")
@click.option("--max-texts", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Texts of --text searched for snippets at most.")
@click.option("--allow-other-weights", is_flag=True,
              help="Accept a vector extracted from other weights of the same model (a finetune of it).")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the latents and their snippets as JSON.")
@click.option("--quiet", is_flag=True, help="No progress messages.")
@friendly_errors
def sae_explain(sae_source, sae_id, vector_path, text_path, layer, top, snippets, max_texts, allow_other_weights, model_id, dtype, device,
                layer_path, trust_remote_code, as_json, quiet):
    """List the SAE latents most aligned with a persona vector (cosine of their decoder rows
    with the vector at the SAE's layer), with each latent's top-activating snippets."""
    from guard.sae.lens import check_sae, explain, load_sae, read_texts
    from guard.core.vectors import PersonaVector

    say = progress_log(as_json or quiet)
    vector = PersonaVector.load(vector_path)  # read, and --layer checked, before the model loads
    if layer is not None:
        vector.resolve_layer(layer)
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    from guard.core.models import input_device

    loaded = load_sae(sae_source, sae_id, device=input_device(model))  # where its activations are
    layer = check_sae(loaded, model, layer, allow_other_weights=allow_other_weights)
    vector.check_model(model, allow_other_weights=allow_other_weights)
    layer = vector.resolve_layer(layer)
    texts = read_texts(text_path, tokenizer)
    found = explain(loaded, vector.layer(layer), model, tokenizer, texts, layer, top=top, snippets=snippets,
                    max_texts=max_texts, layer_path=layer_path)
    if as_json:
        emit_json({"trait": vector.trait, "layer": layer, "latents": found})
        return
    table = Table(title=f"SAE latents most aligned with the {vector.trait} vector at layer {layer}")
    table.add_column("latent", justify="right")
    table.add_column("cosine", justify="right")
    table.add_column("top-activating snippets (activating token in [brackets])", overflow="fold")
    for entry in found:
        text = "\n".join(f"{s['activation']:.1f}: {s['text']}" for s in entry["snippets"]) or "(never active here)"
        table.add_row(str(entry["latent"]), f"{entry['cosine']:+.3f}", text)
    console.print(table)
