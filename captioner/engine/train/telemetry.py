"""What training logs about itself besides the loss: a window of sums between metrics lines, peak memory, and
the whole run's progress line with its ETA.

    clock = RunClock(progress, total_steps, cfg.train.epochs, "captions", show=True)
    with clock:                                     # log lines go above the progress line, not through it
        clock.stepped(step, epoch, items=64)        # step 12,300/35,400 · epoch 4/30 · 41 captions/s · ETA 3h12m
        clock.validated(seconds)                    # validation time counts into the ETA
        clock.start_epoch()                         # ... and so do the checkpoints written since
        clock.eta_text(epochs_done=4)               # "ETA 3h12m", ending each epoch's log line
"""
from __future__ import annotations

import contextlib
import sys
import time

import torch

from captioner.progress import bar as make_bar


class Window:
    """Sums over the steps since the last metrics line (throughput, data vs compute time)."""

    def __init__(self):
        self.steps, self.loss, self.captions, self.data_s, self.compute_s = 0, 0.0, 0, 0.0, 0.0
        self.stats: dict[str, float] = {}  # SCST: summed reward, baseline, sample length, entropy, reward time
        self.start = time.perf_counter()


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    try:
        import resource  # POSIX only
    except ImportError:
        return {}
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"peak_rss_mb": round(kilobytes / 1024, 1)}


def duration(seconds: float) -> str:
    """45s, 12m05s, 3h12m, 2d03h: two units at most, the way a person reads a remaining time."""
    seconds = max(0, round(seconds))
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if days:
        return f"{days}d{h:02d}h"
    if hours:
        return f"{hours}h{m:02d}m"
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


class RunClock:
    """The whole run's time: elapsed (carried over resumes by Progress.elapsed_s), a progress line over all
    epochs (only on a terminal and without -q: progress.py) and the ETA of the run's end.

    ETA = steps left x mean time per training step + epoch ends left x their mean time (validation, sample
    captions, checkpoints), both measured in this process (a resumed run re-measures; until the first
    validation its time is not known and not counted). Early stopping can end the run sooner."""

    def __init__(self, progress, total_steps: int, epochs: int, items: str = "captions", show: bool = True):
        """progress: the run's Progress (step, epoch and elapsed_s so far); total_steps: of all epochs."""
        self.step, self.epochs, self.items = progress.step, epochs, items
        self.total_steps = max(total_steps, progress.step)
        self.epoch = min(progress.epoch + 1, epochs)  # the epoch being trained
        self.base, self.start = progress.elapsed_s, time.perf_counter()
        self.mark = self.start  # end of the last timed step or validation
        self.train_s, self.steps, self.count = 0.0, 0, 0  # this process's training time, steps and items
        self.val_s, self.validations = 0.0, 0
        self.bar = make_bar(total=self.total_steps, initial=self.step, desc=self.line(), bar_format="{desc}",
                            disable=not show)
        self._redirect = contextlib.ExitStack()

    def __enter__(self) -> "RunClock":
        if not self.bar.disable:  # log lines are written above the progress line instead of through it
            from tqdm.contrib.logging import logging_redirect_tqdm
            self._redirect.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc) -> None:
        if not self.bar.disable and self.step >= self.total_steps:
            rate = self.count / self.train_s if self.train_s > 0 else 0.0
            self.bar.set_description_str(f"step {self.step:,}/{self.total_steps:,} · epoch {self.epochs}/"
                                         f"{self.epochs} · {rate:,.0f} {self.items}/s · done in "
                                         f"{duration(self.elapsed())}")
        self.bar.close()
        self._redirect.close()

    def elapsed(self) -> float:
        """Seconds the run has trained, over all its sessions."""
        return self.base + time.perf_counter() - self.start

    def stepped(self, step: int, epoch: int, items: int) -> None:
        """One training step done (items: captions or images, all processes together)."""
        now = time.perf_counter()
        self.train_s, self.mark = self.train_s + now - self.mark, now
        self.steps, self.count, self.step, self.epoch = self.steps + 1, self.count + items, step, epoch
        if not self.bar.disable:
            self.bar.set_description_str(self.line(), refresh=False)
            self.bar.update(step - self.bar.n)

    def validated(self, seconds: float) -> None:
        """A validation took seconds (measured by the caller); the time since the last step is not training."""
        self.val_s, self.validations, self.mark = self.val_s + seconds, self.validations + 1, time.perf_counter()

    def start_epoch(self) -> None:
        """Training starts again: the time since the last validation (its checkpoints) was that epoch end's."""
        now = time.perf_counter()
        if self.validations:
            self.val_s += now - self.mark
        self.mark = now

    def eta(self, epochs_done: int) -> float | None:
        """Seconds until the last epoch's validation ends; None before the first timed step."""
        if not self.steps:
            return None
        validations_left = self.epochs - epochs_done
        per_validation = self.val_s / self.validations if self.validations else 0.0
        return (self.total_steps - self.step) * self.train_s / self.steps + validations_left * per_validation

    def eta_text(self, epochs_done: int) -> str:
        seconds = self.eta(epochs_done)
        return "ETA ?" if seconds is None else f"ETA {duration(seconds)}"

    def line(self) -> str:
        """step 12,300/35,400 · epoch 4/30 · 41 captions/s · ETA 3h12m"""
        rate = self.count / self.train_s if self.train_s > 0 else 0.0
        return (f"step {self.step:,}/{self.total_steps:,} · epoch {self.epoch}/{self.epochs} · "
                f"{rate:,.0f} {self.items}/s · {self.eta_text(self.epoch - 1)}")
