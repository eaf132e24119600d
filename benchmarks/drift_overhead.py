"""Wall-time overhead of PersonaDriftCallback at its default cadence, on the embedded model.

Runs the same LoRA SFT steps (TRL SFTTrainer, same data, same seed) twice in one process:
without the callback, and with it at its default settings (every 50 steps, the sycophancy
evaluation questions as probes, plus the base reference at train begin). Reports the ratio of
training wall times, and the time spent in probes as the callback itself measured it.

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
from _results import machine, write_section  # noqa: E402

import sycophancy_data  # noqa: E402

from guard import PersonaVector, load_model  # noqa: E402
from guard.callbacks import PersonaDriftCallback  # noqa: E402


def run(steps: int, batch_size: int, callbacks, out: str) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, _ = load_model()
    conversations = sycophancy_data.build(0)["sycophantic"]
    config = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=1e-4,
                       logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                       activation_checkpointing=False, seed=0, max_length=96, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"messages": conversations}),
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                         callbacks=callbacks)
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
    with tempfile.TemporaryDirectory() as tmp:
        plain = run(args.steps, args.batch_size, [], tmp)
        drift = PersonaDriftCallback([vector])
        watched = run(args.steps, args.batch_size, [drift], tmp)
    measurements = len(drift.history)
    overhead = watched / plain - 1
    table = "\n".join([
        "| run | wall time | probes | time in probes |", "|---|---:|---:|---:|",
        f"| without callback | {plain:.1f} s | - | - |",
        f"| PersonaDriftCallback, default cadence (every 50 steps) | {watched:.1f} s | {measurements} (+ base reference) "
        f"| {drift.probe_seconds:.1f} s |"])
    text = (f"{table}\n\nOverhead: **{overhead:+.1%}** of training wall time (ratio {watched / plain:.3f}); "
            f"the callback's own probe time is {drift.probe_seconds / plain:.1%} of the plain run.")
    print(text)
    write_section("drift_overhead", "\n".join([
        "## Drift monitoring overhead (embedded SmolLM2-135M-Instruct)", "",
        f"Command: `.venv/bin/python benchmarks/drift_overhead.py --steps {args.steps} --batch-size {args.batch_size}` "
        f"on {machine()}.", "",
        f"The same {args.steps} LoRA SFT steps (TRL SFTTrainer, batch {args.batch_size}, the demo's sycophantic data, "
        "seed 0) in one process, without and with PersonaDriftCallback at its defaults (25 probe prompts, every 50 "
        "steps, plus the base reference at train begin and a final measurement).", "", text]))


if __name__ == "__main__":
    main()
