"""Reports of a screening run: per-sample JSONL and CSV (ranked, text trimmed for reading), a
summary JSON, and a histogram per trait with its threshold."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from .samples import Sample
from .scoring import ScreenResult

SCORE_FIELDS = ("score", "z", "delta_p", "approx", "projection", "base_projection")


def trim(text: str | None, limit: int = 160) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def report_rows(result: ScreenResult, samples: Sequence[Sample], over: dict[int, list[str]]) -> list[dict]:
    """One dict per sample, highest first by the first trait's score (unscored samples last,
    then by index, so the order is fully determined)."""
    first = result.keys[0].name
    rows = []
    for scored, sample in zip(result.samples, samples):
        rows.append({
            "id": scored.id, "index": scored.index, "source": sample.where, "dropped": scored.index in over,
            "over_threshold": over.get(scored.index, []), "flags": scored.flags,
            "prompt_tokens": scored.prompt_tokens, "response_tokens": scored.response_tokens,
            "prompt": trim(sample.last_user), "response": trim(sample.response),
            "base_response": trim(scored.base_response),
            "scores": {name: {f: values[f] for f in SCORE_FIELDS} for name, values in scored.scores.items()},
        })
    rows.sort(key=lambda r: (r["scores"][first]["score"] is None, -(r["scores"][first]["score"] or 0.0), r["index"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps({"rank": row["rank"], **{k: v for k, v in row.items() if k != "rank"}},
                                 ensure_ascii=False) + "\n")


def write_csv(rows: list[dict], names: Sequence[str], path: Path) -> None:
    columns = ["rank", "id", "index", "dropped", "over_threshold", "flags", "prompt_tokens", "response_tokens"]
    columns += [f"{name}.{field}" for name in names for field in SCORE_FIELDS]
    columns += ["prompt", "response", "base_response"]
    with open(path, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            flat = {**row, "over_threshold": ";".join(row["over_threshold"]), "flags": ";".join(row["flags"])}
            for name in names:
                for field in SCORE_FIELDS:
                    flat[f"{name}.{field}"] = row["scores"][name][field]
            writer.writerow(["" if flat.get(c) is None else flat[c] for c in columns])


def histogram(result: ScreenResult, name: str, threshold: float | None, path: Path,
              reference: ScreenResult | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [v for v in result.primary(name) if v is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if reference is not None and reference is not result:
        ref = [v for v in reference.primary(name) if v is not None]
        ax.hist(ref, bins=40, alpha=0.5, color="grey", label=f"reference ({len(ref)})")
    ax.hist(values, bins=40, alpha=0.75, label=f"screened ({len(values)})")
    if threshold is not None:
        ax.axvline(threshold, color="red", ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(f"{result.score_label()}, {name}")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def matplotlib_available() -> bool:
    """Whether matplotlib (the ``train`` extra) imports. Tried, not looked up: a package that is
    found but fails to import (a broken or partial install) must also mean no plots."""
    try:
        import matplotlib  # noqa: F401  (the package only, not pyplot: cheap)
    except ImportError:
        return False
    return True


def plot_name(name: str) -> str:
    """A key name as it appears in plot file names (``evil@L16`` -> ``evil_L16``)."""
    return name.replace("@", "_")


def scatter(result: ScreenResult, a: str, b: str, path: Path, thresholds: dict[str, float] | None = None) -> None:
    """Scatter of two keys' scores, one point per sample scored for both, with their thresholds.

    Args:
        result: the screen's scores.
        a, b: the key names on the x and y axes.
        path: the PNG to write.
        thresholds: score thresholds by key name, drawn as dashed lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(x, y) for x, y in zip(result.primary(a), result.primary(b)) if x is not None and y is not None]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter([x for x, _ in pairs], [y for _, y in pairs], s=10, alpha=0.6)
    for name, line in ((a, ax.axvline), (b, ax.axhline)):
        if thresholds and thresholds.get(name) is not None:
            line(thresholds[name], color="red", ls="--", lw=1)
    what = result.score_label(short=True)
    ax.set_xlabel(f"{what}, {a}")
    ax.set_ylabel(f"{what}, {b}")
    ax.set_title(f"{len(pairs)} samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(summary: dict, path: Path) -> None:
    """Write the run's summary as indented JSON.

    Args:
        summary: the summary dict (:attr:`guard.screen.pipeline.ScreenRun.summary`).
        path: the file to write.
    """
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_report(out_dir: str | Path, result: ScreenResult, samples: Sequence[Sample], thresholds: dict[str, float],
                 over: dict[int, list[str]], summary: dict, reference: ScreenResult | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """Write ``report.jsonl``, ``report.csv``, ``summary.json``, ``hist_<trait>.png`` files and,
    with two keys or more, ``scatter_<a>_<b>.png``; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report_rows(result, samples, over)
    names = [k.name for k in result.keys]
    paths = {"jsonl": out / "report.jsonl", "csv": out / "report.csv", "summary": out / "summary.json"}
    write_jsonl(rows, paths["jsonl"])
    write_csv(rows, names, paths["csv"])
    write_summary(summary, paths["summary"])
    if plots:
        for name in names:
            paths[f"hist_{name}"] = out / f"hist_{plot_name(name)}.png"
            histogram(result, name, thresholds.get(name), paths[f"hist_{name}"], reference)
        if len(names) >= 2:  # the first two keys' scores against each other
            paths["scatter"] = out / f"scatter_{plot_name(names[0])}_{plot_name(names[1])}.png"
            scatter(result, names[0], names[1], paths["scatter"], thresholds)
    return paths
