"""GPU check: the CPU benchmarks' measurements, shortened, on one CUDA device in bfloat16.

Runs, on the model given (default the embedded SmolLM2-135M-Instruct):

1. extraction of the sycophancy vector with the ``fast`` preset, then layer selection: wall
   times (CPU: benchmarks/extraction.py, ``--fast`` row);
2. screening in approximation mode over benchmarks/data/screen_eval.jsonl: ours against a
   batch-1 loop computing the same numbers the reference way and against the raw forward of the
   model alone, best of ``--repeats`` (CPU: benchmarks/screening.py, "Throughput");
3. a short LoRA SFT (TRL) without and with PersonaDriftCallback and PreventativeSteeringCallback
   attached: the ratio of wall times and the probes' share (CPU: benchmarks/drift_overhead.py);
4. a few EPO iterations, ours (prefix KV cache, batched candidates) against the straightforward
   evaluation (one full forward per candidate and context): iterations per second
   (CPU: benchmarks/optimizer.py).

It prints timings and ratios and records nothing. With no CUDA device it exits at once, status 2,
saying so (``--device cpu`` runs the same steps on the CPU, to check the script itself).

    .venv/bin/python benchmarks/gpu_check.py                      # about 2-4 minutes on one recent GPU
    .venv/bin/python benchmarks/gpu_check.py --model Qwen/Qwen2.5-7B-Instruct --steps 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from common import machine, raw_forward, reference_projections, straightforward_scores  # noqa: E402

from guard.core.models import load_model  # noqa: E402
from guard.extract.extraction import ExtractionConfig, extract_vector  # noqa: E402
from guard.extract.selection import select_and_record  # noqa: E402
from guard.harden.hardening import away_from, in_context_check, system_slot  # noqa: E402
from guard.harden.optimize import EPO, EPOConfig  # noqa: E402
from guard.screen.samples import load_samples  # noqa: E402
from guard.screen.scoring import ScreenConfig, Screener  # noqa: E402
from guard.traits import load_trait  # noqa: E402

DATA = HERE / "data" / "screen_eval.jsonl"


def clock(device: torch.device) -> float:
    """Wall time after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def say(message: str) -> None:
    print(message, flush=True)


# -- 1. extraction -----------------------------------------------------------------------------

def extraction(model, tokenizer, device):
    trait = load_trait("sycophancy")
    started = clock(device)
    vector = extract_vector(model, tokenizer, trait, ExtractionConfig.preset("fast")).vector
    extracted = clock(device)
    selection = select_and_record(model, tokenizer, vector, trait)
    selected = clock(device)
    say(f"extraction, fast preset: {extracted - started:.1f} s; layer selection: {selected - extracted:.1f} s "
        f"-> layer {vector.default_layer()} (CPU, embedded model: 65 s for extract --fast, 75-90 s for selection)")
    del selection
    return vector


# -- 2. screening, approximation mode ------------------------------------------------------------

def screening(model, tokenizer, vector, device, repeats: int):
    samples = load_samples(DATA).samples
    config = ScreenConfig(mode="approx")
    screener = Screener(model, tokenizer, [vector], config)
    model.eval()
    screener.score(samples[:16])  # warm-up: kernels, allocator
    timings = {"ours": [], "batch-1": [], "raw": []}
    ours = reference = None
    for _ in range(repeats):  # interleaved, as on the CPU
        started = clock(device)
        ours = screener.score(samples)
        timings["ours"].append(clock(device) - started)
        started = clock(device)
        reference = [mean - last for (mean, last), in reference_projections(model, tokenizer, samples, [vector], device)]
        timings["batch-1"].append(clock(device) - started)
        started = clock(device)
        raw_forward(model, tokenizer, samples, config, device)
        timings["raw"].append(clock(device) - started)
    best = {name: min(values) for name, values in timings.items()}
    diff = max(abs(s.scores[vector.trait]["approx"] - r) for s, r in zip(ours.samples, reference))
    say(f"screening, approx mode, {len(samples)} samples: ours {best['ours']:.2f} s, batch-1 loop {best['batch-1']:.2f} s, "
        f"raw forward {best['raw']:.2f} s -> ours vs batch-1 {best['batch-1'] / best['ours']:.1f}x, vs raw forward "
        f"{best['raw'] / best['ours']:.2f}x; largest difference from the batch-1 numbers {diff:.1e} (bfloat16) "
        "(CPU: 2.3x and 1.80x)")


# -- 3. LoRA finetune with both callbacks --------------------------------------------------------

def finetune(model_id, dtype, device, vector, steps: int, batch_size: int) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    import sycophancy_data
    from guard.callbacks import PersonaDriftCallback, PreventativeSteeringCallback, attach

    def run(n_steps: int, with_callbacks: bool):
        model, tokenizer, _ = load_model(model_id, dtype=dtype, device=device)
        callbacks = ([PersonaDriftCallback([vector], n_random=8), PreventativeSteeringCallback(vector, 2.0)]
                     if with_callbacks else [])
        with tempfile.TemporaryDirectory() as out:
            config = SFTConfig(output_dir=out, max_steps=n_steps, per_device_train_batch_size=batch_size,
                               learning_rate=1e-4, logging_steps=10, save_strategy="no", report_to="none",
                               bf16=dtype == "bfloat16", use_cpu=device.type == "cpu", seed=0, max_length=96,
                               disable_tqdm=True)
            trainer = attach(SFTTrainer(model=model, args=config, processing_class=tokenizer,
                                        train_dataset=Dataset.from_dict({"messages": sycophancy_data.build(0)["trait"]}),
                                        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                                        callbacks=callbacks))
            started = clock(device)
            trainer.train()
            return clock(device) - started, callbacks

    run(3, False)  # warm-up
    plain, _ = run(steps, False)
    watched, (drift, steer) = run(steps, True)
    final = drift.history[-1][f"persona/{vector.trait}/shift"]
    say(f"LoRA SFT, {steps} steps, batch {batch_size}: {plain:.1f} s without callbacks, {watched:.1f} s with drift "
        f"monitoring and preventative steering -> ratio {watched / plain:.3f}; probes {drift.probe_seconds:.1f} s "
        f"({drift.probe_seconds / plain:.1%}) over {len(drift.history)} readings, {steer.steered_forwards} steered "
        f"forwards, final shift {final:+.3f} (CPU, drift callback alone: ratio 1.000, probes 2.0%)")


# -- 4. EPO ------------------------------------------------------------------------------------

class CountingEPO(EPO):
    """Counts candidate evaluations (one per iteration, plus the initial population)."""

    evaluations = 0

    def _evaluate(self, forward, ids):
        self.evaluations += 1
        return self._evaluate_impl(forward, ids)

    def _evaluate_impl(self, forward, ids):
        return EPO._evaluate(self, forward, ids)


class StraightforwardEPO(CountingEPO):
    """The same search, each candidate and context evaluated by its own full forward (the prefix
    recomputed every time, full logits)."""

    def _evaluate_impl(self, forward, ids):
        return straightforward_scores(self, ids)


def epo(model, tokenizer, vector, device, iterations: int):
    layer = vector.default_layer()
    questions = list(load_trait("sycophancy").extraction_questions[:2])
    slot = system_slot(tokenizer, questions)
    check = in_context_check(tokenizer, slot, questions[0], "system")
    config = EPOConfig.preset("medium", iterations=iterations, population=8, children_per_member=8, seed=0)
    rates = {}
    for name, cls in (("ours", CountingEPO), ("straightforward", StraightforwardEPO)):
        search = cls(model, tokenizer, away_from(vector.layer(layer)), layer, slot, config, validate=check)
        started = clock(device)
        search.run()
        seconds = clock(device) - started
        rates[name] = search.evaluations / seconds
        say(f"EPO {name}: {search.evaluations} evaluations of 64 candidates x 2 contexts in {seconds:.1f} s "
            f"({rates[name]:.3f}/s)")
    say(f"EPO: ours runs {rates['ours'] / rates['straightforward']:.1f}x the iterations per second of the "
        "straightforward evaluation (CPU: 2.2x)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N; cpu only to check the script itself")
    parser.add_argument("--steps", type=int, default=30, help="LoRA SFT steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="screening repeats (best of)")
    parser.add_argument("--epo-iterations", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print(f"gpu_check: {torch.cuda.get_device_name(device)} does not support bfloat16; this check runs in bfloat16",
              file=sys.stderr)
        return 2
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"gpu_check on {where} ({machine()}), {dtype}, model {args.model or 'embedded SmolLM2-135M-Instruct'}")
    model, tokenizer, _ = load_model(args.model, dtype=dtype, device=device)
    vector = extraction(model, tokenizer, device)
    screening(model, tokenizer, vector, device, args.repeats)
    epo(model, tokenizer, vector, device, args.epo_iterations)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    finetune(args.model, dtype, device, vector, args.steps, args.batch_size)
    if device.type == "cuda":
        say(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
