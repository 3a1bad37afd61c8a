"""Inputs are sacred: the one check that an output of a command can never replace, clear or write into what the
command reads.

    refuse_overlap({"--out": job.out}, {"--checkpoint": job.checkpoint, "--metrics": job.metrics})

Every job calls it from its validation, before any work, with each output path it writes and each input it reads.
An output is refused when it

    is an input           the same file, followed through symbolic links and hard links (same device and inode)
    contains an input     an input lies under the output folder (replacing or clearing it would delete the input)
    lies inside an input  the output would be written into a folder read as a whole (a model folder, a cache)

`folders` are the folders a command reads files from (an image folder, a dataset's images): a new file beside
those files changes none of them, so an output may lie inside such a folder but never be or contain it.

--overwrite never widens this: it replaces an earlier output, never an input. The test is one line, a
CaptionerError naming both paths (exit status 2).
"""
from __future__ import annotations

import os
import stat
from typing import Iterable, Mapping, Union

from captioner.errors import CaptionerError

PathLike = Union[str, os.PathLike]
# A name ("--checkpoint") -> a path, a list of paths (caption's images), or None (an option not given).
Paths = Mapping[str, Union[PathLike, Iterable[PathLike], None]]


def _stat(path: PathLike) -> os.stat_result | None:
    """What path names after links, None when nothing is there."""
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _identity(st: os.stat_result | None) -> tuple[int, int] | None:
    """(device, inode): the same for every name of one file, symbolic or hard link."""
    return (st.st_dev, st.st_ino) if st is not None else None


def _real(path: PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _under(inner: str, outer: str) -> bool:
    """inner lies strictly below outer (both real paths)."""
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _items(paths: Paths) -> Iterable[tuple[str, PathLike]]:
    for name, value in paths.items():
        if value is None or value == "" or value == "-":
            continue
        if isinstance(value, (str, os.PathLike)):
            yield name, value
        else:
            yield from ((name, p) for p in value if p not in (None, "", "-"))


class _Input:
    """One input, its identity and real path computed once (caption may read 100,000 image files)."""

    def __init__(self, name: str, path: PathLike):
        self.name, self.path = name, path
        st = _stat(path)  # one system call per input
        self.identity, self.is_dir = _identity(st), st is not None and stat.S_ISDIR(st.st_mode)
        self._real: str | None = None

    @property
    def real(self) -> str:
        if self._real is None:
            self._real = _real(self.path)
        return self._real


def _relation(out_real: str, out_identity, out_is_dir: bool, source: _Input, whole: bool) -> str | None:
    """How an output relates to an existing input: 'is', 'contains', 'inside' or None (they do not touch)."""
    if out_identity is not None and out_identity == source.identity:
        return "is"
    if out_is_dir and _under(source.real, out_real):  # only a folder that exists holds anything
        return "contains"
    if whole and source.is_dir and _under(out_real, source.real):
        return "inside"
    return None


def _label(name: str, path: PathLike) -> str:
    """How a path appears in a message: `--out R.json`, or `image photos/a.jpg` for a list's member."""
    return f"{name} {os.fspath(path)}"


def refuse_overlap(outputs: Paths, inputs: Paths, folders: Paths | None = None) -> None:
    """Raise a CaptionerError (one line naming both paths) when an output is, contains or lies inside an input
    (see the module's docstring); folders' members may be written beside, but a folder itself never replaced.
    Outputs are compared with each other too: two outputs of one run never name the same file. Inputs that do
    not exist are left to the command's own check (it names them better)."""
    sources = [(_Input(n, p), True) for n, p in _items(inputs)]
    sources += [(_Input(n, p), False) for n, p in _items(folders or {})]
    sources = [(s, whole) for s, whole in sources if s.identity is not None]
    written: list[tuple[str, PathLike, str]] = []
    for name, out in _items(outputs):
        out_stat = _stat(out)
        out_real, out_identity = _real(out), _identity(out_stat)
        out_is_dir = out_stat is not None and stat.S_ISDIR(out_stat.st_mode)
        for source, whole in sources:
            relation = _relation(out_real, out_identity, out_is_dir, source, whole)
            if relation is None:
                continue
            what = {"is": "is the same file as", "contains": "contains", "inside": "lies inside"}[relation]
            harm = {"is": "writing it would replace the input",
                    "contains": "writing it would replace or delete the input",
                    "inside": "writing it would change that input"}[relation]
            raise CaptionerError(f"{_label(name, out)} {what} the input {_label(source.name, source.path)}: "
                                 f"{harm} (an output never replaces an input, --overwrite included); give "
                                 f"another {name}")
        for other_name, other, other_real in written:
            if out_real == other_real:
                raise CaptionerError(f"{_label(name, out)} and {_label(other_name, other)} name the same file: "
                                     f"give them different paths")
        written.append((name, out, out_real))
