"""Check a dataset and write what training and scoring need from it, before hours of training find a problem.

    captioner prepare --config configs/coco_resnet152.yaml                 # writes data/coco/prepared/
    captioner prepare --config configs/flickr8k_resnet152.yaml --out /tmp/f8k dataset.min_freq=3

Reads the dataset exactly as `captioner train` and `evaluate` do (the dataset.* keys) and reports images and
captions per split, missing image files (count and first few; above dataset.max_missing_fraction an error),
the vocabulary size, the share of words that become <unk> in each split, and how many captions are longer
than dataset.max_len. Writes to OUT (default: DATASET_ROOT/prepared; with dataset.root unset, prepared/ beside
the captions file):

    vocab.json            the vocabulary, from the train split only (train builds the same one itself)
    splits.json           {"train": [image ids], "val": [...], "test": [...]}, usable as dataset.splits
    captions_val.json     val and test references in COCO captions format, for `captioner score`
    captions_test.json
    missing_images.txt    every missing image file, when there are any
    summary.json          everything printed
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from captioner.config import Config, DatasetConfig, to_dict
from captioner.data.datasets import dataset_inputs, read_dataset
from captioner.data.records import SPLITS, ImageRecord, by_split, drop_missing, find_missing
from captioner.errors import CaptionerError, os_failure
from captioner.files import check_writable, write_text
from captioner.io_paths import refuse_overlap
from captioner.jobs.base import config_of
from captioner.text import Vocabulary, tokenize

log = logging.getLogger("captioner")

OUTPUT_FILES = ("vocab.json", "splits.json", "captions_val.json", "captions_test.json", "missing_images.txt",
                "summary.json")  # what main writes into OUT


def build_vocabulary(train_records: list[ImageRecord], cfg: DatasetConfig) -> Vocabulary:
    """The vocabulary of the train split's captions (words seen at least dataset.min_freq times)."""
    return Vocabulary.build([c for r in train_records for c in r.captions], cfg.min_freq)


def caption_stats(records: list[ImageRecord], vocab: Vocabulary, max_len: int) -> dict:
    """Captions, words, share of words not in vocab (-> <unk>), captions cut at max_len, length percentiles."""
    lengths, unknown = [], 0
    for r in records:
        for c in r.captions:
            words = tokenize(c)
            lengths.append(len(words))
            unknown += sum(w not in vocab.index for w in words)
    lengths.sort()
    words = sum(lengths)
    return {"images": len(records), "captions": len(lengths), "words": words,
            "unk_rate": round(unknown / words, 5) if words else 0.0,
            "truncated_captions": sum(n > max_len for n in lengths),
            "empty_captions": sum(n == 0 for n in lengths),
            "length_mean": round(words / len(lengths), 2) if lengths else 0.0,
            "length_p95": lengths[int(0.95 * (len(lengths) - 1))] if lengths else 0,
            "length_max": lengths[-1] if lengths else 0}


def coco_captions(records: list[ImageRecord], description: str) -> dict:
    """Records -> a COCO captions JSON object (what `captioner score --annotations` and coco-caption read)."""
    images = [{"id": r.image_id, "file_name": r.path} for r in records]
    annotations = [{"id": n, "image_id": image_id, "caption": c}
                   for n, (image_id, c) in enumerate((r.image_id, c) for r in records for c in r.captions)]
    return {"info": {"description": description}, "licenses": [], "images": images, "annotations": annotations}


@dataclass
class PrepareJob:
    """`captioner prepare`'s options."""
    cfg: Config | None = None  # None: read from config (+ overrides)
    out_dir: str | Path | None = None  # None: default_out (DATASET_ROOT/prepared, or beside the captions file)
    config: str | None = None  # a YAML config file (its dataset section is used)
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.cfg = config_of(self.cfg, self.config, self.overrides, "prepare")


class _Warnings(logging.Handler):
    """Collects the warnings the readers log while a dataset is read, for the summary."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def split_warnings(splits: dict[str, list[ImageRecord]]) -> list[str]:
    """What an empty split or a split without captions means for training and scoring."""
    consequence = {"val": "training cannot select a checkpoint (every validation would score 0)",
                   "test": "there is nothing held out for `captioner evaluate`"}
    notes = []
    for s in ("val", "test"):
        if not splits[s]:
            notes.append(f"the {s} split is empty: {consequence[s]}; set dataset.val_fraction, dataset.splits or "
                         f"dataset.{s}_list")
        elif not any(r.captions for r in splits[s]):
            notes.append(f"the {s} split has {len(splits[s])} images and no captions: {consequence[s]}")
    return notes


def default_out(dataset, annotations: Path | None) -> Path:
    """DATASET_ROOT/prepared; for a captions file with dataset.root left at its default (the synthetic set's
    folder, data/synthetic), the folder beside that file: one's own CSV's checks do not belong in 'synthetic'."""
    if annotations is not None and dataset.root == DatasetConfig().root:
        return annotations.parent / "prepared"
    return Path(dataset.root) / "prepared"


def main(job: PrepareJob) -> dict:
    """Check cfg.dataset and write vocab, splits, references and a summary into out_dir; returns the summary.
    Every warning the readers give (malformed lines, duplicates, missing files, empty splits) is in the summary
    with its count, so a silent problem shows in summary.json too."""
    cfg, out_dir = job.cfg, job.out_dir
    files, folders = dataset_inputs(cfg.dataset)  # e.g. dataset.splits=PREPARED/splits.json is never rewritten
    out = Path(out_dir) if out_dir else default_out(cfg.dataset, files.get("dataset.annotations"))
    refuse_overlap({"--out": [out / name for name in OUTPUT_FILES]}, {"--config": job.config, **files}, folders)
    check_writable(out, "prepare output folder", folder=True,  # before reading a dataset of 600k captions
                   hint="" if out_dir else "write the prepared files elsewhere with --out DIR")
    warnings = _Warnings()
    logger = logging.getLogger("captioner")
    logger.addHandler(warnings)
    try:
        fmt, records = read_dataset(cfg.dataset)
        unused = [r for r in records if r.split not in SPLITS]
        in_splits = [r for r in records if r.split in SPLITS]
        missing = find_missing(in_splits)
        # The same call load_records makes, so train and evaluate will see exactly these records.
        kept = drop_missing(in_splits, cfg.dataset.max_missing_fraction, f"dataset {cfg.dataset.annotations or fmt}")
    finally:
        logger.removeHandler(warnings)
    splits = {s: by_split(kept, s) for s in SPLITS}
    if not splits["train"]:
        raise CaptionerError("the train split is empty: check dataset.splits, the split lists or dataset.val_fraction")
    if not any(r.captions for r in splits["train"]):
        raise CaptionerError(f"the train split has {len(splits['train'])} images and no captions: nothing to train "
                             f"on; check the annotations file's caption column or field")
    for note in split_warnings(splits):
        log.warning("%s", note)
        warnings.messages.append(note)
    vocab = build_vocabulary(splits["train"], cfg.dataset)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_failure(f"cannot create output folder {out} (choose another with --out)", e) from None
    vocab.save(out / "vocab.json")
    write_text(out / "splits.json", json.dumps({s: [r.image_id for r in rs] for s, rs in splits.items()}))
    files = {"vocab": str(out / "vocab.json"), "splits": str(out / "splits.json")}
    for s in ("val", "test"):
        if splits[s]:
            path = out / f"captions_{s}.json"
            write_text(path, json.dumps(coco_captions(splits[s], f"captioner prepare: {s} split of "
                                                  f"{cfg.dataset.annotations or cfg.dataset.root}")))
            files[f"captions_{s}"] = str(path)
    if missing:
        write_text(out / "missing_images.txt", "".join(r.path + "\n" for r in missing))
        files["missing_images"] = str(out / "missing_images.txt")

    summary = {"format": fmt, "annotations": cfg.dataset.annotations, "images_folder": cfg.dataset.images,
               "splits": {s: caption_stats(rs, vocab, cfg.dataset.max_len) for s, rs in splits.items()},
               "unused_images": len(unused), "missing_images": len(missing),
               "missing_examples": [r.path for r in missing[:5]],
               "vocab_size": len(vocab), "min_freq": cfg.dataset.min_freq, "max_len": cfg.dataset.max_len,
               "warnings": warnings.messages, "dataset_config": to_dict(cfg)["dataset"], "files": files}
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    summary["files"]["summary"] = str(out / "summary.json")
    return summary


def summary_lines(summary: dict) -> list[str]:
    """Human-readable lines for the CLI."""
    lines = [f"format {summary['format']}: {summary['annotations'] or 'synthetic'}"]
    for s, st in summary["splits"].items():
        lines.append(f"  {s:<5} {st['images']:>7} images {st['captions']:>8} captions  <unk> {st['unk_rate']:6.2%}  "
                     f"over {summary['max_len']} words: {st['truncated_captions']:<5} "
                     f"words mean {st['length_mean']}, p95 {st['length_p95']}, max {st['length_max']}")
    if summary["unused_images"]:
        lines.append(f"  {summary['unused_images']} images in no split (not used)")
    if summary["missing_images"]:
        lines.append(f"  {summary['missing_images']} image files missing and skipped (first: "
                     f"{', '.join(summary['missing_examples'][:3])}); all in {summary['files']['missing_images']}")
    if summary.get("warnings"):
        lines.append(f"{len(summary['warnings'])} warning{'s' if len(summary['warnings']) > 1 else ''} (also in "
                     f"summary.json):")
        lines += [f"  {message}" for message in summary["warnings"]]
    lines.append(f"vocabulary: {summary['vocab_size']} tokens (train words seen >= {summary['min_freq']} times, "
                 f"with 4 specials)")
    lines.append(f"written to {Path(summary['files']['vocab']).parent}: " +
                 ", ".join(Path(p).name for p in summary["files"].values()))
    return lines
