"""An on-disk, memory-mapped cache of frozen encoder features, keyed by image id.

    captioner extract --config configs/tiny.yaml      # fills data/synthetic/features/resnet18-layer4-128/

    cache = FeatureCache.load(folder)                   # None when there is no cache there
    source, kept = cache.source(records)                # source[i] -> (C, H, W) features of kept[i]

A cache folder holds
    header.json    how the features were made: encoder arch (source/name), layer, image size, input channels,
                   preprocessing (resize filter, mean, std), weights name, a SHA-256 of the backbone's actual
                   weights (random-init ones too), feature shape, dtype
    features.bin   one row of C*H*W values per image: bfloat16 stored as its raw 16 bits, or float32
    index.json     {"num_rows": n, "rows": {resolved image path: [row, size, mtime_ns]},
                    "failed": {resolved image path: error}}

The encoder is frozen, so an image's features never change: extracting them once replaces running the CNN
on every caption of every epoch. A cache whose header differs from the current encoder is refused, and a row
is served only for the very file it was made from (same resolved path, size and modification time): another
dataset whose files have the same names, or an image replaced since, is never given stale features. Rows are
appended first and the index is rewritten atomically after them, so an interrupted extraction resumes where
its index ends. Readers memory-map features.bin and copy only the rows a batch asks for: memory use follows
the batch size, not the dataset size.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.files import make_parent, write_json
from captioner.lock import ProcessLock

log = logging.getLogger("captioner")

FORMAT_VERSION = 2  # 2: rows keyed by file identity (1 keyed them by image id and file name)
# Storage: torch dtype, numpy dtype of the stored bits, bytes per value. numpy has no bfloat16, so its
# 16 bits are stored as int16 and viewed back as bfloat16. float16 is refused on purpose (it overflows).
DTYPES = {"bfloat16": (torch.bfloat16, np.int16, 2), "float32": (torch.float32, np.float32, 4)}
# The header fields that must match for cached features to equal the encoder's (weights_name is informative:
# the fingerprint decides, so a .pth path and the enum name of the same weights agree). arch holds the source
# and the model name (timm/convnext_tiny); preprocess the resize filter, mean and std.
MUST_MATCH = ("arch", "layer", "image_size", "in_channels", "preprocess", "shape", "fingerprint")


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer of module (names, dtypes, shapes and values), first 16 hex digits.

    Random-init weights depend on the seed, so settings alone cannot tell two encoders apart; the values can.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_signature(encoder, weights_name: str | None = None) -> dict:
    """What a cached feature depends on, for a HookedEncoder: source and model name, hooked layer, input size and
    channels, preprocessing, feature shape and a hash of the backbone's weights."""
    p = encoder.preprocess
    return {"arch": encoder.arch, "source": encoder.source, "layer": encoder.layer, "image_size": encoder.image_size,
            "in_channels": encoder.in_channels, "shape": [encoder.channels, *encoder.grid],
            "fingerprint": weights_fingerprint(encoder.backbone), "weights_name": weights_name,
            "preprocess": {"resize": f"rgb, exif-transposed, {p.interpolation} resize to image_size x image_size",
                           "mean": [float(v) for v in p.mean], "std": [float(v) for v in p.std]}}


def default_cache_dir(cfg: Config, layer: str | None = None) -> Path:
    """cache.dir, or a folder beside the data: ANNOTATIONS_FOLDER/features/STEM-ARCH-LAYER-SIZE for a captions
    file (two annotation files never share one), DATASET_ROOT/features/ARCH-LAYER-SIZE for synthetic data. layer:
    the encoder's resolved one, where the config leaves it to the backbone (a config naming layer4 and one
    naming none share ResNet's cache)."""
    if cfg.cache.dir:
        return Path(cfg.cache.dir)
    e = cfg.encoder
    # timm/convnext_tiny -> timm-convnext_tiny
    name = f"{e.arch.replace('/', '-')}-{e.layer or layer or 'default'}-{e.image_size}"
    if cfg.dataset.annotations and cfg.dataset.format != "synthetic":
        from captioner.data.datasets import annotations_path  # imported on use: the readers pull in pycocotools
        annotations = annotations_path(cfg.dataset)
        return annotations.parent / "features" / f"{annotations.stem}-{name}"
    return Path(cfg.dataset.root or ".") / "features" / name


def file_identity(path: str | Path) -> tuple[str, list[int]] | None:
    """(resolved path, [size, mtime_ns]) of a file: what a cached row must match to be served; None when the
    file cannot be stat'ed. photos/a.jpg, ./photos/a.jpg and /abs/photos/a.jpg are one file."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), [stat.st_size, stat.st_mtime_ns]


def lock_cache(folder: str | Path) -> ProcessLock:
    """folder (created) locked for this process: one writer per cache, released if the process dies."""
    folder = Path(folder)
    make_parent(folder / "lock", "feature cache")
    return ProcessLock(folder / "lock", f"feature cache {folder}",
                       "wait for the other extraction to finish, or set cache.dir to another folder")


def _write_json(path: Path, data) -> None:
    write_json(path, data, "feature cache file", indent=None)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CaptionerError(f"feature cache file {path} is unreadable ({type(e).__name__}); "
                             f"rebuild it with `captioner extract --rebuild`") from None
    if not isinstance(data, dict):
        raise CaptionerError(f"feature cache file {path} is not a JSON object; rebuild it with `captioner extract "
                             f"--rebuild`")
    return data


def describe_size(num_images: int, shape, dtype: str) -> str:
    """'80 images x 512x7x7 bfloat16 = 4.0 MB' for the size estimate shown before writing."""
    total = num_images * int(np.prod(shape)) * DTYPES[dtype][2]
    return f"{num_images} images x {'x'.join(map(str, shape))} {dtype} = {total / 1e6:,.1f} MB"


class CachedFeatures:
    """A training/evaluation source over cache rows: source[i] -> (C, H, W), source[i:j] -> (j-i, C, H, W).

    Tensors come back in the stored dtype (bfloat16 by default); the model's projector casts them to float32.
    Only the file name and row numbers are pickled: every DataLoader worker, fork- or spawn-started, maps
    the file itself on first use, and nothing is read before a batch asks for it.
    """

    def __init__(self, path: Path, shape, dtype: str, rows: list[int], num_rows: int):
        self.path, self.shape, self.dtype = str(path), tuple(shape), dtype
        self.rows, self.num_rows = list(rows), num_rows
        self._array = None

    def __getstate__(self):
        return {**self.__dict__, "_array": None}  # a memory map does not travel to another process

    def __len__(self) -> int:
        return len(self.rows)

    def _mapped(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=DTYPES[self.dtype][1], mode="r",
                                    shape=(self.num_rows, *self.shape))
        return self._array

    def __getitem__(self, i):
        rows = self.rows[i] if isinstance(i, slice) else [self.rows[i]]
        block = torch.from_numpy(np.array(self._mapped()[rows]))  # copies only these rows: (b, C, H, W)
        if self.dtype == "bfloat16":
            block = block.view(torch.bfloat16)
        return block if isinstance(i, slice) else block[0]


class FeatureCache:
    """One cache folder: its header and index; append() and commit() while extracting."""

    def __init__(self, folder: str | Path, header: dict, index: dict):
        self.folder, self.header = Path(folder), header
        self.num_rows = int(index.get("num_rows", 0))
        self.rows: dict[str, list] = dict(index.get("rows", {}))  # resolved path -> [row, size, mtime_ns]
        self.failed: dict[str, str] = dict(index.get("failed", {}))  # resolved path -> why it could not be read
        self._file = None
        self.lock: ProcessLock | None = None  # held while this process may write the cache (see lock_cache)

    # ---- opening ------------------------------------------------------------------------------------------

    @property
    def data_path(self) -> Path:
        return self.folder / "features.bin"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.header["shape"])

    @property
    def dtype(self) -> str:
        return self.header["dtype"]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPES[self.dtype][2]

    @classmethod
    def load(cls, folder: str | Path) -> FeatureCache | None:
        """The cache in folder, None when there is none; a CaptionerError when it is damaged."""
        folder = Path(folder)
        if not (folder / "header.json").is_file():
            return None
        header = _read_json(folder / "header.json")
        missing = [k for k in (*MUST_MATCH, "dtype", "format") if k not in header]
        if missing or header.get("dtype") not in DTYPES:
            raise CaptionerError(f"feature cache {folder}/header.json lacks {', '.join(missing) or 'a valid dtype'}; "
                                 f"rebuild it with `captioner extract --rebuild`")
        if header["format"] != FORMAT_VERSION:
            raise CaptionerError(f"feature cache {folder} has format {header['format']}, this captioner reads "
                                 f"{FORMAT_VERSION}; rebuild it with `captioner extract --rebuild`")
        index = _read_json(folder / "index.json") if (folder / "index.json").is_file() else {}
        try:
            cache = cls(folder, header, index)
            bad = [k for k, (row, size, mtime) in cache.rows.items()
                   if not 0 <= row < cache.num_rows or not isinstance(size, int) or not isinstance(mtime, int)]
        except (TypeError, ValueError, AttributeError):
            bad = ["its entries"]
        if bad:
            raise CaptionerError(f"feature cache {folder}/index.json is damaged (image {bad[0]}); rebuild it with "
                                 f"`captioner extract --rebuild`")
        on_disk = cache.data_path.stat().st_size if cache.data_path.is_file() else 0
        if on_disk < cache.num_rows * cache.row_bytes:
            raise CaptionerError(f"feature cache {cache.data_path} holds {on_disk // cache.row_bytes} rows but its "
                                 f"index lists {cache.num_rows} (truncated?); rebuild it with "
                                 f"`captioner extract --rebuild`")
        return cache

    @classmethod
    def create(cls, folder: str | Path, signature: dict, dtype: str = "bfloat16") -> FeatureCache:
        """A new, empty cache in folder (anything there before is removed)."""
        if dtype not in DTYPES:
            raise CaptionerError(f"cache.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("index.json", "features.bin", "header.json"):
            (folder / name).unlink(missing_ok=True)
        header = {"format": FORMAT_VERSION, **signature, "dtype": dtype}
        cache = cls(folder, header, {})
        cache.commit()
        _write_json(folder / "header.json", header)  # last: its presence marks a usable cache
        return cache

    def mismatch(self, signature: dict) -> str | None:
        """None when features from this cache equal the encoder's; otherwise what differs, in words."""
        diffs = [f"{k} {self.header[k]} (now {signature[k]})" for k in MUST_MATCH
                 if k != "fingerprint" and self.header[k] != signature[k]]
        if not diffs and self.header["fingerprint"] != signature["fingerprint"]:  # same settings, other values
            diffs.append(f"other encoder weights (weights {self.header.get('weights_name')}, fingerprint "
                         f"{self.header['fingerprint']}; now {signature.get('weights_name')}, "
                         f"{signature['fingerprint']})")
        return "; ".join(diffs) or None

    # ---- reading ------------------------------------------------------------------------------------------

    def has(self, record) -> bool:
        """Whether record's image file, as it is now, is cached (another file of the same name is not)."""
        return self._row(file_identity(record.path)) is not None

    def _row(self, identity) -> int | None:
        entry = self.rows.get(identity[0]) if identity else None
        return entry[0] if entry is not None and entry[1:] == identity[1] else None

    def source(self, records: list) -> tuple[CachedFeatures, list] | None:
        """(source, records kept) when every record is cached or known unreadable, else None.

        Records whose image failed to extract are dropped with a warning, as unreadable images are elsewhere.
        """
        found = [(r, file_identity(r.path)) for r in records]
        rows = [(r, self._row(identity), identity) for r, identity in found]
        if not all(row is not None or (identity and identity[0] in self.failed) for _, row, identity in rows):
            return None
        kept = [(r, row) for r, row, _ in rows if row is not None]
        if len(kept) < len(records):
            log.warning("feature cache %s: %d of %d images were unreadable at extraction and are skipped",
                        self.folder, len(records) - len(kept), len(records))
        return (CachedFeatures(self.data_path, self.shape, self.dtype, [row for _, row in kept], self.num_rows),
                [r for r, _ in kept])

    # ---- writing ------------------------------------------------------------------------------------------

    def _open_for_append(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.lock is None:
            self.lock = lock_cache(self.folder)
        self._file = open(self.data_path, "r+b" if self.data_path.exists() else "w+b")
        # Rows written after the last commit belong to no index entry: drop them and append from there.
        self._file.truncate(self.num_rows * self.row_bytes)
        self._file.seek(self.num_rows * self.row_bytes)

    def append(self, records: list, features: torch.Tensor) -> None:
        """Append features (B, C, H, W) of records (B) on CPU; they count once commit() has run."""
        if features.shape[1:] != self.shape:
            raise CaptionerError(f"feature cache {self.folder} stores {self.shape} features, got "
                                 f"{tuple(features.shape[1:])}")
        if self._file is None:
            self._open_for_append()
        torch_dtype, _, _ = DTYPES[self.dtype]
        block = features.to(torch_dtype).contiguous().cpu()
        if self.dtype == "bfloat16":
            block = block.view(torch.int16)  # the raw bits; numpy has no bfloat16
        try:
            self._file.write(block.numpy().data)  # the tensor's own buffer: no extra copy
        except OSError as e:  # disk full, quota, removed drive: cut the partial block so rows stay aligned
            with contextlib.suppress(OSError):
                self._file.truncate(self.num_rows * self.row_bytes)
                self._file.seek(self.num_rows * self.row_bytes)
            raise CaptionerError(f"feature cache {self.data_path}: cannot write ({e.strerror or e})") from None
        for r in records:
            identity = file_identity(r.path)
            if identity is None:  # gone since it was read: its row stays unreferenced
                log.warning("feature cache %s: %s disappeared while it was extracted", self.folder, r.path)
            else:
                self.rows[identity[0]] = [self.num_rows, *identity[1]]
                self.failed.pop(identity[0], None)
            self.num_rows += 1

    def fail(self, record, message: str) -> None:
        self.failed[os.path.realpath(record.path)] = message

    def commit(self) -> None:
        """Make appended rows durable, then point the index at them (in that order)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        _write_json(self.folder / "index.json", {"num_rows": self.num_rows, "rows": self.rows, "failed": self.failed})

    def close(self) -> None:
        if self._file is not None:
            self.commit()
            self._file.close()
            self._file = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def open_valid_cache(cfg: Config, encoder, purpose: str) -> FeatureCache | None:
    """The configured cache when it exists and was built by this very encoder; else None, saying why."""
    folder = default_cache_dir(cfg, encoder.layer)
    if not cfg.cache.use or cfg.encoder.finetune_from:  # a fine-tuned encoder's features change every step
        return None
    cache = FeatureCache.load(folder)
    if cache is None:
        log.info("%s: no feature cache at %s (run `captioner extract` to build one); running the encoder",
                 purpose, folder)
        return None
    why = cache.mismatch(encoder_signature(encoder))
    if why:
        log.warning("%s: feature cache %s is not used, it was built with %s; run `captioner extract --rebuild`",
                    purpose, folder, why)
        return None
    return cache


def cached_source(cfg: Config, encoder, records: list, purpose: str,
                  cache: FeatureCache | None = None) -> tuple[CachedFeatures, list] | None:
    """(memory-mapped source, records kept) when a valid cache covers records, else None (and one log line)."""
    cache = cache or open_valid_cache(cfg, encoder, purpose)
    if cache is None:
        return None
    found = cache.source(records)
    if found is None:
        covered = sum(cache.has(r) for r in records)
        log.warning("%s: feature cache %s covers %d of %d images; run `captioner extract` to finish it; "
                    "running the encoder", purpose, cache.folder, covered, len(records))
    else:
        log.info("%s: features of %d images from cache %s (%s)", purpose, len(found[1]), cache.folder, cache.dtype)
    return found


def _available_memory() -> int | None:
    """Bytes of RAM available to new allocations (Linux MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cached_training_inputs(cfg: Config, encoder, train_records: list, val_records: list):
    """(train source, train records, val source, val records) from one valid cache covering both splits,
    or None so that training runs (or precomputes) the encoder itself."""
    cache = open_valid_cache(cfg, encoder, "train")
    train = cache and cached_source(cfg, encoder, train_records, "train split", cache)
    val = cache and cached_source(cfg, encoder, val_records, "val split", cache)
    if train and val:
        return (*train, *val)
    # Without a cache, train.precompute_features holds float32 features of every image in RAM.
    needed = (len(train_records) + len(val_records)) * encoder.channels * encoder.grid[0] * encoder.grid[1] * 4
    available = _available_memory()
    if cfg.train.precompute_features and available is not None and needed > available // 2:
        log.warning("precomputing features in memory needs %.1f GB of the %.1f GB available; run `captioner "
                    "extract` first to keep them on disk (memory-mapped)", needed / 1e9, available / 1e9)
    return None
