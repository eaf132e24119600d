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
    # In units of the random floor (mean |shift| along random unit directions, the callback's
    # random_shift): an early step of any finetune moves every direction, the vector's among them.
    randoms = np.random.default_rng(0).standard_normal((16, unit.size))
    randoms /= np.linalg.norm(randoms, axis=1, keepdims=True)

    def over_floor(delta, along):
        floor = np.abs(delta @ randoms.T).mean(axis=1)
        return np.where(floor > 1e-9, along / np.maximum(floor, 1e-9), 0.0)
    out["raw_over_floor"] = over_floor(d_ev, d_ev @ unit)
    out["control_over_floor"] = over_floor(d_ev - d_ctl, (d_ev - d_ctl) @ unit)
    # Per prompt (the probe's own rows at the layer): the evaluation questions' shift along v against
    # the control questions' shift along v, in units of their pooled spread.
    n_eval = int(run["n_eval"])
    rows = run["at_layer"].astype(np.float64) @ unit  # (steps, prompts)
    moved = rows - rows[0]
    n_control = int(run["n_control"]) if "n_control" in run else moved.shape[1] - n_eval
    ev_rows, ctl_rows = moved[:, :n_eval], moved[:, n_eval:n_eval + n_control]
    spread = np.sqrt((ev_rows.var(axis=1, ddof=1) + ctl_rows.var(axis=1, ddof=1)) / 2)
    out["control_z"] = np.where(spread > 1e-9, (ev_rows.mean(1) - ctl_rows.mean(1)) / np.maximum(spread, 1e-9), 0.0)
    if "n_control" in run and rows.shape[1] >= n_eval * 3 + n_control:
        # The same evaluation questions under the trait's positive and negative system prompts,
        # read by the current model: its own instructed extremes, which any generic change of the
        # finetune moves as well.
        start = n_eval + n_control
        plain, pos, neg = rows[:, :n_eval].mean(1), rows[:, start:start + n_eval].mean(1), \
            rows[:, start + n_eval:start + 2 * n_eval].mean(1)
        position = (plain - neg) / np.maximum(pos - neg, 1e-9)
        out["instructed_position"] = position - position[0]
        out["minus_negative"] = ((plain - plain[0]) - (neg - neg[0])) / norm
        out["minus_instructed_mean"] = ((plain - plain[0]) - ((pos + neg) / 2 - (pos[0] + neg[0]) / 2)) / norm
    if "n_howto" in run:
        # Other control sets in place of the ordinary questions: practical how-to requests, and
        # everyday requests involving other people with no moral stakes (benchmarks/loop.py).
        X = run["at_layer"].astype(np.float64)
        D = X - X[0]
        start = n_eval * 3 + n_control
        sets = {"howto": slice(start, start + int(run["n_howto"])),
                "social": slice(start + int(run["n_howto"]), start + int(run["n_howto"]) + int(run["n_social"]))}
        ev_delta = D[:, :n_eval].mean(1)
        for name, rows_of in sets.items():
            c_delta = D[:, rows_of].mean(1)
            out[f"control_{name}"] = (ev_delta - c_delta) @ unit / norm
            removed = []
            for t in range(len(D)):
                c = c_delta[t]
                size = np.linalg.norm(c)
                removed.append(0.0 if size < 1e-9 else float(ev_delta[t] @ (unit - c / size * (c @ unit / size))))
            out[f"generic_removed_{name}"] = np.array(removed) / norm
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
