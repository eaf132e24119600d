"""What every command shares: consoles, error handling, JSON output, model and judge options."""

from __future__ import annotations

import functools
import json
import sys

import click
from rich.console import Console

from guard.errors import PersonaGuardError

console = Console()
err_console = Console(stderr=True)


INTERRUPTED = "interrupted; this command does not resume, so rerunning it starts over"


def friendly_errors(func):
    """Turn our own errors (:class:`guard.errors.PersonaGuardError`, whose messages are written for
    users) into one clean line and exit status 1; anything else is a bug and keeps its traceback.
    An interrupt (Ctrl-C, SIGINT) is one line on stderr and exit status 130: the
    KeyboardInterrupt's own message if a command raised one that says what a rerun does (see
    ``screen``), else :data:`INTERRUPTED`.

    Args:
        func: the command's callback.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PersonaGuardError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt as exc:
            message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else INTERRUPTED
            click.echo(f"\n{message}", err=True)
            sys.exit(130)
    return wrapper


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def progress_log(quiet: bool):
    """A logger for progress messages on stderr, silent with --quiet or --json. Quiet also turns
    off transformers' own progress bars ("Loading weights"), so --quiet leaves stderr to warnings
    and errors.

    Args:
        quiet: the command's ``--quiet or --json``.
    """
    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        return lambda message: None
    return lambda message: err_console.print(f"[dim]{message}[/dim]")


_DEVICE_MAP = "persona_guard.device_map"


def _keep_device_map(ctx, param, value):
    # Kept on the click context rather than passed to every command: load_model_from reads it.
    ctx.meta[_DEVICE_MAP] = value
    return value


def model_options(func):
    """--model, --dtype, --device, --device-map, --layer-path, --trust-remote-code."""
    options = [
        click.option("--model", "model_id", default=None,
                     help="Hugging Face hub id or local directory. Default: the embedded SmolLM2-135M-Instruct."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                     show_default=True,
                     help="auto: float32 on CPU; on a GPU the checkpoint's half precision (bfloat16 where supported)."),
        click.option("--device", default="auto", show_default=True,
                     help="torch device, e.g. cuda:0; auto: CUDA, then MPS, then CPU."),
        click.option("--device-map", default=None, expose_value=False, callback=_keep_device_map,
                     help="Spread a large model over devices (transformers' device_map, e.g. auto; needs accelerate). "
                          "Instead of --device."),
        click.option("--layer-path", default=None,
                     help="Dotted path of the decoder-block ModuleList when auto-discovery fails (e.g. model.layers)."),
        click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own Python code to run."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_model_from(model_id, dtype, device, trust_remote_code, log=lambda message: None):
    """Load the model the options describe (``--device-map`` read from the click context).

    Args:
        model_id, dtype, device, trust_remote_code: the option values.
        log: progress messages.
    """
    from guard.core.models import input_device, load_model

    context = click.get_current_context(silent=True)
    device_map = context.meta.get(_DEVICE_MAP) if context is not None else None
    log(f"loading {model_id or 'the embedded SmolLM2-135M-Instruct'}")
    loaded = load_model(model_id, dtype=dtype, device=device, device_map=device_map,
                        trust_remote_code=trust_remote_code)
    log(f"on {input_device(loaded.model)} in {loaded.model.dtype}".replace("torch.", ""))
    return loaded


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
                if values[-1] != values[-1] or values[-1] in (float("inf"), float("-inf")):
                    raise ValueError  # NaN or infinity: no coefficient or layer means anything there
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

    from .checks import writable_file

    if judge_cache and (judge_url or judge_model):
        writable_file(judge_cache, "--judge-cache")
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
