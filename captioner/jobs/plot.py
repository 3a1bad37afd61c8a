"""Draw a run's curves from its metrics.jsonl into one PNG (no display needed).

    captioner plot runs/tiny                  # writes runs/tiny/curves.png
    captioner plot runs/tiny --out loss.png

Left: training loss per logged step (raw and a moving average) with the learning rate on a second axis.
Right: every validation score against the step, the selected metric's best marked. Dotted lines: resumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.files import atomic_write
from captioner.engine.train.rundir import read_metrics


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


@dataclass
class PlotJob:
    """`captioner plot`'s options."""
    run_dir: str | Path
    out: str | Path | None = None  # None: RUN_DIR/curves.png


def main(job: PlotJob) -> dict:
    """Write the PNG; returns {"plot", "steps", "validations"}."""
    run_dir, out = job.run_dir, job.out
    import matplotlib
    matplotlib.use("Agg")  # files only: works on headless machines
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("loss") is not None and "step" in r]
    validations = [r for r in records if "epoch" in r and any(k.startswith("val_") for k in r)]
    resumes = [r["step"] for r in records if r.get("event") == "resume"]
    skipped = [r["step"] for r in records if r.get("skipped")]
    if not steps and not validations:
        raise CaptionerError(f"{run_dir / 'metrics.jsonl'} holds no training steps or validations yet")

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    x, loss = [r["step"] for r in steps], [r["loss"] for r in steps]
    window = max(5, len(loss) // 25)
    ax_loss.plot(x, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax_loss.plot(x, _moving_average(loss, window), color="tab:blue", label=f"loss, mean of {window}")
    for i, step in enumerate(skipped):
        ax_loss.axvline(step, color="tab:red", alpha=0.4, linewidth=0.8, label=None if i else "skipped (non-finite)")
    ax_loss.set(xlabel="step", ylabel="training loss", title=f"{run_dir.name}: training")
    handles, labels = ax_loss.get_legend_handles_labels()
    if steps and "lr" in steps[0]:
        ax_lr = ax_loss.twinx()
        lrs = [r["lr"] for r in steps]
        ax_lr.plot(x, lrs, color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        ax_lr.set_ylim(0, max(lrs) * 1.1)  # from zero, so a constant lr reads as constant
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        more_handles, more_labels = ax_lr.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax_loss.legend(handles, labels, loc="lower left", fontsize="small")

    names = sorted({k for r in validations for k in r if k.startswith("val_") and k != "val_images"})
    vx = [r["step"] for r in validations]
    for name in names:
        ax_val.plot(vx, [r.get(name) for r in validations], marker="o", markersize=3, label=name[4:])
    if validations:
        metric = "val_" + validations[-1].get("select_metric", "bleu4")
        scored = [(r[metric], r["step"]) for r in validations if r.get(metric) is not None]
        if scored:
            best, at = max(scored)
            ax_val.scatter([at], [best], s=120, facecolors="none", edgecolors="black", zorder=3,
                           label=f"best {metric[4:]} {best:.3f}")
    ax_val.set(xlabel="step", ylabel="score (0-1)", title="validation (greedy)")
    if names:
        ax_val.legend(loc="lower right", fontsize="small")
    for ax in (ax_loss, ax_val):
        for step in resumes:
            ax.axvline(step, color="black", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    if resumes:
        ax_val.text(resumes[0], 1.0, " resumed", transform=ax_val.get_xaxis_transform(), va="top", fontsize="small")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    try:
        with atomic_write(out, "plot") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return {"plot": str(out), "steps": len(steps), "validations": len(validations)}
