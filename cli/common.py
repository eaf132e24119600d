"""What every command shares: consoles, error handling, JSON output, model and judge options."""

from __future__ import annotations

import functools
import json

import click
from rich.console import Console

from guard.errors import PersonaGuardError

console = Console()
err_console = Console(stderr=True)


def friendly_errors(func):
    """Turn our own errors (:class:`guard.errors.PersonaGuardError`, whose messages are written for
    users) into one clean line and exit status 1; anything else is a bug and keeps its traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PersonaGuardError as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def progress_log(quiet: bool):
    """A logger for progress messages on stderr, silent with --quiet or --json."""
    return (lambda message: None) if quiet else (lambda message: err_console.print(f"[dim]{message}[/dim]"))


def model_options(func):
    """--model, --dtype, --device, --layer-path, --trust-remote-code."""
    options = [
        click.option("--model", "model_id", default=None,
                     help="Hugging Face hub id or local directory. Default: the embedded SmolLM2-135M-Instruct."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                     show_default=True),
        click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda:0."),
        click.option("--layer-path", default=None,
                     help="Dotted path of the decoder-block ModuleList when auto-discovery fails (e.g. model.layers)."),
        click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own Python code to run."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_model_from(model_id, dtype, device, trust_remote_code, log=lambda message: None):
    from guard.core.models import load_model

    log(f"loading {model_id or 'the embedded SmolLM2-135M-Instruct'}")
    return load_model(model_id, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def judge_options(func):
    """--judge-model / --judge-url / --judge-key-env / --judge-cache."""
    options = [
        click.option("--judge-model", default=None,
                     help="Judge with a local HF instruct model (hub id or directory), scored from its 0-100 "
                          "answer distribution. With --judge-url: the endpoint's model name."),
        click.option("--judge-url", default=None,
                     help="Judge with an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (needs logprobs)."),
        click.option("--judge-key-env", default="OPENAI_API_KEY", show_default=True,
                     help="Environment variable holding the endpoint's API key (unset: no key sent)."),
        click.option("--judge-cache", type=click.Path(dir_okay=False), default=None,
                     help="SQLite file caching judge scores, so reruns judge nothing twice."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def parse_numbers(text: str, kind=float, option: str = "") -> list:
    """``"-8,-4,0,4,8"`` -> numbers; for layers also ranges ``"6-24"``, ``"6-24:2"``, ``"-4--1"``."""
    import re

    values = []
    for part in (p.strip() for p in text.split(",")):
        span = re.fullmatch(r"(-?\d+)-(-?\d+)(?::(\d+))?", part) if kind is int else None
        try:
            if span:
                low, high, step = int(span[1]), int(span[2]), int(span[3] or 1)
                if step < 1 or high < low:
                    raise ValueError
                values += list(range(low, high + 1, step))
            elif part:
                values.append(kind(part))
        except ValueError:
            raise click.BadParameter(f"cannot read {part!r} in {text!r}", param_hint=option or None) from None
    if not values:
        raise click.BadParameter(f"no numbers in {text!r}", param_hint=option or None)
    return values


def build_judge(judge_model, judge_url, judge_key_env, judge_cache, device="cpu", dtype="float32"):
    """The judge the options describe, or None when no judge was asked for. Call it before loading
    the main model, so option mistakes surface before minutes of loading."""
    from guard.judges import CachedJudge, LocalJudge, OpenAICompatibleJudge
    from guard.core.models import load_model

    if judge_url:
        if not judge_model:
            raise click.UsageError("--judge-url needs --judge-model (the endpoint's model name)")
        judge = OpenAICompatibleJudge(judge_url, judge_model, api_key_env=judge_key_env)
    elif judge_model:
        model, tokenizer, _ = load_model(judge_model, dtype=dtype, device=device)
        judge = LocalJudge(model, tokenizer)
    else:
        return None
    return CachedJudge(judge, judge_cache) if judge_cache else judge
