"""The one place progress bars are made: shown only where a person watches them.

    for batch in bar(loader, desc="epoch 1", unit="batch"): ...

A bar is drawn only when INFO messages are logged (`-q` means warnings and errors only) and stderr is a
terminal: a log redirected to a file gets no carriage-return redraws.
"""
from __future__ import annotations

import contextlib
import logging
import sys

from tqdm import tqdm

log = logging.getLogger("captioner")


def show_progress() -> bool:
    stream = sys.stderr
    return log.isEnabledFor(logging.INFO) and hasattr(stream, "isatty") and stream.isatty()


def bar(iterable=None, disable: bool = False, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), disabled when the caller says so or nobody watches (see show_progress)."""
    return tqdm(iterable, disable=disable or not show_progress(), **kwargs)


@contextlib.contextmanager
def quiet_library_logs():
    """Silence the warnings libraries log during a call that are not news here (open_clip's note on every
    random-init build, onnxruntime.quantization's line per tensor it leaves in float); restored afterwards.
    captioner's own lines still pass (logging.disable, used before, hid the int8 steps' warnings too): its
    logger keeps the level it had, the root logger, whose level the libraries' loggers inherit, goes to ERROR."""
    root, ours = logging.getLogger(), logging.getLogger("captioner")
    previous_root, previous_ours = root.level, ours.level
    ours.setLevel(ours.getEffectiveLevel())
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous_root)
        ours.setLevel(previous_ours)
