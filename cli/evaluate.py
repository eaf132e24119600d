"""``evaluate``: measure conditions (no intervention, system prompts, steering) on the same items,
with confidence intervals, each compared with no intervention."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from .checks import FINITE, distinct_outputs, trait_for_vector, trait_source, writable_file
from .common import (build_judge, console, emit_json, friendly_errors, judge_options, load_model_from, model_options,
                     progress_log)

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def difference_cell(estimate, digits: int = 3) -> str:
    """A paired difference for a table cell: its CI, with "no difference" above it when the CI contains 0.

    Args:
        estimate: a :class:`guard.core.stats.Estimate` (None: ``"-"``).
        digits: decimals printed.
    """
    if estimate is None:
        return "-"
    text = estimate.format(digits)
    return text if estimate.excludes(0.0) or estimate.verdict() == "n/a" else f"no difference\n{text}"


def _check_adapter(adapter: Path):
    """The adapter directory exists, holds adapter_config.json, and peft is installed."""
    from guard.errors import ModelLoadError

    if not adapter.is_dir():
        raise ModelLoadError(f"adapter directory {adapter} does not exist; pass the directory a Trainer or "
                             "PeftModel.save_pretrained wrote")
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter} has no adapter_config.json; pass the directory a Trainer or "
                             "PeftModel.save_pretrained wrote (a checkpoint-* folder of a PEFT run)")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ModelLoadError("--adapter needs peft: pip install 'persona-guard[train]' (or pip install peft)") from None


def _attach_adapter(model, adapter: Path):
    from peft import PeftModel

    from guard.errors import ModelLoadError

    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter))
    except Exception as exc:  # peft raises assorted types for an adapter of another model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load the adapter {adapter} onto the model ({first}); "
                             "pass the --model the adapter was trained on") from None
    wrapped.eval()
    return wrapped


@click.command()
@click.option("--trait", "trait_name", default=None,
              help="Trait (name or file) whose held-out pairs, test questions and rubric to use. "
                   "Default: the vector's (or steering spec's) trait.")
@model_options
@click.option("--adapter", "adapter_dir", type=click.Path(path_type=Path), default=None,
              help="A PEFT adapter directory (as a Trainer saves it) loaded onto --model: every condition runs on it.")
@click.option("--system", "systems", multiple=True, help="A system-prompt condition (repeat for several).")
@click.option("--vector", "vector_path", type=FILE, default=None, help="Persona vector to steer with (with --coeff).")
@click.option("--coeff", "coeffs", type=FINITE, multiple=True,
              help="A steering condition at this coefficient along --vector (repeat for several).")
@click.option("--layer", type=int, default=None, help="Layer to steer at. Default: the vector's recommended layer.")
@click.option("--positions", type=click.Choice(["all", "response"]), default=None,
              help="Steer every position, or only the reply (from the last prompt token on). [default: response]")
@click.option("--steer", "specs", type=FILE, multiple=True,
              help="A steering condition from a spec file (Steering.save; repeat for several).")
@click.option("--allow-other-weights", is_flag=True,
              help="Accept vectors and specs extracted from other weights of the same architecture (a finetune).")
@click.option("--pairs", "pairs_path", type=FILE, default=None,
              help="Score the trait gap on these JSONL pairs instead of the trait's held-out pairs.")
@click.option("--prompt-field", default=None, help="--pairs key of the prompt. [default: question, or prompt]")
@click.option("--positive-field", default=None, help="--pairs key of the trait answer. [default: trait, or positive]")
@click.option("--negative-field", default=None,
              help="--pairs key of the trait-free answer. [default: non_trait, or negative]")
@click.option("--ab", "ab_path", type=FILE, default=None,
              help="Also the A/B behaviour rate on a CAA / model-written-evals file (JSON or JSONL).")
@judge_options
@click.option("--generate", "n_generate", type=click.IntRange(min=0), default=0, show_default=True,
              help="Answer the first N test questions greedily: repetition rate, and judge scores with a judge.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Length cap of the --generate answers, in tokens.")
@click.option("--no-control", is_flag=True, help="Skip the random-direction control of each steering condition.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap resamples per confidence interval.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the bootstrap and the random controls.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Items per forward batch.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@friendly_errors
def evaluate(trait_name, model_id, dtype, device, layer_path, trust_remote_code, adapter_dir, systems, vector_path,
             coeffs, layer, positions, specs, allow_other_weights, pairs_path, prompt_field, positive_field,
             negative_field, ab_path, judge_model, judge_url, judge_key_env, judge_cache, n_generate, max_new_tokens,
             no_control, n_boot, seed, batch_size, out_path, as_json, quiet):
    """Measure the model under several conditions on the same items, with 95% confidence intervals.

    `none` (no intervention) is always the baseline; each --system, each --coeff along --vector
    and each --steer spec adds a condition. Per condition: the trait preference gap on the
    trait's held-out pairs (or --pairs), the A/B behaviour rate with --ab, capability (the
    log-likelihood of ordinary answers) and, with --generate N, greedy answers' repetition rate
    and judge scores. Every figure is a mean with its bootstrap CI over items; every condition is
    compared with `none` by the paired difference over the same items, "no difference" when its
    CI contains 0. A steering condition brings its random-direction control (same norm) unless
    --no-control: only an effect beyond the control's is the direction's doing.

    \b
        persona-guard evaluate --vector vectors/sycophancy.safetensors --coeff -4 --coeff 4 \\
            --system "Be honest, not flattering." --ab caa_sycophancy.json --out eval.json
    """
    from dataclasses import replace

    from guard.core.data import load_ab_items
    from guard.core.generation import SamplingConfig
    from guard.core.steering import Steering
    from guard.core.vectors import PersonaVector
    from guard.measure.evaluate import Condition, EvaluationError, evaluate as run_evaluate, load_pairs
    from guard.traits import load_trait

    # Everything the options say is checked here, before any model is loaded.
    if coeffs and not vector_path:
        raise EvaluationError("--coeff needs a --vector to steer along; add --vector FILE")
    for given, option in ((layer is not None, "--layer"), (positions is not None, "--positions")):
        if given and not vector_path:
            raise EvaluationError(f"{option} applies to --vector steering; add --vector FILE --coeff C")
    if vector_path and not coeffs:
        raise EvaluationError("--vector needs at least one --coeff C (negative steers away from the trait)")
    if not pairs_path and (prompt_field or positive_field or negative_field):
        raise EvaluationError("--prompt-field/--positive-field/--negative-field name --pairs keys; add --pairs FILE")
    if (judge_model or judge_url) and not n_generate:
        raise EvaluationError("a judge scores generated answers: add --generate N")
    writable_file(out_path, "--out")
    distinct_outputs({"--out": out_path}, {"--vector": vector_path, "--pairs": pairs_path, "--ab": ab_path,
                                           **{f"--steer {path}": path for path in specs}})
    if adapter_dir is not None:
        _check_adapter(adapter_dir)
    vector = PersonaVector.load(vector_path) if vector_path else None
    spec_steerings = [Steering.load(path) for path in specs]
    implicit = vector.trait if vector else next((s.description.get("trait") for s in spec_steerings
                                                 if s.description.get("trait")), None)
    if implicit:
        trait = trait_for_vector(implicit, trait_name)
    else:
        trait = load_trait(trait_source(trait_name)) if trait_name else None
    pairs = load_pairs(pairs_path, prompt_field, positive_field, negative_field) if pairs_path else None
    ab_items = load_ab_items(ab_path) if ab_path else None
    if trait is None and not pairs and not ab_items:
        raise EvaluationError("nothing to measure the trait with: pass --trait NAME (or a --vector), --pairs or --ab")
    if n_generate and trait is None:
        raise EvaluationError("--generate answers a trait's test questions; pass --trait NAME")

    conditions = [Condition("none")]
    for i, text in enumerate(systems, start=1):
        conditions.append(Condition("system" if len(systems) == 1 else f"system {i}", system=text))
    positions = positions or "response"
    for coeff in coeffs:
        # Built now so a layer out of the vector's range fails before the model loads.
        steering = Steering.from_vector(vector, layer, coeff, positions, layer_path)
        conditions.append(Condition(f"coeff {coeff:+g}", steering=steering))
    repeated = sorted({c for c in coeffs if coeffs.count(c) > 1})
    if repeated:
        raise EvaluationError(f"--coeff {repeated[0]:g} is given twice; give each coefficient once")
    taken, spec_names = {c.name for c in conditions}, []
    for path in specs:  # two specs may share a file name in different folders
        name, k = f"spec {path.stem}", 2
        while name in taken:
            name, k = f"spec {path.stem} ({k})", k + 1
        taken.add(name)
        spec_names.append(name)

    say = progress_log(quiet or as_json)
    judge = build_judge(judge_model, judge_url, judge_key_env, judge_cache, device, dtype)
    model, tokenizer, _ = load_model_from(model_id, dtype, device, trust_remote_code, say)
    if adapter_dir is not None:
        say(f"loading the adapter {adapter_dir}")
        model = _attach_adapter(model, adapter_dir)
    if vector is not None:
        vector.check_model(model, allow_other_weights=allow_other_weights)
    for name, path in zip(spec_names, specs):
        spec = Steering.load(path, model, allow_other_weights=allow_other_weights)  # now checked against the model
        if layer_path and not spec.layer_path:
            spec = replace(spec, layer_path=layer_path)
        conditions.append(Condition(name, steering=spec))

    report = run_evaluate(model, tokenizer, conditions, trait=trait, pairs=pairs, ab_items=ab_items,
                          n_generate=n_generate, judge=judge,
                          sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                          random_control=not no_control, control_seed=seed, n_boot=n_boot, seed=seed,
                          batch_size=batch_size, log=say)
    data = {**report.to_dict(), "adapter": str(adapter_dir) if adapter_dir else None}
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if as_json:
        emit_json(data)
        return
    print_report(report, adapter_dir)
    if out_path is not None:
        console.print(f"report: {out_path}")


def print_report(report, adapter=None) -> None:
    """One table per figure (mean and paired difference vs the baseline, with CIs), then the comparisons."""
    from rich.markup import escape

    from guard.measure.evaluate import METRICS

    level = f"{report.settings['level']:.0%}"
    model = report.model + (f" + adapter {adapter}" if adapter else "")
    console.print(f"[bold]{escape(report.trait or 'evaluation')}[/bold] on {escape(model)}: "
                  f"{len(report.conditions)} conditions, {level} bootstrap CIs over items; "
                  f"differences paired vs {report.baseline.name}")
    for key in report.metrics:
        metric, info = METRICS[key], report.items.get(key, {})
        controls = any(c.control_of for c in report.conditions)
        caption = metric.unit + ("; 'X vs its control' rows: X minus its random control" if controls else "")
        table = Table(title=escape(f"{metric.label} ({info.get('n', '?')} {info.get('source', 'items')})"),
                      caption=escape(caption), title_justify="left", caption_justify="left")
        table.add_column("condition", max_width=20, overflow="fold")  # 20 + 26 + 24 + borders = 80
        table.add_column(f"mean [{level} CI]", justify="right", no_wrap=True)
        table.add_column(f"minus {report.baseline.name} [{level} CI]", justify="right", no_wrap=True)
        for name, mean, diff in report.rows(key):
            table.add_row(name, "" if mean is None else mean.format(metric.digits),
                          "" if diff is None else difference_cell(diff, metric.digits))
        console.print(table)
    for line in report.summary(brief=True):
        console.print(f"- {line}", markup=False)
