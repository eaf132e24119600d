"""Screening at any size: the data scored chunk by chunk, optionally sharded across processes,
merged into one result, and the ranked report written without holding the samples.

* **Chunks.** Samples are read from the source (a :class:`~guard.screen.samples.SampleStream`
  reads the file again for each pass) in chunks of ``chunk_size`` (chunk ``n`` holds sample
  indices ``n * chunk_size`` up to ``(n + 1) * chunk_size``), and each chunk is scored by
  :meth:`Screener.score <guard.screen.scoring.Screener.score>` with its own checkpoint
  (``checkpoint-<name>-<n>.jsonl``, keyed on the chunk's token ids and every setting), so an
  interrupted run redoes at most the batches in progress and a changed chunk or setting is
  scored again. Only each sample's scores, flags and id stay in memory; its report text (the
  trimmed prompt, response and base response) goes to a file and is read back by offset when
  the ranked report is written.
* **Shards.** Under ``torchrun`` / ``accelerate launch`` (a ``torch.distributed`` process group),
  chunk ``n`` is scored by rank ``n % world``. Each rank writes its chunks' results to
  ``<out>/.screen-parts``; after a barrier rank 0 merges them in chunk order, so the merged
  result, and the report, are those of one process scoring every chunk. Rank 0 alone computes
  z-scores and thresholds and writes the report and the filtered copies.

The result of one chunk depends only on that chunk and the settings, so a resumed, re-sharded or
single-process run writes the same report. Dataset-level statistics (z-scores, percentile
thresholds, the mean scores) are computed by the pipeline from the merged result.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import uuid
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from ..errors import ScreenError
from .report import SCORE_FIELDS, histogram, plot_name, scatter, trim, write_csv, write_jsonl, write_summary
from .scoring import SampleScore, Screener, ScreenResult

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 2048
PARTS_DIR = ".screen-parts"  # inside the report directory: each chunk's results, until rank 0 merges them
PROCESS_GROUP_TIMEOUT = timedelta(hours=24)  # a rank that finishes first waits at the barrier for the rest


# -- processes --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """Which chunks this process scores: chunk ``n`` belongs to rank ``n % world``.

    Args:
        rank: this process's rank (0 merges and writes the report).
        world: how many processes share the chunks.
    """

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, which merges and writes the report."""
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        """Whether this process scores chunk number ``chunk``.

        Args:
            chunk: the chunk number.
        """
        return chunk % self.world == self.rank


def current_shard() -> Shard:
    """This process's rank and the world size of the ``torch.distributed`` process group, or a
    single process when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


@contextmanager
def distributed_from_env(timeout: timedelta = PROCESS_GROUP_TIMEOUT) -> Iterator[Shard]:
    """Within the block, a gloo process group when this process was started by ``torchrun`` or
    ``accelerate launch`` with more than one process (``WORLD_SIZE`` > 1 in the environment) and
    none exists yet; it is destroyed on exit, also on exceptions. Yields this process's
    :class:`Shard`. Gloo carries only barriers and small objects (the models stay where they
    are, CPU or GPU), so it serves either.

    Args:
        timeout: how long a collective waits for the other ranks (a rank that finishes its chunks
            first waits at the barrier for the slowest).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield current_shard()
        return
    dist.init_process_group("gloo", timeout=timeout)
    try:
        yield current_shard()
    finally:
        dist.destroy_process_group()


def _barrier(shard: Shard) -> None:
    if shard.world > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast(value, shard: Shard):
    """Rank 0's ``value`` on every rank (itself in a single process).

    Args:
        value: what rank 0 sends (ignored on the other ranks).
        shard: this process's shard.
    """
    if shard.world == 1:
        return value
    import torch.distributed as dist

    box = [value if shard.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- messages ----------------------------------------------------------------------------------------

class ChunkNotes:
    """Warnings from the per-chunk screeners, said once per run instead of once per chunk:
    the first "resuming" and "different run" messages pass, later ones are counted; truncation
    is reported by the pipeline from the merged flags.

    Args:
        warn: where the messages that pass go.
    """

    def __init__(self, warn: Callable[[str], None]):
        self.warn = warn
        self.resumed = 0
        self.restarted = 0

    def __call__(self, message: str) -> None:
        """Pass ``message`` on unless it repeats what was said for an earlier chunk.

        Args:
            message: a screener's warning.
        """
        if message.startswith("resuming from "):
            self.resumed += 1
            if self.resumed > 1:
                return
        elif "is from a different screening run" in message:
            self.restarted += 1
            if self.restarted > 1:
                return
        elif re.search(r"sample\(s\) longer than the \d+-token window were truncated", message):
            return
        self.warn(message)

    def close(self, what: str) -> None:
        """Say how many chunks were resumed or started over, when there were several.

        Args:
            what: names the data, e.g. ``"the screened data"``.
        """
        if self.resumed > 1:
            self.warn(f"{what}: {self.resumed} chunks resumed from their checkpoints")
        if self.restarted > 1:
            self.warn(f"{what}: {self.restarted} chunk checkpoints were from a different run and were scored again")


# -- per-sample records ------------------------------------------------------------------------------

class TextStore:
    """Each sample's report text (source, trimmed prompt, response and base response) in a file,
    read back by position; memory holds one offset per sample.

    Args:
        path: the file (created, or emptied; :meth:`close` deletes it).
    """

    def __init__(self, path: Path):
        self.path = path
        self._out = open(path, "w+", encoding="utf-8", newline="\n")
        self.offsets = array("q")

    def add(self, text: dict) -> None:
        """Append the next sample's text.

        Args:
            text: ``{"source", "prompt", "response", "base_response"}``.
        """
        self.offsets.append(self._out.tell())
        self._out.write(json.dumps(text, ensure_ascii=False) + "\n")

    def get(self, position: int) -> dict:
        """The text of the sample at ``position`` (merge order: sample index order).

        Args:
            position: the sample's position.
        """
        self._out.seek(self.offsets[position])
        return json.loads(self._out.readline())

    def close(self) -> None:
        """Close and delete the file."""
        self._out.close()
        self.path.unlink(missing_ok=True)


def _part_records(result: ScreenResult, samples, texts: bool) -> Iterator[dict]:
    for scored, sample in zip(result.samples, samples):
        record = {"id": scored.id, "index": scored.index, "flags": scored.flags, "prompt_tokens": scored.prompt_tokens,
                  "response_tokens": scored.response_tokens, "scores": scored.scores}
        if texts:
            record["text"] = {"source": sample.where, "prompt": trim(sample.last_user), "response": trim(sample.response),
                              "base_response": trim(scored.base_response)}
        yield record


def _write_part(path: Path, header: dict, records: Iterator[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps(header) + "\n")
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Scored:
    """A source's merged scores (rank 0; None elsewhere) and, when asked for, its report texts.

    Args:
        result: every sample's scores in index order (rank 0), else None.
        texts: each sample's report text (rank 0, when asked for).
        chunks: how many chunks the source was scored in.
    """

    result: ScreenResult | None
    texts: TextStore | None = None
    chunks: int = 0

    def close(self) -> None:
        """Delete the text file."""
        if self.texts is not None:
            self.texts.close()


def _chunk_files(directory: Path, stem: str) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"{re.escape(stem)}-(\d+)\.jsonl")
    found = []
    for path in directory.glob(f"{stem}-*.jsonl"):
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def score_source(screener: Screener, source, name: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 out_dir: str | Path | None = None, restart: bool = False, texts: bool = False,
                 shard: Shard | None = None, progress: bool = False,
                 warn: Callable[[str], None] = logger.warning) -> Scored:
    """Score every sample of ``source`` chunk by chunk (this process's chunks, when sharded) and
    merge the chunks on rank 0.

    Args:
        screener: scores each chunk (:meth:`Screener.score`).
        source: a :class:`~guard.screen.samples.SampleSource` or
            :class:`~guard.screen.samples.SampleStream`.
        name: names its checkpoints (``checkpoint-<name>-<chunk>.jsonl``), e.g. ``"data"``.
        chunk_size: samples per chunk.
        out_dir: where checkpoints and the chunks' results go (None: a temporary directory and no
            checkpoints; a single process only).
        restart: delete this source's checkpoints first.
        texts: keep each sample's report text (:class:`TextStore`) for the ranked report.
        shard: this process's share (default: :func:`current_shard`).
        progress: show progress bars.
        warn: receives warnings (resume, malformed records, ...), each said once per run.

    Returns a :class:`Scored`; its ``result`` holds every sample's scores in index order on rank 0.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ScreenError(f"chunk size must be a positive number of samples, got {chunk_size!r}")
    shard = shard or current_shard()
    if out_dir is None and shard.world > 1:
        raise ScreenError("a screen sharded across processes needs a report directory (--out) that every process "
                          "can read: the chunks' results meet there")
    temporary = tempfile.TemporaryDirectory(prefix="persona-guard-screen-") if out_dir is None else None
    try:
        root = Path(temporary.name) if temporary else Path(out_dir)
        parts = root / PARTS_DIR
        checkpoints = root if temporary is None else None
        n_chunks = -(-source.count // chunk_size)
        if shard.main:
            parts.mkdir(parents=True, exist_ok=True)
            for _, stale in _chunk_files(parts, name):  # left by an interrupted run
                stale.unlink()
            for stale in parts.glob(f"texts-{name}-*.jsonl"):
                stale.unlink()
            if checkpoints is not None:
                for number, path in _chunk_files(checkpoints, f"checkpoint-{name}"):
                    if restart or number >= n_chunks:  # restarted, or chunks the data no longer has
                        path.unlink()
                legacy = checkpoints / f"checkpoint-{name}.jsonl"  # one checkpoint for all samples (before chunks)
                legacy.unlink(missing_ok=True)
        run_id = broadcast(uuid.uuid4().hex, shard)  # also: nobody starts before rank 0 has cleaned up
        notes = ChunkNotes(warn)
        mine = [n for n in range(n_chunks) if shard.owns(n)]
        bar = tqdm(total=len(mine), desc=f"chunks of {chunk_size} samples ({name})", unit="chunk",
                   disable=not progress or len(mine) < 2)
        try:
            for number, samples in source.chunks(chunk_size, only=shard.owns):
                checkpoint = checkpoints / f"checkpoint-{name}-{number:05d}.jsonl" if checkpoints is not None else None
                result = screener.score(samples, checkpoint_path=checkpoint, progress=progress, warn=notes)
                header = {"run": run_id, "chunk": number, "samples": len(samples), "generated": result.generated,
                          "rank": shard.rank}
                _write_part(parts / f"{name}-{number:05d}.jsonl", header, _part_records(result, samples, texts))
                bar.update(1)
        finally:
            bar.close()
        notes.close("the screened data" if name == "data" else f"the {name} data")
        _barrier(shard)
        if not shard.main:
            return Scored(None, chunks=n_chunks)
        return _merge(screener, parts, name, n_chunks, run_id, texts, source.count)
    finally:
        if temporary is not None:
            temporary.cleanup()


def _merge(screener: Screener, parts: Path, name: str, n_chunks: int, run_id: str, texts: bool, count: int) -> Scored:
    """Rank 0: every chunk's results, in chunk order, into one :class:`ScreenResult` (and the text
    file); each part file is deleted once read."""
    from ..core.models import model_name

    store = TextStore(parts / f"texts-{name}-{run_id}.jsonl") if texts else None
    samples: list[SampleScore] = []
    generated = 0
    try:
        for number in range(n_chunks):
            path = parts / f"{name}-{number:05d}.jsonl"
            try:
                handle = open(path, encoding="utf-8")
            except FileNotFoundError:
                raise ScreenError(f"chunk {number} of the {name} was not scored by any process ({path} is missing); "
                                  "were all processes started with the same data and --chunk-size?") from None
            with handle:
                header = json.loads(handle.readline())
                if header.get("run") != run_id:
                    raise ScreenError(f"{path} is from another screening run; run the command again")
                generated += header.get("generated", 0)
                for line in handle:
                    record = json.loads(line)
                    samples.append(SampleScore(record["id"], record["index"], record["flags"], record["prompt_tokens"],
                                               record["response_tokens"], record["scores"]))
                    if store is not None:
                        store.add(record["text"])
            path.unlink()
    except BaseException:
        if store is not None:
            store.close()
        raise
    if len(samples) != count or any(s.index != i for i, s in enumerate(samples)):
        if store is not None:
            store.close()
        raise ScreenError(f"the {name}'s chunks hold {len(samples)} samples, the data has {count}; were all processes "
                          "started with the same data?")
    result = ScreenResult(screener.keys, screener.config.mode, samples, model_name(screener.model), generated)
    return Scored(result, store, n_chunks)


# -- the ranked report, streamed ------------------------------------------------------------------

def ranked_rows(result: ScreenResult, texts: TextStore, over: dict[int, list[str]]) -> Iterator[dict]:
    """The rows :func:`guard.screen.report.report_rows` builds, one at a time, in the same order
    (highest first by the first key's score, unscored last, then by index), their text read
    from ``texts``.

    Args:
        result: the merged scores.
        texts: each sample's report text, by position.
        over: sample index -> keys over their threshold.
    """
    first = result.keys[0].name
    entries = result.samples

    def order(p: int):
        score = entries[p].scores[first]["score"]
        return score is None, -(score or 0.0), entries[p].index

    for rank, p in enumerate(sorted(range(len(entries)), key=order), start=1):
        scored, text = entries[p], texts.get(p)
        yield {
            "id": scored.id, "index": scored.index, "source": text["source"], "dropped": scored.index in over,
            "over_threshold": over.get(scored.index, []), "flags": scored.flags,
            "prompt_tokens": scored.prompt_tokens, "response_tokens": scored.response_tokens,
            "prompt": text["prompt"], "response": text["response"], "base_response": text["base_response"],
            "scores": {name: {f: values[f] for f in SCORE_FIELDS} for name, values in scored.scores.items()},
            "rank": rank,
        }


def write_report_streamed(out_dir: str | Path, result: ScreenResult, texts: TextStore, thresholds: dict[str, float],
                          over: dict[int, list[str]], summary: dict, reference: ScreenResult | None = None,
                          plots: bool = True) -> dict[str, Path]:
    """The files of :func:`guard.screen.report.write_report` (``report.jsonl``, ``report.csv``,
    ``summary.json``, histograms, the scatter of the first two keys), with the rows streamed from
    ``texts`` rather than built in memory; returns their paths by kind.

    Args:
        out_dir: the report directory.
        result: the merged scores.
        texts: each sample's report text.
        thresholds: score threshold per key name.
        over: sample index -> keys over their threshold.
        summary: the run's summary.
        reference: the reference's scores (drawn in the histograms).
        plots: write the PNGs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [k.name for k in result.keys]
    paths = {"jsonl": out / "report.jsonl", "csv": out / "report.csv", "summary": out / "summary.json"}
    write_jsonl(ranked_rows(result, texts, over), paths["jsonl"])
    write_csv(ranked_rows(result, texts, over), names, paths["csv"])
    write_summary(summary, paths["summary"])
    if plots:
        for name in names:
            paths[f"hist_{name}"] = out / f"hist_{plot_name(name)}.png"
            histogram(result, name, thresholds.get(name), paths[f"hist_{name}"], reference)
        if len(names) >= 2:
            paths["scatter"] = out / f"scatter_{plot_name(names[0])}_{plot_name(names[1])}.png"
            scatter(result, names[0], names[1], paths["scatter"], thresholds)
    return paths


def remove_parts(out_dir: str | Path | None) -> None:
    """Remove ``<out>/.screen-parts`` when nothing is left in it (rank 0, after a run).

    Args:
        out_dir: the report directory.
    """
    if out_dir is None:
        return
    parts = Path(out_dir) / PARTS_DIR
    try:
        parts.rmdir()
    except OSError:  # missing, or another run's files still there
        pass


__all__ = ["DEFAULT_CHUNK_SIZE", "Shard", "current_shard", "distributed_from_env", "broadcast", "score_source",
           "ranked_rows", "write_report_streamed", "TextStore", "Scored"]
