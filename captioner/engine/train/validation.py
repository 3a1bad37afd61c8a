"""Validation during training: captions of the val images, scored; best.pt, plateau and early stopping.

    scores = validate(run, inputs, references)     # every process captions its share; rank 0 scores
    validate_start(run, inputs, references)        # --init-from: the starting weights as epoch 0
    finish_epoch(run, epoch, scores, seconds)      # log, best/early-stopping state, last.pt (and best.pt)
"""
from __future__ import annotations

import logging
from dataclasses import replace

from captioner.engine.runtime import distributed
from captioner.engine.infer.predict import DecodeSettings, predict
from captioner.engine.train.run_state import TrainingRun, save_checkpoints
from captioner.engine.train.inputs import TrainingInputs
from captioner.metrics.coco import validation_scores
from captioner.metrics.diversity import caption_diversity

log = logging.getLogger("captioner")


def validate(run: TrainingRun, inputs: TrainingInputs, references: dict) -> dict:
    """Captions (greedy, or beam search of train.val_beam_size) of this process's share of the val images,
    gathered and scored on rank 0 with captioner.metrics; every process gets the scores (plus "images": how
    many were captioned).

    With one process, a stop signal ends validation at the next batch (Stopped); under torchrun every process
    finishes it, since the others would wait for the one that left."""
    cfg = run.cfg
    settings = validation_settings(run)
    hypotheses = predict(run.model, run.vocab, inputs.val_records, settings, cfg.decode.batch_size,
                         run.process.device, features=inputs.val_features, num_workers=cfg.train.num_workers,
                         unreadable=inputs.unreadable, progress_bar=run.process.is_main,
                         stop=None if run.process.distributed else run.stop) if inputs.val_records else {}
    if not run.process.distributed:
        run.stop.check()  # scoring takes a while too
    parts = distributed.gather_to_main(hypotheses, run.process)
    scores = None
    if run.process.is_main:
        merged = {image_id: caption for part in parts for image_id, caption in part.items()}
        # distinct_fraction: a run collapsing to a few generic captions shows per epoch, not only at evaluate
        scores = {**validation_scores(merged, references),
                  "distinct_fraction": caption_diversity(merged)["distinct_fraction"], "images": len(merged)}
    return distributed.broadcast_from_main(scores, run.process)


def validation_settings(run: TrainingRun) -> DecodeSettings:
    """How validation decodes (and the sample captions, samples.py, so a sample's caption is the one scored):
    train.val_beam_size with the decode keys that apply to it, so best.pt is picked on the captions users get.
    Never sampled: a validation must be repeatable. One caption per image: decode.num_return_sequences is what
    `caption` returns, not what validation scores."""
    cfg = run.cfg
    one = replace(cfg, decode=replace(cfg.decode, sample=False, num_return_sequences=1))
    return DecodeSettings.of(one, cfg.train.val_beam_size, compute=run.compute)


def selection_score(run: TrainingRun, scores: dict) -> tuple[str, float]:
    """(metric, value) that picks best.pt: train.select_metric (config.py accepts only what validation computes:
    coco-caption's BLEU-1..4, ROUGE-L and CIDEr-D, as evaluate computes them)."""
    metric = run.cfg.train.select_metric
    return metric, scores[metric]


def finish_epoch(run: TrainingRun, epoch: int, scores: dict, seconds: float) -> None:
    """Log the validation, update best/early-stopping/plateau state, then write last.pt (and best.pt: when the
    score is the best so far, or every epoch with train.select_best false; "improved" in the log says it was)."""
    progress = run.progress
    metric, score = selection_score(run, scores)
    gained = score > progress.best_score  # early stopping counts from the best score, whichever weights best.pt keeps
    improved = gained or not run.cfg.train.select_best
    run.metrics.write({"epoch": epoch, "step": progress.step,
                       "train_loss": progress.loss_sum / max(progress.loss_count, 1),
                       **({"train_reward": progress.reward_sum / max(progress.loss_count, 1)}
                          if run.cfg.train.objective == "scst" else {}),
                       **{f"val_{k}": v for k, v in scores.items()}, "select_metric": metric, "improved": improved,
                       "lr": run.step.optimizer.param_groups[0]["lr"], "epoch_s": seconds,
                       **({"elapsed_s": round(run.clock.elapsed(), 3)} if run.clock else {})})
    log.info("epoch %d/%d: train loss %.3f, val %s %.3f%s (%.0fs)%s", epoch, run.cfg.train.epochs,
             progress.loss_sum / max(progress.loss_count, 1), metric, score, " (best)" if gained else "", seconds,
             f" · {run.clock.eta_text(epoch)}" if run.clock else "")
    progress.epoch, progress.sample, progress.loss_sum, progress.loss_count = epoch, 0, 0.0, 0
    progress.reward_sum = 0.0
    progress.scores = scores
    if gained:
        progress.best_score, progress.evals_without_gain = score, 0
    else:
        progress.evals_without_gain += 1
    if improved:
        progress.best_scores = scores  # best.pt's
    run.schedule.observe(score)
    save_checkpoints(run, best=improved)


def validate_start(run: TrainingRun, inputs: TrainingInputs, references: dict) -> None:
    """--init-from (train.validate_init): score the starting weights, log them as epoch 0 and save them as best.pt,
    so an epoch must beat them to replace it. Self-critical training can lose on val what cross-entropy reached
    (docs/quality.md): its best.pt is then the start, not its least bad epoch."""
    scores = validate(run, inputs, references)
    metric, score = selection_score(run, scores)
    progress = run.progress
    run.metrics.write({"epoch": 0, "step": progress.step, **{f"val_{k}": v for k, v in scores.items()},
                       "select_metric": metric, "improved": True, "start": run.init_from})
    log.info("epoch 0 (the --init-from weights): val %s %.3f", metric, score)
    progress.scores, progress.best_score, progress.best_scores = scores, score, scores
    run.schedule.observe(score)
    save_checkpoints(run, best=True)


def early_stop(run: TrainingRun) -> bool:
    patience = run.cfg.train.early_stop_patience
    return bool(patience) and run.progress.evals_without_gain >= patience


