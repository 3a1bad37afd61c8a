"""The errors a command turns into one line instead of a traceback, and which exit status each gives.

    CaptionerError       the input is wrong (a file, a config value, a checkpoint, an argument): exit status 2;
                         a ValueError, so that `except ValueError` around library calls catches it
    CaptionerFileError   the input is a file that cannot be read (missing, a folder, closed, not permitted):
                         a CaptionerError that is also an OSError (`except OSError` catches it too)
    EnvironmentFailure   the machine failed the command (a full disk, a read-only file system, a closed
                         output, an I/O error): exit status 1; rerunning once the machine is fixed resumes

os_failure(what, error) makes the right one of an OSError, so that every place that catches one decides the
same way (engine/runtime/exit.py applies the same rule to an OSError that nothing caught).
"""
from __future__ import annotations

import errno


def one_line(text: str) -> str:
    """text with its line breaks and other control characters written as escapes (\\n, \\x0c, \\u2028), so
    that a message quoting a user's value (a path with a newline in it) is still one line."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text)


def shorten(text: str, limit: int = 300) -> str:
    """text cut to at most about limit characters at a word boundary, ' ...' marking the cut."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."


def first_line(error: BaseException, limit: int = 200) -> str:
    """A library's error as a reason quoted in one of our lines: its message's first line (its class name when
    the message is empty), cut at a word boundary (a reason cut mid-word, "try aga", reads as a typo)."""
    return shorten((str(error).strip().splitlines() or [type(error).__name__])[0], limit)


class CaptionerError(ValueError):
    """A problem with the user's input (file, config, checkpoint, argument) that deserves one clear line: its
    str() is always one line, whatever the values it quotes hold (the CLI and the Python API both show it)."""
    exit_status = 2

    def __str__(self) -> str:
        return one_line(super().__str__())

    def with_context(self, prefix: str) -> "CaptionerError":
        """The same kind of error with prefix before its message (e.g. the config file it came from)."""
        return type(self)(f"{prefix}{self}")


class CaptionerFileError(CaptionerError, OSError):
    """A file given as input that cannot be read: missing, a folder or a FIFO, closed, not permitted. Exit status 2
    as every CaptionerError (the exit path tests CaptionerError before OSError); errno stays None: the message
    says what is wrong."""


class EnvironmentFailure(CaptionerError):
    """Not the input but the machine: no space left, a read-only file system, a closed pipe, an I/O error."""
    exit_status = 1


# errno values that say the machine (disk, file system, pipe, memory) failed, not that the path given was wrong.
ENVIRONMENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EFBIG", "EIO", "EROFS", "EPIPE", "EBADF", "ENOMEM", "ESTALE", "ENOBUFS", "ENFILE", "EMFILE",
    "ENODEV", "ENXIO", "ECONNRESET", "ETIMEDOUT", "EREMOTEIO", "EUCLEAN") if hasattr(errno, name))


def os_failure(what: str, error: OSError, then: str = "") -> CaptionerError:
    """An OSError as one line, "what: reason" (then `then`, e.g. what was kept): an EnvironmentFailure (exit 1)
    when the machine failed (a full disk, a read-only file system, a closed pipe), else a CaptionerError (exit 2:
    a path that is missing, in the way or not permitted)."""
    reason = error.strerror or str(error) or type(error).__name__
    kind = EnvironmentFailure if error.errno in ENVIRONMENT_ERRNOS else CaptionerError
    return kind(f"{what}: {reason}{then}")


class ErrorText(str):
    """An unreadable item's message as it travels (from a decoding worker process, in a Captioned record): a str
    that remembers whether a file was the problem, so that the Python API raises it as the same type."""
    file_problem = False

    @classmethod
    def of(cls, error: CaptionerError) -> "ErrorText":
        text = cls(str(error))
        text.file_problem = isinstance(error, OSError)
        return text

    @staticmethod
    def raised(text: str) -> CaptionerError:
        """The error to raise for a message: CaptionerFileError (an OSError too) for a file problem."""
        return (CaptionerFileError if getattr(text, "file_problem", False) else CaptionerError)(str(text))
