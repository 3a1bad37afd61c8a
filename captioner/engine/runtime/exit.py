"""The one exit path: every command ends here, whatever ended it, with at most one line on stderr and a status.

    status = with_exit_path("caption", lambda: run_command(args))     # cli.main

    0     done (or what the command's own reporter returned: `caption --strict` 1, a stopped `train` 130/143)
    2     bad input: a CaptionerError (a file, config value, checkpoint or argument), or an OSError about a path
          (missing, not permitted, in the way)
    1     the machine failed: an EnvironmentFailure or an OSError such as a full disk (ENOSPC), a read-only
          file system (EROFS) or a closed output (EPIPE); out of memory; an unexpected error (one line naming
          it; CAPTIONER_TRACEBACK=1 prints the traceback for a bug report)
    130   SIGINT (Ctrl-C), 143 SIGTERM: the command stopped within seconds (signals.StopRequest)
    141   standard output closed by its reader (`captioner layers resnet152 | head`): quiet

On every path standard output is flushed (a full or closed stdout is an error here, not a traceback at
interpreter exit) and image-decoding workers are killed rather than waited for: they ignore stop signals, and
Python's exit hook would otherwise wait for them forever. What was written before the failure stays whole
(atomic writes, fsynced appends), so rerunning the command resumes.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from typing import Callable

from captioner.engine.runtime.signals import StopRequest, Stopped, exit_status
from captioner.errors import CaptionerError, EnvironmentFailure, one_line, os_failure

TRACEBACK_VARIABLE = "CAPTIONER_TRACEBACK"


def with_exit_path(command: str, work: Callable[[], int]) -> int:
    """Run work() (which returns the command's exit status) under the exit path's rules (see above)."""
    real_stdout = sys.stdout
    sys.stdout = _Output(real_stdout)
    try:
        with StopRequest():  # SIGINT/SIGTERM raise Stopped, unless the command defers them (train's steps)
            code = work()
            sys.stdout.flush()  # here, not at interpreter exit, so that a full or closed stdout is caught below
        return code
    except BaseException as error:  # noqa: BLE001 (the one place every exception ends)
        stop_workers()  # before anything else: a worker left alive makes the interpreter's exit wait forever
        if isinstance(error, SystemExit):  # a job that chose its own status
            raise
        status, line = describe(error)
        if line:
            _say(f"captioner {command}: {line}")
        if status == 1 and not isinstance(error, (CaptionerError, OSError, MemoryError, Stopped)) \
                and os.environ.get(TRACEBACK_VARIABLE):
            traceback.print_exception(error, file=sys.stderr)
        return status
    finally:
        sys.stdout = real_stdout


STDOUT = "standard output"


class _Output:
    """sys.stdout while a command runs: an OSError writing it (a full disk, a closed pipe, a closed descriptor)
    names standard output, so that the exit path can tell it from a file's; everything else is the stream's."""

    def __init__(self, stream):
        self._stream = stream

    def _call(self, name: str, *args):
        if self._stream is None:  # started with stdout closed (`>&-`): Python gives None
            raise OSError(errno.EBADF, "it is closed", STDOUT)
        try:
            return getattr(self._stream, name)(*args)
        except OSError as e:
            e.filename = STDOUT
            if e.errno in (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EBADF):
                _silence_stdout(self._stream)  # so that the interpreter's final flush does not fail again
            raise

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        return self._call("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def stop_workers() -> None:
    """Kill the image-decoding workers of any loader still running (none when the pipeline was never imported:
    `captioner --help` and `score` stay free of torch)."""
    pipeline = sys.modules.get("captioner.data.pipeline")
    try:
        if pipeline is not None:
            pipeline.stop_workers()
    except Exception:  # noqa: BLE001 (the error being reported matters more; the exit hook tries again)
        pass


def describe(error: BaseException) -> tuple[int, str]:
    """(exit status, the one line to print; "" for none) for how a command ended."""
    if isinstance(error, BrokenPipeError) and error.filename == STDOUT:  # the reader of our output left
        return (exit_status("SIGPIPE") if hasattr(signal, "SIGPIPE") else 1), ""
    if isinstance(error, Stopped):
        return exit_status(error.signal), f"stopped by {error.signal}" + (
            " (Ctrl-C)" if error.signal == "SIGINT" else "") + "; rerun the same command to continue"
    if isinstance(error, KeyboardInterrupt):
        return exit_status("SIGINT"), "interrupted"
    if isinstance(error, CaptionerError):
        return error.exit_status, f"error: {error}"
    if _lost_peer(error):
        return EnvironmentFailure.exit_status, (f"error: lost contact with another process of this torchrun run "
                                                f"({_first_line(error)[:120]}): it stopped, crashed or was killed, "
                                                f"and its own message, if any, is above; rerun the same command "
                                                f"to continue")
    if isinstance(error, OSError):
        failure = os_failure(f"cannot write {STDOUT}" if error.filename == STDOUT else
                             f"cannot read or write {error.filename}" if error.filename else "input/output failed",
                             error)
        return failure.exit_status, f"error: {failure}"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return EnvironmentFailure.exit_status, (f"error: out of memory ({_first_line(error)}): try a smaller "
                                                f"--batch-size or image size")
    return 1, (f"internal error: {type(error).__name__}: {_first_line(error)} (this is a bug in captioner; "
               f"set {TRACEBACK_VARIABLE}=1 to print where it happened, and please report it)")


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")  # gloo's words for it


def _lost_peer(error: BaseException) -> bool:
    """Under torchrun: a collective failed because another process is gone. torchrun then stops the others,
    whose errors are no bug of theirs (and not this command's "internal error")."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        return False
    if isinstance(error, ConnectionError) and not getattr(error, "filename", None):
        return True
    dist_error = getattr(sys.modules.get("torch.distributed"), "DistError", ())
    return isinstance(error, dist_error) or (isinstance(error, RuntimeError)
                                             and any(words in str(error) for words in PEER_GONE))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _say(line: str) -> None:
    try:
        print(one_line(line), file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed too: nothing left to tell
        pass


def _silence_stdout(stream) -> None:
    """Point the process's stdout at /dev/null so that the interpreter's final flush does not fail again
    ("Exception ignored ... BrokenPipeError"); a stand-in stdout without a file descriptor is left alone."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
