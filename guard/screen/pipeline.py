"""The whole screening job in one call: score the data (and a reference), z-scores, thresholds,
keep/drop, the report files and the summary. ``persona-guard screen`` is a thin shell around
:func:`screen`.

    >>> source = load_samples("train.jsonl")
    >>> run = screen(source, model, tokenizer, [vector], ScreenConfig(mode="approx"), thresholds={None: "p95"},
    ...              out_dir="screen-report", keep_path="train.clean.jsonl")
    >>> run.summary["dropped"], run.written["keep"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.vectors import PersonaVector
from ..errors import ScreenError
from .report import write_report
from .samples import SampleSource
from .scoring import (ScreenConfig, Screener, ScreenResult, check_thresholds, flagged, resolve_thresholds,
                      set_z_scores)

FLAGS = ("empty_response", "empty_prompt", "truncated", "empty_base_response")


def parse_threshold_specs(values: Sequence[str]) -> dict[str | None, str]:
    """``["p95"]`` (every trait), ``["evil=p90", "2.5"]`` (one trait, the rest) -> ``{trait or None: spec}``."""
    specs: dict[str | None, str] = {}
    for value in values:
        name, _, spec = value.rpartition("=")
        specs[name or None] = spec
    return specs


@dataclass
class ScreenRun:
    """What a screening job produced."""

    result: ScreenResult
    reference: ScreenResult | None
    thresholds: dict[str, float]         # score threshold per key name
    over: dict[int, list[str]]           # sample index -> keys over their threshold
    kept: list[int]
    dropped: list[int]
    summary: dict
    written: dict[str, str] = field(default_factory=dict)     # "keep"/"drop" -> path
    report: dict[str, Path] = field(default_factory=dict)     # report files by kind


def screen(source: SampleSource, model, tokenizer, vectors: Sequence[PersonaVector], config: ScreenConfig = ScreenConfig(),
           *, layers: Sequence[int] | None = None, thresholds: dict[str | None, str] | None = None,
           reference: SampleSource | None = None, out_dir: str | Path | None = None, keep_path: str | Path | None = None,
           drop_path: str | Path | None = None, restart: bool = False, plots: bool = True, progress: bool = False,
           warn: Callable[[str], None] = lambda message: None) -> ScreenRun:
    """Score ``source`` for every vector, then threshold, filter and report.

    Args:
        source: the samples (:func:`guard.screen.samples.load_samples`).
        model, tokenizer: the model the data would finetune.
        vectors: one persona vector per trait (checked against the model when loaded).
        config: scoring settings (mode, batching, window, base responses).
        layers: score every vector at each of these layers (default: each one's recommended layer).
        thresholds: ``{trait or None: "2.5" | "p95"}``; samples over a threshold are dropped.
        reference: ordinary data for z-scores and percentile thresholds (default: ``source``).
        out_dir: where the checkpoints and report files go (None: no files, no resume).
        keep_path, drop_path: write the kept / dropped samples here, in the input's format.
        restart: ignore the checkpoint of an interrupted run.
        plots: write a histogram per trait (needs matplotlib).
        progress: show progress bars.
        warn: receives warnings (resume, truncation, malformed records).
    """
    thresholds = dict(thresholds or {})
    if (keep_path or drop_path) and not thresholds:
        raise ScreenError("keeping or dropping samples needs a threshold (for example p95; CLI --threshold p95)")
    screener = Screener(model, tokenizer, vectors, config, layers=layers)
    check_thresholds(screener.keys, thresholds)
    out = Path(out_dir) if out_dir is not None else None

    def run(samples, name):
        checkpoint = None
        if out is not None:
            checkpoint = out / f"checkpoint-{name}.jsonl"
            if restart and checkpoint.exists():
                checkpoint.unlink()
        return screener.score(samples, checkpoint_path=checkpoint, progress=progress, warn=warn)

    result = run(source.samples, "data")
    ref_result = run(reference.samples, "reference") if reference is not None else None
    stats = set_z_scores(result, ref_result)
    limits = resolve_thresholds(result, thresholds, ref_result)
    over = flagged(result, limits)
    dropped = sorted(over)
    kept = [s.index for s in source.samples if s.index not in over]
    written = {}
    if keep_path:
        written["keep"] = str(source.write(keep_path, kept))
    if drop_path:
        written["drop"] = str(source.write(drop_path, dropped))
    summary = {
        "data": source.path, "format": source.format, "samples": len(source.samples),
        "malformed_skipped": len(source.skipped), "model": result.model, "mode": config.mode,
        "base_responses_generated": result.generated,
        "reference": reference.path if reference is not None else "the screened data",
        "traits": {name: {**entry, "reference_mean": stats[name][0], "reference_std": stats[name][1],
                          "threshold": limits.get(name), "over_threshold": sum(name in v for v in over.values())}
                   for name, entry in result.dataset_scores().items()},
        "flags": {flag: sum(flag in s.flags for s in result.samples) for flag in FLAGS},
        "dropped": len(dropped), "kept": len(kept), "written": written,
    }
    paths = {}
    if out is not None:
        paths = write_report(out, result, source.samples, limits, over, summary, ref_result, plots=plots)
        summary["report"] = {kind: str(path) for kind, path in paths.items()}
    return ScreenRun(result, ref_result, limits, over, kept, dropped, summary, written, paths)
