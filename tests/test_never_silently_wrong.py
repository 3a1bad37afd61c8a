"""Cases that used to give a wrong answer without a word: stale features, stale captions, two trainings in one
run dir, non-ASCII text, a rerun right after kill -9, empty captions. Each now gives the right answer or one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.cli import main
from captioner.config import load_config
from captioner.data.datasets import detect_format, load_records, read_dataset
from captioner.data.cache import FeatureCache, default_cache_dir
from captioner.errors import CaptionerError
from captioner.jobs import extract
from captioner.lock import ProcessLock
from captioner.model.decoding import SearchOptions, decode
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary, join_words, tokenize

from helpers import ROOT, SMALL_MODEL, TINY, noise_pngs, small_overrides, untrained_checkpoint

# a one-epoch run of the small model on a CSV dataset
CSV_RUN = [*SMALL_MODEL, "train.num_workers=0", "decode.batch_size=8", "train.batch_size=16", "train.epochs=1"]
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20), "white": (240, 240, 240),
           "black": (10, 10, 10)}


def _csv_dataset(folder: Path, palette: list[str], split_column: list[str] | None = None, text=None) -> Path:
    """img0.png.. in folder, one plain colour each, and captions.csv naming them (optionally with a split column)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "image,caption" + (",split" if split_column else "")
    rows = [header]
    for i, colour in enumerate(palette):
        Image.new("RGB", (32, 32), COLOURS[colour]).save(folder / f"img{i}.png")
        caption = text(colour) if text else f"a {colour} square"
        rows.append(f"img{i}.png,{caption}" + (f",{split_column[i]}" if split_column else ""))
    path = folder / "captions.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _config(annotations: Path, *extra):
    return load_config(TINY, ["dataset.format=auto", f"dataset.annotations={annotations}",
                              f"dataset.root={annotations.parent}", *CSV_RUN, *extra])


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"captioner {command}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# ---------------------------------------------------------------- stale features


def test_features_of_another_dataset_with_the_same_file_names_are_never_served(tmp_path):
    first = _csv_dataset(tmp_path / "a", ["red"] * 10)
    second = _csv_dataset(tmp_path / "b", ["blue"] * 10)  # same names img0.png.., other pictures
    # The default cache folder follows the annotations file, not dataset.root's default (data/synthetic).
    cfg_a, cfg_b = _config(first, "dataset.root=data/synthetic"), _config(second, "dataset.root=data/synthetic")
    assert default_cache_dir(cfg_a) == tmp_path / "a" / "features" / "captions-resnet18-layer4-64"
    assert default_cache_dir(cfg_a) != default_cache_dir(cfg_b)
    # Even when both are told to share one folder, the second dataset's files are not the first's rows.
    shared = tmp_path / "shared-cache"
    cfg_a, cfg_b = _config(first, f"cache.dir={shared}"), _config(second, f"cache.dir={shared}")
    assert extract.main(extract.ExtractJob(cfg_a, "train,val,test", device="cpu", num_workers=0))["added"] == 10
    cache = FeatureCache.load(shared)
    records_a, records_b = load_records(cfg_a.dataset), load_records(cfg_b.dataset)
    assert cache.source(records_a) is not None
    assert cache.source(records_b) is None and not any(cache.has(r) for r in records_b)
    # One of the first dataset's pictures replaced in place (same name): its row is stale, the others are not.
    replaced = Path(records_a[0].path)
    Image.new("RGB", (32, 32), COLOURS["green"]).save(replaced)
    os.utime(replaced, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    assert not cache.has(records_a[0]) and all(cache.has(r) for r in records_a[1:])
    again = extract.main(extract.ExtractJob(cfg_a, "train,val,test", device="cpu", num_workers=0))
    assert again["added"] == 1 and again["skipped_existing"] == 9
    # The same files named three ways are one row each.
    relative = [type(r)(r.image_id, os.path.relpath(r.path), r.captions, r.split) for r in records_a]
    assert all(FeatureCache.load(shared).has(r) for r in relative)


# ---------------------------------------------------------------- stale captions


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    small = ["decode.max_len=6", "encoder.image_size=64"]
    return (untrained_checkpoint(folder / "a.pt", *small, seed=0),
            untrained_checkpoint(folder / "b.pt", *small, seed=1))


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow  # several seconds: the fast subset stays under a minute
def test_one_captions_file_never_holds_two_models_or_one_image_twice(checkpoints, photos, tmp_path, monkeypatch,
                                                                      capsys):
    first, second = checkpoints
    monkeypatch.chdir(tmp_path)
    out, gallery = tmp_path / "captions.jsonl", tmp_path / "gallery.html"
    base = ["caption", "--out", str(out), "--workers", "0", "--device", "cpu"]
    assert main([*base, "--checkpoint", first, "--beam", "2", "photos", "--html", str(gallery)]) == 0
    records = _lines(out)
    assert len(records) == 6 and len({r["model"] for r in records}) == 1
    assert records[0]["decoding"].startswith("beam 2, max_len 6")
    # photos/, ./photos/ and the absolute path are the same six images: nothing new is written.
    for spelling in ("./photos/", str(photos.resolve()), "photos/p0.png"):
        assert main([*base, "--checkpoint", first, "--beam", "2", spelling]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["captioned"] == 0
    assert len(_lines(out)) == 6
    before = out.read_bytes(), gallery.read_bytes()
    # Another checkpoint, or other decoding settings, into the same file: one line, nothing changed.
    for checkpoint, beam, words in [(second, "2", "model"), (first, "3", "decoding")]:
        assert main([*base, "--checkpoint", checkpoint, "--beam", beam, "photos"]) == 2
        line = _one_error_line(capsys, "caption")
        assert words in line and "--overwrite" in line
        assert (out.read_bytes(), gallery.read_bytes()) == before
    base += ["--beam", "2"]
    # The gallery keeps its own record of what made it.
    assert main([*base, "--checkpoint", second, "photos", "--out", str(tmp_path / "other.jsonl"),
                 "--html", str(gallery)]) == 2
    assert "--html" in _one_error_line(capsys, "caption") and gallery.read_bytes() == before[1]
    assert main([*base, "--checkpoint", second, "photos", "--overwrite"]) == 0
    records = _lines(out)
    assert len(records) == 6 and len({r["model"] for r in records}) == 1 and records[0]["model"] not in before[0].decode()


# ---------------------------------------------------------------- one process per run dir, cache, output


HOLDER = """
import os, sys, time
from captioner.lock import ProcessLock
lock = ProcessLock(sys.argv[1], "held", file=open(sys.argv[1], "a+b") if sys.argv[2] == "file" else None)
child = os.fork()  # as a DataLoader worker is forked: it must not keep the lock when its parent dies
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


class _Holder:
    """A process holding the lock on path with a forked child, like a job with DataLoader workers."""

    def __init__(self, path: Path, mode: str = "lockfile"):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.child = int(self.process.stdout.readline())

    def kill(self):
        """kill -9 the holder; its forked child lives on (until the test ends) as orphaned workers would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def close(self):
        try:
            os.kill(self.child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.kill()
        self.process.stdout.close()


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_second_training_in_a_run_dir_is_refused_and_a_rerun_after_kill_9_works(small_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--config", str(TINY), "--run-dir", str(run_dir), *small_overrides(small_root, "train.epochs=1")]
    holder = _Holder(run_dir / ".lock")
    try:
        before = _snapshot(run_dir)
        assert main(argv) == 2
        line = _one_error_line(capsys, "train")
        assert f"run dir {run_dir} is in use by another captioner process (pid {holder.process.pid})" in line
        assert _snapshot(run_dir) == before  # nothing written: no config.yaml, no metrics.jsonl
        holder.kill()  # the holder dies; its forked child is still alive
        assert main(argv) == 0  # at once: the lock died with its process
        capsys.readouterr()
        steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len([x for x in steps if "loss" in x]) == len({x["step"] for x in steps if "loss" in x})
    finally:
        holder.close()
    # Within one process too (e.g. two jobs started from one notebook).
    with ProcessLock(run_dir / ".lock", "x"):
        assert main(argv) == 2
        assert "in use" in _one_error_line(capsys, "train")


@pytest.mark.slow
def test_extract_after_kill_9_reruns_at_once(tmp_path, capsys):
    annotations = _csv_dataset(tmp_path / "data", ["red", "blue", "green", "white", "black"] * 2)
    cfg = _config(annotations)
    folder = default_cache_dir(cfg)
    holder = _Holder(folder / "lock")
    try:
        with pytest.raises(CaptionerError, match=r"feature cache .* is in use by another captioner process \(pid"):
            extract.main(extract.ExtractJob(cfg, device="cpu", num_workers=0))
        holder.kill()
        assert extract.main(extract.ExtractJob(cfg, device="cpu", num_workers=0))["added"] == 10
    finally:
        holder.close()


@pytest.mark.slow
def test_caption_after_kill_9_with_workers_reruns_at_once(checkpoints, tmp_path):
    folder = noise_pngs(tmp_path / "many", 40, 32)
    out = tmp_path / "captions.jsonl"
    cmd = [sys.executable, "-m", "captioner", "-q", "caption", "--checkpoint", checkpoints[0], str(folder),
           "--out", str(out), "--batch-size", "2", "--workers", "2", "--beam", "1", "--device", "cpu"]
    process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # its two DataLoader workers notice only later
    process.wait()
    assert main(cmd[cmd.index("caption"):]) == 0  # immediately: never "being written by another process"
    names = [os.path.basename(r["file"]) for r in _lines(out)]
    assert sorted(names) == [f"img{i:03d}.png" for i in range(40)]


@pytest.mark.slow
def test_output_lock_survives_a_rewrite_and_refuses_a_second_writer(tmp_path):
    from captioner.engine.outputs.captions_file import CaptionsFile
    path = tmp_path / "c.jsonl"
    path.write_text('{"file": "a.png", "error": "x"}\n{"file": "b.png", "caption": "a dog", "score": -1}\n')
    held = CaptionsFile(path, retry_errors=True)  # rewrites the file without its error record
    try:
        holder = None
        with pytest.raises(CaptionerError, match="another captioner process"):
            CaptionsFile(path)
        assert [r["file"] for r in _lines(path)] == ["b.png"]
    finally:
        held.close()
    holder = _Holder(path, "file")
    try:
        with pytest.raises(CaptionerError, match=r"in use by another captioner process \(pid"):
            CaptionsFile(path)
    finally:
        holder.close()
    CaptionsFile(path).close()


# ---------------------------------------------------------------- Unicode text


def test_tokenize_keeps_every_script():
    assert tokenize("café crème") == ["café", "crème"]
    assert tokenize("Cafe\u0301 CRÈME!") == ["café", "crème"]  # combining accent = precomposed, lower-cased
    assert tokenize("Ein Hund läuft über die Wiese.") == ["ein", "hund", "läuft", "über", "die", "wiese"]
    assert tokenize("Собака бежит, быстро!") == ["собака", "бежит", "быстро"]
    assert tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # combining vowel signs stay inside the word
    assert tokenize("一只狗在草地上奔跑。") == list("一只狗在草地上奔跑")
    assert tokenize("l’homme") == ["l'homme"]
    assert join_words(tokenize("一只狗 runs")) == "一只狗 runs"
    # ASCII is unchanged (coco-caption equality rests on it).
    assert tokenize("Two dogs' toys, 3 balls.") == ["two", "dogs", "toys", "3", "balls"]
    assert tokenize("A man's hat-stand don't") == ["a", "man's", "hat", "stand", "don't"]


def test_chinese_captions_give_a_vocabulary_and_latin1_is_one_line_or_decoded(tmp_path):
    chinese = _csv_dataset(tmp_path / "zh", ["red", "blue"], text=lambda c: {"red": "一个红色的方块", "blue": "蓝色方块"}[c])
    _, records = read_dataset(_config(chinese).dataset)
    vocab = Vocabulary.build([c for r in records for c in r.captions])
    assert {"红", "蓝", "方", "块"} <= set(vocab.tokens) and vocab.decode(vocab.encode("蓝色方块", 10)) == "蓝色方块"
    latin1 = tmp_path / "latin1"
    _csv_dataset(latin1, ["red", "blue"], text=lambda c: f"un carré {c}")
    csv_path = latin1 / "captions.csv"
    csv_path.write_bytes(csv_path.read_text(encoding="utf-8").encode("latin-1"))
    offset = csv_path.read_bytes().index(b"\xe9")
    with pytest.raises(CaptionerError) as info:
        read_dataset(_config(csv_path).dataset)
    assert f"{csv_path} is not UTF-8 at byte {offset}" in str(info.value) and "dataset.encoding" in str(info.value)
    _, records = read_dataset(_config(csv_path, "dataset.encoding=latin-1").dataset)
    assert records[0].captions == ["un carré red"]
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text("image,caption\nimg0.png,a dog\n", encoding="utf-16")
    with pytest.raises(CaptionerError, match="UTF-16 .*dataset.encoding=utf-16"):
        read_dataset(_config(utf16, f"dataset.images={latin1}").dataset)
    with pytest.raises(CaptionerError, match="dataset.encoding 'klingon'"):
        _config(csv_path, "dataset.encoding=klingon")


def test_coco_json_with_a_byte_order_mark_is_coco(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": "Un chien"}]}
    path = tmp_path / "captions.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(data, ensure_ascii=False).encode())
    fmt, _ = detect_format(path)
    assert fmt == "coco"
    fmt, records = read_dataset(_config(path).dataset)
    assert fmt == "coco" and records[0].captions == ["Un chien"]


# ---------------------------------------------------------------- empty captions


def test_decoding_never_returns_an_empty_caption():
    torch.manual_seed(0)
    cfg = load_config(TINY, ["encoder.image_size=64"])
    model = CaptionModel(cfg.encoder, cfg.model, 12).eval()
    with torch.no_grad():
        model.decoder.out.bias[Vocabulary.end_id] = 100.0  # <end> far likelier than any word, at every step
        model.decoder.out.bias[Vocabulary.pad_id] = 90.0
    raw = model.encode(torch.rand(3, 3, 64, 64))
    for beam, sample in ((1, False), (10, False), (1, True)):  # greedy, beam, sampled
        out = decode(model, raw, SearchOptions(beam, max_len=5, sample=sample))
        first = out.tokens[:, 0]
        assert not torch.isin(first, torch.tensor([Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.end_id])).any()
        assert (out.lengths >= 2).all()  # a word, then <end>


@pytest.mark.parametrize("extra, words", [
    (["dataset.min_freq=1000"], "vocabulary holds only"),  # every word rarer than min_freq
])
def test_training_refuses_a_vocabulary_of_only_special_tokens(tmp_path, capsys, extra, words):
    annotations = _csv_dataset(tmp_path / "d", ["red", "blue"] * 10)
    run_dir = tmp_path / "run"
    argv = ["train", "--config", str(TINY), "--run-dir", str(run_dir), "dataset.format=auto",
            f"dataset.annotations={annotations}", *CSV_RUN, *extra]
    assert main(argv) == 2
    assert words in _one_error_line(capsys, "train")
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.slow  # trains the tiny dataset to the end
def test_training_refuses_an_empty_val_split_and_warns_on_tiny_data(tmp_path, capsys, caplog):
    no_val = _csv_dataset(tmp_path / "d", ["red", "blue"] * 5, split_column=["train"] * 8 + ["test"] * 2)
    base = ["train", "--config", str(TINY), "dataset.format=auto", *CSV_RUN]
    assert main([*base[:3], "--run-dir", str(tmp_path / "run"), *base[3:], f"dataset.annotations={no_val}"]) == 2
    assert "val split is empty" in _one_error_line(capsys, "train")
    tiny = _csv_dataset(tmp_path / "t", ["red", "blue"] * 3, split_column=["train"] * 4 + ["val"] * 2)
    assert main([*base[:3], "--run-dir", str(tmp_path / "run2"), *base[3:], f"dataset.annotations={tiny}"]) == 0
    err = caplog.text
    assert "only 4 training images" in err and "only 2 validation images" in err and "words in the vocabulary" in err


# ---------------------------------------------------------------- configs: paths


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    annotations = _csv_dataset(tmp_path / "project" / "data", ["red", "blue"] * 5)
    config = tmp_path / "project" / "configs" / "mine.yaml"
    config.parent.mkdir()
    config.write_text("dataset:\n  format: auto\n  annotations: ../data/captions.csv\n  root: ../data\n"
                      "encoder:\n  weights: IMAGENET1K_V1\ncache:\n  dir: ~/features\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the project: the config's own folder decides
    cfg = load_config(config, ["dataset.images=photos"])
    assert Path(cfg.dataset.annotations) == annotations and Path(cfg.dataset.root) == annotations.parent
    assert cfg.encoder.weights == "IMAGENET1K_V1"  # a weights name, not a file
    assert cfg.cache.dir == str(Path("~/features").expanduser())
    assert cfg.dataset.images == "photos"  # command-line values stay relative to the working directory
    assert len(read_dataset(cfg.dataset)[1]) == 10
    # A bare name finds the configs that ship with captioner, from any folder, and so does configs/NAME as the
    # README writes it (outside a checkout: an installed wheel); a missing one lists the shipped names.
    assert load_config("tiny.yaml").encoder.arch == "resnet18"
    assert load_config("configs/tiny.yaml").encoder.arch == "resnet18"
    with pytest.raises(CaptionerError, match=r"config file configs/nope.yaml not found \(the shipped configs, by "
                                             r"bare name: .*tiny.yaml"):
        load_config("configs/nope.yaml")


def test_a_shipped_config_found_by_name_reads_the_data_of_the_working_folder(tmp_path, monkeypatch):
    """The COCO and Flickr guides lay the data out in ./data/ and run `--config configs/flickr8k_resnet152.yaml`;
    outside a checkout that finds the shipped config, whose ../data/flickr8k named site-packages/captioner/data/
    flickr8k. It now starts from ./configs, as it would in a checkout: ./data/flickr8k."""
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for name in ("configs/flickr8k_resnet152.yaml", "flickr8k_resnet152.yaml"):
        dataset = load_config(name).dataset
        assert Path(dataset.root) == tmp_path / "data" / "flickr8k"
        assert Path(dataset.annotations) == tmp_path / "data/flickr8k/Flickr8k_text/Flickr8k.token.txt"
