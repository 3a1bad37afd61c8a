"""Caption image files and folders with a trained checkpoint; one JSON line per image.

    captioner caption --checkpoint runs/tiny/best.pt photos/ --out captions.jsonl
    captioner caption --checkpoint best.pt a.jpg b.png --beam 1

Records: {"file": ..., "caption": ..., "score": ...} or {"file": ..., "error": ...} for a file that could not be read.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.beam import decode
from captioner.checkpoint import load_model
from captioner.compute import autocast, prepare_encoder, use_gpu_decode
from captioner.data.pipeline import image_batches
from captioner.errors import CaptionerError
from captioner.runtime import resolve_device

log = logging.getLogger("captioner")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def collect_paths(paths: list[str], recursive: bool = False) -> list[str]:
    """Files as given, image files inside folders (sorted), and lines of .txt files listing paths."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found.extend(str(f) for f in sorted(p.glob(pattern)) if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.suffix.lower() == ".txt" and p.is_file():
            found.extend(line.strip() for line in p.read_text().splitlines() if line.strip())
        elif p.exists() or p.is_symlink():
            found.append(str(p))
        else:
            raise CaptionerError(f"{p}: no such file or folder")
    return found


@torch.inference_mode()
def main(checkpoint: str, paths: list[str], out: str | None = None, beam_size: int | None = None,
         batch_size: int = 32, recursive: bool = False, device: str | None = "auto", num_workers: int = 2) -> dict:
    """Caption every image under paths into out (JSONL); returns {"captioned", "errors", "out"}."""
    device = resolve_device(device)
    model, vocab, cfg = load_model(checkpoint, device)
    prepare_encoder(model.encoder, device, cfg.compute)
    beam_size = beam_size or cfg.decode.beam_size
    files = collect_paths(paths, recursive)
    if not files:
        raise CaptionerError(f"no image files found in {', '.join(paths)}")
    out_path = Path(out) if out else Path("captions.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    loader = image_batches(files, model.encoder.image_size, batch_size, num_workers, device,
                           use_gpu_decode(cfg.compute, device))
    captioned = errors = 0
    with open(out_path, "w", encoding="utf-8") as f, tqdm(total=len(files), unit="img", desc="captioning") as bar:
        for images, index, messages in loader:
            with autocast(device, cfg.compute.bf16):
                decoded = decode(model, model.encode(images), beam_size, cfg.decode.max_len,
                                 cfg.decode.length_penalty)
            for row, i in enumerate(index.tolist()):
                if messages[row]:
                    record, errors = {"file": files[i], "error": messages[row]}, errors + 1
                else:
                    record = {"file": files[i], "caption": vocab.decode(decoded.tokens[row].tolist()),
                              "score": round(float(decoded.scores[row]), 4)}
                    captioned += 1
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(index))
    return {"captioned": captioned, "errors": errors, "out": str(out_path)}
