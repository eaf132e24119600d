"""The screening HTML report, opened in a browser: screens the mixed dataset, writes report.html
and takes a headless-Chromium screenshot of it.

benchmarks/data/screen_mixed.jsonl holds 372 samples: 40 trait-expressing and 40 normal
responses per trait (sycophancy, evil, hallucination) and 132 benign ones. They are screened in
approx mode (no generation) with the evil vector at its recommended layer (benchmarks/out,
extracted on first use: about 5 minutes on 2 CPU cores), threshold p90, and report.html shades
the response tokens of the highest-scoring samples. Checked here, without a browser: each
sample's mean token reading equals its approx score. With chromium on PATH the page is
screenshotted (1200x1600) and saved, palette-reduced, as benchmarks/screen_html.png.

    .venv/bin/python benchmarks/screen_html.py                 # the embedded model; writes RESULTS.md
    .venv/bin/python benchmarks/screen_html.py --tiny          # a tiny random model, seconds; no RESULTS
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, machine, vector_with_layer, write_section  # noqa: E402

from guard.core.vectors import PersonaVector, metadata_for  # noqa: E402
from guard.screen.explain import token_readings  # noqa: E402
from guard.screen.pipeline import screen  # noqa: E402
from guard.screen.samples import load_samples  # noqa: E402
from guard.screen.scoring import ScreenConfig  # noqa: E402

HERE = Path(__file__).parent
DATA = HERE / "data" / "screen_mixed.jsonl"
SCREENSHOT = HERE / "screen_html.png"
MAX_PNG_BYTES = 300_000


def tiny_model(traits):
    """A tiny random Llama with SmolLM2's tokenizer and random vectors (mechanics only)."""
    import transformers

    from guard.core.models import embedded_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(config).eval()
    vectors = []
    for seed, trait in enumerate(traits):
        meta = metadata_for(model, trait, recommended_layer=1)
        vectors.append(PersonaVector(torch.randn(meta.num_layers, meta.hidden_size,
                                                 generator=torch.Generator().manual_seed(seed)), meta))
    return model, tokenizer, vectors


def screenshot(page: Path, target: Path, log) -> Path | None:
    """Headless Chromium's screenshot of ``page``, palette-reduced (or cropped) to at most
    MAX_PNG_BYTES, written to ``target``; None when chromium is not on PATH."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        log("chromium is not on PATH: no screenshot (Debian: apt-get install chromium)")
        return None
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.png"
        # A throwaway profile and no background services: nothing is fetched, nothing kept. The
        # virtual-time budget lets the page finish painting (without it the last block can be half drawn).
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
                        f"--screenshot={raw}", "--window-size=1200,1600", page.resolve().as_uri()],
                       check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from PIL import Image

        image = Image.open(raw).convert("RGB")
        target.parent.mkdir(parents=True, exist_ok=True)
        for colours, height in ((256, image.height), (128, image.height), (64, image.height), (64, 1000)):
            image.crop((0, 0, image.width, height)).quantize(colors=colours).save(target, optimize=True)
            if target.stat().st_size <= MAX_PNG_BYTES:
                break
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and random vectors (seconds)")
    parser.add_argument("--traits", nargs="+", default=None,
                        help="vectors to screen with (default: evil; with --tiny: sycophancy evil, for the scatter)")
    parser.add_argument("--top", type=int, default=10, help="samples explained per trait")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default: benchmarks/out/screen_html)")
    args = parser.parse_args()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    traits = args.traits or (["sycophancy", "evil"] if args.tiny else ["evil"])
    out = args.out or OUT / ("screen_html_tiny" if args.tiny else "screen_html")
    if args.tiny:
        model, tokenizer, vectors = tiny_model(traits)
        model_label = "a tiny random Llama (SmolLM2's tokenizer), random vectors"
    else:
        from guard.core.models import load_model

        model, tokenizer, _ = load_model()
        vectors = [vector_with_layer(model, tokenizer, trait, log) for trait in traits]
        model_label = "the embedded SmolLM2-135M-Instruct"
    source = load_samples(DATA)
    labels = {json.loads(line)["id"]: json.loads(line) for line in DATA.read_text().splitlines() if line.strip()}
    started = time.perf_counter()
    run = screen(source, model, tokenizer, vectors, ScreenConfig(mode="approx", score="approx"), thresholds={None: "p90"},
                 out_dir=out, restart=True, explain_top=args.top, progress=True, warn=log)
    seconds = time.perf_counter() - started
    page = run.report["html"]

    # The page's numbers, checked: each explained sample's mean token reading is its approx score.
    key = run.result.keys[0]
    top = sorted((s for s in run.result.samples if s.scores[key.name]["score"] is not None),
                 key=lambda s: -s.scores[key.name]["score"])[:args.top]
    readings = token_readings(model, tokenizer, [source.samples[s.index] for s in top], vectors[0], key.layer)
    gap = max(abs(r.mean - s.scores[key.name]["score"]) for r, s in zip(readings, top))
    kinds = [f"{labels[s.id]['kind']}/{labels[s.id]['role']}" for s in top]
    tokens = sorted(((v, t) for r in readings for t, v in zip(r.tokens, r.values)), reverse=True)[:8]
    print(f"report: {page} ({page.stat().st_size / 1000:.0f} kB), screened in {seconds:.0f} s")
    print(f"top {len(top)} by {key.name}: {', '.join(kinds)}; max |mean token reading - score| = {gap:.2e}")
    print("highest token readings: " + ", ".join(f"{t!r} {v:+.2f}" for v, t in tokens))

    target = SCREENSHOT if not args.tiny else out / "screenshot.png"
    shot = screenshot(page, target, log)
    if shot is not None:
        print(f"screenshot: {shot} ({shot.stat().st_size / 1000:.0f} kB)")
    if args.tiny:
        return
    trait_kinds = sum(k == f"{key.trait}/trait" for k in kinds)
    others = sorted({k for k in kinds if k != f"{key.trait}/trait"})
    refs = [r.reference for r in readings]
    positive = sum(v > 0 for r in readings for v in r.values) / sum(len(r.values) for r in readings)
    write_section("screen_html", "\n".join([
        "## Screening report in a browser (embedded SmolLM2-135M-Instruct)", "",
        f"Command: `.venv/bin/python benchmarks/screen_html.py` on {machine()}.", "",
        f"{len(source.samples)} samples of `benchmarks/data/screen_mixed.jsonl` screened in approx mode with the "
        f"{', '.join(f'{k.name} (layer {k.layer})' for k in run.result.keys)} vector, threshold p90, "
        f"`explain_top={args.top}`: {seconds:.0f} s in all, report.html "
        f"{page.stat().st_size / 1000:.0f} kB. Of the {len(top)} highest {key.name} scores, {trait_kinds} are "
        f"{key.trait}-expressing responses" + (f" (the others: {', '.join(others)})" if others else "")
        + f". Each shown sample's mean token reading equals its approx score (largest gap {gap:.1e}). The "
        f"reference, the last prompt token's projection, is {min(refs):+.1f} to {max(refs):+.1f} for these samples, "
        f"so {100 * positive:.0f}% of their tokens read positive (red): the page contrasts tokens by intensity. "
        "Highest single-token readings: "
        + ", ".join(f"`{t.strip() or repr(t)}` {v:+.1f}" for v, t in tokens) + ".", "",
        "Headless Chromium screenshot (1200×1600, palette-reduced): "
        + ("[benchmarks/screen_html.png](screen_html.png)." if shot else "not taken (chromium not on PATH)."),
    ]))
    log(f"wrote the screen_html section of {HERE / 'RESULTS.md'} ({model_label})")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
