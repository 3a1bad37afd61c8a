"""Train an attention captioner; survive kills and pre-emption, resume exactly, scale with torchrun.

    captioner train --config configs/tiny.yaml --run-dir runs/tiny
    captioner train --config configs/tiny.yaml --run-dir runs/tiny2 train.epochs=3 encoder.layer=layer3
    captioner train --resume runs/tiny                    # after kill -9, Ctrl-C or pre-emption
    captioner train --resume runs/tiny train.epochs=20    # or to train longer
    captioner train --config configs/tiny.yaml --run-dir runs/scst --init-from runs/tiny/best.pt train.objective=scst
    captioner train --config configs/tiny.yaml train.epochs=3 --print-config   # the resolved config; no work
    torchrun --nproc_per_node=2 -m captioner train --config configs/tiny.yaml --run-dir runs/ddp

RUN_DIR gets last.pt (every train.checkpoint_every steps, at each epoch end, on SIGINT/SIGTERM), best.pt (when
the validation train.select_metric improves), metrics.jsonl, config.yaml and vocab.json (see rundir.py), and what
train.log_to adds: tb/ (TensorBoard), an MLflow or a W&B run (engine/train/loggers/; each validation logs 8 sample
captions, samples.py). Each checkpoint holds the whole training state (engine/train/run_state.py), so a resumed run
repeats an uninterrupted one exactly on CPU. This file assembles a run and holds the epoch loop; the step is engine/train/step.py (the one `bench`
times), validation engine/train/validation.py, the choice of inputs engine/train/inputs.py.

Under torchrun each process trains on train.batch_size captions of every step with DistributedDataParallel
(the global batch is N times larger). Validation captions are computed by every process on its share of the
val images and gathered on rank 0, which alone scores them, logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from captioner.config import (Config, from_dict, inherit_old_defaults, inherit_preprocess, resolve_defaults,
                               stated_keys, to_dict)
from captioner.data.cache import default_cache_dir
from captioner.data.datasets import by_split, dataset_inputs, load_records
from captioner.data.pipeline import Batches
from captioner.engine.infer.checkpoint import load_checkpoint
from captioner.engine.runtime import distributed
from captioner.engine.runtime.compute import setup_compute
from captioner.engine.runtime.distributed import Process
from captioner.engine.runtime.signals import StopRequest, Stopped
from captioner.engine.train.averaging import WeightAverage
from captioner.engine.train.resume import (check_vocabulary, init_checkpoint, resume_checkpoint, resume_config,
                                          vocabulary_coverage)
from captioner.engine.train.run_state import Progress, TrainingRun, restore, save_checkpoints
from captioner.engine.train.loggers import check_log_to, open_run_log
from captioner.engine.train.rundir import lock_run_dir, plan_run, write_run_files
from captioner.engine.train.samples import SampleImages
from captioner.engine.train.telemetry import RunClock, Window, peak_memory
from captioner.engine.runtime.rng import seed_everything
from captioner.engine.train.schedule import LRSchedule
from captioner.engine.train.scst import ReferenceCaptions, Rewarder, SelfCriticalLoss
from captioner.engine.train.step import CaptionLoss, TrainingStep, build_optimizer
from captioner.engine.train.inputs import build_train_loader, check_training_data, training_inputs
from captioner.engine.train.validation import early_stop, finish_epoch, validate, validate_start
from captioner.errors import CaptionerError
from captioner.files import check_writable
from captioner.io_paths import refuse_overlap
from captioner.jobs.base import config_of
from captioner.model.caption_model import CaptionModel, build_encoder
from captioner.model.pretrained import names_library_weights
from captioner.text import Vocabulary

log = logging.getLogger("captioner")

def _scst_stats(run: TrainingRun) -> dict:
    """The last step's SCST statistics (reward, baseline, sample_words, entropy, reward_s, maybe xe and similarity),
    {} under cross-entropy."""
    loss = run.step.loss_fn
    return dict(getattr(getattr(loss, "module", loss), "stats", {}))  # DDP wraps the loss module


def _mean_over_processes(run: TrainingRun, values: dict) -> dict:
    """values averaged over the processes (one all_reduce; every process calls it at the same step)."""
    if not run.process.distributed or not values:
        return values
    keys = sorted(values)
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=run.process.device)
    return dict(zip(keys, (distributed.all_reduce_sum(local, run.process) / run.process.world_size).tolist()))


def _stop_requested(run: TrainingRun) -> bool:
    flag = torch.tensor([float(run.stop.signal is not None)], device=run.process.device)
    return bool(distributed.all_reduce_sum(flag, run.process)[0] > 0)


def _agreed_signal(run: TrainingRun) -> str:
    """The signal that stopped the run, the same in every process whichever one received it, so that all of
    them exit with the same status (130 or 143)."""
    names = distributed.gather_to_main(run.stop.signal, run.process)
    first = next((n for n in names if n), "SIGTERM") if run.process.is_main else None
    return distributed.broadcast_from_main(first, run.process)


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
    device = process.device
    run.model.train()
    window = Window()
    scst = cfg.train.objective == "scst"
    items = "images" if scst else "captions"  # what one sample of the data order is
    tick = time.perf_counter()
    for batch in loader:
        data_s = time.perf_counter() - tick
        captions = batch.captions
        if not process.distributed and captions.shape[0] == 0:  # every image unreadable: nothing to learn from
            progress.sample += batch.read  # (under DDP the step runs and skips itself: every process must join)
            continue
        step = progress.step + 1
        lr = run.schedule.step(step)
        # SCST: the images (B, ...) and their records (B,), whose references reward the sampled captions
        inputs = (batch.inputs, batch.index.to(device)) if scst else (batch.inputs, captions, batch.lengths)
        result = run.step(*inputs, stop=run.stop.signal is not None)
        global_loss, grad_norm, stop = result.loss, result.grad_norm, result.stop
        progress.step, progress.sample = step, progress.sample + batch.read * process.world_size

        if grad_norm is None:
            _skip_step(run, epoch, "non-finite loss" if not math.isfinite(global_loss) else "non-finite gradient")
        else:
            progress.bad_steps = 0
            if run.average:
                run.average.update(run.model)
            progress.loss_sum, progress.loss_count = progress.loss_sum + global_loss, progress.loss_count + 1
            window.steps, window.loss = window.steps + 1, window.loss + global_loss
            stats = _scst_stats(run) if scst else {"xe": result.part} if result.part is not None else {}
            progress.reward_sum += stats.get("reward", 0.0)
            for key, value in stats.items():
                window.stats[key] = window.stats.get(key, 0.0) + value
        window.captions += captions.shape[0] * process.world_size
        run.clock.stepped(step, epoch, captions.shape[0] * process.world_size)
        window.data_s, window.compute_s = window.data_s + data_s, window.compute_s + time.perf_counter() - tick - data_s
        if step % cfg.train.log_every == 0 and grad_norm is not None:
            elapsed = time.perf_counter() - window.start
            groups = run.step.optimizer.param_groups
            run.metrics.write({
                "step": step, "epoch": epoch, "loss": global_loss, "loss_avg": window.loss / max(window.steps, 1),
                "lr": lr, **({"encoder_lr": groups[1]["lr"]} if len(groups) > 1 else {}), "grad_norm": grad_norm,
                f"{items}_per_s": round(window.captions / max(elapsed, 1e-9), 1),
                **{k: round(v / max(window.steps, 1), 6) for k, v in _mean_over_processes(run, window.stats).items()},
                "data_s": round(window.data_s / max(window.steps, 1), 6),
                "compute_s": round(window.compute_s / max(window.steps, 1), 6),
                **peak_memory(device), "elapsed_s": round(run.clock.elapsed(), 3)})
            window = Window()

        periodic = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
        if (periodic and progress.bad_steps == 0) or stop:  # never checkpoint in the middle of a bad streak
            save_checkpoints(run)
        if stop:
            return False
        tick = time.perf_counter()
    return True


def _weight_average(cfg: Config, model: CaptionModel, checkpoint: dict | None, path: Path) -> WeightAverage | None:
    """train.ema_decay's average of the weights, for a resumed run with the raw weights back in the model."""
    if not cfg.train.ema_decay:
        if checkpoint and "raw_weights" in checkpoint:
            log.warning("%s was trained with train.ema_decay=%s: training continues from its averaged weights, "
                        "without averaging", path, checkpoint.get("weight_average", {}).get("decay"))
        return None
    average = WeightAverage(model, cfg.train.ema_decay)
    if checkpoint:
        average.resume(model, checkpoint, path)
    return average


@dataclass
class TrainJob:
    """`captioner train`'s options. The config is cfg as given, else the YAML file `config` with `overrides`;
    with resume and no config file, the run's own config from its last.pt (plus overrides, e.g. train.epochs=20)."""
    cfg: Config | None = None
    run_dir: str | Path | None = None
    device: str | None = "auto"
    resume: bool = False  # continue the run in run_dir from its last.pt
    overwrite: bool = False  # start over in a run_dir that holds another run
    init_from: str | Path | None = None  # a checkpoint whose weights and vocabulary a new run starts from
    config: str | Path | None = None  # a YAML config file
    overrides: list[str] = field(default_factory=list)  # section.key=value on top of the config
    print_config: bool = False  # only the resolved config is wanted (--print-config): run_dir may be left out

    def __post_init__(self):
        if self.resume and self.init_from:
            raise CaptionerError("--init-from starts a new run; --resume continues one (it already holds its weights)")
        if (not self.run_dir and not self.print_config) or (self.cfg is None and not self.config and not self.resume):
            raise CaptionerError("train needs --config FILE and --run-dir DIR, or --resume RUN_DIR")
        from_file = self.cfg is None and bool(self.config)
        if self.cfg is None and self.resume:
            self.cfg = resume_config(self.run_dir, self.config, self.overrides)
        else:
            self.cfg = config_of(self.cfg, self.config, self.overrides, "train")
        # the keys the file and overrides give: the others may keep a continued checkpoint's (inherit_old_defaults)
        stated = stated_keys(self.config, self.overrides) if from_file else None
        continued = Path(self.init_from) if self.init_from else Path(self.run_dir) / "last.pt" if self.resume else None
        if stated is not None and continued is not None and continued.is_file():  # else the run's checks refuse it
            saved = load_checkpoint(continued, mmap=True)["config"]
            self.cfg = from_dict(inherit_old_defaults(to_dict(self.cfg), saved, stated))
        self.cfg = resolve_defaults(self.cfg)  # a Config built in code too: the run records the numbers it used
        check_log_to(self.cfg.train.log_to)  # a missing tracker package, in one line before anything runs
        files, folders = dataset_inputs(self.cfg.dataset)  # --overwrite clears the run dir: never an input in it
        refuse_overlap({"--run-dir": self.run_dir}, {"--config": self.config, "--init-from": self.init_from, **files,
                                                     "cache.dir": default_cache_dir(self.cfg),
                                                     "encoder.weights": self.cfg.encoder.weights}, folders)


def main(job: TrainJob) -> dict:
    """Train per job.cfg into job.run_dir, or resume the run there; returns {"best_checkpoint",
    "last_checkpoint", "best_bleu4", "best_score", "select_metric", "epochs", "steps", "stopped",
    "unreadable_images"}.

    job.init_from: a checkpoint whose model weights and vocabulary a new run starts from (fresh optimizer and
    schedule): SCST after cross-entropy (train.objective=scst), or fine-tuning on another dataset.
    stopped is None, "early stopping", or the signal ("SIGINT", "SIGTERM") that interrupted the run (under
    torchrun: the same one in every process). best_checkpoint, best_bleu4 and best_score are None when the run
    stopped before its first validation."""
    process = distributed.setup(job.device)
    try:
        with StopRequest() as stop, contextlib.ExitStack() as held:
            return _train(job.cfg, Path(job.run_dir), process, job.resume, job.overwrite, stop, held, job.init_from)
    finally:
        distributed.cleanup(process)


def _train(cfg: Config, run_dir: Path, process: Process, resume: bool, overwrite: bool, stop: StopRequest,
           held: contextlib.ExitStack, init_from: str | Path | None = None) -> dict:
    mode = plan_run(run_dir, to_dict(cfg), resume, overwrite)  # refusals first: nothing is written before
    if process.is_main:
        check_writable(run_dir, "run dir", folder=True)  # a real write test, before the data and the encoder
    distributed.barrier(process)  # every process has read the folder before rank 0 changes it
    checkpoint = resume_checkpoint(run_dir, cfg) if mode == "resume" else None
    init = init_checkpoint(init_from, cfg) if init_from and not checkpoint else None
    init_from = str(init_from) if init else (checkpoint or {}).get("init_from")  # a resumed run keeps its origin
    if checkpoint or init:  # preprocessing the config leaves to the weights is what the checkpoint trained with
        cfg = from_dict(inherit_preprocess(to_dict(cfg), (checkpoint or init)["config"]))
    seed_everything(cfg.train.seed)  # the same initial weights in every process
    # A resumed or initialised backbone comes from the checkpoint: its weights file need not exist any more.
    encoder_cfg = dataclasses.replace(cfg.encoder, weights=None) if checkpoint or init else cfg.encoder
    # One process per node downloads the pretrained weights into the node's cache; the others read them there.
    with distributed.node_main_first(process, "fetching encoder.weights", names_library_weights(encoder_cfg.weights)):
        encoder = build_encoder(encoder_cfg)
    with distributed.main_process_first(process):  # the synthetic set is generated once, not by every process
        records = load_records(cfg.dataset)
    train_records, val_records = by_split(records, "train"), by_split(records, "val")  # missing files already dropped
    if not train_records:
        raise CaptionerError("the training split is empty: check dataset.splits or dataset.val_fraction")
    if cfg.train.val_images:
        val_records = val_records[: cfg.train.val_images]
    if init_from:  # the words the initial weights were trained on, whatever this data's words are
        vocab = Vocabulary((init or checkpoint)["vocab"])
        vocabulary_coverage(vocab, train_records, init_from)
    else:
        vocab = Vocabulary.build([c for r in train_records for c in r.captions], cfg.dataset.min_freq)
    check_training_data(train_records, val_records, vocab, cfg)
    if checkpoint:
        check_vocabulary(checkpoint["vocab"], vocab, run_dir / "last.pt")
    model = CaptionModel(cfg.encoder, cfg.model, len(vocab), encoder=encoder)
    for state, path in ((checkpoint, run_dir / "last.pt"), (init, init_from)):
        if not state:
            continue
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CaptionerError(f"checkpoint {path} does not fit the model: "
                                 f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    del init
    model.to(process.device)
    compute = setup_compute(cfg.compute, process.device)
    compute.prepare_encoder(model.encoder)  # channels_last, optional torch.compile, as resolved

    if process.is_main:  # one training process per run dir, from its first write until main returns or it dies
        held.enter_context(lock_run_dir(run_dir))
        write_run_files(run_dir, cfg, vocab, clear=mode == "new")
    metrics = open_run_log(cfg, run_dir, process.is_main, checkpoint, device=str(process.device),
                           dtype="bfloat16" if compute.bf16 else "float32")

    inputs = training_inputs(cfg, model, train_records, val_records, process, compute)
    loader, sampler = build_train_loader(cfg, vocab, inputs, process)
    optimizer = build_optimizer(model, cfg)
    schedule = LRSchedule(optimizer, cfg.train.lr_schedule, cfg.train.epochs * len(loader), len(loader),
                          cfg.train.warmup_steps, cfg.train.min_lr_ratio, cfg.train.lr_decay_epochs,
                          cfg.train.lr_gamma, cfg.train.lr_patience)
    if cfg.train.objective == "scst":  # rewards: CIDEr-D with the training references' idf, computed once
        loss = SelfCriticalLoss(model, Rewarder(inputs.train_records, vocab, cfg.dataset.max_len),
                                cfg.train.scst_samples, cfg.train.scst_baseline,
                                cfg.train.scst_max_len or cfg.decode.max_len,
                                cfg.train.scst_entropy, cfg.train.scst_diversity, cfg.decode.suppress_unk,
                                ReferenceCaptions(inputs.train_records, vocab, cfg.dataset.max_len)
                                if cfg.train.scst_xe_weight else None,
                                cfg.train.scst_xe_weight, cfg.train.label_smoothing, cfg.train.scst_temperature)
    else:
        # DDP wraps the whole forward pass: the fine-tuned encoder stages too
        loss = CaptionLoss(model, cfg.train.label_smoothing)
    if process.distributed:
        loss = DistributedDataParallel(loss, device_ids=[process.device] if process.device.type == "cuda" else None)
    step = TrainingStep(loss, optimizer, cfg.train.grad_clip, process.device, compute.bf16, process)
    run = TrainingRun(cfg, run_dir, vocab, model, step, schedule, Progress(), metrics, process, stop, compute,
                      init_from, average=_weight_average(cfg, model, checkpoint, run_dir / "last.pt"))
    resumed = bool(checkpoint)
    if resumed:
        restore(run, checkpoint)
        del checkpoint
        metrics.write({"event": "resume", "step": run.progress.step, "epoch": run.progress.epoch,
                       "processes": process.world_size})
        log.info("resuming %s after epoch %d, step %d", run_dir, run.progress.epoch, run.progress.step)
    else:
        seed_everything(cfg.train.seed + process.rank)  # each process draws its own dropout masks
        if init_from:
            metrics.write({"event": "init_from", "checkpoint": init_from, "objective": cfg.train.objective})
            log.info("weights and vocabulary from %s; fresh optimizer and schedule", init_from)
    log.info("device %s x %d; %d train / %d val images; vocabulary %d words; %d steps per epoch",
             process.device, process.world_size, len(inputs.train_records), len(val_records), len(vocab), len(loader))

    if run.progress.epoch >= cfg.train.epochs:
        log.info("%s has finished its %d epochs: train.epochs=N trains it longer", run_dir, cfg.train.epochs)
    references = {r.image_id: r.captions for r in val_records}
    samples = SampleImages(inputs, references) if process.is_main else None  # the same images every validation
    run.clock = RunClock(run.progress, cfg.train.epochs * len(loader), cfg.train.epochs,
                         "images" if cfg.train.objective == "scst" else "captions", show=process.is_main)
    if init_from and not resumed and val_records and cfg.train.validate_init:
        validate_start(run, inputs, references)
    stopped = None
    # Until here a stop signal ends the run at once (nothing to save yet: a rerun redoes the setup and feature
    # precompute); from here on it finishes the step and saves last.pt.
    try:
        with stop.deferred(), run.clock:
            for epoch in range(run.progress.epoch + 1, cfg.train.epochs + 1):
                if early_stop(run):
                    stopped = "early stopping"
                    break
                start = time.perf_counter()
                run.clock.start_epoch()
                sampler.set_epoch(epoch, run.progress.sample)
                if not train_one_epoch(run, loader, epoch):
                    stopped = _agreed_signal(run)
                    break
                run.progress.reward_sum = _mean_over_processes(run, {"r": run.progress.reward_sum}).get("r", 0.0)
                validation_start = time.perf_counter()
                try:
                    with run.validated_weights():  # train.ema_decay: the average is what is scored and kept
                        scores = validate(run, inputs, references)
                        if samples:
                            metrics.samples(run.progress.step, epoch, samples.caption(run))
                except Stopped:  # one process only: the epoch's steps are done, its validation is not
                    save_checkpoints(run)  # a resumed run validates this epoch first (it has no steps left)
                    stopped = run.stop.signal
                    break
                run.clock.validated(time.perf_counter() - validation_start)
                finish_epoch(run, epoch, scores, time.perf_counter() - start)
                if _stop_requested(run):  # a signal during validation under torchrun: last.pt was just written
                    stopped = _agreed_signal(run)
                    break
        if stopped in (None, "early stopping"):
            metrics.finish(run_dir)  # the trackers get best.pt as a model folder
    finally:
        metrics.close()
    if stopped == "early stopping":
        log.info("early stopping: no %s gain in %d validations", cfg.train.select_metric,
                 run.progress.evals_without_gain)
    progress = run.progress
    distributed.name_on_main(inputs.unreadable, run.process)  # each process read its own share of the images
    best = progress.best_scores.get(cfg.train.select_metric, progress.best_score)  # best.pt's
    # Stopped before the first validation: no best.pt and no score, said as null (-Infinity is not JSON)
    return {"best_checkpoint": str(run_dir / "best.pt") if (run_dir / "best.pt").is_file() else None,
            "last_checkpoint": str(run_dir / "last.pt"),
            "best_bleu4": progress.best_scores.get("bleu4"),
            "best_score": best if math.isfinite(best) else None,
            "select_metric": cfg.train.select_metric, "epochs": progress.epoch, "steps": progress.step,
            "stopped": stopped, "unreadable_images": len(inputs.unreadable)}
