"""The one image->batch iterator: every command turns image files (or cached features) into device batches here.

    for batch in image_batches(paths, 224, batch_size=64, num_workers=8, device=device):
        ...   # batch.inputs (B, 3, 224, 224) uint8 on device; batch.index (B,) into paths;
              # batch.errors[j] "" or why file j could not be read (its row is zeros); batch.sizes (B, 2)
    for batch in Batches(CaptionPairs(...), batch_size, device, sampler=sampler):   # training
        ...   # + batch.captions (B, T+2), batch.lengths (B,); rows of unreadable images already dropped

CPU decoding (the default): DataLoader workers decode and resize with PIL (data/images.py), the batch goes
through pinned memory and is copied without blocking. GPU decoding (compute.gpu_decode, CUDA only): workers
only read the file bytes, nvjpeg decodes the whole batch and the GPU resizes it with antialiased bicubic
interpolation, which matches PIL's to within a few intensity levels (mean difference ~0.2 of 255). Files that
are not plain RGB or greyscale JPEGs (PNG, CMYK, EXIF-rotated, huge) are decoded by PIL in the worker instead.

One error policy: an unreadable image never raises. It comes back as an error message that starts with its
path; `Unreadable` reports each one once (a warning naming it) and counts them, and the commands skip it
(`caption` writes an error record for it instead).
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401  (its exit hook is registered before ours, so ours runs first)
import os
import signal
import threading
import time
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils import signal_handling as _torch_signals
from torch.utils.data._utils.collate import default_collate

from captioner.data.images import MAX_PIXELS, CaptionPairs, ImageFiles, load_image
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")


class Batch(NamedTuple):
    inputs: torch.Tensor  # (B, 3, S, S) uint8 images or (B, C, H, W) encoder features, on the device
    index: torch.Tensor  # (B,) long: positions in the dataset (ImageFiles) or records (CaptionPairs)
    errors: list[str]  # "" or why row j could not be read (its input is zeros)
    sizes: torch.Tensor  # (B, 2) files' (width, height) as displayed; (0, 0) when unknown or unreadable
    captions: torch.Tensor | None = None  # (B, T+2) caption ids (training batches only)
    lengths: torch.Tensor | None = None  # (B,) tokens of each caption, <start> and <end> included
    read: int = 0  # training: samples the loader read, those dropped as unreadable included

    def readable(self) -> list[int]:
        """The rows whose image was read; the others hold zeros and an error."""
        return readable_rows(self.errors)


def readable_rows(errors: list[str]) -> list[int]:
    """Positions of the empty error messages: the one readable-rows rule of every batch consumer."""
    return [j for j, error in enumerate(errors) if not error]


class Unreadable:
    """Counts unreadable images, warning once per image with its path and the reason."""

    def __init__(self):
        self.messages: dict[str, None] = {}  # insertion-ordered set

    def add(self, message: str) -> None:
        if message not in self.messages:
            self.messages[message] = None
            log.warning("skipped unreadable image: %s", message)

    def __len__(self) -> int:
        return len(self.messages)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group, and a worker killed by it would
    break the main process's clean stop. Workers still die with the main process: a thread exits the worker
    as soon as its parent is gone (even when the parent was killed with SIGKILL), and the exit path kills
    them (stop_workers) instead of waiting for them."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.pid,), name="exit-with-parent", daemon=True).start()


def _exit_with_parent(parent_pid: int, interval: float = 0.2) -> None:
    """In a worker: end the process within `interval` seconds of its parent's death (re-parented workers see
    another parent pid). torch's own watchdog only looks between batches, every few seconds."""
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(0)


# The iterators of this process's loaders that have worker processes, so that the exit path can end them.
_live_iterators: "weakref.WeakSet" = weakref.WeakSet()


def stop_workers(timeout: float = 2.0) -> int:
    """Kill the worker processes of every loader still running in this process, now: the exit path calls it
    (and so does the interpreter at exit). Workers ignore SIGINT/SIGTERM (see ignore_stop_signals), so
    Python's own exit hook, which sends SIGTERM and then waits, would wait for them forever. Returns how
    many were killed."""
    killed = []
    for iterator in list(_live_iterators):
        if getattr(iterator, "_worker_pids_set", False):  # torch's SIGCHLD check would report them as crashed
            _torch_signals._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
                killed.append(worker)
    for worker in killed:
        worker.join(timeout)
    return len(killed)


atexit.register(stop_workers)  # runs before multiprocessing's exit hook (registered at its import, earlier)


def collate(items):
    """Stack what stacks; JPEG bytes of different lengths (GPU decoding) stay a list."""
    columns = list(zip(*items))
    data = columns[0]
    if all(t.shape == data[0].shape and t.dtype == data[0].dtype for t in data):
        inputs = torch.stack(data)
    else:
        inputs = list(data)
    # index, errors (strings stay a list), then sizes and, for training pairs, captions and lengths
    return [inputs, torch.tensor(columns[1]), list(columns[2]), *(default_collate(list(c)) for c in columns[3:])]


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    # torchvision 0.29's DeprecationWarning (pointing to torchcodec) is hidden by Python's default filters; no
    # catch_warnings here: it swaps the process-wide filter list, which loses filters when two threads decode.
    return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)


def resize_batch(images: list[torch.Tensor], image_size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Images (3, H_i, W_i) uint8 of any sizes -> (B, 3, S, S) uint8, one interpolate call per distinct size."""
    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8, device=images[0].device)
    by_size: dict[tuple, list[int]] = {}
    for j, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(j)
    for positions in by_size.values():
        group = torch.stack([images[j] for j in positions]).float()  # (b, 3, H, W)
        resized = F.interpolate(group, size=(image_size, image_size), mode=interpolation, antialias=True,
                                align_corners=False)  # antialiased: PIL's BICUBIC / BILINEAR resize
        out[positions] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def decode_batch(items: list[torch.Tensor], paths: list[str], image_size: int, device: torch.device,
                 errors: list[str], interpolation: str = "bicubic") -> torch.Tensor:
    """ImageFiles(gpu_decode=True) items -> (B, 3, S, S) uint8 on device. A file the batch decoder rejects is
    read by PIL instead (errors[j] gets PIL's message when that fails too)."""
    jpegs = [j for j, t in enumerate(items) if t.dim() == 1]
    images: list[torch.Tensor | None] = [t.to(device, non_blocking=True) if t.dim() == 3 else None for t in items]
    try:
        decoded = _decode_jpegs([items[j] for j in jpegs], device) if jpegs else []
    except RuntimeError:  # the batch fails as a whole on one bad file: decode one by one
        decoded = []
        for j in jpegs:
            try:
                decoded.append(_decode_jpegs([items[j]], device)[0])
            except RuntimeError:
                decoded.append(None)
    for j, image in zip(jpegs, decoded):
        images[j] = image
    out = torch.empty(len(items), 3, image_size, image_size, dtype=torch.uint8, device=device)
    full_size = [j for j in jpegs if images[j] is not None]
    if full_size:
        out[full_size] = resize_batch([images[j] for j in full_size], image_size, interpolation)
    for j in set(range(len(items))) - set(full_size):
        image = images[j]
        if image is None:  # the batch decoder refused it: PIL decodes it, or says why it cannot
            try:
                image = load_image(paths[j], image_size, interpolation=interpolation).to(device)
            except CaptionerError as e:
                image, errors[j] = torch.zeros(3, image_size, image_size, dtype=torch.uint8), str(e)
        out[j] = image
    return out


def _in_this_process() -> int:
    """Worker count 0, said once: a daemonic process (a DataLoader or multiprocessing.Pool worker running the
    Python API) may not start processes, so its images are decoded where it runs; the captions are the same."""
    global _said_in_this_process
    if not _said_in_this_process:
        log.warning("decoding images in this process: a daemonic process (a DataLoader or Pool worker) cannot "
                    "start image-decoding workers")
        _said_in_this_process = True
    return 0


_said_in_this_process = False


class Batches:
    """Device batches of an ImageFiles or CaptionPairs dataset, decoded in DataLoader workers (or on the GPU
    when its ImageFiles has gpu_decode). Training batches (CaptionPairs) come without the rows of unreadable
    images, which go to `unreadable`; image batches keep them (zeros and an error) for the caller to report."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                 sampler=None, shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                 persistent_workers: bool = False, unreadable: Unreadable | None = None):
        self.dataset, self.device = dataset, device
        self.unreadable = unreadable if unreadable is not None else Unreadable()
        files = dataset.source if isinstance(dataset, CaptionPairs) else dataset
        self.files = files if isinstance(files, ImageFiles) else None  # None: features, nothing to decode
        num_workers = min(num_workers, -(-len(dataset) // batch_size))  # no idle worker processes
        if num_workers and multiprocessing.current_process().daemon:
            num_workers = _in_this_process()
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle,
                                 drop_last=drop_last, num_workers=num_workers, collate_fn=collate,
                                 pin_memory=device.type == "cuda", persistent_workers=persistent_workers and num_workers > 0,
                                 # its own generator: creating an iterator must not draw from the global RNG
                                 generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        if getattr(iterator, "_workers", None):
            _live_iterators.add(iterator)
        for data, index, errors, sizes, *pairs in iterator:
            if isinstance(data, list):  # JPEG bytes: the device decodes them
                paths = [self.files.paths[i] for i in index.tolist()]
                inputs = decode_batch(data, paths, self.files.image_size, self.device, errors,
                                      self.files.interpolation)
            else:
                inputs = data.to(self.device, non_blocking=True)
            if not pairs:
                yield Batch(inputs, index, errors, sizes)
                continue
            captions, lengths = (t.to(self.device, non_blocking=True) for t in pairs)
            read, good = len(errors), readable_rows(errors)
            for e in filter(None, errors):
                self.unreadable.add(e)
            if len(good) < len(errors):  # an unreadable image's captions are left out of the step
                inputs, captions, lengths = inputs[good], captions[good], lengths[good]
                index, sizes, errors = index[good], sizes[good], [""] * len(good)
            yield Batch(inputs, index, errors, sizes, captions, lengths, read)


def image_batches(paths: list, image_size: int, batch_size: int, num_workers: int, device: torch.device,
                  gpu_decode: bool = False, max_pixels: int = MAX_PIXELS, names: list[str] | None = None,
                  interpolation: str = "bicubic") -> Batches:
    """Batches of image files: Batch(images (B, 3, S, S) uint8 on device, index into paths, errors, sizes).

    A file that cannot be read gives a zero image and its error message; callers skip it and report it.
    gpu_decode: workers only read bytes and `device` decodes them in batches (nvjpeg on CUDA; on CPU the
    main process would decode, which only tests use). paths may also hold PIL images, numpy arrays and tensors
    (the Python API's inputs, data/images.py read_any), which errors call by their names. interpolation: the
    encoder's resize filter (HookedEncoder.interpolation), bicubic or bilinear.
    """
    files = ImageFiles(paths, image_size, max_pixels, gpu_decode=gpu_decode, names=names,
                       interpolation=interpolation)
    return Batches(files, batch_size, device, num_workers)


def feature_batches(features, count: int, batch_size: int, device: torch.device):
    """Batches of precomputed features (a (N, C, H, W) tensor or a feature-cache source), as image_batches
    gives images: Batch(features (B, C, H, W) on device, index, no errors, unknown sizes)."""
    for i in range(0, count, batch_size):
        j = min(i + batch_size, count)
        yield Batch(features[i:j].to(device, non_blocking=True), torch.arange(i, j), [""] * (j - i),
                    torch.zeros(j - i, 2, dtype=torch.long))
