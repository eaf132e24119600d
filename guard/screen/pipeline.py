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
import heapq
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.vectors import PersonaVector
from ..errors import ScreenError
from .explain import explain_screen
from .report import matplotlib_available, plot_name, write_summary
from .samples import FieldNames, SampleSource, SampleStream, dataset_stream
from .scoring import (ScreenConfig, Screener, ScreenResult, check_thresholds, flagged, parse_threshold,
                      resolve_thresholds, set_relative_scores, set_z_scores)
from .stream import (DEFAULT_CHUNK_SIZE, Scored, broadcast, current_shard, remove_parts, score_source,
                     write_report_streamed)

logger = logging.getLogger(__name__)  # warnings reach Python users who pass no warn=

FLAGS = ("empty_response", "empty_prompt", "truncated", "empty_base_response")


# Files the report writes inside its directory; no --keep/--drop copy may land on one.
REPORT_FILES = ("report.jsonl", "report.csv", "summary.json", "report.html", "hist_*.png", "scatter_*.png",
                "checkpoint-*.jsonl", "checkpoint-*.tmp", ".screen-parts")


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
    """What a screening job produced.

    ``result`` holds every sample's scores, flags and id in index order (not its text: the
    report has that, and ``base_response`` is None here). On the ranks other than 0 of a sharded
    run ``result`` and ``reference`` are None and the lists empty; ``summary``, ``written`` and
    ``report`` are rank 0's.
    """

    result: ScreenResult | None
    reference: ScreenResult | None
    thresholds: dict[str, float]         # score threshold per key name
    over: dict[int, list[str]]           # sample index -> keys over their threshold
    kept: list[int]
    dropped: list[int]
    summary: dict
    written: dict[str, str] = field(default_factory=dict)     # "keep"/"drop" -> path
    report: dict[str, Path] = field(default_factory=dict)     # report files by kind


def screen(source: SampleSource | SampleStream, model, tokenizer, vectors: Sequence[PersonaVector],
           config: ScreenConfig = ScreenConfig(), *, layers: Sequence[int] | None = None,
           thresholds: dict[str | None, str] | None = None, reference: SampleSource | SampleStream | None = None,
           out_dir: str | Path | None = None, keep_path: str | Path | None = None, drop_path: str | Path | None = None,
           restart: bool = False, plots: bool = True, explain_top: int = 20, chunk_size: int = DEFAULT_CHUNK_SIZE,
           generator=None, progress: bool = False, warn: Callable[[str], None] = logger.warning) -> ScreenRun:
    """Score ``source`` for every vector, then threshold, filter and report.

    The data is scored ``chunk_size`` samples at a time, each chunk with its own checkpoint, and
    only each sample's scores, flags and id are kept in memory (:mod:`guard.screen.stream`); a
    :class:`~guard.screen.samples.SampleStream` source (:func:`~guard.screen.samples.open_samples`)
    is read again for each pass instead of held. Under ``torchrun`` / ``accelerate launch`` (a
    ``torch.distributed`` process group) the chunks are shared out between the processes and
    rank 0 merges them and writes the report: the same report as one process.

    Args:
        source: the samples (:func:`~guard.screen.samples.open_samples` or
            :func:`~guard.screen.samples.load_samples`).
        model, tokenizer: the model the data would finetune.
        vectors: one persona vector per trait (checked against the model when loaded).
        config: scoring settings (mode, batching, window, base responses).
        layers: score every vector at each of these layers (default: each one's recommended layer).
        thresholds: ``{trait or None: "2.5" | "p95"}``; samples over a threshold are dropped.
        reference: ordinary data for z-scores and percentile thresholds (default: ``source``).
        out_dir: where the checkpoints and report files go (None: no files, no resume; a single
            process only).
        keep_path, drop_path: write the kept / dropped samples here, in the input's format.
        restart: ignore the checkpoints of an interrupted run.
        plots: write a histogram per trait and, with two traits or more, a scatter of the first two
            (needs matplotlib; skipped with a warning without it).
        explain_top: write ``report.html`` with the response tokens of this many highest-scoring
            samples per trait shaded by their projection (:mod:`guard.screen.explain`); 0: no page.
        chunk_size: samples scored (and checkpointed) together; part of each chunk's checkpoint key.
        generator: where base responses come from in full mode (None: generated in process;
            :class:`~guard.core.generation.RemoteGenerator`: a completions server).
        progress: show progress bars.
        warn: receives warnings (resume, truncation, malformed records).
    """
    thresholds = dict(thresholds or {})
    if explain_top < 0:
        raise ScreenError(f"explain_top must be 0 (no report.html) or more, got {explain_top}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ScreenError(f"chunk_size must be a positive number of samples, got {chunk_size!r}")
    if (keep_path or drop_path) and not thresholds:
        raise ScreenError("keeping or dropping samples needs a threshold (for example p95; CLI --threshold p95)")
    check_threshold_specs(thresholds)
    check_output_paths(source.path, out_dir=out_dir, keep_path=keep_path, drop_path=drop_path,
                       reference=reference.path if reference is not None else None)
    shard = current_shard()
    if shard.world > 1 and out_dir is None:
        raise ScreenError("a screen sharded across processes needs out_dir (--out), a directory every process can read")
    screener = Screener(model, tokenizer, vectors, config, layers=layers, generator=generator)
    check_thresholds(screener.keys, thresholds)
    if generator is not None and config.mode == "full" and hasattr(generator, "check"):
        generator.check()  # a server serving another model is refused before any scoring
    out = Path(out_dir) if out_dir is not None else None

    def run(samples, name, texts):
        return score_source(screener, samples, name, chunk_size=chunk_size, out_dir=out, restart=restart, texts=texts,
                            shard=shard, progress=progress, warn=warn)

    scored = run(source, "data", True)
    try:
        ref_scored = run(reference, "reference", False) if reference is not None else None
        if not shard.main:
            outcome = broadcast(None, shard)
            if "error" in outcome:
                raise ScreenError(f"rank 0 failed to finish the screen: {outcome['error']}")
            return ScreenRun(None, None, {}, {}, [], [], outcome["summary"], outcome["written"],
                             {kind: Path(path) for kind, path in outcome["report"].items()})
        try:
            done = _finish(screener, source, scored, ref_scored.result if ref_scored else None, reference, thresholds,
                           out, keep_path, drop_path, plots, explain_top, model, tokenizer, vectors, config, warn)
        except BaseException as error:
            broadcast({"error": f"{type(error).__name__}: {error}"}, shard)
            raise
        broadcast({"summary": done.summary, "written": done.written,
                   "report": {kind: str(path) for kind, path in done.report.items()}}, shard)
        return done
    finally:
        scored.close()
        if shard.main:
            remove_parts(out)


def _warn_truncated(result: ScreenResult, window: int, what: str, warn) -> None:
    truncated = sum("truncated" in s.flags for s in result.samples)
    if truncated:
        warn(f"{what}{truncated} sample(s) longer than the {window}-token window were truncated (flagged 'truncated')")


def finish_scores(result: ScreenResult, reference: ScreenResult | None = None,
                  score: str = "relative") -> dict[str, tuple[float, float]]:
    """Dataset-level steps over the merged scores, run once every chunk (and every shard) is in
    ``result``: this is where a score that needs a statistic of the whole dataset belongs (each
    chunk's :meth:`Screener.score` sees only its chunk). The z-scores against ``reference`` (or
    the data itself), then ``score`` (:func:`~guard.screen.scoring.set_relative_scores`), on the
    reference too, so that percentile thresholds compare like with like. Returns
    ``{key name: (mean, std)}`` of the mode's score.

    Args:
        result: every sample's scores (rank 0's merged result).
        reference: the reference's merged scores, if any.
        score: ``ScreenConfig.score``.
    """
    if reference is not None:
        set_z_scores(reference, reference)
        set_relative_scores(reference, score)
    stats = set_z_scores(result, reference)
    set_relative_scores(result, score)
    return stats


def _finish(screener: Screener, source, scored: Scored, ref_result: ScreenResult | None, reference, thresholds,
            out: Path | None, keep_path, drop_path, plots: bool, explain_top: int, model, tokenizer, vectors,
            config: ScreenConfig, warn) -> ScreenRun:
    """Rank 0, with every chunk merged: z-scores, thresholds, the copies, the report files."""
    result = scored.result
    _warn_truncated(result, screener.window, "", warn)
    if ref_result is not None:
        _warn_truncated(ref_result, screener.window, "the reference data: ", warn)
    stats = finish_scores(result, ref_result, config.score)
    limits = resolve_thresholds(result, thresholds, ref_result)
    over = flagged(result, limits)
    dropped = sorted(over)
    kept = [i for i in range(source.count) if i not in over]
    written = {}
    if keep_path:
        written["keep"] = str(source.write(keep_path, kept))
    if drop_path:
        written["drop"] = str(source.write(drop_path, dropped))
    summary = {
        "data": source.path, "format": source.format, "samples": source.count,
        "malformed_skipped": source.n_skipped, "model": result.model, "mode": config.mode,
        "score": result.score or config.score,
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
        paths = write_report_streamed(out, result, scored.texts, limits, over, summary, ref_result,
                                      plots=plots and not notes)
        if explain_top:
            paths["html"] = _explain(out, model, tokenizer, vectors, result, source, over, explain_top, paths, summary,
                                     notes, config)
        summary["report"] = {kind: str(path) for kind, path in paths.items()}
        write_summary(summary, paths["summary"])  # again, now listing the report's own files
    return ScreenRun(result, ref_result, limits, over, kept, dropped, summary, written, paths)


def _explain(out: Path, model, tokenizer, vectors, result: ScreenResult, source, over, top: int, paths, summary, notes,
             config: ScreenConfig) -> Path:
    """``report.html`` from the ``top`` highest-scoring samples of each key, fetched from the source
    (the page needs their text; the rest of the data is not read into memory for it)."""
    chosen: set[int] = set()
    for key in result.keys:
        ranked = ((-s.scores[key.name]["score"], p) for p, s in enumerate(result.samples)
                  if s.scores[key.name]["score"] is not None)
        chosen.update(p for _, p in heapq.nsmallest(top, ranked))
    positions = sorted(chosen)  # index order, so explain_screen breaks ties as it would on all samples
    fetched = source.fetch(result.samples[p].index for p in positions)
    subset = ScreenResult(result.keys, result.mode, [result.samples[p] for p in positions], result.model,
                          result.generated)
    return explain_screen(out, model, tokenizer, vectors, subset, [fetched[result.samples[p].index] for p in positions],
                          over, top=top, report_files=paths, summary=summary, notes=notes,
                          max_length=config.max_length, layer_path=config.layer_path)


# -- dtype -----------------------------------------------------------------------------------------

def screening_dtype(mode: str, device: str = "auto") -> str:
    """The dtype ``persona-guard screen --dtype auto`` loads the model in: the fastest that keeps
    the ranking (Spearman >= 0.999 against float32) where that was measured.

    * approx mode on a CPU with AMX (bfloat16 tiles; Intel Sapphire Rapids and later):
      ``"bfloat16"``, measured 1.95x the tokens/s of float32 on the embedded model with
      Spearman 0.9995 of the approx scores (benchmarks/RESULTS.md, ``screen_scale``);
    * everything else: ``"auto"`` as every command means it (float32 on a CPU; on a GPU the
      checkpoint's half precision, bfloat16 where supported). Full mode stays float32 on a CPU:
      base responses generated in bfloat16 (float16) differ from float32 greedy ones enough to
      move the ΔP ranking (Spearman 0.962, 0.990 on 64 samples).

    Args:
        mode: ``"full"`` or ``"approx"``.
        device: the ``--device`` value (``auto``, ``cpu``, ``cuda:0``, ...).
    """
    import torch

    from ..core.models import resolve_device

    if mode != "approx" or resolve_device(device).type != "cpu":
        return "auto"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bfloat16" if amx and bf16 else "auto"


# -- datasets ------------------------------------------------------------------------------------

def score_columns(keys, mode: str) -> list[tuple[str, str, str]]:
    """``(column, key name, score field)`` of the columns :func:`score_dataset` adds:
    ``<key>_score``, ``<key>_z``, ``<key>_approx``, ``<key>_projection`` and, in full mode,
    ``<key>_delta_p`` and ``<key>_base_projection`` (``@`` in a key name becomes ``_``).

    Args:
        keys: the screened keys.
        mode: ``"full"`` or ``"approx"``.
    """
    fields = ["score", "z", "approx", "projection"] + (["delta_p", "base_projection"] if mode == "full" else [])
    return [(f"{plot_name(key.name)}_{name}", key.name, name) for key in keys for name in fields]


def score_dataset(dataset, model, tokenizer, vectors: Sequence[PersonaVector], config: ScreenConfig = ScreenConfig(),
                  *, layers: Sequence[int] | None = None, fields: FieldNames = FieldNames(), on_error: str = "fail",
                  reference=None, chunk_size: int = DEFAULT_CHUNK_SIZE, out_dir: str | Path | None = None,
                  restart: bool = False, generator=None, progress: bool = False,
                  warn: Callable[[str], None] = logger.warning):
    """Score a ``datasets.Dataset`` and return it with the scores as columns, ready for ``.filter``::

        scored = score_dataset(ds, model, tokenizer, [vector], ScreenConfig(mode="approx"))
        clean = scored.filter(lambda row: row["sycophancy_z"] is None or row["sycophancy_z"] < 2)

    Columns (:func:`score_columns`): ``<trait>_score`` (``config.score``: by default the
    relative score, see :mod:`guard.screen.scoring`), ``<trait>_z`` (against ``reference``, or the dataset itself), ``<trait>_approx``,
    ``<trait>_projection`` and, in full mode, ``<trait>_delta_p`` and ``<trait>_base_projection``;
    ``screen_flags`` lists a row's flags (``empty_response``, ``truncated``, ..., ``malformed``
    for a row skipped with ``on_error="skip"``). Unscored rows hold None. Scoring runs in
    chunks as :func:`screen` does (sharded under ``torchrun``: every rank gets the scored dataset).

    Args:
        dataset: a ``datasets.Dataset`` (one split).
        model, tokenizer: the model the data would finetune.
        vectors: one persona vector per trait.
        config: scoring settings.
        layers: score every vector at each of these layers (default: each one's recommended layer).
        fields: where the text is in each row.
        on_error: ``"fail"`` or ``"skip"`` for malformed rows.
        reference: ordinary data for the z-scores: a ``datasets.Dataset``, or a source from
            :func:`~guard.screen.samples.open_samples` / :func:`~guard.screen.samples.load_samples`.
        chunk_size: samples scored together.
        out_dir: where checkpoints go, so an interrupted call resumes (None: none kept).
        restart: ignore the checkpoints of an interrupted call.
        generator: where base responses come from in full mode (None: in process).
        progress: show progress bars.
        warn: receives warnings.
    """
    try:
        import datasets
    except ImportError as error:
        raise ScreenError("score_dataset needs the 'datasets' package (pip install 'persona-guard[train]')") from error
    if isinstance(dataset, datasets.DatasetDict):
        raise ScreenError(f"score_dataset takes one split, e.g. dataset['{next(iter(dataset), 'train')}'], "
                          f"not a DatasetDict (splits: {', '.join(dataset)})")
    if not isinstance(dataset, datasets.Dataset):
        raise ScreenError(f"score_dataset takes a datasets.Dataset, got {type(dataset).__name__}")
    shard = current_shard()
    screener = Screener(model, tokenizer, vectors, config, layers=layers, generator=generator)
    columns = score_columns(screener.keys, config.mode)
    clash = [name for name in [c for c, _, _ in columns] + [FLAGS_COLUMN] if name in dataset.column_names]
    if clash:
        raise ScreenError(f"the dataset already has column(s) {', '.join(clash)}; remove them first "
                          f"(dataset.remove_columns({clash!r}))")
    if generator is not None and config.mode == "full" and hasattr(generator, "check"):
        generator.check()
    stream = dataset_stream(dataset, fields=fields, on_error=on_error, warn=warn if shard.main else (lambda m: None))
    if isinstance(reference, datasets.Dataset):
        reference = dataset_stream(reference, fields=fields, on_error=on_error, name="the reference dataset",
                                   warn=warn if shard.main else (lambda m: None))
    scored = score_source(screener, stream, "dataset", chunk_size=chunk_size, out_dir=out_dir, restart=restart,
                          shard=shard, progress=progress, warn=warn)
    ref = score_source(screener, reference, "reference", chunk_size=chunk_size, out_dir=out_dir, restart=restart,
                       shard=shard, progress=progress, warn=warn) if reference is not None else None
    values = None
    if shard.main:
        result = scored.result
        finish_scores(result, ref.result if ref is not None else None, config.score)
        rows = range(dataset.num_rows) if not stream.n_skipped else list(stream.sample_rows())
        values = {column: [None] * dataset.num_rows for column, _, _ in columns}
        flags = [["malformed"] for _ in range(dataset.num_rows)] if stream.n_skipped else [[] for _ in range(dataset.num_rows)]
        for row, sample in zip(rows, result.samples):
            flags[row] = list(sample.flags)
            for column, name, score_field in columns:
                values[column][row] = sample.scores[name][score_field]
        values[FLAGS_COLUMN] = flags
    values = broadcast(values, shard)
    for column, column_values in values.items():
        dataset = dataset.add_column(column, column_values)
    return dataset


FLAGS_COLUMN = "screen_flags"
