"""captioner.Captioner inside other processes: a DataLoader worker forked while another thread captions, and a
Captioner with decoding workers of its own running inside a (daemonic) DataLoader worker."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from captioner import Captioner

from helpers import varied_checkpoint

pytestmark = pytest.mark.slow  # forks DataLoader worker processes


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(8):
        pixels = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(varied_checkpoint(tmp_path_factory.mktemp("ckpt") / "varied.pt"))


class CaptionsOf(Dataset):
    """Each item: the captions of a slice of paths, made by `captioner` in the DataLoader worker."""

    def __init__(self, captioner: Captioner, paths: list[str], per_item: int):
        self.captioner, self.paths, self.per_item = captioner, paths, per_item

    def __len__(self) -> int:
        return len(self.paths) // self.per_item

    def __getitem__(self, i: int) -> list[str]:
        return [c.text for c in self.captioner.caption(self.paths[i * self.per_item:(i + 1) * self.per_item])]


def _captions_from_workers(dataset: Dataset) -> list[str]:
    loader = DataLoader(dataset, batch_size=None, num_workers=2, timeout=60)  # a hang fails, never blocks
    return [text for item in loader for text in item]


def test_a_worker_forked_while_another_thread_captions_does_not_hang(checkpoint, photos):
    cap = Captioner.from_pretrained(checkpoint, device="cpu")
    expected = [c.text for c in cap.caption(photos)]
    stop = threading.Event()

    def keep_captioning():  # holds the Captioner's lock most of the time, so forks happen while it is held
        while not stop.is_set():
            cap.caption(photos[:4])

    busy = threading.Thread(target=keep_captioning)
    busy.start()
    try:
        got = [_captions_from_workers(CaptionsOf(cap, photos, 2)) for _ in range(3)]
    finally:
        stop.set()
        busy.join()
    assert got == [expected] * 3


def test_decoding_workers_inside_a_dataloader_worker_fall_back_to_the_worker_itself(checkpoint, photos):
    cap = Captioner.from_pretrained(checkpoint, device="cpu", num_workers=2)  # a daemonic worker cannot fork
    expected = [c.text for c in Captioner.from_pretrained(checkpoint, device="cpu").caption(photos)]
    assert _captions_from_workers(CaptionsOf(cap, photos, 4)) == expected
