"""Stop signals: SIGINT/SIGTERM during training finish the step, save last.pt and exit cleanly; how a stop
becomes an exit status.

    with StopRequest() as stop:
        for batch in loader:
            ...
            if stop.signal:      # "SIGINT" or "SIGTERM" once one arrived
                save(); break

A second Ctrl-C raises KeyboardInterrupt at once, for when saving itself hangs. Handlers can only be
installed from the main thread; elsewhere (and after the block) signals keep their previous behaviour.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("captioner")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and saving last.pt (Ctrl-C again to abort now)",
                    self.signal)

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
