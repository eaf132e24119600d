"""Wall-time overhead of PersonaDriftCallback at its default cadence, on the embedded model.

Runs the same LoRA SFT steps (TRL SFTTrainer, same data, same seed) in one process: a short
untimed warm-up, then alternately without the callback and with it at its default settings
(a reading on every logging step, here every 50 steps, the sycophancy evaluation questions as
probes, plus the base reference at train begin), twice each, so warm-up and drift in machine speed do not favour either side.
Reports the ratio of training wall times per pair and overall, and the time spent in probes as
the callback itself measured it (the part of the difference that is the callback's own work).

    .venv/bin/python benchmarks/drift_overhead.py --steps 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import machine, write_section  # noqa: E402

import sycophancy_data  # noqa: E402

from guard import PersonaVector, load_model  # noqa: E402
from guard.callbacks import PersonaDriftCallback, attach  # noqa: E402


def run(steps: int, batch_size: int, callbacks, out: str) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, _ = load_model()
    conversations = sycophancy_data.build(0)["trait"]
    config = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=1e-4,
                       logging_steps=50, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                       activation_checkpointing=False, seed=0, max_length=96, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"messages": conversations}),
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                         callbacks=callbacks)
    attach(trainer)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vector", type=Path, default=Path(__file__).parent / "out" / "sycophancy.safetensors")
    args = parser.parse_args()
    vector = PersonaVector.load(args.vector)
    rows, plain_times, watched_times, probe_times = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        run(5, args.batch_size, [], tmp)  # warm-up: allocator, threads, first-call costs
        for repeat in range(2):
            plain = run(args.steps, args.batch_size, [], tmp)
            drift = PersonaDriftCallback([vector])
            watched = run(args.steps, args.batch_size, [drift], tmp)
            plain_times.append(plain)
            watched_times.append(watched)
            probe_times.append(drift.probe_seconds)
            rows.append(f"| {repeat + 1} | {plain:.1f} s | {watched:.1f} s | {watched / plain:.3f} | "
                        f"{len(drift.history)} (+ base reference) | {drift.probe_seconds:.1f} s |")
    ratio = sum(watched_times) / sum(plain_times)
    probe_share = sum(probe_times) / sum(plain_times)
    table = "\n".join(["| pair | without callback | with PersonaDriftCallback | ratio | measurements | time in probes |",
                       "|---:|---:|---:|---:|---:|---:|", *rows])
    text = (f"{table}\n\nOverall ratio of wall times: **{ratio:.3f}** ({ratio - 1:+.1%}); the callback's own probe "
            f"time is **{probe_share:.1%}** of the runs without it. Differences between pairs show the machine's "
            "noise at this run length.")
    print(text)
    write_section("drift_overhead", "\n".join([
        "## Drift monitoring overhead (embedded SmolLM2-135M-Instruct)", "",
        f"Command: `.venv/bin/python benchmarks/drift_overhead.py --steps {args.steps} --batch-size {args.batch_size}` "
        f"on {machine()}.", "",
        f"The same {args.steps} LoRA SFT steps (TRL SFTTrainer, batch {args.batch_size}, the demo's sycophantic data, "
        "seed 0) in one process, without and with PersonaDriftCallback at its defaults (25 probe prompts, on every "
        "logging step: every 50 steps, plus the base reference at train begin and a final measurement).", "", text]))


if __name__ == "__main__":
    main()
