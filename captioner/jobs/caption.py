"""Caption image files and folders with a trained checkpoint: batched, resumable, with an attention gallery.

    captioner caption --checkpoint runs/tiny/best.pt photos/ --recursive --out captions.jsonl
    captioner caption --checkpoint best.pt a.jpg b.png list.txt --beam 1 --format csv --out captions.csv
    captioner caption --checkpoint best.pt photos/ --html gallery.html      # + per-word attention maps
    find photos -name '*.jpg' | captioner caption --checkpoint best.pt -     # paths from standard input

Records: {"file", "caption", "score"} (score: the caption's total log-probability), or {"file", "error"}
for a file that could not be read; a bad file never stops the run. Records are appended and flushed batch
by batch: rerunning the same command skips the files already in the output (error records included;
--retry-errors tries those again, --overwrite starts from scratch), so a killed run loses at most the batch
in flight and never leaves a duplicate or half-written record.

Images are decoded in DataLoader workers; the encoder and the greedy or beam decoder run on whole batches.
An image gets the same caption alone or in any batch (only the good images of a batch are decoded).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.model.beam import decode
from captioner.engine.checkpoint import load_model
from captioner.engine.compute import autocast, prepare_encoder
from captioner.data.images import MAX_PIXELS, ImageFiles
from captioner.data.inputs import find_images
from captioner.errors import CaptionerError
from captioner.engine.gallery import Gallery
from captioner.engine.outputs import CaptionsFile, format_for, same_file
from captioner.engine.runtime import resolve_device
from captioner.model.vocab import Vocabulary

log = logging.getLogger("captioner")


def words_and_alphas(tokens: torch.Tensor, alphas: torch.Tensor, vocab: Vocabulary) -> tuple[list[str], torch.Tensor]:
    """tokens (L,), alphas (L, N) -> the caption's words and their (len(words), N) attention weights."""
    keep = []
    for t, token in enumerate(tokens.tolist()):
        if token == Vocabulary.end_id:
            break
        if token not in (Vocabulary.pad_id, Vocabulary.start_id):
            keep.append(t)
    return [vocab.tokens[int(tokens[t])] for t in keep], alphas[keep]


@torch.inference_mode()
def main(checkpoint: str, paths: list[str], out: str | None = None, beam_size: int | None = None,
         batch_size: int | None = None, recursive: bool = False, device: str | None = "auto", num_workers: int = 2,
         fmt: str | None = None, html: str | None = None, overwrite: bool = False, retry_errors: bool = False,
         max_pixels: int | None = None) -> dict:
    """Caption every image under paths into out (JSONL or CSV), and into an HTML gallery when html is given.

    Returns {"images": found, "captioned": and "errors": written by this run, "skipped": already in the
    output, "failed": error records for these images in the whole output, "out", "html", "seconds",
    "images_per_second"}.
    """
    for name, value, low in (("--beam", beam_size, 1), ("--batch-size", batch_size, 1), ("--workers", num_workers, 0),
                             ("--max-pixels", max_pixels, 1)):
        if value is not None and value < low:
            raise CaptionerError(f"{name} must be >= {low}, got {value}")
    max_pixels = max_pixels or MAX_PIXELS
    fmt = format_for(out or "captions.jsonl", fmt)
    out_path = Path(out or f"captions.{fmt}")
    device = resolve_device(device)
    files = find_images(paths, recursive)  # before loading the model: a typo in a path fails fast
    if not files:
        raise CaptionerError(f"no image files found in {', '.join(paths)} (folders are searched for "
                             f"image extensions{'' if recursive else '; add --recursive for sub-folders'})")
    model, vocab, cfg = load_model(checkpoint, device)
    prepare_encoder(model.encoder, device, cfg.compute)  # CUDA: channels_last, optional torch.compile
    beam_size = beam_size or cfg.decode.beam_size
    batch_size = batch_size or cfg.decode.batch_size

    results = CaptionsFile(out_path, fmt, overwrite, retry_errors)
    try:
        gallery = Gallery(html, _gallery_title(checkpoint, beam_size, model), overwrite) if html else None
    except BaseException:
        results.close()
        raise
    todo = [f for f in files if same_file(f) not in results.done or (gallery and not gallery.has(f))]
    skipped = sum(same_file(f) in results.done for f in files)
    if skipped:
        log.info("%d of %d images are already in %s: skipped (--overwrite starts again)", skipped, len(files),
                 out_path)
    counts = {"captioned": 0, "errors": 0}
    start, waiting = time.perf_counter(), 0.0
    try:
        loader = DataLoader(ImageFiles(todo, model.encoder.image_size, max_pixels, with_size=True),
                            batch_size=batch_size, num_workers=min(num_workers, -(-len(todo) // batch_size)),
                            pin_memory=device.type == "cuda")
        bar = tqdm(total=len(todo), unit="img", desc="captioning", disable=not log.isEnabledFor(logging.INFO))
        batches = iter(loader)
        while True:
            tick = time.perf_counter()
            batch = next(batches, None)
            waiting += time.perf_counter() - tick
            if batch is None:
                break
            images, index, messages, sizes = batch
            try:
                _caption_batch(model, vocab, cfg, beam_size, device, [todo[i] for i in index.tolist()], images,
                               messages, sizes, results, gallery, counts)
            except torch.cuda.OutOfMemoryError:
                raise CaptionerError(f"out of GPU memory at --batch-size {batch_size}: rerun with a smaller one "
                                     f"(the images captioned so far are kept)") from None
            bar.update(len(index))
            bar.set_postfix(errors=counts["errors"], refresh=False)
        bar.close()
    except KeyboardInterrupt:
        log.warning("interrupted: %d images captioned so far are saved in %s; rerun the same command to resume",
                    counts["captioned"], out_path)
        raise
    finally:
        results.close()
        if gallery:
            gallery.close()
    seconds = time.perf_counter() - start
    done = counts["captioned"] + counts["errors"]
    failed = sorted(f for f in files if "error" in results.done.get(same_file(f), {}))
    log.info("captioned %d images in %.1fs (%.1f images/s, %.1fs waiting for image decoding); %d could not be "
             "read", counts["captioned"], seconds, done / seconds if seconds else 0.0, waiting, counts["errors"])
    for f in failed[:5]:
        log.warning("  %s: %s", f, results.done[same_file(f)]["error"])
    if len(failed) > 5:
        log.warning("  ... and %d more error records in %s", len(failed) - 5, out_path)
    return {"images": len(files), **counts, "skipped": skipped, "failed": len(failed), "out": str(out_path),
            "html": str(html) if html else None, "seconds": round(seconds, 2),
            "images_per_second": round(done / seconds, 2) if seconds else None}


def _caption_batch(model, vocab, cfg, beam_size, device, files, images, messages, sizes, results, gallery, counts):
    """Encode and decode the good images of one batch; append their records (and gallery entries) at once."""
    good = [row for row, message in enumerate(messages) if not message]
    if good:  # unreadable images are never encoded: a batch's captions do not depend on its bad files
        with autocast(device, cfg.compute.bf16):  # bf16 on CUDA, float32 elsewhere
            raw = model.encode(images.to(device, non_blocking=True)[good])  # (G, 3, S, S) -> (G, C, H, W)
            decoded = decode(model, raw, beam_size, cfg.decode.max_len, cfg.decode.length_penalty)
        # One copy to the host per batch: (G, L) tokens, (G,) scores, (G, L, N) attention.
        tokens, scores, alphas = decoded.tokens.cpu(), decoded.scores.cpu(), decoded.alphas.float().cpu()
    records = []
    for row, (file, message) in enumerate(zip(files, messages)):
        entry = None
        if message:
            # The dataset's message starts with the path, which the record already holds.
            record = {"file": file, "error": message.removeprefix(f"{file}: ")}
        else:
            g = good.index(row)
            words, word_alphas = words_and_alphas(tokens[g], alphas[g], vocab)
            record = {"file": file, "caption": " ".join(words), "score": round(float(scores[g]), 4)}
            entry = (images[row].permute(1, 2, 0).numpy(), tuple(sizes[row].tolist()), words, word_alphas.numpy())
        if same_file(file) not in results.done:
            records.append(record)
            counts["errors" if message else "captioned"] += 1
        if gallery is not None and not gallery.has(file):
            if entry is None:
                gallery.add_error(file, record["error"])
            else:
                gallery.add(file, *entry, grid=model.grid, score=record["score"])
    results.append(records)
    if gallery is not None:
        gallery.flush()


def _gallery_title(checkpoint: str, beam_size: int, model) -> str:
    decoding = "greedy decoding" if beam_size == 1 else f"beam search (beam {beam_size})"
    enc = model.encoder
    return (f"Captions by {Path(checkpoint).name}: {decoding}, attention over the {enc.grid[0]}x{enc.grid[1]} "
            f"{enc.layer} grid of {enc.arch}")
