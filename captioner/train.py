"""Train an attention captioner.

    captioner train --config configs/tiny.yaml --run-dir runs/tiny
    captioner train --config configs/tiny.yaml --run-dir runs/tiny2 train.epochs=3 encoder.layer=layer3

RUN_DIR gets last.pt (every epoch), best.pt (best validation BLEU-4), metrics.jsonl (one JSON line per
logged step and per epoch), config.yaml and vocab.json.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.checkpoint import save_checkpoint
from captioner.compute import autocast, prepare_encoder
from captioner.config import Config, to_dict
from captioner.data import by_split, load_records
from captioner.data.cache import training_inputs
from captioner.data.images import CaptionPairs, ImageFiles, ImageSource
from captioner.decoder import caption_loss
from captioner.errors import CaptionerError
from captioner.evaluate import predict
from captioner.metrics import corpus_bleu_scores
from captioner.model import CaptionModel, build_encoder
from captioner.runtime import resolve_device, seed_everything
from captioner.vocab import Vocabulary

log = logging.getLogger("captioner")


def drop_unreadable(records, what: str):
    """Keep records whose image file exists; report the others (count and first few) instead of crashing later."""
    missing = [r for r in records if not Path(r.path).is_file()]
    if missing:
        names = ", ".join(Path(r.path).name for r in missing[:5])
        log.warning("%s: %d of %d image files are missing and skipped (first: %s)", what, len(missing),
                    len(records), names)
    if len(missing) == len(records) and records:
        raise CaptionerError(f"{what}: none of the {len(records)} image files exist (first: {records[0].path})")
    return [r for r in records if Path(r.path).is_file()]


@torch.no_grad()
def extract_features(model: CaptionModel, records, batch_size: int, num_workers: int, device,
                     desc: str = "features"):
    """Run the frozen encoder once over records -> (float32 (N, C, H, W) on CPU, records kept).
    Unreadable images are reported and dropped."""
    loader = DataLoader(ImageFiles([r.path for r in records], model.encoder.image_size), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks, bad = [], []
    for images, index, errors in tqdm(loader, desc=desc, unit="batch", leave=False):
        chunks.append(model.encode(images.to(device, non_blocking=True)).float().cpu())
        bad.extend(int(i) for i, e in zip(index, errors) if e)
        for e in filter(None, errors):
            log.warning("skipped: %s", e)
    features = torch.cat(chunks)
    keep = [i for i in range(len(records)) if i not in set(bad)]
    return features[keep], [records[i] for i in keep]


def train_one_epoch(model, loader, optimizer, cfg: Config, device, epoch: int, step: int, metrics_file) -> tuple[int, float]:
    model.train()
    total, count, window_start, window_items = 0.0, 0, time.perf_counter(), 0
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False)
    for inputs, captions, lengths in bar:
        width = int(lengths.max())  # trim padding beyond the longest caption in the batch (CPU: no sync)
        inputs, captions, lengths = (t.to(device, non_blocking=True) for t in (inputs, captions, lengths))
        with autocast(device, cfg.compute.bf16):
            raw = inputs if inputs.is_floating_point() else model.encode(inputs)  # cached features or images
            logits, alphas = model(raw, captions[:, :width])
            loss, ce = caption_loss(logits, alphas, captions[:, :width], lengths, model.alpha_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.train.grad_clip)
        optimizer.step()
        step += 1
        total, count, window_items = total + loss.item(), count + 1, window_items + captions.shape[0]
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.train.log_every == 0:
            elapsed = time.perf_counter() - window_start
            _log_line(metrics_file, {"step": step, "epoch": epoch, "loss": loss.item(), "ce": ce.item(),
                                     "lr": optimizer.param_groups[0]["lr"],
                                     "captions_per_s": window_items / max(elapsed, 1e-9)})
            window_start, window_items = time.perf_counter(), 0
    return step, total / max(count, 1)


def _log_line(metrics_file, record: dict) -> None:
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()


def main(cfg: Config, run_dir: str | Path, device: str | None = "auto") -> dict:
    """Train per cfg into run_dir; returns {"best_checkpoint", "last_checkpoint", "best_bleu4", "epochs"}."""
    device = resolve_device(device)
    generator = seed_everything(cfg.train.seed)
    encoder = build_encoder(cfg.encoder)  # first: bad weights or layer names fail before anything else runs
    records = load_records(cfg.dataset)
    train_records = drop_unreadable(by_split(records, "train"), "train split")
    val_records = drop_unreadable(by_split(records, "val"), "val split")
    if not train_records:
        raise CaptionerError("the training split is empty: check dataset.splits or dataset.val_fraction")
    if cfg.train.val_images:
        val_records = val_records[: cfg.train.val_images]
    vocab = Vocabulary.build([c for r in train_records for c in r.captions], cfg.dataset.min_freq)
    model = CaptionModel(cfg.encoder, cfg.model, len(vocab), encoder=encoder).to(device)
    prepare_encoder(model.encoder, device, cfg.compute)  # CUDA: channels_last, optional torch.compile
    params = model.trainable_parameters()
    log.info("device %s; %d train / %d val images; vocabulary %d words; %.2fM trainable parameters",
             device, len(train_records), len(val_records), len(vocab), sum(p.numel() for p in params) / 1e6)

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    vocab.save(run_dir / "vocab.json")

    val_features = None
    cached = training_inputs(cfg, model.encoder, train_records, val_records)  # None: no valid cache for both
    if cached is not None:  # memory-mapped: workers read the rows each batch needs, nothing more
        source, train_records, val_features, val_records = cached
        workers = cfg.train.num_workers
    elif cfg.train.precompute_features:  # the encoder is frozen: its output per image never changes
        train_features, train_records = extract_features(model, train_records, cfg.decode.batch_size,
                                                         cfg.train.num_workers, device, "train features")
        val_features, val_records = extract_features(model, val_records, cfg.decode.batch_size,
                                                     cfg.train.num_workers, device, "val features")
        source, workers = train_features, 0  # in memory: workers would only copy it
    else:
        source, workers = ImageSource([r.path for r in train_records], cfg.encoder.image_size), cfg.train.num_workers
    pairs = CaptionPairs(train_records, vocab, cfg.dataset.max_len, source)
    loader = DataLoader(pairs, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers,
                        generator=generator, drop_last=len(pairs) > cfg.train.batch_size,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    references = {r.image_id: r.captions for r in val_records}

    best, step, summary = -math.inf, 0, {}
    with open(run_dir / "metrics.jsonl", "a") as metrics_file:
        for epoch in range(1, cfg.train.epochs + 1):
            start = time.perf_counter()
            step, train_loss = train_one_epoch(model, loader, optimizer, cfg, device, epoch, step, metrics_file)
            hypotheses = predict(model, vocab, val_records, cfg.decode.batch_size, device, beam_size=1,
                                 max_len=cfg.decode.max_len, features=val_features,
                                 num_workers=cfg.train.num_workers) if val_records else {}
            scores = corpus_bleu_scores(hypotheses, references)
            record = {"epoch": epoch, "step": step, "train_loss": train_loss,
                      **{f"val_{k}": v for k, v in scores.items()}, "epoch_s": time.perf_counter() - start}
            _log_line(metrics_file, record)
            log.info("epoch %d: train loss %.3f, val BLEU-4 %.3f (%.0fs)", epoch, train_loss, scores["bleu4"],
                     record["epoch_s"])
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": to_dict(cfg),
                     "vocab": vocab.tokens, "epoch": epoch, "step": step, "val_scores": scores}
            improved = scores["bleu4"] > best
            if improved:
                best = scores["bleu4"]
                save_checkpoint(run_dir / "best.pt", {**state, "best_score": best})
            save_checkpoint(run_dir / "last.pt", {**state, "best_score": best})
    summary = {"best_checkpoint": str(run_dir / "best.pt"), "last_checkpoint": str(run_dir / "last.pt"),
               "best_bleu4": best, "epochs": cfg.train.epochs, "steps": step}
    return summary
