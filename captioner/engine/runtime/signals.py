"""Stop signals: how SIGINT (Ctrl-C) and SIGTERM (kill, a scheduler's pre-emption) end a command, and the exit
status a stop becomes.

    with StopRequest() as stop:          # every command runs inside one (engine/runtime/exit.py)
        ...                              # a signal raises Stopped here: the command ends within seconds
        with stop.deferred():            # training's steps: finish the step, save last.pt, then stop
            for batch in loader:
                ...
                if stop.signal:          # "SIGINT" or "SIGTERM" once one arrived
                    save(); break

Outside a deferred block a signal raises Stopped (a KeyboardInterrupt, so every `except KeyboardInterrupt`
cleanup runs) wherever the main thread is: a loop of minutes (feature precompute, extraction, captioning,
scoring) ends at once instead of after its work. Inside one, the signal is only recorded, and a second Ctrl-C
raises at once, for when saving itself hangs. Handlers can only be installed from the main thread; elsewhere
(and after the block) signals keep their previous behaviour.
"""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger("captioner")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A stop signal ended the command; `signal` is its name ("SIGINT", "SIGTERM")."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


class StopRequest:
    def __init__(self):
        self.signal: str | None = None
        self._deferred = 0
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self._deferred or (self.signal is not None and signum == signal.SIGINT):
            raise Stopped(name)
        self.signal = name
        log.warning("%s received: stopping after this step and saving last.pt (Ctrl-C again to abort now)", name)

    @contextmanager
    def deferred(self):
        """Inside: a signal is recorded in .signal for the loop to act on at its next safe point."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1

    def check(self) -> None:
        """Raise Stopped when a recorded signal is waiting (a loop leaving its deferred block)."""
        if self.signal is not None:
            raise Stopped(self.signal)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def exit_status(signal_name: str) -> int:
    """The shell's convention for death by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM). The one
    place a stop request becomes an exit status: `train` after a saved stop, every command on Ctrl-C."""
    return 128 + signal.Signals[signal_name].value
