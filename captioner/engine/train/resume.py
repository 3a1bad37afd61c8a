"""Which checkpoint a run continues from (--resume) or starts from (--init-from), and whether it may.

    cfg = resume_config("runs/tiny")                 # the run's own config (+ overrides)
    state = resume_checkpoint(run_dir, cfg)           # last.pt, refused when it cannot continue this config
    state = init_checkpoint("runs/xe/best.pt", cfg)   # weights and vocabulary for a new run (fresh optimizer)
"""
from __future__ import annotations

import logging
from pathlib import Path

from captioner.config import Config, apply_overrides, from_saved_dict, inherit_preprocess, load_config, to_dict
from captioner.engine.infer.checkpoint import check_resumable, load_checkpoint
from captioner.engine.train.rundir import config_differences, plan_run
from captioner.errors import CaptionerError
from captioner.text import Vocabulary, tokenize

log = logging.getLogger("captioner")

# Config keys that shape the weights or the optimizer's parameter groups: a checkpoint resumes only under the same.
# The encoder's preprocessing is among them: other normalisation, other features. A config that leaves it to the
# weights takes the checkpoint's (inherit_preprocess).
ARCHITECTURE_KEYS = ("encoder.arch", "encoder.layer", "encoder.in_channels", "encoder.image_size",
                     "encoder.mean", "encoder.std", "encoder.interpolation", "encoder.finetune_from", "model.embed_dim", "model.attention_dim", "model.decoder_dim",
                     "model.features", "model.gate")

def resume_config(run_dir: str | Path, config_path: str | Path | None = None, overrides=()) -> Config:
    """The config of a resumed run: FILE's when given (checked against the checkpoint by main), else the
    checkpoint's own; overrides apply on top (e.g. train.epochs=20 to train longer)."""
    if config_path:
        return load_config(config_path, overrides)
    plan_run(run_dir, {}, resume=True, overwrite=False)  # refuses a folder without last.pt
    path = Path(run_dir) / "last.pt"
    state = load_checkpoint(path, mmap=True)
    try:
        cfg = from_saved_dict(state["config"])
    except CaptionerError as e:
        raise CaptionerError(f"checkpoint {path} has an invalid config: {e}") from None
    return apply_overrides(cfg, list(overrides))

def resume_checkpoint(run_dir: Path, cfg: Config) -> dict:
    """last.pt of run_dir, refused when it cannot continue a run of this config."""
    path = run_dir / "last.pt"
    state = load_checkpoint(path)
    check_resumable(state, path)
    saved = to_dict(from_saved_dict(state["config"]))  # keys added since filled in
    changes = config_differences(saved, inherit_preprocess(to_dict(cfg), saved))
    clashes = [c for c in changes if c.split(":")[0] in ARCHITECTURE_KEYS]
    if clashes:
        raise CaptionerError(f"checkpoint {path} does not match the config's architecture ({'; '.join(clashes)}); "
                             f"a run keeps its architecture: leave these keys out of --config and the KEY=VALUE overrides, or "
                             f"start a new --run-dir")
    if changes:
        log.info("resuming with changed settings: %s", "; ".join(changes))
    return state

def init_checkpoint(path: str | Path, cfg: Config) -> dict:
    """The checkpoint a new run starts from (--init-from): its model weights and vocabulary, refused when its
    architecture differs from cfg's. Optimizer, schedule and progress start fresh."""
    state = load_checkpoint(path)
    changes = config_differences(state["config"], inherit_preprocess(to_dict(cfg), state["config"]))
    clashes = [c for c in changes if c.split(":")[0] in ARCHITECTURE_KEYS]
    if clashes:
        raise CaptionerError(f"--init-from {path} has another architecture than the config ({'; '.join(clashes)}): "
                             f"set those keys as in the checkpoint")
    try:
        Vocabulary(state["vocab"])
    except CaptionerError as e:
        raise CaptionerError(f"--init-from {path}: {e}") from None
    return state

def vocabulary_coverage(vocab: Vocabulary, records, path) -> None:
    """Fine-tuning keeps the checkpoint's words: say how many of this data's training words it lacks."""
    words = [w for r in records for c in r.captions for w in tokenize(c)]
    unknown = sum(w not in vocab.index for w in words)
    log.info("vocabulary of %s (%d words): %.1f%% of this data's %d training words become <unk>", path, len(vocab),
             100.0 * unknown / max(len(words), 1), len(words))

def check_vocabulary(saved: list[str], vocab: Vocabulary, path: Path) -> None:
    if saved == vocab.tokens:
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, vocab.tokens)) if a != b), min(len(saved), len(vocab)))
    first = (f"first difference at id {i}: {saved[i] if i < len(saved) else None!r} in the checkpoint, "
             f"{vocab.tokens[i] if i < len(vocab) else None!r} from the data")
    raise CaptionerError(f"checkpoint {path} has a {len(saved)}-word vocabulary but the training captions give "
                         f"{len(vocab)} words ({first}); the dataset or dataset.min_freq changed since the run "
                         f"started: resume with the original data or start a new --run-dir")
