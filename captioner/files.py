"""The one atomic write: every file the project writes whole goes through `atomic_write`.

    with atomic_write("runs/x/metrics_test.json", "metrics file") as f:
        f.write(json.dumps(metrics).encode())

The bytes go to a temporary file in the same folder, which is flushed and fsynced, renamed over the target
(os.replace is atomic on POSIX and Windows) and the folder fsynced, so that the rename survives a power cut.
A reader therefore sees the old file or the new one, never half of one. On any failure the temporary file is
removed, the previous file is left as it was, and an OSError becomes a one-line CaptionerError naming the file.

It lives at the top of the package, beside config.py and errors.py, rather than in engine/ (as STYLE.md
draws it), because data/ (feature cache, synthetic images) writes files too and may not import engine/.
"""
from __future__ import annotations

import codecs
import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from captioner.errors import CaptionerError, EnvironmentFailure, os_failure

TEMP_SUFFIX = ".tmp"


def _umask_from_proc() -> int | None:
    """The umask as Linux (4.7+) reports it in /proc/self/status, read without changing it; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# os.umask can only be read by setting it, and the umask is process-wide: a thread creating a file between the
# two calls would get the temporary value. So it is read that way once, here at import (before captioner starts
# any thread), and otherwise taken from /proc, which a later os.umask (a test, a user's code) updates too.
_UMASK_AT_IMPORT = _umask_from_proc()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = _umask_by_setting()


def current_umask() -> int:
    """The process's umask: what open() and mkdir() apply, and what the files written here must get too."""
    umask = _umask_from_proc()
    return _UMASK_AT_IMPORT if umask is None else umask


def file_mode() -> int:
    """The mode a file created with open() gets (0644 under umask 022, 0600 under 077)."""
    return 0o666 & ~current_umask()


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in folder durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _blocking_file(folder: Path) -> Path | None:
    """The first of folder and its parents that exists but is a plain file (so nothing can be made under it)."""
    return next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)


def write_target(path: str | Path) -> Path:
    """Where writing path lands: the file a symbolic link points to (followed to the end), so that replacing
    an output that is a link updates the file it names instead of replacing the link with a copy."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _existing_folder(folder: Path) -> Path:
    """folder, or the nearest of its parents that exists (where the missing folders would be created)."""
    return next((p for p in [folder, *folder.parents] if p.is_dir()), Path("."))


def check_writable(path: str | Path, what: str = "file", folder: bool = False, append: bool = False,
                   hint: str = "") -> None:
    """_check_writable's refusal, with hint after it (how to write elsewhere, where path is a default)."""
    try:
        _check_writable(path, what, folder, append)
    except CaptionerError as e:
        if not hint:
            raise
        raise type(e)(f"{e}; {hint}") from None


def _check_writable(path: str | Path, what: str, folder: bool, append: bool) -> None:
    """Refuse, before any work is done, an output that cannot be written: a folder where a file is wanted (or a
    file where a folder is), a path under a plain file, or a place where creating a file fails (read-only file
    system, no permission, a full disk's exhausted inodes). The test is real: a file is created and removed in
    the folder that will receive the output (or the nearest existing folder above it, where the missing ones
    would be made), since a permission check cannot see a read-only mount or what root may do. append: the
    output is appended to in place, so an existing file must open for writing too. Leaves nothing behind."""
    if str(path) == "-":  # the Unix habit for standard output; outputs here are files that resume and replace
        raise CaptionerError(f"cannot write {what} to '-': standard output is not an output here; give a file name"
                             if not folder else f"cannot write {what} to '-': give a folder name")
    path = write_target(path)
    if not folder and path.is_dir():
        raise CaptionerError(f"cannot write {what} {path}: it is a folder; give a file name")
    if not folder and path.exists() and not path.is_file():  # /dev/zero would be read for resuming, forever
        raise CaptionerError(f"cannot write {what} {path}: it is not a regular file (a device, pipe or socket); "
                             f"give a file name")
    if folder and path.exists() and not path.is_dir():
        raise CaptionerError(f"cannot write {what} {path}: it is a file, not a folder")
    blocker = _blocking_file(path if folder else path.parent)
    if blocker is not None:
        raise CaptionerError(f"cannot write {what} {path}: {blocker} is a file, not a folder")
    probe = _existing_folder(path if folder else path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".captioner-write-test-", suffix=TEMP_SUFFIX, dir=probe)
        os.close(fd)
        os.unlink(tmp)
        if append and not folder and path.is_file():
            with open(path, "ab"):  # opening to append changes nothing
                pass
    except OSError as e:
        raise os_failure(f"cannot write {what} {path}", e) from None


def make_parent(path: str | Path, what: str = "file") -> None:
    """Create the folders above path; one line (not a traceback) when one of them is a plain file."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = _blocking_file(parent)
        if blocker:
            raise CaptionerError(f"cannot write {what} {path}: {blocker} is a file, not a folder") from None
        raise os_failure(f"cannot write {what} {path}", e) from None


def move_into_place(tmp: str | Path, path: str | Path, durable: bool = True) -> None:
    """Rename a finished (flushed, fsynced) temporary file over path and make the rename durable: the project's
    one rename. atomic_write uses it; so do the two writers that must fill the temporary file themselves
    (a locked captions output that stays open after its rewrite, a weights download)."""
    os.replace(tmp, path)
    if durable:
        fsync_dir(Path(path).parent)


_BOMS = {codecs.BOM_UTF8: "utf-8", codecs.BOM_UTF16_LE: "utf-16", codecs.BOM_UTF16_BE: "utf-16",
         codecs.BOM_UTF32_LE: "utf-32", codecs.BOM_UTF32_BE: "utf-32"}


def read_text(path: str | Path, what: str, encoding: str = "", limit: int | None = None,
              setting: str = "dataset.encoding") -> str:
    """A text file's content: UTF-8 with or without a byte-order mark, or the explicit encoding (setting).

    Anything else is one line naming the file and the byte offset of the first undecodable byte: captions
    silently turned into U+FFFD would train and score on garbage. limit reads only the first bytes (a
    multi-byte character cut at the limit is left out)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit)
    except OSError as e:
        raise os_failure(f"{what} {path}: cannot read", e) from None
    if encoding:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as e:
            raise CaptionerError(f"{what} {path} is not {encoding} at byte {e.start} ({data[e.start:e.start + 4]!r}): "
                                 f"set {setting} to the file's encoding") from None
    bom = next((b for b in sorted(_BOMS, key=len, reverse=True) if data.startswith(b)), b"")
    if bom and _BOMS[bom] != "utf-8":
        raise CaptionerError(f"{what} {path} is {_BOMS[bom].upper()} (byte-order mark {bom.hex(' ')}): save it as "
                             f"UTF-8" + (f", or set {setting}={_BOMS[bom]}" if setting else ""))
    try:
        return data[len(bom):].decode("utf-8")
    except UnicodeDecodeError as e:
        if limit is not None and e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            return data[len(bom):e.start].decode("utf-8")
        offset = len(bom) + e.start
        raise CaptionerError(f"{what} {path} is not UTF-8 at byte {offset} ({data[offset:offset + 4]!r}): save it "
                             f"as UTF-8" + (f", or set {setting} to its encoding (e.g. latin-1, cp1252, gb18030)"
                                             if setting else "")) from None


@contextmanager
def atomic_write(path: str | Path, what: str = "file", durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file whose contents replace `path` atomically when the block ends without error.

    `what` names the file in errors ("cannot write checkpoint runs/x/last.pt: No space left on device").
    durable=False skips the fsyncs (still atomic, not power-cut proof) for scratch files that a rerun
    writes again anyway: generated synthetic images, benchmark JPEGs."""
    path = write_target(path)  # a link's target is replaced, not the link
    if path.is_dir():
        raise CaptionerError(f"cannot write {what} {path}: it is a folder; give a file name")
    make_parent(path, what)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise os_failure(f"cannot write {what} {path}", e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp's 0600 would hide the file from the user's group
        move_into_place(tmp, path, durable)
    except (OSError, RuntimeError) as e:  # a full disk shows up as either (torch.save raises RuntimeError)
        Path(tmp).unlink(missing_ok=True)
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        cause = _os_cause(e)
        if cause is not None:
            disk = _disk_note(path) if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise os_failure(f"cannot write {what} {path}", cause, then=disk + kept) from None
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        reason = re.sub(r"^\[enforce fail at [^\]]*\][ .]*", "", reason)[:200]  # torch's C++ location: no help
        raise EnvironmentFailure(f"cannot write {what} {path}: {reason}{_disk_note(path)}{kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _os_cause(error: BaseException) -> OSError | None:
    """The OSError behind error: itself, or the one a library wrapped (torch.save turns the file's ENOSPC into a
    RuntimeError "[enforce fail at inline_container.cc] ...", the OSError kept as its context)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _disk_note(path: Path) -> str:
    """Which file system path is on (its mount point) and how much room it has left: for a full disk or quota."""
    mount = Path(os.path.realpath(path.parent))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = shutil.disk_usage(mount).free
    except OSError:
        return f" (the disk mounted at {mount})"
    return f" (the disk mounted at {mount} has {free / 1e6:.1f} MB free)"


def update_digest(digest, path: str | Path, what: str = "file") -> None:
    """Feed a file's bytes to a hashlib digest, a block at a time (a 230 MB checkpoint never sits in memory); an
    unreadable file is one line naming it."""
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    except OSError as e:
        raise os_failure(f"{what} {path}: cannot read", e) from None


def write_bytes(path: str | Path, data: bytes, what: str = "file", durable: bool = True) -> None:
    with atomic_write(path, what, durable) as f:
        f.write(data)


def write_text(path: str | Path, text: str, what: str = "file") -> None:
    write_bytes(path, text.encode("utf-8"), what)


def write_json(path: str | Path, data, what: str = "file", indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n", what)


def remove_stale_temporaries(folder: str | Path, pattern: str = "*") -> list[str]:
    """Delete temporary files that a kill left behind in folder (the files they were to replace are whole)."""
    stale = sorted(Path(folder).glob(pattern + TEMP_SUFFIX))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return [t.name for t in stale]


def _shareable(folder: Path) -> None:
    """Give a finished temporary folder and its files the permissions of a folder made with mkdir (mkdtemp and
    mkstemp make them private to their owner), so that a model folder can be shared."""
    umask = current_umask()
    folder.chmod(0o777 & ~umask)
    for item in folder.rglob("*"):
        if not item.is_symlink():  # chmod would follow a link out of the folder
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_folder(path: str | Path, what: str = "folder", replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` that becomes `path` when the block ends without error.

    Files written into it (each with atomic_write or not) appear at `path` together, by one rename: a reader
    never sees half a model folder. replace=True swaps out an existing `path` (moved aside, then deleted only
    after the new folder is in place); otherwise an existing non-empty `path` is refused. On any failure the
    temporary folder is removed and `path` is left as it was. A `path` that is a symbolic link to a folder is
    written through: the link stays, the folder it names is replaced (beside it, by the same swap)."""
    path = write_target(path)
    if path.exists() and not path.is_dir():
        raise CaptionerError(f"cannot write {what} {path}: it is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise CaptionerError(f"cannot write {what} {path}: the folder is not empty")
    make_parent(path, what)  # the folder's parent (and a one-line error when a plain file is in the way)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    except OSError as e:
        raise os_failure(f"cannot write {what} {path}", e) from None
    try:
        yield tmp
        _shareable(tmp)
        old = None
        if path.exists():  # the new folder is complete: only now is the old one moved aside
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the old folder back: a failed swap loses nothing
                os.replace(old / path.name, path)
                shutil.rmtree(old, ignore_errors=True)
            raise
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_failure(f"cannot write {what} {path}", e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
