"""Caption image files and folders with a trained checkpoint: batched, resumable, with an attention gallery.

    captioner caption --checkpoint runs/tiny/best.pt photos/ --recursive --out captions.jsonl
    captioner caption --checkpoint best.pt a.jpg b.png list.txt --beam 1 --format csv --out captions.csv
    captioner caption --checkpoint best.pt photos/ --html gallery.html      # + per-word attention maps
    find photos -name '*.jpg' | captioner caption --checkpoint best.pt -     # paths from standard input

Records: {"file", "caption", "score"} (score: the caption's total log-probability), or {"file", "error"}
for a file that could not be read; a bad file never stops the run. Records are appended and flushed batch
by batch: rerunning the same command skips the files already in the output (error records included;
--retry-errors tries those again, --overwrite starts from scratch), so a killed run loses at most the batch
in flight and never leaves a duplicate or half-written record. Each record names the checkpoint (SHA-256)
and decoding settings that made it; resuming an output made by another checkpoint or with other settings is
refused (--overwrite, or another --out), so one file never mixes two models' captions.

Images are decoded in DataLoader workers (or on the GPU with compute.gpu_decode); the encoder and the greedy or
beam decoder run on whole batches, through the same decode path as `evaluate` (engine/infer/predict.py).
An image gets the same caption alone or in any batch (only the good images of a batch are decoded).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioner.config import ComputeConfig, check_checkpoint_overrides, require_min
from captioner.config.sections import TEMPERATURES
from captioner.data.images import MAX_PIXELS
from captioner.engine.infer.generation import GenerationFields, given_options
from captioner.engine.infer.predict import DecodeSettings
from captioner.engine.infer.predictor import load_for_job
from captioner.data.inputs import find_images
from captioner.errors import CaptionerError
from captioner.files import check_writable
from captioner.io_paths import refuse_overlap
from captioner.engine.outputs.gallery import Gallery
from captioner.engine.runtime import distributed
from captioner.engine.runtime.distributed import Process
from captioner.engine.outputs.captions_file import CaptionsFile, format_for, part_path, part_paths, file_key

log = logging.getLogger("captioner")


@dataclass
class CaptionJob(GenerationFields):
    """`captioner caption`'s options (and the generation options of GenerationFields, keyword-only)."""
    checkpoint: str
    paths: list[str]  # image files, folders, .txt/.lst lists, or "-" for standard input
    out: str | None = None  # None: captions.jsonl (or captions.csv with fmt csv)
    beam_size: int | None = None  # None: the checkpoint's decode.beam_size
    batch_size: int | None = None  # None: the checkpoint's decode.batch_size
    recursive: bool = False
    device: str | None = "auto"
    num_workers: int = 2  # image decoding processes
    fmt: str | None = None  # jsonl | csv; None: from out's extension
    html: str | None = None  # also write an HTML attention gallery here
    overwrite: bool = False
    retry_errors: bool = False
    max_pixels: int | None = None  # None: MAX_PIXELS
    compute: ComputeConfig | None = None  # this machine's switches; None: the checkpoint's (auto by default)
    # sample, temperature, max_len, ... (decode.* for this run; None: the checkpoint's): GenerationFields
    num_return_sequences: int | None = None  # > 1: JSONL records list every caption as "sequences"
    runtime: str = "torch"  # torch | onnxruntime (a model folder's ONNX graphs)
    providers: list[str] | None = None  # onnxruntime: execution providers, best first (None: from the device)
    ort_threads: int | None = None  # onnxruntime: intra-op threads (None: torch's count)
    ort_optimization: str | None = None  # onnxruntime: graph optimization level (None: all)
    overrides: list[str] = field(default_factory=list)  # section.key=value (or --set) on the checkpoint's config

    def __post_init__(self):
        require_min(("--beam", self.beam_size, 1), ("--batch-size", self.batch_size, 1),
                    ("--workers", self.num_workers, 0), ("--max-pixels", self.max_pixels, 1),
                    ("--ort-threads", self.ort_threads, 1))
        check_checkpoint_overrides(list(self.overrides))  # decode.* and compute.*, never the model's shape
        low, high = TEMPERATURES
        if self.temperature is not None and not low <= self.temperature <= high:  # NaN fails too
            raise CaptionerError(f"--temperature must be in [{low:g}, {high:g}], got {self.temperature}")


@torch.inference_mode()
def main(job: CaptionJob) -> dict:
    """Caption every image under job.paths into job.out (JSONL or CSV), and into an HTML gallery when job.html
    is given.

    Under torchrun every process captions its shard of the images on its own device (cuda:LOCAL_RANK or the
    CPU) into its own part files, which rank 0 moves into out and html at the end (engine/outputs/captions_file.py).

    Returns {"images": found, "captioned": and "errors": written by this run, "skipped": already in the
    output, "failed": error records for these images in the whole output, "out", "html", "seconds",
    "images_per_second"}: over all processes on rank 0, this process's share elsewhere. sample (or the
    checkpoint's decode.sample): each word drawn from the model's distribution at temperature (default
    decode.temperature) instead of greedy/beam, torch seeded with train.seed (+ rank) first so that the same
    command gives the same captions.
    """
    out, fmt = job.out, job.fmt
    fmt = format_for(out or "captions.jsonl", fmt)
    out_path = Path(out or f"captions.{fmt}")
    process = distributed.setup(job.device, distributed.LONG_WAIT)  # cuda:LOCAL_RANK under torchrun
    try:
        return _caption(job, out_path, fmt, process)
    finally:
        distributed.cleanup(process)


def _caption(job: CaptionJob, out_path: Path, fmt: str, process: Process) -> dict:
    html, max_pixels = job.html, job.max_pixels or MAX_PIXELS
    if process.is_main:  # before the model loads and any image is read
        check_writable(out_path, "captions file", append=True)
        if html:
            check_writable(html, "gallery", append=True)
    files = find_images(job.paths, job.recursive) if process.is_main else None  # before the model: a typo fails fast
    if process.is_main and not files:
        raise CaptionerError(f"no image files found in {', '.join(job.paths)} (folders are searched for image "
                             f"extensions{'' if job.recursive else '; add --recursive for sub-folders'})")
    if process.is_main:  # the images, lists and model are never written over (before the model loads)
        folders = [p for p in job.paths if p != "-" and Path(p).is_dir()]
        refuse_overlap({"--out": out_path, "--html": html},
                       {"--checkpoint": job.checkpoint, "input": [p for p in job.paths if p not in folders],
                        "image": files}, folders={"folder": folders})
    predictor = load_for_job(job, process.device)
    predictor.settings = predictor.settings_for(given_options(job))  # checked as decode.* would be
    settings, batch_size = predictor.settings, job.batch_size or predictor.cfg.decode.batch_size
    if settings.sample:
        torch.manual_seed(predictor.cfg.train.seed + process.rank)
    title = f"Captions by {Path(job.checkpoint).name}: {predictor.description()}"

    made_by = {"model": predictor.model_hash(), "decoding": _decoding(settings)}
    # outputs written before the id was computed from the tensors carry the files' hash: the same model
    older = lambda: {"model": predictor.legacy_model_hash()}  # noqa: E731
    results = gallery = None  # the output files, held by rank 0
    parts = None  # this process's part files under torchrun
    counts = {"captioned": 0, "errors": 0}
    start, waited = time.perf_counter(), [0.0]
    try:
        if process.is_main:
            results, gallery, plan = _open_outputs(files, out_path, fmt, html, title, job.overwrite,
                                                   job.retry_errors, made_by, older)
        todo, recorded = distributed.broadcast_from_main(plan if process.is_main else None, process)
        mine = distributed.shard(todo, process)
        writer, pages = results, gallery
        if process.distributed:  # each process appends to its own files; rank 0 merges them below
            parts = (CaptionsFile(part_path(out_path, process.rank), fmt, overwrite=True, made_by=made_by),
                     Gallery(part_path(html, process.rank), title, True, made_by) if html else None)
            writer, pages = parts
            writer.done.update((key, {}) for key in recorded)  # gallery-only work: no second record
        try:
            batches = _timed_iter(predictor.image_batches(mine, batch_size, job.num_workers, max_pixels), waited)
            with distributed.GlobalProgress(len(todo), process, "captioning", log.isEnabledFor(logging.INFO)) as bar:
                for batch, captioned in predictor.caption_batches(batches, attention=html is not None):
                    _write_batch(predictor.encoder.grid, mine, batch, captioned, writer, pages, counts)
                    bar.update(len(captioned))
                    bar.set_postfix(errors=counts["errors"])
        except torch.cuda.OutOfMemoryError:
            raise CaptionerError(f"out of GPU memory at --batch-size {batch_size}: rerun with a smaller one "
                                 f"(the images captioned so far are kept)") from None
        finally:
            for output in parts or ():
                if output is not None:
                    output.close()
        if process.distributed:  # every part is complete and closed once every process has sent its counts
            everyone = distributed.gather_to_main(counts, process)
            if not process.is_main:
                return {"images": len(mine), **counts, "rank": process.rank}
            counts = {k: sum(c[k] for c in everyone) for k in counts}
            order = {file_key(f): i for i, f in enumerate(files)}
            results.absorb(part_paths(out_path), order)
            if gallery:
                gallery.absorb(part_paths(html), order)
    except KeyboardInterrupt:
        log.warning("interrupted: %d images captioned so far are saved in %s; rerun the same command to resume",
                    counts["captioned"], out_path)
        raise
    finally:
        for output in (results, gallery):
            if output is not None:
                output.close()
    seconds = time.perf_counter() - start
    done = counts["captioned"] + counts["errors"]
    skipped = len(files) - len(todo) + len(recorded)
    failed = sorted(f for f in files if "error" in results.done.get(file_key(f), {}))
    log.info("captioned %d images in %.1fs (%.1f images/s over %d process%s, %.1fs waiting for image decoding); "
             "%d could not be read", counts["captioned"], seconds, done / seconds if seconds else 0.0,
             process.world_size, "es" if process.distributed else "", waited[0], counts["errors"])
    for f in failed[:5]:
        log.warning("  %s: %s", f, results.done[file_key(f)]["error"])
    if len(failed) > 5:
        log.warning("  ... and %d more error records in %s", len(failed) - 5, out_path)
    return {"images": len(files), **counts, "skipped": skipped, "failed": len(failed), "out": str(out_path),
            "html": str(html) if html else None, "seconds": round(seconds, 2),
            "images_per_second": round(done / seconds, 2) if seconds else None}


def _open_outputs(files, out_path, fmt, html, title, overwrite, retry_errors, made_by, older=None):
    """(captions file, gallery or None, (todo, recorded)) on rank 0: todo the files still to caption (or to add
    to the gallery), recorded those of them already in the captions file. Part files a killed torchrun run
    left are merged first (or deleted with --overwrite), so their work is not done twice."""
    results = CaptionsFile(out_path, fmt, overwrite, retry_errors, made_by, older)
    gallery = None
    try:
        gallery = Gallery(html, title, overwrite, made_by, older) if html else None
        order = {file_key(f): i for i, f in enumerate(files)}
        leftovers = [part_paths(out_path), part_paths(html) if html else []]
        if overwrite:
            for path in leftovers[0] + leftovers[1]:
                path.unlink()
        elif leftovers[0] or leftovers[1]:
            added = results.absorb(leftovers[0], order, retry_errors)
            if gallery:
                gallery.absorb(leftovers[1], order)
            log.info("%s: took %d records from the part files of an interrupted run", out_path, added)
    except BaseException:
        results.close()
        if gallery:
            gallery.close()
        raise
    todo = [f for f in files if file_key(f) not in results.done or (gallery and not gallery.has(f))]
    recorded = [file_key(f) for f in todo if file_key(f) in results.done]
    skipped = len(files) - len(todo) + len(recorded)
    if skipped:
        log.info("%d of %d images are already in %s: skipped (--overwrite starts again)", skipped, len(files),
                 out_path)
    return results, gallery, (todo, recorded)


def _timed_iter(iterable, waited: list):
    """Iterate, adding the seconds spent waiting for each item to waited[0] (time spent decoding images)."""
    iterator = iter(iterable)
    while True:
        tick = time.perf_counter()
        item = next(iterator, None)
        waited[0] += time.perf_counter() - tick
        if item is None:
            return
        yield item


def _write_batch(grid, todo, batch, captioned, results, gallery, counts) -> None:
    """Append one batch's records (and gallery entries) at once."""
    records = []
    for c in captioned:
        file = todo[c.index]
        if c.error:
            # The pipeline's message starts with the path, which the record already holds.
            record = {"file": file, "error": c.error.removeprefix(f"{file}: ")}
        else:
            record = {"file": file, "caption": c.caption, "score": round(c.score, 4)}
            if len(c.sequences) > 1:  # num_return_sequences: every caption, best first (a CSV keeps the best)
                record["sequences"] = [{"caption": text, "score": round(score, 4)} for text, score in c.sequences]
        if file_key(file) not in results.done:
            records.append(record)
            counts["errors" if c.error else "captioned"] += 1
        if gallery is not None and not gallery.has(file):
            if c.error:
                gallery.add_error(file, record["error"])
            else:
                row = batch.index.tolist().index(c.index)
                image = batch.inputs[row].permute(1, 2, 0).cpu().numpy()  # (3, S, S) -> (S, S, 3) uint8
                gallery.add(file, image, tuple(batch.sizes[row].tolist()), c.words, c.alphas.numpy(),
                            grid=grid, score=record["score"])
    results.append(records)
    if gallery is not None:
        gallery.flush()


def _decoding(settings: DecodeSettings) -> str:
    """The decoding settings a caption depends on, as records name them (options left at off are not named, so
    outputs written before they existed resume)."""
    n_best = f", num_return_sequences {settings.num_return_sequences}" if settings.num_return_sequences > 1 else ""
    if settings.sample:
        how = f"sampled at temperature {settings.temperature:g}, max_len {settings.max_len}"
        how += f", top_k {settings.top_k}" if settings.top_k else ""
        how += f", top_p {settings.top_p:g}" if settings.top_p < 1 else ""
        how += ", suppress_unk" if settings.suppress_unk else ""  # sampling honours it too (sample.py)
        return how + n_best
    how = f"beam {settings.beam_size}, max_len {settings.max_len}, length_penalty {settings.length_penalty:g}"
    if settings.block_ngram:
        how += f", block_ngram {settings.block_ngram}"
    if settings.suppress_unk:
        how += ", suppress_unk"
    if settings.groups > 1 and settings.beam_size > 1:
        how += f", groups {settings.groups}, diversity {settings.diversity:g}"
    return how + n_best
