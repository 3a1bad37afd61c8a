"""Property-based tests of the config and dataset readers (Hypothesis): generated configs, overrides and caption
files go through `captioner prepare` (in process: the whole CLI path, exit path included) and must give exit 0
with a correct result, or exit 2 with one line; never a traceback, never a hang, never a changed file that
existed before. Derandomized and bounded (40 examples per test, a time limit per example) so that it runs the
same in CI, in about 30 s (marked slow: the full run, not the fast subset); a few examples also run through a
real process."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.cli import main
from captioner.config import valid_keys

from helpers import ROOT

IMAGES = [f"p{i:02d}.png" for i in range(12)]
PER_EXAMPLE_S = 20  # far above what one example takes: reaching it means a hang
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# Values of every kind a YAML file or an override can hold, the awkward ones included.
SCALARS = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70), st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(["auto", "true", "false", "csv", "jsonl", "coco", "null", "~", "1e-3",
                                           "nan", ".inf", "-.inf", "resnet18", "layer4", "utf-8", "latin-1",
                                           "utf-16", "bfloat16", "cider", "0x10", "1_000", "2024-01-01", "yes"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS,
                                                                           max_size=2))
# Keys whose value is the amount of work (images generated): kept small here, it is a size, not a parse.
WORK_KEYS = {"dataset.synthetic_images"}
KEYS = st.sampled_from([k for k in valid_keys() if k not in WORK_KEYS]
                       + ["train.epoch", "nosuch.key", "dataset", "train", "dataset.", ".x", "a.b.c"])
CAPTIONS = st.one_of(
    st.sampled_from(["a red square", "two dogs, running", "a \"quoted\" cat", "un carré rouge", "一只猫", "",
                     "   ", "a\u2028dog", "x\x0cy", "tab\there", "line\nbreak", "semi;colon|pipe", "#0", "{json}"]),
    st.text(max_size=30))


class Hang(BaseException):
    """An example that ran past PER_EXAMPLE_S."""


@contextlib.contextmanager
def time_limit(seconds: int):
    def alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def no_fsync():
    """Durability is not what is tested here, and an fsync per output file would make the examples wait for the
    disk: the atomic writes stay atomic, only their flush to the platter is skipped."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images every generated dataset may name, and the folder each example works in."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    for i, name in enumerate(IMAGES):
        Image.new("RGB", (8, 8), (i * 20, 40, 90)).save(root / "images" / name)
    return root


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _prepare(world: Path, config_text: str, overrides: list[str], example: str) -> tuple[int, str, Path]:
    """`captioner prepare` with this config and overrides, in a fresh folder; (exit status, stderr, out folder)."""
    work = world / example
    work.mkdir()
    (work / "config.yaml").write_text(config_text, encoding="utf-8", errors="surrogatepass")
    before = _snapshot(world)
    out = work / "prepared"
    stderr = io.StringIO()
    cwd = os.getcwd()
    os.chdir(work)  # relative paths a config names land here, never in the checkout
    try:
        with time_limit(PER_EXAMPLE_S), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            code = main(["-q", "prepare", "--config", str(work / "config.yaml"), "--out", str(out), *overrides])
    finally:
        os.chdir(cwd)
    err = stderr.getvalue()
    after = _snapshot(world)
    changed = [str(p) for p, data in before.items() if after.get(p) != data]
    assert not changed, f"changed files that existed before: {changed}\n{err}"
    assert "Traceback" not in err and "internal error" not in err and "Hang" not in err, err
    assert code in (0, 2), f"exit {code}\n{err}"
    event(f"exit {code}" + (": " + re.sub(r"/\S+", "PATH", err.split("error: ")[-1])[:50] if code else ""))
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("captioner ")]
        assert len(lines) == 1 and lines[0].startswith("captioner prepare: error: ") and len(lines[0]) > 40, err
        assert not (out / "summary.json").exists()
    return code, err, out


_counter = iter(range(10**9))


def _csv_dataset(world: Path, rows: list[tuple[str, str]]) -> Path:
    path = world / f"captions{next(_counter)}.csv"
    with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path


# Two different captions per image: a repeated (image, caption) row is counted once (data/csv.py)
BASE_ROWS = ([(name, f"a shape number {i} on a table") for i, name in enumerate(IMAGES)]
             + [(name, f"shape {i} seen again") for i, name in enumerate(IMAGES)])


def _base(world: Path) -> dict:
    path = world / "base.csv"
    if not path.exists():
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([("image", "caption"), *BASE_ROWS])
    return {"dataset": {"format": "auto", "annotations": str(path), "images": str(world / "images"),
                        "synthetic_images": 8}}


@pytest.mark.slow  # about 30 s for the three property tests: CI's full run, not the fast subset
@given(edits=st.lists(st.tuples(KEYS, VALUES), max_size=3), duplicate=st.integers(0, 7).map(lambda n: n == 7),
       as_override=st.booleans())
@FUZZ
def test_generated_configs(world, edits, duplicate, as_override):
    config = _base(world)
    overrides = []
    for key, value in edits:
        section, _, name = key.partition(".")
        if as_override:
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            overrides.append(f"{key}={text}")
        elif name:
            config.setdefault(section, {}) if isinstance(config.get(section, {}), dict) else None
            if isinstance(config.get(section), dict):
                config[section][name] = value
        else:
            config[section] = value
    text = yaml.safe_dump(config, allow_unicode=True)
    if duplicate:  # the same section again, as a hand edit would leave it: must never keep only the last
        text += "dataset:\n  min_freq: 2\n"
    code, err, out = _prepare(world, text, overrides, f"config{next(_counter)}")
    if duplicate:
        assert code == 2 and "duplicate key 'dataset'" in err
        return
    if code == 0:
        summary = json.loads((out / "summary.json").read_text())
        assert sum(s["captions"] for s in summary["splits"].values()) == len(BASE_ROWS)
        assert sum(s["images"] for s in summary["splits"].values()) == len(IMAGES)
        given_dataset = {k: v for k, v in config.get("dataset", {}).items() if k not in ("annotations", "images")}
        for key, value in given_dataset.items():
            kept = summary["dataset_config"][key]
            if isinstance(value, float) and not isinstance(kept, str):
                assert math.isfinite(value) and kept == value
            elif isinstance(value, int) and not isinstance(value, bool) and not isinstance(kept, str):
                assert kept == value


@st.composite
def caption_rows(draw):
    names = st.sampled_from(IMAGES)
    return draw(st.lists(st.tuples(names, CAPTIONS), min_size=1, max_size=20))


def _write(world: Path, kind: str, rows: list[tuple[str, str]]) -> Path:
    if kind == "csv":
        return _csv_dataset(world, rows)
    path = world / f"captions{next(_counter)}.{ 'jsonl' if kind == 'jsonl' else 'json'}"
    if kind == "jsonl":
        lines = [json.dumps({"image": n, "caption": c}, ensure_ascii=i % 2 == 0) for i, (n, c) in enumerate(rows)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    else:
        names = sorted({n for n, _ in rows})
        ids = {n: i + 1 for i, n in enumerate(names)}
        data = {"images": [{"id": ids[n], "file_name": n} for n in names],
                "annotations": [{"id": k, "image_id": ids[n], "caption": c} for k, (n, c) in enumerate(rows)]}
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8", errors="surrogatepass")
    return path


def _kept_captions(kind: str, rows: list[tuple[str, str]]) -> list[str]:
    """The captions a reader keeps: stripped, holding a word (records.drop_wordless), and for CSV and JSONL each
    (image, caption) once (csv.records_from_rows); COCO keeps its annotations as they are."""
    from captioner.data.records import _ASCII_WORD
    from captioner.text import tokenize
    pairs = [(n, c.strip()) for n, c in rows if c.strip() and (_ASCII_WORD.search(c.strip()) or tokenize(c.strip()))]
    if kind != "coco":
        pairs = list(dict.fromkeys(pairs))
    return [c for _, c in pairs]


@pytest.mark.slow
@given(kind=st.sampled_from(["csv", "jsonl", "coco"]), rows=caption_rows())
@FUZZ
def test_generated_caption_files_are_read_exactly(world, kind, rows):
    """Well-formed files of any caption text: every non-blank caption is read, whole; else one line."""
    path = _write(world, kind, rows)
    config = yaml.safe_dump({"dataset": {"annotations": str(path), "images": str(world / "images"),
                                         "max_missing_fraction": 1.0}})
    code, err, out = _prepare(world, config, [], f"{kind}{next(_counter)}")
    expected = _kept_captions(kind, rows)
    if code == 2:
        assert not expected or "split" in err or "no captions" in err or "vocabulary" in err, err
        return
    summary = json.loads((out / "summary.json").read_text())
    assert sum(s["captions"] for s in summary["splits"].values()) == len(expected), err
    references = {}
    for split in ("val", "test"):
        if (out / f"captions_{split}.json").exists():
            for a in json.loads((out / f"captions_{split}.json").read_text())["annotations"]:
                references.setdefault(a["image_id"], []).append(a["caption"])
    read = sorted(c for caps in references.values() for c in caps)
    assert set(read) <= set(expected)  # each one a caption of the file, whole (not cut at a comma or a U+2028)


@pytest.mark.slow
@given(kind=st.sampled_from(["csv", "jsonl", "coco", "flickr", "karpathy"]), rows=caption_rows(),
       damage=st.sampled_from(["truncate", "bytes", "bom16", "latin1", "nul", "nul-name", "duplicate-id",
                               "shared-file", "extra-column", "swap"]),
       where=st.integers(min_value=0, max_value=10**6), junk=st.binary(min_size=1, max_size=8))
@FUZZ
def test_damaged_caption_files_are_refused_or_read(world, kind, rows, damage, where, junk):
    if kind == "flickr":
        path = world / f"tokens{next(_counter)}.txt"
        path.write_text("".join(f"{n}#{k}\t{c}\n" for k, (n, c) in enumerate(rows)), encoding="utf-8",
                        errors="surrogatepass")
    elif kind == "karpathy":
        path = world / f"karpathy{next(_counter)}.json"
        images = [{"filename": n, "split": ["train", "val", "test"][i % 3], "sentences": [{"raw": c}]}
                  for i, (n, c) in enumerate(rows)]
        path.write_text(json.dumps({"images": images}), encoding="utf-8", errors="surrogatepass")
    else:
        path = _write(world, kind, rows)
    data = path.read_bytes()
    at = where % (len(data) + 1)
    if damage == "truncate":
        data = data[:at]
    elif damage == "bytes":
        data = data[:at] + junk + data[at:]
    elif damage == "bom16":
        data = "\ufeff".encode("utf-16-le") + data.decode("utf-8", "surrogatepass").encode("utf-16-le", "replace")
    elif damage == "latin1":
        data = data.decode("utf-8", "surrogatepass").encode("latin-1", "replace")
    elif damage == "nul":
        data = data.replace(b",", b"\x00", 1)
    elif damage == "nul-name":
        data = data.replace(b"p00.png", b"p0\\u00000.png" if kind in ("jsonl", "coco", "karpathy") else b"p0\x000.png")
    elif damage == "duplicate-id" and kind == "coco":
        coco = json.loads(data)
        coco["images"].append({"id": coco["images"][0]["id"], "file_name": "p11.png"})
        data = json.dumps(coco).encode()
    elif damage == "shared-file":
        data = data.replace(b"p00.png", b"./p01.png")
    elif damage == "extra-column" and kind == "csv":
        data = data.replace(b"\r\n", b",extra\r\n", 1 + at % 3)
    elif damage == "swap":
        data = data.replace(b"image", b"caption", 1)
    path.write_bytes(data)
    config = yaml.safe_dump({"dataset": {"annotations": str(path), "images": str(world / "images"),
                                         "max_missing_fraction": 1.0}})
    _prepare(world, config, [], f"damaged{next(_counter)}")


@pytest.mark.slow
def test_generated_failures_through_a_real_process(world, tmp_path):
    """The exit path in a real interpreter: no traceback at exit, one line, the same statuses."""
    cases = [("train:\n  lr: .nan\n", 2), ("dataset:\n  root: 123\n", 2), ("train: {}\ntrain: {}\n", 2), ("", 2),
             ("- a list\n", 2), (yaml.safe_dump(_base(world)), 0)]
    for i, (text, status) in enumerate(cases):
        config = tmp_path / f"c{i}.yaml"
        config.write_text(text)
        done = subprocess.run([sys.executable, "-m", "captioner", "-q", "prepare", "--config", str(config), "--out",
                               str(tmp_path / f"out{i}")], cwd=tmp_path, capture_output=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        err = done.stderr.decode()
        assert done.returncode == status and "Traceback" not in err and "Exception ignored" not in err, (text, err)
        assert len(err.strip().splitlines()) == (1 if status else 0), err
