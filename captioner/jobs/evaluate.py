"""Evaluate a checkpoint on a dataset split: captions every image, scores them, writes results and metrics.

    captioner evaluate --checkpoint runs/tiny/best.pt
    captioner evaluate --checkpoint runs/tiny/best.pt --split val --beam 1 dataset.root=data/other

The dataset comes from the checkpoint's own config; `key=value` overrides change it (e.g. dataset.root).
Writes OUT/results_SPLIT.json (COCO results format: [{"image_id", "caption"}]) and OUT/metrics_SPLIT.json:
coco-caption's BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (captioner.metrics; equal to `captioner score` on the
results file), nltk corpus BLEU beside them, with the checkpoint, split, beam size and decoding, and how much the
captions vary: distinct_captions / distinct_fraction (of the images), vocab_used (distinct words), mean_length.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioner.config import ComputeConfig, check_checkpoint_overrides, require_min
from captioner.engine.infer.generation import GenerationFields, given_options
from captioner.engine.infer.predict import predict
from captioner.engine.infer.predictor import load_for_job
from captioner.data.datasets import by_split, dataset_inputs, load_records
from captioner.data.cache import cached_source, default_cache_dir
from captioner.errors import CaptionerError
from captioner.files import check_writable, write_json
from captioner.io_paths import refuse_overlap
from captioner.metrics.coco import caption_metrics
from captioner.metrics.diversity import caption_diversity

log = logging.getLogger("captioner")


@dataclass
class EvaluateJob(GenerationFields):
    """`captioner evaluate`'s options (and the generation options of GenerationFields, keyword-only)."""
    checkpoint: str
    split: str = "test"
    beam_size: int | None = None  # None: the checkpoint's decode.beam_size
    out_dir: str | None = None  # None: the folder holding the checkpoint (or model folder)
    overrides: list[str] = field(default_factory=list)  # dataset.*, decode.*, compute.*, cache.* only
    device: str | None = "auto"
    batch_size: int | None = None  # None: decode.batch_size
    compute: ComputeConfig | None = None  # this machine's switches (default: auto, then any compute.* override)
    runtime: str = "torch"  # torch | onnxruntime (a model folder's ONNX graphs)
    providers: list[str] | None = None  # onnxruntime: execution providers, best first (None: from the device)
    ort_threads: int | None = None  # onnxruntime: intra-op threads (None: torch's count)
    ort_optimization: str | None = None  # onnxruntime: graph optimization level (None: all)
    # sample, temperature, max_len, ... (decode.* for this run; None / False: the checkpoint's): GenerationFields

    def __post_init__(self):
        require_min(("--beam", self.beam_size, 1), ("--batch-size", self.batch_size, 1),
                    ("--ort-threads", self.ort_threads, 1))
        check_checkpoint_overrides(list(self.overrides))
        out = Path(self.out_dir) if self.out_dir else None
        if out is not None and out.suffix.lower() in FILE_SUFFIXES and not out.is_dir():
            # a name a file would bear: `--out metrics.json` made a folder of that name, holding two files
            raise CaptionerError(f"--out {out} names a file; evaluate writes results_{self.split}.json and "
                                 f"metrics_{self.split}.json into a folder: give a folder, e.g. "
                                 f"--out {out.with_suffix('')}")


# What a file, not a folder, would be called (an existing folder of such a name is still taken)
FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".txt", ".yaml", ".yml"}


def main(job: EvaluateJob) -> dict:
    # Default: beside the checkpoint file or model folder; for a Hub repo id, the working folder.
    out = Path(job.out_dir) if job.out_dir else Path(job.checkpoint).parent if Path(job.checkpoint).exists() else Path()
    results_path, metrics_path = out / f"results_{job.split}.json", out / f"metrics_{job.split}.json"
    outputs = {"--out": [results_path, metrics_path]}  # the folder's other files are never touched
    refuse_overlap(outputs, {"--checkpoint": job.checkpoint})
    # the default lies beside the model, perhaps a shared read-only one: say how to write elsewhere
    check_writable(out, "evaluation output folder", folder=True,
                   hint="" if job.out_dir else "write the results elsewhere with --out DIR")
    predictor = load_for_job(job, job.device)
    # One caption per image is scored, whatever decode.num_return_sequences the checkpoint carries.
    predictor.settings = predictor.settings_for({**given_options(job), "num_return_sequences": 1})
    if predictor.settings.sample:
        torch.manual_seed(predictor.cfg.train.seed)  # as `caption` does: the same command, the same captions
    cfg, split = predictor.cfg, job.split
    files, folders = dataset_inputs(cfg.dataset)  # the checkpoint's dataset, as overridden, and its feature cache
    refuse_overlap(outputs, {**files, "cache.dir": default_cache_dir(cfg)}, folders)
    records = [r for r in by_split(load_records(cfg.dataset), split) if r.captions]  # missing files dropped
    if not records:
        raise CaptionerError(f"split '{split}' of the dataset has no captioned images")
    # A feature cache holds the PyTorch encoder's activations: another backend runs its own encoder.
    model = predictor.model
    cached = cached_source(cfg, model.encoder, records, f"{split} split") if model is not None else None
    features, records = cached if cached else (None, records)
    hypotheses = predict(predictor.backend, predictor.vocab, records, predictor.settings,
                         job.batch_size or cfg.decode.batch_size, predictor.device, features=features,
                         num_workers=cfg.compute.num_workers, gpu_decode=predictor.compute.gpu_decode)
    if len(hypotheses) != len(records):
        log.warning("scored %d captions for %d images in the split", len(hypotheses), len(records))
    scores = caption_metrics(hypotheses, {r.image_id: r.captions for r in records})
    scores.update(caption_diversity(hypotheses))  # one caption for every image shows as a low distinct_fraction
    write_json(results_path, [{"image_id": i, "caption": c} for i, c in hypotheses.items()], "results file", indent=1)
    metrics = {"checkpoint": str(job.checkpoint), "split": split, "split_images": len(records),
               "dataset": cfg.dataset.annotations or cfg.dataset.root,
               "decoding": "sampled" if predictor.settings.sample else
               "greedy" if predictor.settings.beam_size == 1 else "beam",
               "beam_size": predictor.settings.beam_size,
               **{k: getattr(predictor.settings, k) for k in ("max_len", "length_penalty", "block_ngram",
                                                               "suppress_unk", "groups", "diversity")},
               **({k: getattr(predictor.settings, k) for k in ("temperature", "top_k", "top_p")}
                  if predictor.settings.sample else {}),
               "features": f"cache {features.path} ({features.dtype})" if cached else "encoder",
               "runtime": predictor.runtime, **scores,
               "results_file": str(results_path), "metrics_file": str(metrics_path)}
    write_json(metrics_path, metrics, "metrics file", indent=1)
    return metrics
