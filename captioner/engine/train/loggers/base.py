"""What every logger shares: the Logger interface, the scalars of a metrics record, the flattened config, the
attention strip of a sample as JPEG, and the best checkpoint exported as a model folder (for MLflow and W&B)."""
from __future__ import annotations

import io
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from PIL import Image

import captioner

log = logging.getLogger("captioner")

COORDINATES = ("step", "epoch")  # where a record is, not what it measured: no scalars of their own


class Logger:
    """What the training loop hands each logger; a logger overrides what it keeps.

    write and samples may only buffer; flush makes everything durable before a checkpoint is written;
    checkpointed comes right after it is on disk (trackers that cannot take records back get them then, so that
    they never hold a step past last.pt); finish comes once when the run has trained all its epochs (or stopped
    early), before close."""

    def write(self, record: dict) -> None:
        """One metrics record: a step line, a validation line or an event."""

    def samples(self, step: int, epoch: int, samples: list) -> None:
        """The sample captions of one validation (engine/train/samples.py Sample)."""

    def flush(self) -> None:
        """Make everything written so far durable: called before each checkpoint."""

    def checkpointed(self) -> None:
        """A checkpoint holding everything written so far is on disk."""

    def finish(self, run_dir: Path) -> None:
        """The run is complete: RUN_DIR/best.pt is its model."""

    def state(self) -> dict | None:
        """What a checkpoint keeps to continue this logger on resume (a tracker's run id), or None."""
        return None

    def close(self) -> None:
        pass


def scalars(record: dict) -> dict[str, float]:
    """The scalars of a metrics record, as every tracker names them: {"train/loss": 2.3, ...} or
    {"epoch/val_cider": 0.4, ...}; {} for events and sample captions. Booleans and text (improved, select_metric)
    are not scalars."""
    if "event" in record or "samples" in record:
        return {}
    kind = "epoch" if any(key.startswith("val_") for key in record) else "train"
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if key not in COORDINATES and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_config(config: dict) -> dict[str, object]:
    """{"train.lr": 0.0004, "train.log_to": "jsonl, mlflow", ...}: a config dict (config.to_dict) as trackers'
    flat parameters (lists joined, None left out)."""
    return {f"{section}.{key}": (", ".join(map(str, value)) if isinstance(value, list) else value)
            for section, values in config.items() for key, value in values.items() if value is not None}


def attention_jpeg(sample) -> tuple[bytes, int, int] | None:
    """(JPEG bytes, height, width) of the gallery's attention strip of a sample; None when it has no picture.
    JPEG, as the gallery's thumbnails: PNG took 3x the time and 2.5x the bytes (tiny.yaml)."""
    from captioner.engine.outputs.gallery import attention_strip
    if sample.image is None:
        return None
    strip = attention_strip(sample.image, sample.size, sample.words, sample.alphas, sample.grid, per_row=5)
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, "JPEG", quality=85)
    return buffer.getvalue(), strip.shape[0], strip.shape[1]


def sample_rows(step: int, samples: list) -> list[dict]:
    """A validation's sample captions as table rows: step, file (its name only: no path of this machine leaves
    it), caption (decoded as validation decodes), references (one per line)."""
    return [{"step": step, "file": Path(s.file).name, "caption": s.caption, "references": "\n".join(s.references)}
            for s in samples]


def run_tags(device: str, dtype: str) -> dict[str, str]:
    """What a tracker's run is tagged with: captioner's version and git commit (when it runs from a checkout),
    the device and the training precision."""
    tags = {"captioner.version": captioner.__version__, "captioner.device": device, "captioner.dtype": dtype}
    checkout = Path(captioner.__file__).resolve().parent.parent
    if (checkout / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10)
            if commit.returncode == 0:
                tags["captioner.git_commit"] = commit.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass  # no git here: the tag is left out
    return tags


def export_best(run_dir: Path, out: Path) -> dict:
    """RUN_DIR/best.pt written as a model folder at out (what `captioner export` writes, model card included);
    returns its config.json content."""
    from captioner.engine.infer.checkpoint import load_checkpoint, model_from_checkpoint
    from captioner.engine.infer.model_card import model_card
    from captioner.engine.infer.model_folder import model_hash, write_model_folder
    source = run_dir / "best.pt"
    state = load_checkpoint(source)
    model, vocab, cfg = model_from_checkpoint(state, source)
    provenance = {"checkpoint": source.name, "sha256": model_hash(source, digits=64), "epoch": state.get("epoch"),
                  "step": state.get("step"), "val_scores": state.get("val_scores")}
    return write_model_folder(out, model.eval(), vocab, cfg, source=provenance,
                              card=model_card)


def log_best_model(run_dir: Path, tracker: str, folder_name: str, upload: Callable[[Path], None]) -> bool:
    """A tracker's finish(): RUN_DIR/best.pt exported as a model folder named folder_name (export_best) in a
    temporary folder, handed to upload(folder), then removed. False, with a warning naming the tracker, when the
    run has no best.pt (no validation ran): nothing is uploaded."""
    if not (run_dir / "best.pt").is_file():
        log.warning("%s has no best.pt (no validation ran): no model logged to %s", run_dir, tracker)
        return False
    with tempfile.TemporaryDirectory(prefix="captioner-model-") as tmp:
        folder = Path(tmp) / folder_name
        export_best(run_dir, folder)
        upload(folder)
    return True
