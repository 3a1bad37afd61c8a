"""Train an attention captioner; survive kills and pre-emption, resume exactly, scale with torchrun.

    captioner train --config configs/tiny.yaml --run-dir runs/tiny
    captioner train --config configs/tiny.yaml --run-dir runs/tiny2 train.epochs=3 encoder.layer=layer3
    captioner train --resume runs/tiny                    # after kill -9, Ctrl-C or pre-emption
    captioner train --resume runs/tiny train.epochs=20    # or to train longer
    torchrun --nproc_per_node=2 -m captioner train --config configs/tiny.yaml --run-dir runs/ddp

RUN_DIR gets last.pt (every train.checkpoint_every steps, at each epoch end, on SIGINT/SIGTERM), best.pt (when
the validation train.select_metric improves), metrics.jsonl, config.yaml and vocab.json (see rundir.py). Each
checkpoint holds the whole training state: model, optimizer, lr schedule, grad scaler, the position in the
epoch's data order and every random generator, so a resumed run repeats an uninterrupted one exactly on CPU.

Under torchrun each process trains on train.batch_size captions of every step with DistributedDataParallel
(the global batch is N times larger). Validation captions are computed by every process on its share of the
val images and gathered on rank 0, which alone scores them, logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioner.engine import distributed
from captioner.engine.checkpoint import check_resumable, load_checkpoint, remove_stale_temporaries, save_checkpoint
from captioner.engine.compute import Compute, autocast, setup_compute
from captioner.config import Config, apply_overrides, from_dict, load_config, to_dict
from captioner.data import by_split, load_records
from captioner.data.cache import training_inputs as cached_inputs
from captioner.data.images import CaptionPairs, ImageFiles
from captioner.data.pipeline import Batches, Unreadable, image_batches
from captioner.data.sampler import ResumableSampler
from captioner.model.decoder import caption_loss
from captioner.engine.distributed import Process
from captioner.errors import CaptionerError
from captioner.engine.predict import DecodeSettings, predict
from captioner.engine.interrupt import StopRequest
from captioner.metrics.coco import corpus_bleu_scores
from captioner.model.caption_model import CaptionModel, build_encoder
from captioner.engine.rundir import MetricsLog, clear_run_files, config_differences, lock_run_dir, plan_run
from captioner.engine.runtime import restore_rng_state, rng_state, seed_everything
from captioner.engine.schedule import LRSchedule
from captioner.model.vocab import SPECIALS, Vocabulary

log = logging.getLogger("captioner")

# Config keys that shape the weights or the optimizer's parameter groups: a checkpoint resumes only under the same.
ARCHITECTURE_KEYS = ("encoder.arch", "encoder.layer", "encoder.in_channels", "encoder.image_size",
                     "encoder.finetune_from", "model.embed_dim", "model.attention_dim", "model.decoder_dim")


@torch.no_grad()
def extract_features(model: CaptionModel, records, batch_size: int, num_workers: int, device, gpu_decode: bool,
                     unreadable: Unreadable, desc: str = "features", progress_bar: bool = True, bf16: bool = False):
    """Run the frozen encoder once over records -> (float32 (N, C, H, W) on CPU, records kept).
    Unreadable images are reported, counted and dropped. bf16: autocast (the resolved compute.bf16)."""
    batches = image_batches([r.path for r in records], model.encoder.image_size, batch_size, num_workers, device,
                            gpu_decode)
    chunks, keep = [], []
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress_bar):
        good = [j for j, e in enumerate(batch.errors) if not e]
        for e in filter(None, batch.errors):
            unreadable.add(e)
        if good:
            with autocast(device, bf16):
                chunks.append(model.encode(batch.inputs[good]).float().cpu())
            keep.extend(int(batch.index[j]) for j in good)
    if not chunks:
        return torch.empty(0), []
    return torch.cat(chunks), [records[i] for i in keep]


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class TrainingInputs:
    """Where the training and validation inputs come from."""
    train_source: object  # train_source[i] -> input of train_records[i]: image (3, S, S) uint8 or features (C, H, W)
    train_records: list
    val_features: object  # (N, C, H, W) tensor or cache source for val_records, or None: read the images
    val_records: list  # this process's share of the val images
    num_workers: int
    unreadable: Unreadable  # images skipped because they could not be read


def training_inputs(cfg: Config, model: CaptionModel, train_records, val_records, process: Process,
                    compute: Compute) -> TrainingInputs:
    """Choose the input source: encoder features computed once per image (a frozen encoder gives the same ones
    every epoch) or image files read per batch. One place, so that a feature cache can take over."""
    val_records = val_records[process.rank::process.world_size]  # validation is split across processes
    unreadable, gpu_decode = Unreadable(), compute.gpu_decode
    cached = None if cfg.encoder.finetune_from else cached_inputs(cfg, model.encoder, train_records, val_records)
    if cached is not None:  # memory-mapped feature cache: workers read only the rows each batch needs
        train_source, train_records, val_features, val_records = cached
        return TrainingInputs(train_source, train_records, val_features, val_records, cfg.train.num_workers,
                              unreadable)
    precompute = cfg.train.precompute_features
    if precompute and cfg.encoder.finetune_from:
        log.info("encoder.finetune_from=%s: the encoder changes while training, so its features are computed "
                 "per batch (train.precompute_features ignored)", cfg.encoder.finetune_from)
        precompute = False
    if not precompute:
        source = ImageFiles([r.path for r in train_records], cfg.encoder.image_size, raw_jpeg=gpu_decode)
        return TrainingInputs(source, train_records, None, val_records, cfg.train.num_workers, unreadable)
    device, bar = process.device, process.is_main
    train_features, train_records = extract_features(model, train_records, cfg.decode.batch_size,
                                                     cfg.train.num_workers, device, gpu_decode, unreadable,
                                                     "train features", bar, compute.bf16)
    val_features, val_records = extract_features(model, val_records, cfg.decode.batch_size, cfg.train.num_workers,
                                                 device, gpu_decode, unreadable, "val features", bar, compute.bf16)
    return TrainingInputs(train_features, train_records, val_features, val_records, 0, unreadable)  # in memory


def build_train_loader(cfg: Config, vocab: Vocabulary, inputs: TrainingInputs,
                       process: Process) -> tuple[Batches, ResumableSampler]:
    pairs = CaptionPairs(inputs.train_records, vocab, cfg.dataset.max_len, inputs.train_source)
    sampler = ResumableSampler(len(pairs), cfg.train.seed, process.rank, process.world_size)
    per_process = -(-len(pairs) // process.world_size)
    loader = Batches(pairs, cfg.train.batch_size, process.device, inputs.num_workers, sampler=sampler,
                     drop_last=per_process > cfg.train.batch_size, seed=cfg.train.seed, unreadable=inputs.unreadable)
    return loader, sampler


# ---------------------------------------------------------------------------------------------- state

@dataclass
class Progress:
    """Where training stands. Saved in every checkpoint as plain data, so a run resumes at the exact sample."""
    epoch: int = 0  # epochs completed
    sample: int = 0  # samples of the current epoch's global order consumed (all processes together)
    step: int = 0  # batches trained in all (steps skipped for a non-finite loss included)
    scores: dict = field(default_factory=dict)  # the last validation's scores
    best_score: float = -math.inf  # best validation train.select_metric so far
    best_scores: dict = field(default_factory=dict)  # every validation score at that point
    evals_without_gain: int = 0  # validations since the best one, for early stopping
    bad_steps: int = 0  # consecutive non-finite losses
    loss_sum: float = 0.0  # this epoch's summed loss and number of steps, for its mean
    loss_count: int = 0


class LossForward(nn.Module):
    """Encoder (for image inputs), teacher-forced decoder and loss as one module, so that DDP sees the whole
    forward pass: the fine-tuned encoder stages too."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(self, inputs, captions, lengths):
        """inputs (B, 3, S, S) uint8 images or (B, C, H, W) float features, captions (B, T+1) -> (loss, ce)."""
        raw = inputs if inputs.is_floating_point() else self.model.encode(inputs)
        logits, alphas = self.model(raw, captions)  # bf16 under autocast; caption_loss works in float32
        return caption_loss(logits, alphas, captions, lengths, self.model.alpha_c)


@dataclass
class TrainingRun:
    """What the functions below share (instead of script globals)."""
    cfg: Config
    run_dir: Path
    vocab: Vocabulary
    model: CaptionModel  # the plain model: checkpoints and validation use it, never a wrapper
    forward: nn.Module  # LossForward(model), in DistributedDataParallel when there are several processes
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    progress: Progress
    metrics: MetricsLog
    process: Process
    stop: StopRequest
    compute: Compute  # the resolved precision and memory format (engine/compute.py)
    warned: set = field(default_factory=set)  # select_metric fallbacks already warned about


def build_optimizer(model: CaptionModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: projector and decoder at train.lr, fine-tuned encoder stages
    (encoder.finetune_from) at train.encoder_lr."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    in_encoder = {id(p) for p in encoder}
    head = [p for p in model.trainable_parameters() if id(p) not in in_encoder]
    groups = [{"params": head, "lr": cfg.train.lr, "name": "decoder"}]
    if encoder:
        groups.append({"params": encoder, "lr": cfg.train.encoder_lr, "name": "encoder"})
    for group in groups:
        log.info("optimizing %s: %d tensors, %.2fM parameters, lr %g", group["name"], len(group["params"]),
                 sum(p.numel() for p in group["params"]) / 1e6, group["lr"])
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def _grad_scaler(device: torch.device, enabled: bool):
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


def _weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def save_checkpoints(run: TrainingRun, best: bool = False) -> None:
    """Write last.pt (and best.pt) from rank 0. Every process must call it: the RNG states are gathered."""
    rng = distributed.gather_to_main(rng_state(), run.process)  # each process has its own dropout generator
    if not run.process.is_main:
        return
    progress = run.progress
    if not _weights_finite(run.model):
        log.warning("step %d: the model holds non-finite weights; last.pt is kept as it was", progress.step)
        return
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "schedule": run.schedule.state_dict(), "scaler": run.scaler.state_dict(),
             "progress": dataclasses.asdict(progress), "rng": rng, "world_size": run.process.world_size,
             "metrics_offset": run.metrics.offset, "config": to_dict(run.cfg), "vocab": run.vocab.tokens,
             "epoch": progress.epoch, "step": progress.step, "val_scores": progress.scores}
    save_checkpoint(run.run_dir / "last.pt", state)
    if best:
        save_checkpoint(run.run_dir / "best.pt", state)


# ---------------------------------------------------------------------------------------------- training

class _Window:
    """Sums over the steps since the last metrics line (throughput, data vs compute time)."""

    def __init__(self):
        self.steps, self.loss, self.captions, self.data_s, self.compute_s = 0, 0.0, 0, 0.0, 0.0
        self.start = time.perf_counter()


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    try:
        import resource  # POSIX only
    except ImportError:
        return {}
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"peak_rss_mb": round(kilobytes / 1024, 1)}


def _reduce_step(run: TrainingRun, loss, ce, lengths) -> tuple[torch.Tensor, float, bool]:
    """(loss to backpropagate here, the global batch's loss, whether any process was asked to stop).

    DDP averages the processes' gradients, but each process's cross-entropy is a mean over its own tokens.
    Weighting it by its share of the global batch's tokens makes that average exactly the gradient of one
    process training on the whole global batch. One all_reduce per step carries all of it."""
    process = run.process
    if not process.distributed:
        return loss, loss.item(), run.stop.signal is not None
    tokens = (lengths - 1).sum().to(ce.dtype)  # words + <end> of each caption
    penalty = loss - ce  # alpha_c * attention penalty: a mean over the same number of images in every process
    stop = torch.tensor(float(run.stop.signal is not None), device=ce.device)
    totals = distributed.all_reduce_sum(torch.stack([ce.detach() * tokens, tokens, penalty.detach(), stop]), process)
    local = ce * (tokens * process.world_size / totals[1]) + penalty
    global_loss = (totals[0] / totals[1] + totals[2] / process.world_size).item()
    return local, global_loss, bool(totals[3] > 0)


def _stop_requested(run: TrainingRun) -> bool:
    flag = torch.tensor([float(run.stop.signal is not None)], device=run.process.device)
    return bool(distributed.all_reduce_sum(flag, run.process)[0] > 0)


def _backward_and_step(run: TrainingRun, loss) -> float | None:
    """Backward, unscale, clip, step. Returns the gradient norm, or None when it was not finite (step skipped)."""
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    clip = run.cfg.train.grad_clip if run.cfg.train.grad_clip > 0 else math.inf
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not math.isfinite(norm) and not run.scaler.is_enabled():  # an enabled scaler would skip such steps itself
        return None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return norm


def _skip_step(run: TrainingRun, epoch: int, why: str) -> None:
    """Count a skipped step; stop the run (last.pt left as it was) after train.max_bad_steps in a row."""
    progress, limit = run.progress, run.cfg.train.max_bad_steps
    progress.bad_steps += 1
    log.warning("step %d: %s, step skipped (%d in a row; the run stops at %d)", progress.step, why,
                progress.bad_steps, limit)
    run.metrics.write({"step": progress.step, "epoch": epoch, "loss": None, "skipped": why})
    if progress.bad_steps >= limit:
        last = run.run_dir / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        raise CaptionerError(f"training stopped at step {progress.step}: {limit} consecutive steps with a {why} "
                             f"(train.max_bad_steps); {kept}; try a lower train.lr or train.grad_clip")


def train_one_epoch(run: TrainingRun, loader: Batches, epoch: int) -> bool:
    """Train from run.progress.sample to the end of the epoch. Returns False when a stop signal ended it early
    (last.pt is saved by then)."""
    cfg, progress, process = run.cfg, run.progress, run.process
    device, global_batch = process.device, cfg.train.batch_size * process.world_size
    run.model.train()
    window = _Window()
    done = progress.sample // global_batch
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not process.is_main,
               initial=done, total=done + len(loader))
    tick = time.perf_counter()
    for batch in bar:
        data_s = time.perf_counter() - tick
        inputs, captions, lengths = batch.inputs, batch.captions, batch.lengths
        if not process.distributed and captions.shape[0] == 0:  # every image unreadable: nothing to learn from
            progress.sample += batch.read  # (under DDP the step runs and skips itself: every process must join)
            continue
        width = int(lengths.max())  # trim padding beyond the longest caption in the batch
        step = progress.step + 1
        lr = run.schedule.step(step)
        with run.compute.autocast():  # bf16 activations; float32 weights, gradients and optimizer state
            loss, ce = run.forward(inputs, captions[:, :width], lengths)
        loss, global_loss, stop = _reduce_step(run, loss, ce, lengths)
        grad_norm = _backward_and_step(run, loss) if math.isfinite(global_loss) else None
        run.optimizer.zero_grad(set_to_none=True)
        progress.step, progress.sample = step, progress.sample + batch.read * process.world_size

        if grad_norm is None:
            _skip_step(run, epoch, "non-finite loss" if not math.isfinite(global_loss) else "non-finite gradient")
        else:
            progress.bad_steps = 0
            progress.loss_sum, progress.loss_count = progress.loss_sum + global_loss, progress.loss_count + 1
            window.steps, window.loss = window.steps + 1, window.loss + global_loss
            bar.set_postfix(loss=f"{global_loss:.3f}")
        window.captions += captions.shape[0] * process.world_size
        window.data_s, window.compute_s = window.data_s + data_s, window.compute_s + time.perf_counter() - tick - data_s
        if step % cfg.train.log_every == 0 and grad_norm is not None:
            elapsed = time.perf_counter() - window.start
            groups = run.optimizer.param_groups
            run.metrics.write({
                "step": step, "epoch": epoch, "loss": global_loss, "loss_avg": window.loss / max(window.steps, 1),
                "lr": lr, **({"encoder_lr": groups[1]["lr"]} if len(groups) > 1 else {}), "grad_norm": grad_norm,
                "captions_per_s": round(window.captions / max(elapsed, 1e-9), 1),
                "data_s": round(window.data_s / max(window.steps, 1), 6),
                "compute_s": round(window.compute_s / max(window.steps, 1), 6),
                **_peak_memory(device)})
            window = _Window()

        periodic = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
        if (periodic and progress.bad_steps == 0) or stop:  # never checkpoint in the middle of a bad streak
            save_checkpoints(run)
        if stop:
            return False
        tick = time.perf_counter()
    return True


# ---------------------------------------------------------------------------------------------- validation

def validate(run: TrainingRun, inputs: TrainingInputs, references: dict) -> dict:
    """Greedy captions of this process's share of the val images, gathered and scored on rank 0 with
    captioner.metrics; every process gets the scores (plus "images": how many were captioned)."""
    cfg = run.cfg
    hypotheses = predict(run.model, run.vocab, inputs.val_records, DecodeSettings(1, cfg.decode.max_len, bf16=run.compute.bf16),
                         cfg.decode.batch_size, run.process.device, features=inputs.val_features,
                         num_workers=cfg.train.num_workers, unreadable=inputs.unreadable,
                         progress_bar=run.process.is_main) if inputs.val_records else {}
    parts = distributed.gather_to_main(hypotheses, run.process)
    scores = None
    if run.process.is_main:
        merged = {image_id: caption for part in parts for image_id, caption in part.items()}
        scores = {**corpus_bleu_scores(merged, references), "images": len(merged)}
    return distributed.broadcast_from_main(scores, run.process)


def selection_score(run: TrainingRun, scores: dict) -> tuple[str, float]:
    """(metric, value) that picks best.pt: train.select_metric, or bleu4 when validation does not compute it."""
    metric = run.cfg.train.select_metric
    if metric in scores:
        return metric, scores[metric]
    if metric not in run.warned:
        run.warned.add(metric)
        log.warning("train.select_metric=%s is not computed by validation (it gives %s): selecting by bleu4",
                    metric, ", ".join(k for k in scores if k != "images"))
    return "bleu4", scores["bleu4"]


def finish_epoch(run: TrainingRun, epoch: int, scores: dict, seconds: float) -> None:
    """Log the validation, update best/early-stopping/plateau state, then write last.pt (and best.pt)."""
    progress = run.progress
    metric, score = selection_score(run, scores)
    improved = score > progress.best_score
    run.metrics.write({"epoch": epoch, "step": progress.step,
                       "train_loss": progress.loss_sum / max(progress.loss_count, 1),
                       **{f"val_{k}": v for k, v in scores.items()}, "select_metric": metric, "improved": improved,
                       "lr": run.optimizer.param_groups[0]["lr"], "epoch_s": seconds})
    log.info("epoch %d: train loss %.3f, val %s %.3f%s (%.0fs)", epoch, progress.loss_sum / max(progress.loss_count, 1),
             metric, score, " (best)" if improved else "", seconds)
    progress.epoch, progress.sample, progress.loss_sum, progress.loss_count = epoch, 0, 0.0, 0
    progress.scores = scores
    if improved:
        progress.best_score, progress.best_scores, progress.evals_without_gain = score, scores, 0
    else:
        progress.evals_without_gain += 1
    run.schedule.observe(score)
    save_checkpoints(run, best=improved)


def _early_stop(run: TrainingRun) -> bool:
    patience = run.cfg.train.early_stop_patience
    return bool(patience) and run.progress.evals_without_gain >= patience


# ---------------------------------------------------------------------------------------------- resuming

def resume_config(run_dir: str | Path, config_path: str | Path | None = None, overrides=()) -> Config:
    """The config of a resumed run: FILE's when given (checked against the checkpoint by main), else the
    checkpoint's own; overrides apply on top (e.g. train.epochs=20 to train longer)."""
    if config_path:
        return load_config(config_path, overrides)
    plan_run(run_dir, {}, resume=True, overwrite=False)  # refuses a folder without last.pt
    path = Path(run_dir) / "last.pt"
    state = load_checkpoint(path, mmap=True)
    try:
        cfg = from_dict(state["config"])
    except CaptionerError as e:
        raise CaptionerError(f"checkpoint {path} has an invalid config: {e}") from None
    return apply_overrides(cfg, list(overrides))


def _resume_checkpoint(run_dir: Path, cfg: Config) -> dict:
    """last.pt of run_dir, refused when it cannot continue a run of this config."""
    path = run_dir / "last.pt"
    state = load_checkpoint(path)
    check_resumable(state, path)
    changes = config_differences(state["config"], to_dict(cfg))
    clashes = [c for c in changes if c.split(":")[0] in ARCHITECTURE_KEYS]
    if clashes:
        raise CaptionerError(f"checkpoint {path} does not match the config's architecture ({'; '.join(clashes)}); "
                             f"resume without --config to use the run's own, or start a new --run-dir")
    if changes:
        log.info("resuming with changed settings: %s", "; ".join(changes))
    return state


def _check_vocabulary(saved: list[str], vocab: Vocabulary, path: Path) -> None:
    if saved == vocab.tokens:
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, vocab.tokens)) if a != b), min(len(saved), len(vocab)))
    first = (f"first difference at id {i}: {saved[i] if i < len(saved) else None!r} in the checkpoint, "
             f"{vocab.tokens[i] if i < len(vocab) else None!r} from the data")
    raise CaptionerError(f"checkpoint {path} has a {len(saved)}-word vocabulary but the training captions give "
                         f"{len(vocab)} words ({first}); the dataset or dataset.min_freq changed since the run "
                         f"started: resume with the original data or start a new --run-dir")


def _restore(run: TrainingRun, state: dict) -> None:
    """Optimizer, schedule, scaler, progress and random generators from a checkpoint."""
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CaptionerError(f"checkpoint {run.run_dir / 'last.pt'}: optimizer state does not fit: {e}") from None
    run.schedule.load_state_dict(state["schedule"])
    if state["scaler"] and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    run.progress = Progress(**state["progress"])
    states, process = state["rng"], run.process
    if len(states) != process.world_size:
        log.warning("last.pt was written by %d processes, this run has %d: the data order continues at the same "
                    "sample, dropout randomness differs from an uninterrupted run", len(states), process.world_size)
    restore_rng_state(states[process.rank % len(states)])


# ---------------------------------------------------------------------------------------------- main

def _write_run_files(run_dir: Path, cfg: Config, vocab: Vocabulary, clear: bool) -> None:
    try:
        if clear:
            clear_run_files(run_dir)  # --overwrite, or leftovers of this run from before its first checkpoint
        run_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temporaries(run_dir)
        if stale:
            log.info("removed %d temporary files of interrupted saves (%s)", len(stale), ", ".join(stale[:3]))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        vocab.save(run_dir / "vocab.json")
    except OSError as e:
        raise CaptionerError(f"cannot write to run dir {run_dir}: {e.strerror or e}") from None


def main(cfg: Config, run_dir: str | Path, device: str | None = "auto", resume: bool = False,
         overwrite: bool = False) -> dict:
    """Train per cfg into run_dir, or resume the run there; returns {"best_checkpoint", "last_checkpoint",
    "best_bleu4", "best_score", "select_metric", "epochs", "steps", "stopped"}.

    stopped is None, "early stopping", or the signal ("SIGINT", "SIGTERM") that interrupted the run."""
    process = distributed.setup(device)
    try:
        with StopRequest() as stop, contextlib.ExitStack() as held:
            return _train(cfg, Path(run_dir), process, resume, overwrite, stop, held)
    finally:
        distributed.cleanup(process)


# Below these, training runs but can hardly learn anything useful: say so before the first step.
FEW_TRAIN_IMAGES, FEW_VAL_IMAGES, FEW_WORDS = 100, 10, 20


def check_training_data(train_records, val_records, vocab: Vocabulary, cfg: Config) -> None:
    """Refuse data no model can be selected or trained on; warn when it is too small to learn much."""
    if not val_records:
        raise CaptionerError("the val split is empty, so no checkpoint could be selected (every validation would "
                             "score 0): set dataset.val_fraction (e.g. 0.1), or give val images in dataset.splits "
                             "or dataset.val_list")
    if len(vocab) <= len(SPECIALS):
        raise CaptionerError(f"the training captions give no word seen at least dataset.min_freq="
                             f"{cfg.dataset.min_freq} times, so the vocabulary holds only {', '.join(SPECIALS)}: "
                             f"lower dataset.min_freq, or check that the captions column holds text")
    for count, few, what in ((len(train_records), FEW_TRAIN_IMAGES, "training images"),
                             (len(val_records), FEW_VAL_IMAGES, "validation images"),
                             (len(vocab) - len(SPECIALS), FEW_WORDS, "words in the vocabulary")):
        if count < few:
            log.warning("WARNING: only %d %s (fewer than %d): the model will learn little and its scores will "
                        "be noise", count, what, few)


def _train(cfg: Config, run_dir: Path, process: Process, resume: bool, overwrite: bool, stop: StopRequest,
           held: contextlib.ExitStack) -> dict:
    mode = plan_run(run_dir, to_dict(cfg), resume, overwrite)  # refusals first: nothing is written before
    distributed.barrier(process)  # every process has read the folder before rank 0 changes it
    checkpoint = _resume_checkpoint(run_dir, cfg) if mode == "resume" else None
    seed_everything(cfg.train.seed)  # the same initial weights in every process
    # A resumed backbone comes from the checkpoint: its weights file need not exist any more.
    encoder = build_encoder(dataclasses.replace(cfg.encoder, weights=None) if checkpoint else cfg.encoder)
    with distributed.main_process_first(process):  # the synthetic set is generated once, not by every process
        records = load_records(cfg.dataset)
    train_records, val_records = by_split(records, "train"), by_split(records, "val")  # missing files already dropped
    if not train_records:
        raise CaptionerError("the training split is empty: check dataset.splits or dataset.val_fraction")
    if cfg.train.val_images:
        val_records = val_records[: cfg.train.val_images]
    vocab = Vocabulary.build([c for r in train_records for c in r.captions], cfg.dataset.min_freq)
    check_training_data(train_records, val_records, vocab, cfg)
    if checkpoint:
        _check_vocabulary(checkpoint["vocab"], vocab, run_dir / "last.pt")
    model = CaptionModel(cfg.encoder, cfg.model, len(vocab), encoder=encoder)
    if checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as e:
            raise CaptionerError(f"checkpoint {run_dir / 'last.pt'} does not fit the model: "
                                 f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    model.to(process.device)
    compute = setup_compute(cfg.compute, process.device)
    compute.prepare_encoder(model.encoder)  # channels_last, optional torch.compile, as resolved

    if process.is_main:  # one training process per run dir, from its first write until main returns or it dies
        held.enter_context(lock_run_dir(run_dir))
        _write_run_files(run_dir, cfg, vocab, clear=mode == "new")
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=process.is_main,
                         truncate_to=checkpoint["metrics_offset"] if checkpoint else None)

    inputs = training_inputs(cfg, model, train_records, val_records, process, compute)
    loader, sampler = build_train_loader(cfg, vocab, inputs, process)
    optimizer = build_optimizer(model, cfg)
    schedule = LRSchedule(optimizer, cfg.train.lr_schedule, cfg.train.epochs * len(loader), len(loader),
                          cfg.train.warmup_steps, cfg.train.min_lr_ratio, cfg.train.lr_decay_epochs,
                          cfg.train.lr_gamma, cfg.train.lr_patience)
    # bf16 (compute.bf16) keeps float32's range and needs no loss scaling; float16 is not offered since
    # random-weight activations (~1e8) overflow it. The disabled scaler keeps the one unscale/clip/step path.
    scaler = _grad_scaler(process.device, enabled=False)
    forward = LossForward(model)
    if process.distributed:
        forward = DistributedDataParallel(forward, device_ids=[process.device] if process.device.type == "cuda" else None)
    run = TrainingRun(cfg, run_dir, vocab, model, forward, optimizer, schedule, scaler, Progress(), metrics, process,
                      stop, compute)
    if checkpoint:
        _restore(run, checkpoint)
        del checkpoint
        metrics.write({"event": "resume", "step": run.progress.step, "epoch": run.progress.epoch,
                       "processes": process.world_size})
        log.info("resuming %s after epoch %d, step %d", run_dir, run.progress.epoch, run.progress.step)
    else:
        seed_everything(cfg.train.seed + process.rank)  # each process draws its own dropout masks
    log.info("device %s x %d; %d train / %d val images; vocabulary %d words; %d steps per epoch",
             process.device, process.world_size, len(inputs.train_records), len(val_records), len(vocab), len(loader))

    if run.progress.epoch >= cfg.train.epochs:
        log.info("%s has finished its %d epochs: train.epochs=N trains it longer", run_dir, cfg.train.epochs)
    references = {r.image_id: r.captions for r in val_records}
    stopped = None
    try:
        for epoch in range(run.progress.epoch + 1, cfg.train.epochs + 1):
            if _early_stop(run):
                stopped = "early stopping"
                break
            start = time.perf_counter()
            sampler.set_epoch(epoch, run.progress.sample)
            if not train_one_epoch(run, loader, epoch):
                stopped = stop.signal or "signal"
                break
            finish_epoch(run, epoch, validate(run, inputs, references), time.perf_counter() - start)
            if _stop_requested(run):  # a signal during validation: last.pt was just written
                stopped = stop.signal or "signal"
                break
    finally:
        metrics.close()
    if stopped == "early stopping":
        log.info("early stopping: no %s gain in %d validations", cfg.train.select_metric,
                 run.progress.evals_without_gain)
    progress = run.progress
    return {"best_checkpoint": str(run_dir / "best.pt"), "last_checkpoint": str(run_dir / "last.pt"),
            "best_bleu4": progress.best_scores.get("bleu4", -math.inf), "best_score": progress.best_score,
            "select_metric": cfg.train.select_metric, "epochs": progress.epoch, "steps": progress.step,
            "stopped": stopped, "unreadable_images": len(inputs.unreadable)}
