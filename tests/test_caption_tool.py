"""`captioner caption` on folders nobody curated: every image kind, every broken file, resume, CSV, gallery."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from captioner.jobs import caption
from captioner.engine.infer.checkpoint import save_checkpoint
from captioner.cli import main
from captioner.config import load_config, to_dict
from captioner.data.images import load_image, read_image
from captioner.data.inputs import find_images
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel
from captioner.engine.outputs.captions_file import CaptionsFile
from captioner.text import Vocabulary

from conftest import ROOT, TINY, noise_pngs

RED, BLUE = (220, 20, 20), (20, 20, 220)
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written byte by byte, for what PIL will not write (16-bit RGB) or must not (a bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kwargs) -> None:
    img.save(path, fmt, **kwargs)


def make_input_folder(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Every input case of the issue -> (good file names, {bad file name: expected words of its error})."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    halves = Image.new("RGB", (40, 20), RED)
    halves.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    good = {
        "photo.jpg": lambda p: _save(photo, p, quality=90),
        "progressive.jpeg": lambda p: _save(photo, p, "JPEG", progressive=True),
        "rotated_exif.jpg": lambda p: _save(halves, p, exif=exif.tobytes()),
        "cmyk.jpg": lambda p: _save(photo.convert("CMYK"), p),
        "grey.png": lambda p: _save(photo.convert("L"), p),
        "palette.png": lambda p: _save(photo.convert("P", palette=Image.Palette.ADAPTIVE), p),
        "alpha.png": lambda p: _save(photo.convert("RGBA"), p),
        "grey_alpha.png": lambda p: _save(photo.convert("LA"), p),
        "grey16.png": lambda p: _save(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)), p),
        "rgb16.png": lambda p: p.write_bytes(_png(8, 8, 16, 2, (b"\0" + b"\x80\x00" * 24) * 8)),
        "lossy.webp": lambda p: _save(photo, p, "WEBP"),
        "alpha.webp": lambda p: _save(photo.convert("RGBA"), p, "WEBP", lossless=True),
        "bitmap.bmp": lambda p: _save(photo, p),
        "bilevel.bmp": lambda p: _save(photo.convert("1"), p),
        "animated.gif": lambda p: _save(Image.new("RGB", (16, 16), RED), p, save_all=True,
                                        append_images=[Image.new("RGB", (16, 16), BLUE)], duration=100),
        "lzw.tiff": lambda p: _save(photo, p, compression="tiff_lzw"),
        "cmyk.tif": lambda p: _save(photo.convert("CMYK"), p),
        "grey16.tif": lambda p: _save(Image.fromarray(np.full((16, 16), 1000, dtype=np.uint16)), p),
        "float.tif": lambda p: _save(Image.fromarray(rng.random((16, 16), dtype=np.float32)), p),
        "one_pixel.png": lambda p: _save(Image.new("RGB", (1, 1), RED), p),
        "very_wide.jpg": lambda p: _save(Image.new("RGB", (3000, 6), BLUE), p),
        "very_tall.png": lambda p: _save(Image.new("RGB", (4, 1500), RED), p),
        "café ünïcødé 写真.jpg": lambda p: _save(photo, p),
        "SHOUTING.JPG": lambda p: _save(photo, p, "JPEG"),
        "png_named.jpg": lambda p: _save(photo, p, "PNG"),
    }
    for name, write in good.items():
        write(folder / name)
    os.symlink("photo.jpg", folder / "link_to_photo.jpg")
    good_names = [*good, "link_to_photo.jpg"]
    latin1 = os.fsdecode(b"latin1_\xe9t\xe9.jpg")  # a name that is not UTF-8 (an old archive)
    try:
        _save(photo, folder / latin1, "JPEG")
        good_names.append(latin1)
    except (OSError, UnicodeEncodeError):
        pass  # a file system that insists on UTF-8 names

    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG")
    png = io.BytesIO()
    photo.save(png, "PNG")
    bad = {
        "empty.jpg": ("empty file", lambda p: p.write_bytes(b"")),
        "truncated.jpg": ("truncated", lambda p: p.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])),
        "truncated.png": ("truncated", lambda p: p.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])),
        "text.jpg": ("not an image", lambda p: p.write_bytes(b"just some text, not pixels\n")),
        "page.png": ("HTML page", lambda p: p.write_bytes(b"<!DOCTYPE html><html><body>404</body></html>")),
        "bomb.png": ("above the limit", lambda p: p.write_bytes(_png(30000, 30000, 8, 0, b"\0" * 30001))),
        "bomb_120mp.png": ("12000x10000 is above the limit", lambda p: p.write_bytes(_png(12000, 10000, 8, 0, b"\0"))),
        "broken_link.jpg": ("broken symbolic link", lambda p: os.symlink("gone.jpg", p)),
        "loop.jpg": ("cannot access", lambda p: os.symlink("loop.jpg", p)),
        "fifo.jpg": ("FIFO", lambda p: os.mkfifo(p)),
    }
    if not AS_ROOT:  # root reads any file whatever its mode: there the FIFO and the loop stand for unreadable
        bad["unreadable.jpg"] = ("permission denied", lambda p: (_save(photo, p, "JPEG"), os.chmod(p, 0)))
    for name, (_, write) in bad.items():
        write(folder / name)
    (folder / ".hidden.jpg").write_bytes(b"macOS resource fork")  # hidden: never picked up
    (folder / "notes.md").write_text("not an image extension: ignored")
    return good_names, {name: words for name, (words, _) in bad.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An untrained tiny model (4x4 attention grid): the tool's behaviour needs no good captions."""
    torch.manual_seed(0)
    cfg = load_config(TINY, ["decode.max_len=8"])  # untrained captions run to max_len: keep them short
    vocab = Vocabulary.build(["a red circle left of a blue square", "a green triangle above a small square"])
    model = CaptionModel(cfg.encoder, cfg.model, len(vocab))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "vocab": vocab.tokens})
    return str(path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed") / "photos"
    good, bad = make_input_folder(folder)
    return folder, good, bad


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _by_name(records: list[dict]) -> dict[str, dict]:
    names = [os.path.basename(r["file"]) for r in records]
    assert len(names) == len(set(names)), "duplicate records"
    return dict(zip(names, records))


class _GalleryParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.entries, self.errors, self.current = {}, {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "entry" in (attrs.get("class") or "").split():
            file = attrs["data-file"]
            if "error" in attrs["class"]:
                self.errors[file] = True
            else:
                assert "data:image/jpeg;base64," in attrs["style"]  # the thumbnail is embedded
                self.current = self.entries.setdefault(file, [])
        elif tag == "img" and self.current is not None:
            assert attrs["src"].startswith("data:image/png;base64,")
            self.current.append(attrs["alt"])


def _parse_gallery(path: Path) -> _GalleryParser:
    parser = _GalleryParser()
    parser.feed(path.read_text(encoding="utf-8"))  # valid UTF-8 whatever the file names
    return parser


def _shown(name: str) -> str:
    """How the gallery shows a file name that is not valid UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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


def test_bad_files_are_refused_with_a_reason(mixed, monkeypatch):
    folder, _, bad = mixed
    for name, words in bad.items():
        with pytest.raises(CaptionerError, match=words) as e:
            load_image(str(folder / name), 64)
        assert str(e.value).startswith(str(folder / name)) and "\n" not in str(e.value)
    # Another library switching Pillow to accept truncated data must not let a truncated file through.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(CaptionerError, match="truncated"):
        load_image(str(folder / "truncated.jpg"), 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the decode
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


def test_mixed_folder_records_gallery_and_strict(mixed, checkpoint, tmp_path, capsys):
    folder, good, bad = mixed
    out, gallery = tmp_path / "captions.jsonl", tmp_path / "gallery.html"
    args = ["caption", "--checkpoint", checkpoint, str(folder), "--out", str(out), "--html", str(gallery),
            "--batch-size", "8", "--device", "cpu"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["captioned"] == len(good) and summary["errors"] == summary["failed"] == len(bad)
    records = _by_name(_records(out))
    assert sorted(records) == sorted(good + list(bad))
    for name in good:
        assert records[name]["caption"] and records[name]["score"] < 0 and "error" not in records[name], name
    for name, words in bad.items():
        assert words in records[name]["error"] and "caption" not in records[name], name
        assert not records[name]["error"].startswith(str(folder))  # the file is in its own field

    page = _parse_gallery(gallery)
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


def test_same_caption_alone_or_in_a_batch(mixed, checkpoint, tmp_path):
    folder, good, _ = mixed
    files = [str(folder / n) for n in ("photo.jpg", "cmyk.jpg", "alpha.png", "very_wide.jpg", "empty.jpg")]
    for beam in (1, 3):
        runs = []
        for batch_size in (1, 5):  # each image alone in its batch, then all in one batch with a bad file
            out = tmp_path / f"beam{beam}_batch{batch_size}.jsonl"
            caption.main(caption.CaptionJob(checkpoint, files, out=str(out), beam_size=beam, batch_size=batch_size, device="cpu",
                         num_workers=0))
            runs.append(_by_name(_records(out)))
        alone, batched = runs
        assert alone.keys() == batched.keys() and len(alone) == 5
        for name in alone:
            assert alone[name].get("caption") == batched[name].get("caption")
            assert alone[name].get("score") == pytest.approx(batched[name].get("score"), abs=1e-3)


def test_resume_after_a_kill_leaves_no_duplicates(tmp_path, checkpoint):
    folder = noise_pngs(tmp_path / "many", 24, 40, broken_jpeg=True)
    out = tmp_path / "captions.jsonl"
    cmd = [sys.executable, "-m", "captioner", "-q", "caption", "--checkpoint", checkpoint, str(folder),
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
    records = _by_name(_records(out))
    names = sorted([f"img{i:03d}.png" for i in range(24)] + ["broken.jpg"])
    assert sorted(records) == names and "error" in records["broken.jpg"]
    page = _parse_gallery(gallery)
    assert sorted(map(os.path.basename, [*page.entries, *page.errors])) == names
    for file, alts in page.entries.items():
        assert alts == [f"attention for {w}" for w in records[os.path.basename(file)]["caption"].split()]


def test_csv_list_file_retry_and_overwrite(tmp_path, checkpoint, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (30, 20), RED).save(photos / "red, with comma.jpg")
    (photos / "later.jpg").write_bytes(b"")  # still being copied when the run starts
    listing = tmp_path / "todo.txt"
    listing.write_text(f"{photos / 'red, with comma.jpg'}\n{photos / 'later.jpg'}\n{photos / 'gone.jpg'}\n")
    out = tmp_path / "out.csv"
    args = ["caption", "--checkpoint", checkpoint, str(listing), "--out", str(out), "--device", "cpu",
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


def test_output_that_is_not_ours_or_in_use_is_refused(tmp_path, checkpoint, capsys):
    out = tmp_path / "notes.jsonl"
    out.write_text("my own notes\n")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["caption", "--checkpoint", checkpoint, str(image), "--out", str(out), "--device", "cpu"]) == 2
    assert "line 1 is not a caption record" in capsys.readouterr().err
    for stranger in (tmp_path / "notes.csv", tmp_path / "page.html"):  # no final newline: still not touched
        stranger.write_text("my own notes")
        flag = "--html" if stranger.suffix == ".html" else "--out"
        assert main(["caption", "--checkpoint", checkpoint, str(image), "--out", str(tmp_path / "c.jsonl"),
                     flag, str(stranger), "--device", "cpu"]) == 2
        assert stranger.read_text() == "my own notes"
        assert "choose another" in capsys.readouterr().err
    held = CaptionsFile(tmp_path / "busy.jsonl")
    try:
        with pytest.raises(CaptionerError, match="another captioner process"):
            CaptionsFile(tmp_path / "busy.jsonl")
    finally:
        held.close()


def test_sampled_captions_are_varied_and_reproducible(mixed, checkpoint, tmp_path):
    folder, _, _ = mixed
    files = [str(folder / "photo.jpg"), str(folder / "cmyk.jpg")]
    runs = []
    for name, temperature in (("a", 5.0), ("b", 5.0), ("g", None)):
        out = tmp_path / f"{name}.jsonl"
        caption.main(caption.CaptionJob(checkpoint, files, out=str(out), beam_size=1, device="cpu", num_workers=0,
                                        sample=temperature is not None, temperature=temperature))
        runs.append(_by_name(_records(out)))
    hot, again, greedy = runs
    assert hot == again  # seeded with train.seed: the same command gives the same captions
    assert any(hot[n]["caption"] != greedy[n]["caption"] for n in hot)  # a hot distribution leaves greedy
    with pytest.raises(CaptionerError):
        caption.CaptionJob(checkpoint, files, out=str(tmp_path / "x.jsonl"), device="cpu", sample=True, temperature=0)
