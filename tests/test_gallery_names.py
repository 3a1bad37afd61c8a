"""The gallery keeps one entry per file even for names that are not valid UTF-8, which it shows with U+FFFD:
two such names that look alike stay two entries, a rerun finds both, and torchrun's part pages merge in input
order."""
from __future__ import annotations

import os
import re

import numpy as np

from captioner.engine.outputs.captions_file import file_key, part_path
from captioner.engine.outputs.gallery import Gallery

# Both show as "caf\ufffd.jpg": only their bytes tell them apart.
E_ACUTE, E_GRAVE = os.fsdecode(b"caf\xe9.jpg"), os.fsdecode(b"caf\xe8.jpg")
IMAGE = np.zeros((16, 16, 3), np.uint8)
ALPHAS = np.full((1, 4), 0.25)


def _add(gallery: Gallery, name: str) -> None:
    gallery.add(name, IMAGE, (16, 16), ["word"], ALPHAS, grid=(2, 2))


def _entry_files(path) -> list[str]:
    text = path.read_bytes().decode("utf-8")  # the page stays valid UTF-8
    return re.findall(r'^<figure class="entry" data-file="([^"]*)"', text, flags=re.M)


def test_names_alike_once_shown_stay_two_entries_and_a_rerun_finds_both(tmp_path):
    path, names = tmp_path / "gallery.html", [str(tmp_path / n) for n in (E_ACUTE, "plain.jpg", E_GRAVE)]
    gallery = Gallery(path)
    for name in names:
        assert not gallery.has(name)
        _add(gallery, name)
    gallery.close()
    assert len(_entry_files(path)) == 3

    again = Gallery(path)
    assert all(again.has(name) for name in names) and again.images == 3
    assert not again.has(str(tmp_path / os.fsdecode(b"caf\xea.jpg")))  # a third look-alike is not done
    again.close()


def test_part_pages_merge_in_input_order_whatever_the_names(tmp_path):
    names = [str(tmp_path / n) for n in ("a.jpg", E_ACUTE, "b.jpg", E_GRAVE, "c.jpg")]
    path = tmp_path / "gallery.html"
    for rank in (0, 1):  # torchrun: process r captions items r, r + 2, ...
        part = Gallery(part_path(path, rank))
        for name in names[rank::2]:
            _add(part, name)
        part.close()
    gallery = Gallery(path)
    assert gallery.absorb([part_path(path, 0), part_path(path, 1)], {file_key(n): i for i, n in enumerate(names)}) == 5
    gallery.close()
    one_process = Gallery(tmp_path / "one.html")
    for name in names:
        _add(one_process, name)
    one_process.close()
    assert _entry_files(path) == _entry_files(tmp_path / "one.html")
    assert [os.path.basename(f) for f in _entry_files(path)] == ["a.jpg", "caf\ufffd.jpg", "b.jpg", "caf\ufffd.jpg",
                                                                 "c.jpg"]
    data_names = re.findall(r'data-name="([^"]*)"', path.read_text(encoding="utf-8"))
    assert [n.rsplit("/", 1)[-1] for n in data_names] == ["caf%E9.jpg", "caf%E8.jpg"]
