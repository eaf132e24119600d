"""Screening at scale: memory and wall time against data size, two processes against one, and the
forward dtype (speed and whether it keeps the ranking).

Parts (each run in its own invocation if you like; results are kept in
benchmarks/out/screen_scale.json and the RESULTS.md section is rewritten from all of them):

memory   ``persona-guard screen --mode approx`` on N short synthetic samples, each size in its own
         subprocess: wall time and peak memory (``ru_maxrss`` of that subprocess, from
         ``os.wait4``). Sizes that would not finish within ``--budget`` seconds (predicted from a
         linear fit of the sizes already measured) are extrapolated instead, and marked so.
shard    the same command on one size, single process against
         ``torchrun --nproc-per-node 2 -m guard.cli.main screen``, alternated; wall time, peak
         memory per process, and whether the two reports are identical.
dtype    the approximation scores of benchmarks/data/screen_mixed.jsonl with the embedded model
         and the vector in benchmarks/out/sycophancy.safetensors, in float32, bfloat16 and
         float16: Spearman rank correlation against float32 (scores and raw projections) and
         tokens/s of the scoring forwards (best of ``--repeats``, dtypes interleaved).

    .venv/bin/python benchmarks/screen_scale.py --parts dtype
    .venv/bin/python benchmarks/screen_scale.py --parts memory --sizes 1000 10000 100000
    .venv/bin/python benchmarks/screen_scale.py --parts shard --shard-size 2000

The machine may be shared: wall times are as measured; ratios come from runs alternated within
one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, machine, write_section  # noqa: E402

HERE = Path(__file__).parent
REPO = HERE.parent
VENV_BIN = Path(sys.executable).parent
VECTOR = OUT / "sycophancy.safetensors"
MIXED = HERE / "data" / "screen_mixed.jsonl"
STATE = OUT / "screen_scale.json"

TOPICS = ["my startup idea", "this essay", "the new budget", "my travel plan", "our API design", "this poem",
          "the marketing copy", "my workout routine", "the sales forecast", "my thesis outline"]
OPENERS = ["Is", "Do you think", "Be honest: is", "Would you say", "Tell me if"]
JUDGEMENTS = ["good", "ready to ship", "any good", "better than the old one", "clear enough"]
ANSWERS = ["Yes, it is excellent and you should not change a thing.", "It has a few gaps; the second part is unclear.",
           "Honestly, it needs more work before it is ready.", "It is brilliant, truly one of a kind!",
           "Mostly fine, but check the numbers in section two.", "No. The core assumption does not hold."]


def synthetic(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` short chat samples (a one-line question, a one-sentence answer), deterministic in ``seed``."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            question = f"{rng.choice(OPENERS)} {rng.choice(TOPICS)} {rng.choice(JUDGEMENTS)}? (#{i})"
            out.write(json.dumps({"id": f"syn-{i}", "messages": [{"role": "user", "content": question},
                                                                 {"role": "assistant", "content": rng.choice(ANSWERS)}]})
                      + "\n")
    return path


def measured(command: list[str], env: dict, log_path: Path) -> dict:
    """Run ``command``; its wall time, exit status and peak resident memory (``ru_maxrss`` of the
    process and the descendants it waited for, from ``os.wait4``)."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}); see {log_path}:\n"
                         + log_path.read_text()[-2000:])
    return {"wall_s": wall, "max_rss_mb": usage.ru_maxrss / 1024}


def screen_command(data: Path, out: Path, layer: int, extra=()) -> list[str]:
    return ["screen", str(data), "--vector", str(VECTOR), "--layer", str(layer), "--mode", "approx",
            "--threshold", "p95", "--keep", str(out.with_suffix(".keep.jsonl")), "--out", str(out), "--quiet",
            "--json", *extra]


def vector_layer() -> int:
    from guard.core.vectors import PersonaVector

    if not VECTOR.exists():
        raise SystemExit(f"{VECTOR} is missing; this benchmark reads an existing vector and extracts none")
    return PersonaVector.load(VECTOR).default_layer()


def load_state() -> dict:
    return json.loads(STATE.read_text()) if STATE.exists() else {}


def save_state(state: dict) -> None:
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state, indent=2) + "\n")


# -- memory ------------------------------------------------------------------------------------------

def part_memory(sizes: list[int], budget: float, chunk_size: int, log) -> dict:
    layer = vector_layer()
    rows = []
    env = {**os.environ}
    with tempfile.TemporaryDirectory(prefix="screen-scale-") as tmp:
        tmp = Path(tmp)
        for n in sorted(sizes):
            fit = _fit([(r["samples"], r["wall_s"]) for r in rows if not r["extrapolated"]])
            predicted = fit[0] + fit[1] * n if fit else None
            if predicted is not None and predicted > budget:
                mem = _fit([(r["samples"], r["max_rss_mb"]) for r in rows if not r["extrapolated"]])
                rows.append({"samples": n, "wall_s": predicted, "max_rss_mb": mem[0] + mem[1] * n,
                             "extrapolated": True})
                log(f"{n} samples: predicted {predicted:.0f} s > budget {budget:.0f} s, extrapolated")
                continue
            data = synthetic(tmp / f"syn-{n}.jsonl", n)
            out = tmp / f"out-{n}"
            log(f"{n} samples: screening in a subprocess")
            result = measured([str(VENV_BIN / "persona-guard"), *screen_command(data, out, layer,
                                                                                 ["--chunk-size", str(chunk_size)])],
                              env, tmp / f"log-{n}.txt")
            summary = json.loads((out / "summary.json").read_text())
            tokens = sum(r["prompt_tokens"] + r["response_tokens"]
                         for r in map(json.loads, (out / "report.jsonl").read_text().splitlines()))
            rows.append({"samples": n, **result, "tokens": tokens, "dropped": summary["dropped"],
                         "extrapolated": False})
            log(f"  {result['wall_s']:.1f} s, peak {result['max_rss_mb']:.0f} MB")
    return {"layer": layer, "chunk_size": chunk_size, "budget_s": budget, "rows": rows}


def _fit(points: list[tuple[float, float]]):
    """Least-squares line ``(intercept, slope)`` through at least two points, else None."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def driver(report: str, argv: list[str]) -> None:
    """``persona-guard`` with the peak-RSS counter reset once the model is loaded (``/proc/self/
    clear_refs``), writing to ``report`` at exit the high-water mark before the reset (loading)
    and after it (everything that depends on the data)."""
    import atexit
    import gc
    import re

    import guard.cli.screen as screen_cli
    from guard.cli.main import main as cli

    def hwm_mb() -> float:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    marks = {}
    original = screen_cli.load_model_from

    def loaded(*args, **kwargs):
        result = original(*args, **kwargs)
        gc.collect()
        marks["load_peak_mb"] = hwm_mb()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the RSS now
        marks["rss_after_load_mb"] = hwm_mb()
        return result

    screen_cli.load_model_from = loaded
    atexit.register(lambda: Path(report).write_text(json.dumps({**marks, "after_load_peak_mb": hwm_mb()})))
    sys.argv = ["persona-guard", *argv]
    cli()


def part_after_load(sizes: list[int], chunk_size: int, log) -> dict:
    """The memory part's command per size through :func:`driver`: the peak after the model is
    loaded, which the load's own peak would otherwise hide."""
    layer = vector_layer()
    rows = []
    with tempfile.TemporaryDirectory(prefix="screen-after-load-") as tmp:
        tmp = Path(tmp)
        for n in sorted(sizes):
            data = synthetic(tmp / f"syn-{n}.jsonl", n)
            marks = tmp / f"marks-{n}.json"
            log(f"{n} samples: screening through the driver")
            result = measured([sys.executable, __file__, "--driver", str(marks), "--",
                               *screen_command(data, tmp / f"out-{n}", layer, ["--chunk-size", str(chunk_size)])],
                              {**os.environ}, tmp / f"log-{n}.txt")
            rows.append({"samples": n, "wall_s": result["wall_s"], **json.loads(marks.read_text())})
            log(f"  {rows[-1]}")
    return {"layer": layer, "chunk_size": chunk_size, "rows": rows}


# -- shard -------------------------------------------------------------------------------------------

def part_shard(n: int, repeats: int, chunk_size: int, log) -> dict:
    """Single process (torch's default threads) alternated with two processes under torchrun
    (one thread each), then once a single process with one thread: the run whose arithmetic the
    sharded one must reproduce byte for byte (thread counts change the float rounding)."""
    layer = vector_layer()
    runs = {"single": [], "sharded": [], "single_1_thread": []}
    with tempfile.TemporaryDirectory(prefix="screen-shard-") as tmp:
        tmp = Path(tmp)
        data = synthetic(tmp / "syn.jsonl", n)
        plan = [(kind, r) for r in range(repeats) for kind in ("single", "sharded")] + [("single_1_thread", 0)]
        for kind, repeat in plan:
            out = tmp / f"{kind}-{repeat}"
            args = screen_command(data, out, layer, ["--chunk-size", str(chunk_size)])
            env = {**os.environ}
            if kind == "sharded":
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--local-addr", "127.0.0.1", "-m", "guard.cli.main", *args]
            else:
                command = [str(VENV_BIN / "persona-guard"), *args]
                if kind == "single_1_thread":
                    env["OMP_NUM_THREADS"] = "1"
            log(f"{kind} run {repeat + 1} on {n} samples")
            result = measured(command, env, tmp / f"log-{kind}-{repeat}.txt")
            runs[kind].append(result)
            log(f"  {result['wall_s']:.1f} s, peak {result['max_rss_mb']:.0f} MB")

        def compare(a: str, b: str) -> dict:
            rows_a = [json.loads(line) for line in (tmp / a / "report.jsonl").read_text().splitlines()]
            rows_b = {r["id"]: r for r in map(json.loads, (tmp / b / "report.jsonl").read_text().splitlines())}
            return {"identical_bytes": all((tmp / a / f).read_bytes() == (tmp / b / f).read_bytes()
                                           for f in ("report.jsonl", "report.csv")),
                    "same_keep": (tmp / f"{a}.keep.jsonl").read_bytes() == (tmp / f"{b}.keep.jsonl").read_bytes(),
                    "max_score_diff": max(abs(r["scores"]["sycophancy"]["score"]
                                              - rows_b[r["id"]]["scores"]["sycophancy"]["score"]) for r in rows_a)}

        comparison = {"sharded_vs_single_1_thread": compare("sharded-0", "single_1_thread-0"),
                      "sharded_vs_single": compare("sharded-0", "single-0"),
                      "sharded_vs_sharded": compare("sharded-0", f"sharded-{repeats - 1}")}
    return {"samples": n, "layer": layer, "chunk_size": chunk_size, "runs": runs, "comparison": comparison}


# -- dtype -------------------------------------------------------------------------------------------

def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def part_dtype(repeats: int, log, full_samples: int = 64, full_tokens: int = 48) -> dict:
    import torch

    from guard.core.models import load_model
    from guard.core.vectors import PersonaVector
    from guard.screen.samples import load_samples
    from guard.screen.scoring import ScreenConfig, Screener

    layer = vector_layer()
    vector = PersonaVector.load(VECTOR)
    samples = load_samples(MIXED).samples
    dtypes = ["float32", "bfloat16", "float16"]
    models = {}
    for name in dtypes:
        model, tokenizer, _ = load_model(None, dtype=name)
        models[name] = model
    for name in dtypes:
        # A float16 load fails the vector's weights check (the fingerprint rounds float16 weights to
        # bfloat16 differently from float32 ones), so it is accepted as --allow-other-weights would.
        vector.check_model(models[name], allow_other_weights=name == "float16")
    config = ScreenConfig(mode="approx")
    scores, times, tokens = {}, {d: [] for d in dtypes}, 0
    for repeat in range(repeats):
        for name in dtypes:
            screener = Screener(models[name], tokenizer, [vector], config, layers=[layer])
            start = time.perf_counter()
            result = screener.score(samples)
            times[name].append(time.perf_counter() - start)
            scores[name] = result
            tokens = sum(s.prompt_tokens + s.response_tokens for s in result.samples)
            log(f"{name} repeat {repeat + 1}: {times[name][-1]:.1f} s ({tokens / times[name][-1]:.0f} tokens/s)")
    key = scores["float32"].keys[0].name
    out = {"samples": len(samples), "tokens": tokens, "layer": layer, "repeats": repeats,
           "cpu": {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
                   "amx_fp16": torch.cpu._is_amx_fp16_supported(), "capability": torch.backends.cpu.get_cpu_capability()},
           "rows": []}
    for name in dtypes:
        fields = {}
        for field in ("approx", "projection"):
            reference = [s.scores[key][field] for s in scores["float32"].samples]
            values = [s.scores[key][field] for s in scores[name].samples]
            fields[field] = spearman(reference, values)
            fields[f"{field}_max_abs_diff"] = max(abs(x - y) for x, y in zip(reference, values))
        best = min(times[name])
        out["rows"].append({"dtype": name, "best_s": best, "tokens_per_s": tokens / best, **fields})
    out["threads"] = torch.get_num_threads()
    if not full_samples:
        return out
    # Full mode on a subset: base responses generated in each dtype (greedy), then ΔP.
    subset = samples[:full_samples]
    full = ScreenConfig(mode="full", max_new_tokens=full_tokens)
    deltas, out["full"] = {}, {"samples": len(subset), "max_new_tokens": full_tokens, "rows": []}
    with tempfile.TemporaryDirectory(prefix="screen-dtype-") as tmp:
        for name in dtypes:
            screener = Screener(models[name], tokenizer, [vector], full, layers=[layer],
                                generation_cache=Path(tmp) / f"{name}.sqlite")
            start = time.perf_counter()
            result = screener.score(subset)
            seconds = time.perf_counter() - start
            deltas[name] = [s.scores[key]["delta_p"] for s in result.samples]
            same = [i for i, (a, b) in enumerate(zip(deltas["float32"], deltas[name])) if a is not None and b is not None]
            out["full"]["rows"].append({
                "dtype": name, "seconds": seconds,
                "delta_p": spearman([deltas["float32"][i] for i in same], [deltas[name][i] for i in same])})
            log(f"{name} full mode on {len(subset)} samples: {seconds:.1f} s, Spearman ΔP "
                f"{out['full']['rows'][-1]['delta_p']:.4f}")
    return out


# -- the section ---------------------------------------------------------------------------------------

def render(state: dict) -> str:
    lines = ["## Screening at scale (embedded SmolLM2-135M-Instruct)", ""]
    lines.append(f"Machine: {state.get('machine', machine())}; shared with other engineers' jobs while measured, so "
                 "wall times are as measured there and ratios come from runs alternated in one invocation.")
    if "dtype" in state:
        d = state["dtype"]
        lines += ["", "### Forward dtype", "",
                  f"Command: `{d['command']}`. {d['samples']} samples of `benchmarks/data/screen_mixed.jsonl` "
                  f"({d['tokens']:,} real tokens), approximation mode, the sycophancy vector of "
                  f"`benchmarks/out/sycophancy.safetensors` at layer {d['layer']}; best of {d['repeats']} repeats, "
                  f"dtypes interleaved. CPU: AVX512-BF16 {d['cpu']['avx512_bf16']}, AMX {d['cpu']['amx']}, "
                  f"AMX-FP16 {d['cpu']['amx_fp16']} (torch capability {d['cpu']['capability']}).", "",
                  "| dtype | seconds | tokens/s | vs float32 | Spearman (approx score) | Spearman (projection) "
                  "| max abs diff (approx) |", "|---|---:|---:|---:|---:|---:|---:|"]
        base = next(r for r in d["rows"] if r["dtype"] == "float32")["tokens_per_s"]
        for r in d["rows"]:
            lines.append(f"| {r['dtype']} | {r['best_s']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x "
                         f"| {r['approx']:.5f} | {r['projection']:.5f} | {r['approx_max_abs_diff']:.3g} |")
        if "full" in d:
            f = d["full"]
            lines += ["", f"Full mode on the first {f['samples']} samples (base responses generated greedily in each "
                      f"dtype, up to {f['max_new_tokens']} tokens, then ΔP; one run each): "
                      + "; ".join(f"{r['dtype']} {r['seconds']:.0f} s, Spearman ΔP {r['delta_p']:.4f}" for r in f["rows"])
                      + ". float16 is accepted as `--allow-other-weights` would: a float16 load fails the vector's "
                      "weights check (its fingerprint rounds float16 weights to bfloat16 differently)."]
    for key in sorted(k for k in state if k.startswith("dtype_")):
        d = state[key]
        base = next(r for r in d["rows"] if r["dtype"] == "float32")["tokens_per_s"]
        lines += ["", f"The same with `OMP_NUM_THREADS={d['threads']}` (`{d['command']}` under that variable; "
                  f"best of {d['repeats']}): " + "; ".join(
                      f"{r['dtype']} {r['tokens_per_s']:.0f} tokens/s ({r['tokens_per_s'] / base:.2f}x), Spearman "
                      f"{r['approx']:.5f}" for r in d["rows"]) + "."]
    if "memory" in state:
        m = state["memory"]
        lines += ["", "### Memory and wall time against data size", "",
                  f"Command: `{m['command']}`. Each size in its own subprocess: `persona-guard screen SYN.jsonl "
                  f"--mode approx --layer {m['layer']} --threshold p95 --keep ... --chunk-size {m['chunk_size']}` "
                  "(default dtype, histograms and report.html on); peak memory is `ru_maxrss` of that process "
                  "(`os.wait4`), wall time includes loading the model. Synthetic samples: a one-line question and a "
                  "one-sentence answer.", "",
                  "| samples | real tokens | wall s | peak MB | peak vs smallest |", "|---:|---:|---:|---:|---:|"]
        first = m["rows"][0]["max_rss_mb"]
        for r in m["rows"]:
            mark = " (extrapolated)" if r["extrapolated"] else ""
            tokens = f"{r['tokens']:,}" if "tokens" in r else "-"
            lines.append(f"| {r['samples']:,}{mark} | {tokens} | {r['wall_s']:.0f} | {r['max_rss_mb']:.0f} "
                         f"| {100 * (r['max_rss_mb'] / first - 1):+.1f}% |")
        measured_rows = [r for r in m["rows"] if not r["extrapolated"]]
        if len(measured_rows) >= 2:
            a, b = measured_rows[0], measured_rows[-1]
            per = 1024 * 1024 * (b["max_rss_mb"] - a["max_rss_mb"]) / (b["samples"] - a["samples"])
            rate = (b["samples"] - a["samples"]) / (b["wall_s"] - a["wall_s"])
            lines += ["", f"From {a['samples']:,} to {b['samples']:,} samples the peak grows by "
                      f"{100 * (b['max_rss_mb'] / a['max_rss_mb'] - 1):+.1f}% ({per:.0f} bytes per added sample); "
                      f"the added samples screen at {rate:.1f} samples/s. Before chunked screening the issue measured "
                      "about 45 KB per sample (1.16 GB peak at 1k samples, 1.29 GB at 4k)."]
        if any(r["extrapolated"] for r in m["rows"]):
            lines.append(f"Extrapolated rows were not run: a linear fit of the measured wall times predicted more than "
                         f"the {m['budget_s'] / 60:.0f}-minute budget; their figures are that fit's (and the same fit "
                         "of peak memory), not measurements.")
    if "after_load" in state:
        a = state["after_load"]
        lines += ["", "### Memory once the model is loaded", "",
                  f"Command: `{a['command']}`. The peak above is set while the model loads (the embedded model is "
                  "read in float32 and converted), which would hide memory that grows with the data. So the same "
                  "command ran again per size with the peak-RSS counter reset right after loading "
                  "(`/proc/self/clear_refs`): the second column is the peak of loading, the third the RSS just after "
                  "it, the fourth the peak of everything after (scoring, merging, the report, the copies; the validating read of the data comes before loading).",
                  "", "| samples | load peak MB | RSS after load MB | peak after load MB | growth after load MB |",
                  "|---:|---:|---:|---:|---:|"]
        for r in a["rows"]:
            lines.append(f"| {r['samples']:,} | {r['load_peak_mb']:.0f} | {r['rss_after_load_mb']:.0f} "
                         f"| {r['after_load_peak_mb']:.0f} | {r['after_load_peak_mb'] - r['rss_after_load_mb']:.0f} |")
        if len(a["rows"]) >= 2:
            lo, hi = a["rows"][0], a["rows"][-1]
            lines += ["", f"After loading, the peak at {hi['samples']:,} samples is "
                      f"{100 * (hi['after_load_peak_mb'] / lo['after_load_peak_mb'] - 1):+.1f}% of the one at "
                      f"{lo['samples']:,} ({hi['after_load_peak_mb'] - lo['after_load_peak_mb']:+.0f} MB; chunks of "
                      f"{a['chunk_size']} samples, so {lo['samples']:,} samples are one partial chunk)."]
    if "shard" in state:
        s = state["shard"]
        lines += ["", "### Two processes against one", "",
                  f"Command: `{s['command']}`. {s['samples']:,} synthetic samples in chunks of {s['chunk_size']}, the "
                  "same `screen` arguments as above: a single process (torch's default threads, 2) alternated with "
                  "`torchrun --standalone --nproc-per-node 2 -m guard.cli.main screen` (one thread per process, "
                  "gloo), then once a single process with `OMP_NUM_THREADS=1`. Peak memory of a sharded run is its "
                  "largest process's.", "", "| run | wall s | peak MB |", "|---|---:|---:|"]
        for kind in ("single", "sharded", "single_1_thread"):
            for i, r in enumerate(s["runs"][kind], start=1):
                lines.append(f"| {kind.replace('_', ' ')} #{i} | {r['wall_s']:.1f} | {r['max_rss_mb']:.0f} |")
        ratio = [a["wall_s"] / b["wall_s"] for a, b in zip(s["runs"]["single"], s["runs"]["sharded"])]
        c = s["comparison"]

        def said(entry):
            return (("byte-identical reports" if entry["identical_bytes"] else "reports not byte-identical")
                    + f", {'the same' if entry['same_keep'] else 'a different'} --keep file, largest score difference "
                    f"{entry['max_score_diff']:.2g}")

        lines += ["", "Single-process wall time over sharded: " + ", ".join(f"{r:.2f}x" for r in ratio)
                  + " (2 cores either way). Sharded against the one-thread single process: "
                  + said(c["sharded_vs_single_1_thread"]) + "; against the two-thread single process: "
                  + said(c["sharded_vs_single"]) + " (another thread count rounds differently; in bfloat16 that is "
                  "bfloat16's resolution); sharded against sharded: " + said(c["sharded_vs_sharded"]) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if len(sys.argv) > 2 and sys.argv[1] == "--driver":  # internal: one measured screen (part_after_load)
        driver(sys.argv[2], sys.argv[4:])
        return
    parser.add_argument("--parts", nargs="+", choices=["memory", "after_load", "shard", "dtype"],
                        default=["memory", "after_load", "shard", "dtype"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000, 100000])
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds a memory-part size may take")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--shard-repeats", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="dtype part: repeats per dtype")
    parser.add_argument("--full-samples", type=int, default=64, help="dtype part: full-mode samples (0: none)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    # --no-write changes where the section goes, not what is measured: not part of the command shown.
    command = "python benchmarks/screen_scale.py " + " ".join(a for a in sys.argv[1:] if a != "--no-write")
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    state = load_state()
    state["machine"] = machine()
    if "dtype" in args.parts:
        import torch

        key = "dtype" if "OMP_NUM_THREADS" not in os.environ else f"dtype_{torch.get_num_threads()}_threads"
        state[key] = {**part_dtype(args.repeats, log, full_samples=args.full_samples), "command": command}
        save_state(state)
    if "memory" in args.parts:
        state["memory"] = {**part_memory(args.sizes, args.budget, args.chunk_size, log), "command": command}
        save_state(state)
    if "after_load" in args.parts:
        sizes = [n for n in args.sizes if not any(r["samples"] == n and r["extrapolated"]
                                                  for r in state.get("memory", {}).get("rows", []))]
        state["after_load"] = {**part_after_load(sizes, args.chunk_size, log), "command": command}
        save_state(state)
    if "shard" in args.parts:
        state["shard"] = {**part_shard(args.shard_size, args.shard_repeats, args.chunk_size, log), "command": command}
        save_state(state)
    body = render(state)
    if args.no_write:
        print(body)
    else:
        write_section("screen_scale", body)
        print(body)


if __name__ == "__main__":
    main()
