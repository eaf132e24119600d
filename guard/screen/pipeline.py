"""The whole screening job in one call: score the data (and a reference), z-scores, thresholds,
keep/drop, the report files and the summary. ``persona-guard screen`` is a thin shell around
:func:`screen`.

    >>> source = load_samples("train.jsonl")
    >>> run = screen(source, model, tokenizer, [vector], ScreenConfig(mode="approx"), thresholds={None: "p95"},
    ...              out_dir="screen-report", keep_path="train.clean.jsonl")
    >>> run.summary["dropped"], run.written["keep"]
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.vectors import PersonaVector
from ..errors import ScreenError
from .explain import explain_screen
from .report import matplotlib_available, write_report, write_summary
from .samples import SampleSource
from .scoring import (ScreenConfig, Screener, ScreenResult, check_thresholds, flagged, parse_threshold,
                      resolve_thresholds, set_z_scores)

logger = logging.getLogger(__name__)  # warnings reach Python users who pass no warn=

FLAGS = ("empty_response", "empty_prompt", "truncated", "empty_base_response")


# Files the report writes inside its directory; no --keep/--drop copy may land on one.
REPORT_FILES = ("report.jsonl", "report.csv", "summary.json", "report.html", "hist_*.png", "scatter_*.png",
                "checkpoint-*.jsonl", "checkpoint-*.tmp")


def parse_threshold_specs(values: Sequence[str]) -> dict[str | None, str]:
    """``["p95"]`` (every trait), ``["evil=p90", "2.5"]`` (one trait, the rest) -> ``{trait or None: spec}``.

    Each spec is parsed here (:func:`check_threshold_specs`), so a bad one is refused before any work.

    Args:
        values: the ``--threshold`` values as given.
    """
    specs: dict[str | None, str] = {}
    for value in values:
        name, _, spec = value.rpartition("=")
        if name in specs or (not name and None in specs):
            raise ScreenError(f"two thresholds for {name or 'every trait'} ({specs[name or None]!r} and {spec!r}); "
                              "give one")
        specs[name or None] = spec
    check_threshold_specs(specs)
    return specs


def check_threshold_specs(specs: dict[str | None, str]) -> None:
    """Refuse a threshold that does not parse, or that is NaN or infinite (NaN would flag
    nothing and write invalid JSON; infinity means no threshold at all).

    Args:
        specs: ``{trait or None: spec}`` as :func:`parse_threshold_specs` returns.
    """
    for name, spec in specs.items():
        kind, number = parse_threshold(spec)
        if not math.isfinite(number):
            label = f" for {name}" if name else ""
            raise ScreenError(f"threshold{label} {spec!r} is not a finite number; give a score such as 2.5 or a "
                              "percentile such as p95")


def _same_path(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # symlinks and hard links included
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_paths(data: str | Path, *, out_dir: str | Path | None = None, keep_path: str | Path | None = None,
                       drop_path: str | Path | None = None, reference: str | Path | None = None) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other: ``keep_path``
    or ``drop_path`` equal to the data or the reference (symlinks and hard links resolved), to
    each other, or to a file the report writes inside ``out_dir``; ``out_dir`` equal to an input.

    Args:
        data: the screened data's path (a hub dataset id that is not a local path is ignored).
        out_dir: the report directory.
        keep_path, drop_path: the filtered copies.
        reference: the reference data's path, if any.
    """
    inputs = [(label, path) for label, path in (("the screened data", data), ("the --reference data", reference))
              if path is not None and Path(path).expanduser().exists()]
    outputs = [(option, path) for option, path in (("--keep", keep_path), ("--drop", drop_path)) if path is not None]
    for option, path in outputs:
        for label, source in inputs:
            if _same_path(path, source):
                raise ScreenError(f"{option} {path} is {label} itself ({source}); writing it would overwrite "
                                  f"the input: give {option} another path")
    if len(outputs) == 2 and _same_path(keep_path, drop_path):
        raise ScreenError(f"--keep and --drop are the same file ({keep_path}); give each its own path")
    if out_dir is None:
        return
    for label, source in inputs:
        if _same_path(out_dir, source):
            raise ScreenError(f"--out {out_dir} is {label} ({source}); give the report its own directory")
    for option, path in outputs:
        target = Path(path).expanduser()
        if _same_path(target, out_dir):
            raise ScreenError(f"{option} {path} is the report directory (--out); give {option} a file outside it "
                              "or another name")
        if _same_path(target.parent, out_dir) and any(fnmatch.fnmatch(target.name, pattern)
                                                      for pattern in REPORT_FILES):
            raise ScreenError(f"{option} {path} is a file the report writes in {out_dir} "
                              f"({', '.join(REPORT_FILES)}); give {option} another name")


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
           drop_path: str | Path | None = None, restart: bool = False, plots: bool = True, explain_top: int = 20,
           progress: bool = False, warn: Callable[[str], None] = logger.warning) -> ScreenRun:
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
        plots: write a histogram per trait and, with two traits or more, a scatter of the first two
            (needs matplotlib; skipped with a warning without it).
        explain_top: write ``report.html`` with the response tokens of this many highest-scoring
            samples per trait shaded by their projection (:mod:`guard.screen.explain`); 0: no page.
        progress: show progress bars.
        warn: receives warnings (resume, truncation, malformed records).
    """
    thresholds = dict(thresholds or {})
    if explain_top < 0:
        raise ScreenError(f"explain_top must be 0 (no report.html) or more, got {explain_top}")
    if (keep_path or drop_path) and not thresholds:
        raise ScreenError("keeping or dropping samples needs a threshold (for example p95; CLI --threshold p95)")
    check_threshold_specs(thresholds)
    check_output_paths(source.path, out_dir=out_dir, keep_path=keep_path, drop_path=drop_path,
                       reference=reference.path if reference is not None else None)
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
        notes = []
        if plots and not matplotlib_available():
            notes.append("no histograms or scatter: matplotlib is not installed (pip install matplotlib)")
            warn(notes[-1])
        paths = write_report(out, result, source.samples, limits, over, summary, ref_result,
                             plots=plots and not notes)
        if explain_top:
            paths["html"] = explain_screen(out, model, tokenizer, vectors, result, source.samples, over,
                                           top=explain_top, report_files=paths, summary=summary, notes=notes,
                                           max_length=config.max_length, layer_path=config.layer_path)
        summary["report"] = {kind: str(path) for kind, path in paths.items()}
        write_summary(summary, paths["summary"])  # again, now listing the report's own files
    return ScreenRun(result, ref_result, limits, over, kept, dropped, summary, written, paths)
