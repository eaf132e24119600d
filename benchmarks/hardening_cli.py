"""The SAE path through the command line, on the embedded model: what a user types.

1. `persona-guard sae train` on local text (the same corpus as benchmarks/hardening.py, written
   to benchmarks/out/sae-corpus.jsonl), at the sycophancy vector's recommended layer;
2. `persona-guard sae explain` for the sycophancy vector with that SAE;
3. `persona-guard harden --sae` (SAEGA) with it.

Each command runs in its own process, as a user would run it; wall times include model loading.

    .venv/bin/python benchmarks/hardening_cli.py        # about 12 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402
from hardening import OUT, corpus, latent_rows  # noqa: E402
from common import vector_with_layer  # noqa: E402

from guard.core.models import load_model  # noqa: E402


def run(args: list[str], log) -> tuple[float, str]:
    command = ["persona-guard", *args]
    log("$ " + " ".join(command))
    started = time.perf_counter()
    done = subprocess.run([shutil.which("persona-guard", path=str(Path(sys.executable).parent)) or "persona-guard",
                           *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-tokens", type=int, default=300_000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    model, tokenizer, _ = load_model()
    layer = vector_with_layer(model, tokenizer, "sycophancy", log).default_layer()  # extracted if missing
    vector_path = OUT / "sycophancy.safetensors"
    corpus_path = OUT / "sae-corpus.jsonl"
    texts = corpus(tokenizer)
    corpus_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    del model

    sae_dir, report_dir = OUT / "sae-cli", OUT / "harden-saega-cli"
    train_args = ["sae", "train", str(corpus_path), "--layer", str(layer), "--out", str(sae_dir),
                  "--training-tokens", str(args.training_tokens), "--json"]
    explain_args = ["sae", "explain", "--sae", str(sae_dir), "--vector", str(vector_path), "--text", str(corpus_path),
                    "--top", "5", "--snippets", "1", "--json"]
    harden_args = ["harden", "--vector", str(vector_path), "--sae", str(sae_dir), "--iterations", str(args.iterations),
                   "--population", "8", "--children", "8", "--contexts", "2", "--init-from-instruction",
                   "--out", str(report_dir), "--json"]
    train_s, train_out = run(train_args, log)
    explain_s, explain_out = run(explain_args, log)
    harden_s, _ = run(harden_args, log)
    stats = json.loads(train_out)
    found = json.loads(explain_out)["latents"]
    report = json.loads((report_dir / "harden.json").read_text())
    by = {c["name"]: c for c in report["conditions"]}

    show = lambda a: "persona-guard " + " ".join(a).replace(str(OUT), "benchmarks/out")  # noqa: E731
    lines = ["## The SAE path from the command line (embedded SmolLM2-135M-Instruct, sycophancy)", "",
             f"Command: `{('python benchmarks/hardening_cli.py ' + ' '.join(sys.argv[1:] if argv is None else argv)).strip()}`"
             f" on {machine()}. It writes the local corpus of `benchmarks/hardening.py` ({len(texts)} texts) to "
             "`benchmarks/out/sae-corpus.jsonl` and runs, each in its own process (times include loading the model):",
             "", "| command | seconds |", "|---|---:|",
             f"| `{show(train_args)}` | {train_s:.0f} |", f"| `{show(explain_args)}` | {explain_s:.0f} |",
             f"| `{show(harden_args)}` | {harden_s:.0f} |", "",
             f"SAE at layer {layer}: held-out variance explained {stats['variance_explained']:.3f}, "
             f"L0 {stats['l0']:.1f}, dead latents {stats['dead_fraction']:.1%}.", "",
             "Latents most aligned with the sycophancy vector:", "", "| latent | cosine | top-activating snippet |",
             "|---:|---:|---|"]
    lines += latent_rows(found)
    none = by["none"]["target"]
    lines += ["", f"SAEGA ({len(report['config']['latents'])} latents), target gain over no prompt on test questions: "
              f"optimised {by['optimised']['target'] - none:+.3f}, instruction {by['instruction']['target'] - none:+.3f}, "
              f"random-latent control {by['random-latent control']['target'] - none:+.3f}. Optimised prompt: "
              f"`{json.dumps(by['optimised']['prompt'])[1:-1]}`."]
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        write_section("hardening_cli", body)


if __name__ == "__main__":
    main()
