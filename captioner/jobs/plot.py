"""Draw runs' curves from their metrics.jsonl into one PNG (no display needed).

    captioner plot runs/tiny                  # writes runs/tiny/curves.png
    captioner plot runs/tiny --out loss.png
    captioner plot runs/a runs/b runs/c --out compare.png     # several runs overlaid (default ./compare.png)

One run, left: training loss per logged step (raw and a moving average) with the learning rate on a second axis.
Right: every validation score against the step, the selected metric's best marked. Dotted lines: resumes.

Several runs, one colour each, legend by run name: training loss (moving average over the raw curve) and the
selection metric (train.select_metric, best marked), each against steps and against the run's training time
(elapsed_s: wall-clock time while training, resumes included, downtime between them not).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.files import atomic_write, check_writable
from captioner.io_paths import refuse_overlap
from captioner.engine.train.loggers import read_metrics


def _lone_point(x: list) -> str | None:
    """A marker where a curve has one point: a line through one point draws nothing (a run stopped after its
    first logged step showed an empty loss panel)."""
    return "o" if len(x) == 1 else None


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


@dataclass
class PlotJob:
    """`captioner plot`'s options."""
    run_dirs: list[str | Path] | str | Path  # one run dir, or several to overlay
    out: str | Path | None = None  # None: RUN_DIR/curves.png for one run, ./compare.png for several

    def __post_init__(self):
        self.run_dirs = [self.run_dirs] if isinstance(self.run_dirs, (str, Path)) else list(self.run_dirs)
        if not self.run_dirs:
            raise CaptionerError("plot needs at least one RUN_DIR")


def _curves(run_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(records, logged steps, validations) of a run, refused when it has neither steps nor validations."""
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("loss") is not None and "step" in r]
    validations = [r for r in records if "epoch" in r and any(k.startswith("val_") for k in r)]
    if not steps and not validations:
        raise CaptionerError(f"{run_dir / 'metrics.jsonl'} holds no training steps or validations yet")
    return records, steps, validations


def validation_title(records: list[dict]) -> str:
    """The validation panel's title, with how validation decoded as its sample captions record it ("beam 3",
    "greedy": train.val_beam_size, by default decode.beam_size); plain "validation" where no samples were logged
    (runs from before they were). It said "(greedy)" whatever the run did."""
    for record in reversed(records):
        decoding = next((s.get("decoding") for s in record.get("samples") or [] if s.get("decoding")), None)
        if decoding:
            return f"validation ({decoding})"
    return "validation"


def _pyplot():
    home = Path(os.path.expanduser("~"))
    if "MPLCONFIGDIR" not in os.environ and not (home.is_dir() and os.access(home, os.W_OK)):
        # No writable home (a service account, a container user): matplotlib would make a temporary folder
        # itself, with three warning lines about it; the same folder without them.
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="captioner-matplotlib-")
        atexit.register(shutil.rmtree, os.environ["MPLCONFIGDIR"], True)  # as matplotlib removes its own
    import matplotlib
    matplotlib.use("Agg")  # files only: works on headless machines
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path, plt) -> None:
    fig.tight_layout()
    try:
        with atomic_write(out, "plot") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


def main(job: PlotJob) -> dict:
    """Write the PNG; returns {"plot", "steps", "validations"} for one run, and for several {"plot", "runs",
    "steps", "validations"} with a list entry per run."""
    runs = [Path(d) for d in job.run_dirs]
    out = Path(job.out) if job.out else runs[0] / "curves.png" if len(runs) == 1 else Path("compare.png")
    refuse_overlap({"--out": out}, {"metrics of run": [run / "metrics.jsonl" for run in runs]})
    curves = [_curves(run_dir) for run_dir in runs]  # every run is read (and refused) before anything is drawn
    check_writable(out, "plot")
    if len(runs) > 1:
        return _compare(runs, curves, out)
    run_dir, (records, steps, validations) = runs[0], curves[0]
    plt = _pyplot()
    resumes = [r["step"] for r in records if r.get("event") == "resume"]
    skipped = [r["step"] for r in records if r.get("skipped")]

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    x, loss = [r["step"] for r in steps], [r["loss"] for r in steps]
    window = max(5, len(loss) // 25)
    ax_loss.plot(x, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax_loss.plot(x, _moving_average(loss, window), color="tab:blue", label=f"loss, mean of {window}",
                 marker=_lone_point(x))
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
    ax_val.set(xlabel="step", ylabel="score (0-1; CIDEr-D 0-10)", title=validation_title(records))
    if names:
        ax_val.legend(loc="lower right", fontsize="small")
    for ax in (ax_loss, ax_val):
        for step in resumes:
            ax.axvline(step, color="black", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    if resumes:
        ax_val.text(resumes[0], 1.0, " resumed", transform=ax_val.get_xaxis_transform(), va="top", fontsize="small")
    _save(fig, out, plt)
    return {"plot": str(out), "steps": len(steps), "validations": len(validations)}


def _names(runs: list[Path]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [run.name or str(run) for run in runs]
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


def _time_unit(seconds: float) -> tuple[float, str]:
    return (3600.0, "hours") if seconds > 3 * 3600 else (60.0, "minutes") if seconds > 180 else (1.0, "seconds")


def _compare(runs: list[Path], curves: list, out: Path) -> dict:
    """Several runs in one 2 x 2 figure: loss and selection metric, against steps and against training time."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (loss_step, loss_time), (score_step, score_time) = axes
    longest = max([r["elapsed_s"] for _, steps, vals in curves for r in steps + vals if "elapsed_s" in r] or [0.0])
    scale, unit = _time_unit(longest)
    metrics = {(vals[-1].get("select_metric", "cider") if vals else "cider") for _, _, vals in curves}
    untimed = []
    for index, (name, (_, steps, validations)) in enumerate(zip(_names(runs), curves)):
        color = f"C{index % 10}"
        loss = [r["loss"] for r in steps]
        window = max(5, len(loss) // 25)
        timed = [r for r in steps if "elapsed_s" in r]
        for ax, rows in ((loss_step, steps), (loss_time, timed)):
            x = [r["step"] if ax is loss_step else r["elapsed_s"] / scale for r in rows]
            values = [r["loss"] for r in rows]
            ax.plot(x, values, color=color, alpha=0.2, linewidth=0.7)
            ax.plot(x, _moving_average(values, window), color=color, label=name, marker=_lone_point(x))
        metric = validations[-1].get("select_metric", "cider") if validations else "cider"
        scored = [r for r in validations if r.get(f"val_{metric}") is not None]
        label = name if len(metrics) == 1 else f"{name} ({metric})"
        for ax, rows in ((score_step, scored), (score_time, [r for r in scored if "elapsed_s" in r])):
            if not rows:
                continue
            x = [r["step"] if ax is score_step else r["elapsed_s"] / scale for r in rows]
            values = [r[f"val_{metric}"] for r in rows]
            ax.plot(x, values, color=color, marker="o", markersize=3, label=label)
            best = max(range(len(values)), key=values.__getitem__)
            ax.scatter([x[best]], [values[best]], s=110, facecolors="none", edgecolors=color, zorder=3)
        if len(timed) < len(steps) or len(scored) and not any("elapsed_s" in r for r in scored):
            untimed.append(name)
    metric_name = next(iter(metrics)) if len(metrics) == 1 else "selection metric"
    loss_step.set(xlabel="step", ylabel="training loss", title="training loss (moving average) against steps")
    loss_time.set(xlabel=f"training time ({unit})", ylabel="training loss", title="training loss against time")
    score_step.set(xlabel="step", ylabel=f"validation {metric_name}", title=f"validation {metric_name} (o: best)")
    score_time.set(xlabel=f"training time ({unit})", ylabel=f"validation {metric_name}",
                   title=f"validation {metric_name} against time")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if untimed:  # metrics.jsonl written before elapsed_s was logged
        loss_time.text(0.5, 0.02, f"no training time logged by: {', '.join(untimed)}", transform=loss_time.transAxes,
                       ha="center", fontsize="small", color="gray")
    _save(fig, out, plt)
    return {"plot": str(out), "runs": _names(runs), "steps": [len(c[1]) for c in curves],
            "validations": [len(c[2]) for c in curves]}
