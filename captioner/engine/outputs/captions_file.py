"""Caption records on disk, appended batch by batch, so a killed run resumes where it stopped.

    out = CaptionsFile("captions.jsonl", made_by={"model": "3f2a...", "decoding": "beam 3, max_len 30, ..."})
    out.done                                    # {resolved file: record} already in the file: skip these
    out.append([{"file": "a.jpg", "caption": "a dog", "score": -3.2}, {"file": "b.jpg", "error": "empty file"}])
    out.close()

JSONL: one JSON object per line. CSV: a header, then one file,caption,score,error,model,decoding row per
image. Every record says what made it (model: the checkpoint file's SHA-256, decoding: the settings), and a
file holding records of another model or other settings is never resumed: the same output can never mix two
models' captions. Inputs are compared by absolute path: photos/a.jpg, ./photos/a.jpg and /abs/photos/a.jpg
are one image, one record.
Each append is whole lines written at once, flushed and fsynced. A last line cut short by a kill (no final
newline) is cut off when the file is opened again, so a record is never half-written and never written twice.
While a run holds the file, a second run on the same file stops with an error (a process lock, see
captioner/lock.py: it dies with its process, so a rerun right after kill -9 works).

Under torchrun each process appends to its own part file (captions.jsonl.part-00003 for rank 3) and rank 0
moves the parts into the output at the end (absorb). Parts a killed run left behind are absorbed when the
next run starts, so their records are neither redone nor written twice.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from pathlib import Path

from captioner.errors import CaptionerError, os_failure
from captioner.files import make_parent, move_into_place
from captioner.lock import ProcessLock

log = logging.getLogger("captioner")

FORMATS = ("jsonl", "csv")
CSV_FIELDS = ("file", "caption", "score", "error", "model", "decoding")
PROVENANCE = ("model", "decoding")


# Names that promise another format: JSONL written under them would be read wrongly (json.load fails on it, a
# .gz is expected compressed, gallery.html is --html's), so without --format they are refused.
OTHER_FORMATS = {".json": "one JSON document", ".tsv": "tab-separated values", ".html": "an HTML page (--html)",
                 ".htm": "an HTML page (--html)", ".gz": "compressed data", ".bz2": "compressed data",
                 ".xz": "compressed data", ".zst": "compressed data", ".zip": "an archive", ".parquet": "Parquet",
                 ".xlsx": "a spreadsheet", ".yaml": "YAML", ".yml": "YAML"}


def format_for(path: str | Path, fmt: str | None = None) -> str:
    """The explicit format, else csv for a .csv file, else jsonl; a name promising another format is refused."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise CaptionerError(f"unknown output format '{fmt}'; use one of: {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in OTHER_FORMATS:
        stem = re.sub(r"\.(jsonl|csv|json|tsv)$", "", Path(path).name[:-len(suffix)], flags=re.I)  # a.jsonl.gz: a
        raise CaptionerError(f"{path}: a {suffix} name promises {OTHER_FORMATS[suffix]}, but captions are written as "
                             f"JSONL (one JSON object per line) or CSV: name it {stem}.jsonl or {stem}.csv, or "
                             f"pass --format jsonl or --format csv to keep this name")
    return "csv" if suffix == ".csv" else "jsonl"


def part_path(path: str | Path, rank: int) -> Path:
    """Where process `rank` of a torchrun run writes its share of the output at path."""
    path = Path(path)
    return path.with_name(f"{path.name}.part-{rank:05d}")


def part_paths(path: str | Path) -> list[Path]:
    """The part files of the output at path that exist now (left by this run's processes or a killed run)."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.part-\d{5}")
    return sorted(p for p in path.parent.glob(f"{path.name}.part-*") if pattern.fullmatch(p.name))


def file_key(path: str) -> str:
    """The key every spelling of one input path shares ("./a.jpg", "a.jpg", "/abs/a.jpg"). Symbolic links stay
    apart: a link is an input of its own, named as the user named it."""
    return os.path.abspath(path)


class AppendLog:
    """A text file of whole lines that is only ever appended to, locked while open.

    `lines` are the complete lines found when opening (appends are not kept in memory: a gallery can be
    large); drop_partial_line() recovers from a kill mid-write. Lines are bytes-exact round trips of str,
    file names that are not valid UTF-8 included (surrogateescape).
    """

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise CaptionerError(f"{self.path} is a folder; give a file name")
        make_parent(self.path)
        self._lock = None
        self._file = self._open_locked()
        if overwrite:
            self._file.truncate(0)
        self._file.seek(0)
        data = self._file.read()
        self._complete = data.rfind(b"\n") + 1
        self.partial = data[self._complete:].decode("utf-8", "surrogateescape")  # "" after a clean close
        # split("\n"), not splitlines(): JSON keeps U+2028 and friends unescaped inside a line.
        self.lines = data[:self._complete].decode("utf-8", "surrogateescape").split("\n")[:-1]

    def is_ours(self, first_line: str) -> bool:
        """Whether the file could have been written by us: empty, or starting the way we start it."""
        start = self.lines[0] if self.lines else self.partial
        return start.startswith(first_line) or first_line.startswith(start)

    def drop_partial_line(self) -> None:
        """Cut off what follows the last newline: a write a kill interrupted. The owner calls this once it
        has checked that the file is its own, so a stranger's file is never modified."""
        if self.partial:
            log.warning("%s: dropped an incomplete last line (%r) left by an interrupted run",
                        self.path, self.partial[:60])
            self._file.truncate(self._complete)
            self._sync()
            self.partial = ""

    def _open_locked(self, path: Path | None = None):
        """path (default: the log's own) opened for appending and locked for this process."""
        path = path or self.path
        try:
            f = open(path, "a+b")
        except OSError as e:
            raise CaptionerError(f"{self.path}: cannot open for writing ({e.strerror or e})") from None
        try:
            self._lock = ProcessLock(self.path, str(self.path), "wait for the other run to finish or choose another "
                                     "output file", file=f)
        except BaseException:
            f.close()
            raise
        return f

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, lines: list[str]) -> None:
        """Write whole lines in one call, then flush and fsync: a kill loses at most these lines."""
        if not lines:
            return
        try:
            self._file.seek(0, os.SEEK_END)
            self._file.write("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))
            self._sync()
        except OSError as e:  # a full disk: what is already in the file stays, a rerun resumes after it
            raise os_failure(f"cannot write {self.path}", e, then="; the lines written before are kept: rerun "
                             "the same command to resume") from None

    def rewrite(self, lines: list[str]) -> None:
        """Replace the whole content atomically (temporary file, then rename): a kill keeps old or new.

        The temporary file is locked before the rename, so the file at this path is never unlocked."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        old_file = self._file
        self._lock.release()  # forgets the old file's lock; closing old_file below unlocks it
        try:
            new_file = self._open_locked(tmp)
            new_file.truncate(0)
            new_file.write("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))
            new_file.flush()
            os.fsync(new_file.fileno())
            move_into_place(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self._lock = ProcessLock(self.path, str(self.path), file=old_file)  # still ours: never closed
            raise CaptionerError(f"cannot rewrite {self.path}: {e.strerror or e}") from None
        self._file = new_file
        old_file.close()
        self.lines, self.partial = list(lines), ""

    def close(self) -> None:
        self._lock.release()
        try:
            self._file.close()  # closing releases the lock
        except OSError:  # a full disk: append already failed on the same error, which is the one reported
            pass


class CaptionsFile:
    """Caption and error records in JSONL or CSV; `done` maps each input already recorded to its record.

    retry_errors=True removes the error records, so those files are tried again (a file that was still
    being copied, a disk that was not mounted); by default a rerun skips them like captioned ones.
    """

    def __init__(self, path: str | Path, fmt: str | None = None, overwrite: bool = False,
                 retry_errors: bool = False, made_by: dict | None = None, also_made_by=None):
        """also_made_by: None, or a function giving made_by as an older captioner spelled it (the model id of the
        files' bytes, before it was computed from the tensors): records carrying it are the same model's."""
        self.format = format_for(path, fmt)
        self.made_by = {k: str(v) for k, v in (made_by or {}).items() if k in PROVENANCE}
        self._also_made_by = also_made_by
        self.log = AppendLog(path, overwrite)
        self.path = self.log.path
        try:
            if not self.log.is_ours(_csv_line(CSV_FIELDS) if self.format == "csv" else '{"file": '):
                raise self._not_ours(1, "it starts differently")
            records = self._parse(self.log.lines)
            self._check_provenance(records)
            self.log.drop_partial_line()
            if retry_errors and any("error" in r for r in records):
                records = [r for r in records if "error" not in r]
                self.log.rewrite(self._header() + [self._line(r) for r in records])
            if not self.log.lines:
                self.log.append(self._header())
        except BaseException:
            self.log.close()
            raise
        self.done = {file_key(r["file"]): r for r in records}

    def _check_provenance(self, records: list[dict]) -> None:
        """Refuse to resume a file holding records that another model or other decoding settings made."""
        if not self.made_by:
            return
        older = None  # made_by as an older captioner spelled it, computed once and only when a record differs
        for number, record in enumerate(records, start=1):
            theirs = {k: record.get(k) or None for k in PROVENANCE}
            if theirs != self.made_by and self._also_made_by is not None:
                older = older or {**self.made_by, **{k: str(v) for k, v in self._also_made_by().items()}}
            if theirs != self.made_by and theirs != older:
                differ = "; ".join(f"{k} {theirs[k] or 'not recorded'} (now {self.made_by[k]})"
                                   for k in PROVENANCE if theirs[k] != self.made_by[k])
                raise CaptionerError(f"{self.path} holds captions made otherwise (record {number}: {differ}); "
                                     f"one file never mixes two models' captions: pass --overwrite to replace "
                                     f"them, or choose another --out")

    def append(self, records: list[dict]) -> None:
        records = [{**r, **self.made_by} for r in records]
        self.log.append([self._line(r) for r in records])
        self.done.update((file_key(r["file"]), r) for r in records)

    def absorb(self, parts: list[Path], order: dict[str, int] | None = None, retry_errors: bool = False) -> int:
        """Append the records of part files that are not in this file yet, then delete the parts.

        order maps file_key(file) to its place among the inputs, so that the records come in input order (as
        one process writes them); retry_errors drops error records, as opening with retry_errors does.
        Records are appended (and fsynced) before any part is deleted: a kill in between loses nothing, and
        the next absorb skips what is already here. Returns the number of records added.
        """
        new = {}
        for path in parts:
            # Drops a line a kill cut short; refuses a stranger's file, or records of another model or decoding.
            part = CaptionsFile(path, self.format, made_by=self.made_by)
            part.close()
            for key, record in part.done.items():
                if key not in self.done and not (retry_errors and "error" in record):
                    new.setdefault(key, record)
        last = len(order or ())
        added = sorted(new.values(), key=lambda r: (order or {}).get(file_key(r["file"]), last))
        self.append(added)
        for path in parts:
            path.unlink(missing_ok=True)
        return len(added)

    def close(self) -> None:
        self.log.close()

    def _header(self) -> list[str]:
        return [_csv_line(CSV_FIELDS)] if self.format == "csv" else []

    def _line(self, record: dict) -> str:
        return _json_line(record) if self.format == "jsonl" else _csv_line([record.get(k, "") for k in CSV_FIELDS])

    def _parse(self, lines: list[str]) -> list[dict]:
        """Records already in the file; anything that is not a record is an error naming the line."""
        if self.format == "csv":
            rows = list(csv.reader(io.StringIO("".join(line + "\n" for line in lines), newline="")))
            if not rows:
                return []
            if tuple(rows[0]) != CSV_FIELDS:
                raise self._not_ours(1, f"header {','.join(rows[0])[:80]!r}, expected {','.join(CSV_FIELDS)!r}")
            records = []
            for number, row in enumerate(rows[1:], start=2):
                if len(row) != len(CSV_FIELDS) or not row[0]:
                    raise self._not_ours(number, f"{len(row)} columns")
                file, caption, score, error, model, decoding = row
                try:
                    records.append({"file": file, "error": error, "model": model, "decoding": decoding} if error else
                                   {"file": file, "caption": caption, "score": float(score) if score else None,
                                    "model": model, "decoding": decoding})
                except ValueError:
                    raise self._not_ours(number, f"score {score[:20]!r}") from None
            return records
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                raise self._not_ours(number, "not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("file"), str):
                raise self._not_ours(number, 'no "file" field')
            records.append(record)
        return records

    def _not_ours(self, line: int, what: str) -> CaptionerError:
        return CaptionerError(f"{self.path} line {line} is not a caption record ({what}): to resume, the output "
                              f"must be one this command wrote; choose another --out or pass --overwrite")


def _csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)  # "\r\n" so fields holding either get quoted
    return buffer.getvalue()[:-2]


def _json_line(record: dict) -> str:
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not valid UTF-8: \udcXX escapes keep the file valid UTF-8
        line = json.dumps(record)
    return line
