"""`captioner caption` on folders nobody curated: every image kind, every broken file, resume, CSV, gallery."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from captioner.jobs import caption
from captioner.cli import main
from captioner.data.images import load_image, read_image
from captioner.data.inputs import find_images
from captioner.errors import CaptionerError
from captioner.engine.outputs.captions_file import CaptionsFile
from captioner.engine.outputs.gallery import _shown

from helpers import BLUE, RED, ROOT, by_name, noise_pngs, parse_gallery, read_records

PILLOW_DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # PIL/Image.py's own value


# ---------------------------------------------------------------- decoding single files, no model


def test_every_image_kind_decodes(mixed):
    folder, good, _ = mixed
    for name in good:
        image = load_image(str(folder / name), 64)
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8, name
    # EXIF orientation 6: the stored 40x20 red|blue image is shown 20x40, red on top.
    image, size = read_image(str(folder / "rotated_exif.jpg"), 64)
    assert size == (20, 40)
    assert image[0, 5, 32] > 180 and image[2, 5, 32] < 80  # top: red
    assert image[2, 58, 32] > 180 and image[0, 58, 32] < 80  # bottom: blue
    assert load_image(str(folder / "animated.gif"), 8)[:, 4, 4].tolist() == list(RED)  # first frame
    assert load_image(str(folder / "grey16.png"), 8)[:, 0, 0].tolist() == [round(40000 / 257)] * 3
    assert load_image(str(folder / "rgb16.png"), 8)[:, 0, 0].tolist() == [128] * 3
    assert read_image(str(folder / "very_wide.jpg"), 32)[1] == (3000, 6)


def test_attention_map_orientation():
    from captioner.engine.outputs.gallery import DIMMING, _attention_png
    weights = np.zeros((3, 4))
    weights[0, 3] = 1.0  # all attention on the top-right region
    shade = np.asarray(Image.open(io.BytesIO(base64.b64decode(_attention_png(weights)))).getchannel("A"))
    assert shade.shape == (3, 4) and shade[0, 3] == 0
    assert (np.delete(shade.ravel(), 3) == round(255 * DIMMING)).all()


def test_alpha_is_flattened_onto_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(path)
    assert load_image(str(path), 8).unique().tolist() == [255]


def test_bad_files_are_refused_with_a_reason(mixed):
    folder, _, bad = mixed
    for name, words in bad.items():
        with pytest.raises(CaptionerError, match=words) as e:
            load_image(str(folder / name), 64)
        assert str(e.value).startswith(str(folder / name)) and "\n" not in str(e.value)
    # Pillow's process-wide switches are the program's: a decode reads them and never sets them (another thread
    # may be decoding with other settings), so they are exactly as they were after every refusal above.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False and Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX_PIXELS
    with pytest.raises(CaptionerError, match="above the limit of 1000 pixels"):
        load_image(str(folder / "photo.jpg"), 64, max_pixels=1000)


def test_find_images(tmp_path):  # sorted, hidden skipped, links to folders not followed, lists, no duplicates
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("b.PNG", "a/x.jpg", "a/deep/y.webp", "a/.hidden.jpg", "a/readme.txt", "c.md"):
        (tmp_path / name).write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "a" / "deep" / "loop")  # a folder link loop: never followed
    assert find_images([str(tmp_path)]) == [str(tmp_path / "b.PNG")]
    found = find_images([str(tmp_path), str(tmp_path / "b.PNG")], recursive=True)
    assert [os.path.relpath(f, tmp_path) for f in found] == ["b.PNG", "a/x.jpg", "a/deep/y.webp"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my photos\n{tmp_path / 'c.md'}\n\n{tmp_path / 'a'}\n{tmp_path / 'missing.jpg'}\n")
    assert find_images([str(listing)]) == [str(tmp_path / "c.md"), str(tmp_path / "a" / "x.jpg"),
                                           str(tmp_path / "missing.jpg")]
    with pytest.raises(CaptionerError, match="nope: no such file or folder"):
        find_images([str(tmp_path / "nope")])


def test_paths_from_standard_input(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{tmp_path / 'a.jpg'}\n# comment\n{tmp_path / 'a.jpg'}\n"))
    assert find_images(["-"]) == [str(tmp_path / "a.jpg")]


# ---------------------------------------------------------------- the command on a mixed folder


@pytest.mark.slow  # several seconds: the fast subset stays under a minute
def test_mixed_folder_records_gallery_and_strict(mixed, tiny_checkpoint, tmp_path, capsys):
    folder, good, bad = mixed
    out, gallery = tmp_path / "captions.jsonl", tmp_path / "gallery.html"
    args = ["caption", "--checkpoint", tiny_checkpoint, str(folder), "--out", str(out), "--html", str(gallery),
            "--batch-size", "8", "--device", "cpu"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["captioned"] == len(good) and summary["errors"] == summary["failed"] == len(bad)
    records = by_name(read_records(out))
    assert sorted(records) == sorted(good + list(bad))
    for name in good:
        assert records[name]["caption"] and records[name]["score"] < 0 and "error" not in records[name], name
    for name, words in bad.items():
        assert words in records[name]["error"] and "caption" not in records[name], name
        assert not records[name]["error"].startswith(str(folder))  # the file is in its own field

    page = parse_gallery(gallery)
    assert sorted(map(os.path.basename, page.entries)) == sorted(map(_shown, good))
    assert sorted(map(os.path.basename, page.errors)) == sorted(bad)
    captions = {_shown(name): r.get("caption") for name, r in records.items()}
    for file, alts in page.entries.items():  # one attention map per word of the caption
        assert alts == [f"attention for {w}" for w in captions[os.path.basename(file)].split()]

    # Rerun: nothing left to do, nothing rewritten; --strict turns the error records into exit status 1.
    before = out.read_bytes()
    assert main(args) == 0 and main([*args, "--strict"]) == 1
    assert out.read_bytes() == before
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == len(good) + len(bad)
    assert gallery.read_text(errors="surrogateescape").count("<footer") == 1


@pytest.mark.slow  # several seconds: the fast subset stays under a minute
def test_same_caption_alone_or_in_a_batch(mixed, tiny_checkpoint, tmp_path):
    folder, good, _ = mixed
    files = [str(folder / n) for n in ("photo.jpg", "cmyk.jpg", "alpha.png", "very_wide.jpg", "empty.jpg")]
    for beam in (1, 3):
        runs = []
        for batch_size in (1, 5):  # each image alone in its batch, then all in one batch with a bad file
            out = tmp_path / f"beam{beam}_batch{batch_size}.jsonl"
            caption.main(caption.CaptionJob(tiny_checkpoint, files, out=str(out), beam_size=beam, batch_size=batch_size, device="cpu",
                         num_workers=0))
            runs.append(by_name(read_records(out)))
        alone, batched = runs
        assert alone.keys() == batched.keys() and len(alone) == 5
        for name in alone:
            assert alone[name].get("caption") == batched[name].get("caption")
            assert alone[name].get("score") == pytest.approx(batched[name].get("score"), abs=1e-3)


@pytest.mark.slow
def test_resume_after_a_kill_leaves_no_duplicates(tmp_path, tiny_checkpoint):
    folder = noise_pngs(tmp_path / "many", 24, 40, broken_jpeg=True)
    out = tmp_path / "captions.jsonl"
    cmd = [sys.executable, "-m", "captioner", "-q", "caption", "--checkpoint", tiny_checkpoint, str(folder),
           "--out", str(out), "--batch-size", "2", "--workers", "0", "--beam", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = out.read_text().count("\n")
    assert 4 <= written < 25, "the run should have been killed part way"
    with open(out, "ab") as f:  # as if the kill had come in the middle of a write
        f.write(b'{"file": "' + str(folder).encode() + b'/img4')
    before = out.read_text().rpartition("\n")[0]
    # Resume, now with a gallery: the images captioned before the kill are decoded again for the gallery only.
    gallery = tmp_path / "gallery.html"
    assert main([*cmd[cmd.index("caption"):], "--batch-size", "8", "--html", str(gallery)]) == 0
    assert out.read_text().startswith(before)
    records = by_name(read_records(out))
    names = sorted([f"img{i:03d}.png" for i in range(24)] + ["broken.jpg"])
    assert sorted(records) == names and "error" in records["broken.jpg"]
    page = parse_gallery(gallery)
    assert sorted(map(os.path.basename, [*page.entries, *page.errors])) == names
    for file, alts in page.entries.items():
        assert alts == [f"attention for {w}" for w in records[os.path.basename(file)]["caption"].split()]


def test_csv_list_file_retry_and_overwrite(tmp_path, tiny_checkpoint, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (30, 20), RED).save(photos / "red, with comma.jpg")
    (photos / "later.jpg").write_bytes(b"")  # still being copied when the run starts
    listing = tmp_path / "todo.txt"
    listing.write_text(f"{photos / 'red, with comma.jpg'}\n{photos / 'later.jpg'}\n{photos / 'gone.jpg'}\n")
    out = tmp_path / "out.csv"
    args = ["caption", "--checkpoint", tiny_checkpoint, str(listing), "--out", str(out), "--device", "cpu",
            "--workers", "0", "--beam", "1"]
    assert main(args) == 0

    def rows():
        with open(out, newline="", encoding="utf-8") as f:
            return {os.path.basename(r["file"]): r for r in csv.DictReader(f)}
    first = rows()
    assert first["red, with comma.jpg"]["caption"] and not first["red, with comma.jpg"]["error"]
    assert first["later.jpg"]["error"] == "empty file (0 bytes)" and "no such file" in first["gone.jpg"]["error"]

    Image.new("RGB", (30, 20), BLUE).save(photos / "later.jpg")  # the copy finished
    assert main([*args, "--retry-errors"]) == 0
    second = rows()
    assert len(second) == 3 and second["later.jpg"]["caption"] and not second["later.jpg"]["error"]
    assert second["red, with comma.jpg"] == first["red, with comma.jpg"]
    assert out.read_text().count("\n") == 4  # header + one row each
    assert main([*args, "--overwrite"]) == 0 and rows() == second
    capsys.readouterr()


def test_output_that_is_not_ours_or_in_use_is_refused(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "notes.jsonl"
    out.write_text("my own notes\n")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["caption", "--checkpoint", tiny_checkpoint, str(image), "--out", str(out), "--device", "cpu"]) == 2
    assert "line 1 is not a caption record" in capsys.readouterr().err
    for stranger in (tmp_path / "notes.csv", tmp_path / "page.html"):  # no final newline: still not touched
        stranger.write_text("my own notes")
        flag = "--html" if stranger.suffix == ".html" else "--out"
        assert main(["caption", "--checkpoint", tiny_checkpoint, str(image), "--out", str(tmp_path / "c.jsonl"),
                     flag, str(stranger), "--device", "cpu"]) == 2
        assert stranger.read_text() == "my own notes"
        assert "choose another" in capsys.readouterr().err
    held = CaptionsFile(tmp_path / "busy.jsonl")
    try:
        with pytest.raises(CaptionerError, match="another captioner process"):
            CaptionsFile(tmp_path / "busy.jsonl")
    finally:
        held.close()


@pytest.mark.parametrize("name", ["captions.json", "captions.jsonl.gz", "gallery.html", "captions.TSV"])
def test_an_output_named_for_another_format_is_refused_unless_the_format_is_given(name, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    out = tmp_path / name
    args = ["caption", "--checkpoint", str(tmp_path / "missing.pt"), str(image), "--out", str(out), "--device", "cpu"]
    assert main(args) == 2  # before the checkpoint is even looked for
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "name it captions.jsonl or captions.csv" in err.replace("gallery.", "captions.")
    assert str(out) in err and not out.exists()
    assert main([*args, "--format", "jsonl"]) == 2
    assert "missing.pt" in capsys.readouterr().err  # the name was accepted; the missing checkpoint stops it


def test_sampled_captions_are_varied_and_reproducible(mixed, tiny_checkpoint, tmp_path):
    folder, _, _ = mixed
    files = [str(folder / "photo.jpg"), str(folder / "cmyk.jpg")]
    runs = []
    for name, temperature in (("a", 5.0), ("b", 5.0), ("g", None)):
        out = tmp_path / f"{name}.jsonl"
        caption.main(caption.CaptionJob(tiny_checkpoint, files, out=str(out), beam_size=1, device="cpu", num_workers=0,
                                        sample=temperature is not None, temperature=temperature))
        runs.append(by_name(read_records(out)))
    hot, again, greedy = runs
    assert hot == again  # seeded with train.seed: the same command gives the same captions
    assert any(hot[n]["caption"] != greedy[n]["caption"] for n in hot)  # a hot distribution leaves greedy
    with pytest.raises(CaptionerError):
        caption.CaptionJob(tiny_checkpoint, files, out=str(tmp_path / "x.jsonl"), device="cpu", sample=True, temperature=0)


def test_set_overrides_the_checkpoints_decode_and_compute_only(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    images = noise_pngs(tmp_path / "images", 2, 32)
    seen = {}
    real_load = caption.load_for_job

    def load(*args, **kwargs):
        seen["predictor"] = real_load(*args, **kwargs)
        return seen["predictor"]

    monkeypatch.setattr(caption, "load_for_job", load)
    out = tmp_path / "c.jsonl"
    assert main(["caption", "--checkpoint", tiny_checkpoint, str(images), "--out", str(out), "--workers", "0",
                 "--device", "cpu", "--set", "compute.bf16=false", "--set", "decode.max_len=3"]) == 0
    predictor = seen["predictor"]
    assert not predictor.compute.bf16 and predictor.settings.max_len == 3  # float32 wherever auto means bf16
    assert all(len(r["caption"].split()) <= 3 for r in read_records(out))
    capsys.readouterr()
    assert main(["caption", "--checkpoint", tiny_checkpoint, str(images), "--out", str(out), "--set",
                 "model.embed_dim=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.embed_dim=8" in err and "fixed" in err and len(err.splitlines()) == 1
