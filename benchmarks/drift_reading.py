"""Which drift reading separates a trait-inducing finetune from a harmless one at every step?
(Issue "Prove the loop", part d.)

The callback's raw reading, the paper's finetuning shift (mean last-prompt-token activation on
the trait's evaluation questions, current minus base, on the unit vector), jumps in the first
steps of *any* LoRA finetune on the demo's data: the harmless run reads almost as high as the
trait-inducing one at step 5 and only decays later. This script reads the raw activations that
``benchmarks/loop.py`` saves per run (``acts.npz``: every 5 steps, the activation of each probe
prompt at the vector's layer, and the evaluation and control prompt means at every layer) and
compares candidate readings on the neutral (0%) and trait-inducing (100%) mixtures of each seed:

* ``raw``: the shift as logged today;
* ``control``: the shift on the evaluation questions minus the shift on ordinary control questions
  (NEUTRAL_QA), along the vector: a change every prompt shares is not the trait's;
* ``mean_removed``: the shift along the vector with its component along the base model's mean
  probe activation removed (activation growth moves every direction that has a mean component);
* ``generic_removed``: the shift along the vector with the direction of the control prompts' own
  shift removed first (whatever the finetune does to every prompt, taken out of the vector).
* ``cosine``, ``cosine_control``: the cosine between the vector and the shift of the evaluation
  prompts' mean (minus the control prompts' shift): how much of the change points along the
  vector, whatever its size.

Per reading and step: the two runs' values, in units of ||v|| (shift_frac, as warn_at/stop_at
read), and whether a threshold exists that lies between them at every logged step.

    .venv/bin/python benchmarks/drift_reading.py --trait evil [--record]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, write_section  # noqa: E402

from guard.core.vectors import PersonaVector  # noqa: E402

LOOP = OUT / "loop"


def load_runs(trait: str, settings: str) -> dict:
    runs = {}
    for path in sorted((LOOP / "runs" / trait).glob("seed*/*/acts.npz")):
        seed, name = int(path.parent.parent.name[4:]), path.parent.name
        z = np.load(path)
        runs[(seed, name)] = {k: z[k] for k in z.files}
    return runs


def unit_vector(trait: str, layer: int) -> tuple[np.ndarray, float]:
    v = PersonaVector.load(OUT / f"{trait}.safetensors").layer(layer).double().numpy()
    return v / np.linalg.norm(v), float(np.linalg.norm(v))


def readings(run: dict, unit: np.ndarray, norm: float) -> dict[str, np.ndarray]:
    """Each candidate reading per recorded step (step 0 = base), in units of ||v||."""
    layer = int(run["layer"])
    means = run["means"].astype(np.float64)  # (steps, layers, 2 = eval/control, d)
    ev, ctl = means[:, layer, 0], means[:, layer, 1]
    d_ev, d_ctl = ev - ev[0], ctl - ctl[0]
    out = {"raw": d_ev @ unit, "control": (d_ev - d_ctl) @ unit}
    m = ev[0] / np.linalg.norm(ev[0])
    u_perp = unit - m * (m @ unit)
    out["mean_removed"] = d_ev @ u_perp
    gen = []
    for t in range(len(d_ev)):
        c = d_ctl[t]
        if np.linalg.norm(c) < 1e-9:
            gen.append(0.0)
            continue
        c = c / np.linalg.norm(c)
        gen.append(float(d_ev[t] @ (unit - c * (c @ unit))))
    out["generic_removed"] = np.array(gen)
    out = {k: v / norm for k, v in out.items()}
    # Scale-free: how much of the change points along v (an early overshoot of any finetune is
    # large but points elsewhere).
    def cosine(a):
        return np.array([0.0 if np.linalg.norm(x) < 1e-9 else float(x @ unit / np.linalg.norm(x)) for x in a])
    out["cosine"] = cosine(d_ev)
    out["cosine_control"] = cosine(d_ev - d_ctl)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trait", default="evil")
    parser.add_argument("--neutral", default="mix000")
    parser.add_argument("--inducing", default="mix100")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    runs = load_runs(args.trait, "")
    seeds = sorted({s for s, n in runs if n == args.neutral} & {s for s, n in runs if n == args.inducing})
    if not seeds:
        raise SystemExit(f"no {args.neutral}/{args.inducing} acts.npz under {LOOP / 'runs' / args.trait}")
    layer = int(runs[(seeds[0], args.neutral)]["layer"])
    unit, norm = unit_vector(args.trait, layer)
    lines = [f"## Drift readings that separate the runs at every step ({args.trait})", "",
             f"Command: `python benchmarks/drift_reading.py --trait {args.trait} --inducing {args.inducing}` on the raw activations saved by "
             f"`benchmarks/loop.py` (runs {args.neutral}: harmless, {args.inducing}: trait-inducing; layer {layer}, "
             f"||v|| = {norm:.2f}). Values in units of ||v|| (shift_frac, what warn_at / stop_at compare), at every "
             "recorded step after 0.", ""]
    summary = {}
    for seed in seeds:
        neutral = readings(runs[(seed, args.neutral)], unit, norm)
        inducing = readings(runs[(seed, args.inducing)], unit, norm)
        steps = runs[(seed, args.neutral)]["steps"].tolist()
        lines += [f"### seed {seed}", "", "| reading | run | " + " | ".join(f"step {s}" for s in steps[1:]) + " |",
                  "|---|---|" + "---:|" * (len(steps) - 1)]
        for name in neutral:
            for label, values in ((args.neutral, neutral[name]), (args.inducing, inducing[name])):
                lines.append(f"| {name} | {label} | " + " | ".join(f"{v:+.3f}" for v in values[1:]) + " |")
            gap = float(np.min(inducing[name][1:]) - np.max(neutral[name][1:]))
            summary.setdefault(name, []).append((gap, float(np.max(neutral[name][1:])), float(np.min(inducing[name][1:]))))
        lines.append("")
    lines += ["| reading | " + " | ".join(f"seed {s}: min inducing - max neutral" for s in seeds) + " | separates at every step |",
              "|---|" + "---:|" * len(seeds) + "---|"]
    for name, per_seed in summary.items():
        ok = all(g > 0 for g, _, _ in per_seed)
        lines.append(f"| {name} | " + " | ".join(f"{g:+.3f} ({lo:+.3f} vs {hi:+.3f})" for g, lo, hi in per_seed)
                     + f" | {'yes' if ok else 'no'} |")
    body = "\n".join(lines)
    print(body)
    if args.record:
        write_section(f"drift_reading_{args.trait}", body)


if __name__ == "__main__":
    main()
