"""The drift plot beside the drift report: shift per measured step per trait, with the random floor."""

from __future__ import annotations

from pathlib import Path


def matplotlib_available() -> bool:
    """Whether matplotlib imports (an import, not a lookup: a broken install counts as absent)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_drift(report: dict, path: Path) -> Path:
    """Write ``path`` (PNG): one panel per trait, the shift along its vector at every measured
    step, a band of ± the mean |shift| along random directions (the noise floor), and the warn
    and stop events. Needs matplotlib (the ``train`` extra).

    Args:
        report: the drift report (:meth:`PersonaDriftCallback.report`): its ``vectors``, ``history``
            and ``events``.
        path: the PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    vectors = report["vectors"]
    by_step: dict[int, dict] = {}
    for entry in report["history"]:
        by_step[entry["step"]] = entry  # readings at one step share the weights; keep the last
    steps = sorted(by_step)
    fig, axes = plt.subplots(len(vectors), 1, figsize=(7, 2.8 * len(vectors)), squeeze=False, sharex=True)
    for ax, vector in zip(axes[:, 0], vectors):
        key = f"persona/{vector['trait']}"
        shift = [by_step[s][f"{key}/shift"] for s in steps]
        floor = [by_step[s][f"{key}/random_shift"] for s in steps]
        ax.fill_between(steps, [-f for f in floor], floor, color="grey", alpha=0.3, label="random floor (±mean |shift|)")
        ax.plot(steps, shift, marker="o", ms=3, label=f"{vector['trait']} shift (layer {vector['layer']})")
        ax.axhline(0, color="black", lw=0.5)
        for event in report["events"]:
            if event["trait"] == vector["trait"]:
                ax.axvline(event["step"], color="red" if event["action"] == "stop" else "orange", ls="--",
                           label=f"{event['action']} at step {event['step']}")
        ax.set_ylabel("shift along v̂")
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle("persona drift: (current − base) mean activation on the probe set, projected on v̂", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
