"""Which files to caption: PATH arguments (files, folders, lists of paths, "-" for stdin) -> image paths.

    find_images(["photos/", "extra.jpg", "todo.txt"], recursive=True)

- A folder gives its files with an image extension (any case), sorted by name. Hidden entries (".name",
  e.g. the "._IMG_0001.jpg" resource forks macOS leaves on shared drives) are skipped. recursive=True goes
  into sub-folders, without following symbolic links to folders (no loops).
- A file named on the command line is always taken, whatever its extension (it may be refused later).
- A .txt or .lst file, or "-" (standard input), lists one path per line, relative to the current folder;
  blank lines and lines starting with "#" are skipped. A listed path that does not exist is kept, so it
  becomes an error record instead of stopping the run; a PATH argument that does not exist is a typo and
  stops the run.
- A file reached twice is kept once, at its first place.
"""
from __future__ import annotations

import os
import sys

from captioner.errors import CaptionerError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif",
                              ".tif", ".tiff", ".avif", ".heic", ".heif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"})
LIST_EXTENSIONS = frozenset({".txt", ".lst"})


def find_images(paths: list[str], recursive: bool = False) -> list[str]:
    """Expand PATH arguments into image file paths, in a stable order, without duplicates."""
    found = []
    for path in paths:
        if path == "-":
            found.extend(_expand_listed(_list_lines(sys.stdin), recursive))
        elif os.path.isdir(path):
            found.extend(_folder_images(path, recursive))
        elif os.path.splitext(path)[1].lower() in LIST_EXTENSIONS and os.path.isfile(path):
            found.extend(_expand_listed(_read_list(path), recursive))
        elif os.path.lexists(path):
            found.append(path)
        else:
            raise CaptionerError(f"{path}: no such file or folder")
    return _unique(found)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _folder_images(folder: str, recursive: bool) -> list[str]:
    if not recursive:
        with os.scandir(folder) as entries:
            return sorted(e.path for e in entries
                          if not e.name.startswith(".") and is_image_name(e.name) and not _is_folder(e))
    found = []
    for root, dirs, files in os.walk(folder):  # followlinks=False: a link to a folder is never entered
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and is_image_name(f))
    return found


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symbolic link loop: kept, it becomes an error record
        return False


def _read_list(path: str) -> list[str]:
    try:
        # surrogateescape: a listed name that is not valid UTF-8 still round-trips to the same bytes on disk.
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return _list_lines(f)
    except OSError as e:
        raise CaptionerError(f"{path}: cannot read the list of paths ({e.strerror or e})") from None


def _list_lines(lines) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _expand_listed(listed: list[str], recursive: bool) -> list[str]:
    found = []
    for path in listed:
        found.extend(_folder_images(path, recursive) if os.path.isdir(path) else [path])
    return found


def _unique(paths: list[str]) -> list[str]:
    seen, out = set(), []
    for path in paths:
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out
