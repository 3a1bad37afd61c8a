"""The one process lock: a folder or file belongs to one captioner process at a time.

    with ProcessLock(run_dir / ".lock", f"run dir {run_dir}", "wait for it or pick another --run-dir"):
        ...                                                  # a second process gets a one-line CaptionerError

A POSIX record lock (fcntl.lockf, F_SETLK) belongs to the process that took it: the kernel drops it the moment
that process dies, kill -9 included, and fork()ed children (DataLoader workers) never hold it, so a rerun
right after a kill always gets the lock. flock() locks were used before and failed exactly there: a flock
belongs to the open file, which the workers inherit and keep open until they notice their parent died.

Two caveats of record locks, handled here: closing ANY descriptor of the locked file in the owning process
drops the lock (so the file is opened once, here or by the caller that passes `file`), and a process never
conflicts with itself (so locks held by this process are also kept in `_held` and refused there).
Where fcntl does not exist (Windows) only the in-process check remains.

It lives at the top of the package, beside files.py, because data/ (feature cache) and engine/ both use it.
"""
from __future__ import annotations

import errno
import os
import struct
import sys
from pathlib import Path
from typing import BinaryIO

from captioner.errors import CaptionerError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_held: set[str] = set()  # real paths of the files this process has locked


class ProcessLock:
    """An exclusive, non-blocking lock on path for this process; a CaptionerError when another holds it.

    what names the thing in the error ("run dir runs/x"), hint says what to do instead. With file=None the
    lock file is opened (created, never written) here; with an open file (read-write) that file itself is
    locked and stays the caller's to close: closing it unlocks, release() only forgets it.
    """

    def __init__(self, path: str | Path, what: str, hint: str = "", file: BinaryIO | None = None):
        self.path, self.what, self.hint = Path(path), what, hint
        self.key = os.path.realpath(self.path)
        self._owned = file is None
        if self.key in _held:
            raise self._busy("another run in this same process")
        if file is None:
            try:
                file = open(self.path, "a+b")
            except OSError as e:
                raise CaptionerError(f"{what}: cannot create lock file {self.path} ({e.strerror or e})") from None
        self.file = file
        if fcntl is not None:
            try:
                fcntl.lockf(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder()
                if self._owned:
                    file.close()
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise self._busy(f"pid {holder}" if holder else "") from None
                raise CaptionerError(f"{what}: cannot lock {self.path} ({e.strerror or e})") from None
        _held.add(self.key)  # the lock file stays empty: taking a lock never modifies a file

    def _holder(self) -> str | None:
        """The pid holding the lock, for the message (Linux's struct flock layout; None elsewhere)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            query = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
            _, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(self.file.fileno(), fcntl.F_GETLK, query))
        except (OSError, struct.error):
            return None
        return str(pid) if pid > 0 else None

    def _busy(self, holder: str) -> CaptionerError:
        hint = f"; {self.hint}" if self.hint else ""
        holder = f" ({holder})" if holder else ""
        return CaptionerError(f"{self.what} is in use by another captioner process{holder}{hint}")

    def release(self) -> None:
        """Unlock (closing the lock file this lock opened); a second call does nothing."""
        if self.key not in _held:
            return
        _held.discard(self.key)
        if self._owned:
            self.file.close()  # closing unlocks; the file stays, empty of meaning, for the next holder
        # A caller's file stays locked until the caller closes it (AppendLog.rewrite relies on that).

    def __enter__(self) -> ProcessLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
