"""``traits``: list, show, validate and write trait definitions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.table import Table

from guard.errors import TraitError

from .common import console, emit_json, friendly_errors, progress_log


@click.group()
def traits():
    """List, show, validate and write trait definitions.

    A trait file is JSON with instruction pairs (trait-positive / trait-negative system
    prompts), extraction questions, disjoint evaluation questions, a 0-100 judge rubric with
    {question} and {answer} placeholders, and paired example answers. Pass your own file to
    `extract --trait path/to/trait.json`, or have a chat model write one with `traits new`.
    """


@traits.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@friendly_errors
def traits_list(as_json):
    """The traits shipped with persona-guard."""
    from guard.traits import list_traits, load_trait

    rows = []
    for name in list_traits():
        t = load_trait(name)
        rows.append({"name": name, "pairs": len(t.instruction_pairs), "extraction_questions": len(t.extraction_questions),
                     "evaluation_questions": len(t.evaluation_questions), "examples": len(t.examples),
                     "description": t.description})
    if as_json:
        emit_json(rows)
        return
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)  # no vertical rules: whole headers fit 80 columns
    for column in ("name", "pairs", "extraction_questions", "evaluation_questions", "examples"):
        table.add_column(column.replace("_", " "), justify="left" if column == "name" else "right",
                         no_wrap=True, overflow="fold")
    for row in rows:
        table.add_row(row["name"], *(str(row[k]) for k in ("pairs", "extraction_questions", "evaluation_questions", "examples")))
    console.print(table)


@traits.command("show")
@click.argument("trait")
@click.option("--json", "as_json", is_flag=True, help="Print the whole trait definition as JSON.")
@friendly_errors
def traits_show(trait, as_json):
    """Show a trait (name or file): description, prompts and sample questions."""
    from guard.traits import load_trait

    t = load_trait(trait)
    if as_json:
        emit_json(t.to_dict())
        return
    console.print(f"[bold]{t.name}[/bold]: {t.description}\n")
    for i, pair in enumerate(t.instruction_pairs):
        console.print(f"[green]pos {i}[/green] {pair.pos}\n[red]neg {i}[/red] {pair.neg}")
    console.print(f"\n{len(t.extraction_questions)} extraction questions, e.g. {t.extraction_questions[0]!r}")
    console.print(f"{len(t.evaluation_questions)} evaluation questions, e.g. {t.evaluation_questions[0]!r}")
    console.print(f"{len(t.examples)} example pairs")


@traits.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def traits_validate(files, as_json):
    """Check trait files against the schema; lists every problem and exits 1 if any file is invalid."""
    from guard.traits import load_trait

    from .checks import trait_source

    report = []
    for path in files:
        try:
            t = load_trait(trait_source(path))
            report.append({"path": path, "valid": True, "name": t.name, "problems": []})
        except TraitError as exc:
            report.append({"path": path, "valid": False, "problems": str(exc).splitlines()[1:] or [str(exc)]})
    if as_json:
        emit_json(report)
    else:
        for entry in report:
            if entry["valid"]:
                console.print(f"[green]ok[/green]      {entry['path']} ({entry['name']})")
            else:
                console.print(f"[red]invalid[/red] {entry['path']}")
                for problem in entry["problems"]:
                    console.print(f"        {problem.strip()}")
    if not all(entry["valid"] for entry in report):
        sys.exit(1)


COUNT = click.IntRange(min=1)


@traits.command("new")
@click.argument("name")
@click.option("--description", required=True,
              help="What displaying the trait means, in a sentence or two; it is stored as the trait's description.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The .json file to write; its directory must exist. Default: NAME.json in the current directory.")
@click.option("--generator-url", default=None,
              help="Write with an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or "
                   "http://127.0.0.1:8000/v1 (needs --generator-model, the endpoint's model name).")
@click.option("--generator-model", default=None,
              help="With --generator-url: the endpoint's model name. Without it: a local Hugging Face instruct "
                   "model (hub id or directory), decoded greedily.")
@click.option("--generator-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the endpoint's API key (unset: no key sent).")
@click.option("--pairs", type=COUNT, default=5, show_default=True, help="Instruction pairs (pos/neg system prompts).")
@click.option("--extraction-questions", type=COUNT, default=20, show_default=True,
              help="Questions answered under both prompts to build the vector.")
@click.option("--evaluation-questions", type=COUNT, default=20, show_default=True,
              help="Held-out questions, disjoint from the extraction ones.")
@click.option("--examples", type=click.IntRange(min=0), default=30, show_default=True,
              help="Paired example answers (trait / non-trait); layer selection needs some.")
@click.option("--max-attempts", type=COUNT, default=3, show_default=True,
              help="Replies to try; each retry sends the problems of the last reply back to the generator.")
@click.option("--overwrite", is_flag=True, help="Replace the --out file if it exists.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Endpoint: seconds to wait for each reply.")
@click.option("--max-new-tokens", type=COUNT, default=8192, show_default=True,
              help="Local model: length cap of each reply.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Local model: weight dtype.")
@click.option("--device", default="cpu", show_default=True, help="Local model: torch device, e.g. cuda:0.")
@click.option("--trust-remote-code", is_flag=True, help="Local model: allow the repository's own Python code to run.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary instead of the message.")
@click.option("--quiet", is_flag=True, help="No progress messages.")
@friendly_errors
def traits_new(name, description, out_path, generator_url, generator_model, generator_key_env, pairs,
               extraction_questions, evaluation_questions, examples, max_attempts, overwrite, timeout,
               max_new_tokens, dtype, device, trust_remote_code, as_json, quiet):
    """Have a chat model write a trait file from a name and a description.

    The generator is asked for JSON only: instruction pairs, extraction questions, disjoint
    evaluation questions, a 0-100 judge rubric and example answer pairs. A reply that is not
    valid JSON or breaks the trait rules (or has fewer entries than asked) is sent back with its
    problems listed, up to --max-attempts times. The file is written only once the trait is
    valid, so it always passes `persona-guard traits validate`. Read it before extracting: the
    questions and prompts are the model's.

    \b
        export OPENAI_API_KEY=...
        persona-guard traits new overconfidence \\
            --description "Stating guesses as certain facts and never admitting doubt." \\
            --generator-url https://api.openai.com/v1 --generator-model gpt-4.1
        persona-guard traits new overconfidence --description "..." --generator-model Qwen/Qwen2.5-7B-Instruct --device cuda:0
        persona-guard extract --trait overconfidence.json
    """
    from guard.traits.generate import TraitWriter, check_description, check_name, check_out_path

    # Every option is checked before a request is sent or a model is loaded.
    try:
        check_name(name)
    except TraitError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    try:
        check_description(description)
    except TraitError as exc:
        raise click.BadParameter(str(exc), param_hint="--description") from None
    if generator_url and not generator_model:
        raise click.UsageError("--generator-url needs --generator-model (the endpoint's model name)")
    if not generator_model:
        raise click.UsageError("no generator: pass --generator-url URL --generator-model NAME (an OpenAI-compatible "
                               "endpoint) or --generator-model HF_ID_OR_DIR (a local instruct model)")
    out_path = out_path or Path(f"{name}.json")
    try:
        check_out_path(out_path, overwrite=overwrite)
    except TraitError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    from .checks import writable_file

    writable_file(out_path, "--out")  # tried, not read from permission bits (root passes those)

    say = progress_log(as_json or quiet)
    if generator_url:
        from guard.traits.generate import OpenAIChatGenerator

        generator = OpenAIChatGenerator(generator_url, generator_model, api_key_env=generator_key_env,
                                        timeout=timeout)
        if not os.environ.get(generator_key_env):
            say(f"${generator_key_env} is not set: sending no API key")
    else:
        from guard.traits.generate import LocalChatGenerator

        say(f"loading {generator_model}")
        generator = LocalChatGenerator.load(generator_model, dtype=dtype, device=device,
                                            trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens)
    writer = TraitWriter(generator, pairs=pairs, extraction_questions=extraction_questions,
                         evaluation_questions=evaluation_questions, examples=examples, max_attempts=max_attempts,
                         log=say)
    written = writer.write(name, description, out_path, overwrite=overwrite)
    t = written.trait
    summary = {"path": str(written.path), "name": t.name, "attempts": written.attempts,
               "pairs": len(t.instruction_pairs), "extraction_questions": len(t.extraction_questions),
               "evaluation_questions": len(t.evaluation_questions), "examples": len(t.examples),
               "fingerprint": t.fingerprint()}
    if as_json:
        emit_json(summary)
        return
    console.print(f"[green]wrote[/green] {written.path}: {summary['pairs']} instruction pairs, "
                  f"{summary['extraction_questions']} extraction and {summary['evaluation_questions']} evaluation "
                  f"questions, {summary['examples']} example pairs ({written.attempts} attempt(s))")
    console.print(f"read it, then: persona-guard extract --trait {written.path}")
