"""Weights & Biases (train.log_to: [jsonl, wandb], `pip install "captioner[wandb]"`): one W&B run per training run.

W&B's own settings apply: WANDB_MODE (online, offline: RUN_DIR/wandb/offline-run-*, `wandb sync` uploads it
later; disabled), WANDB_API_KEY, WANDB_ENTITY and so on. The project is train.experiment, else the run dir's parent
folder's name; the run is named after the run dir and keeps its files in RUN_DIR/wandb/.

What: the config (flattened, "train.lr", ...) with captioner.version, captioner.git_commit, captioner.device and
captioner.dtype; the scalars of metrics.jsonl under TensorBoard's names at the same steps; per validation a
wandb.Table "samples" (step, file, caption, references, the attention strip as an image); at the end best.pt
as a model folder in a "model" artifact named model-RUN_ID.

When: as for MLflow (mlflow_log.py), records go to W&B right after the checkpoint that covers them is on disk, so
a killed run's W&B history ends at its last.pt; the resumed run continues the same W&B run (its id kept in the
checkpoint, with the step it was sent up to) from there.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace


from captioner.config import Config, to_dict
from captioner.engine.train.loggers.base import (Logger, attention_jpeg, flat_config, log_best_model, sample_rows,
                                                 scalars)
from captioner.errors import CaptionerError, first_line

log = logging.getLogger("captioner")

SAMPLES_KEY = "samples"
TABLE_COLUMNS = ("step", "file", "caption", "references", "attention")


def check_wandb() -> None:
    """One clear line before anything runs when train.log_to asks for W&B and it is not installed."""
    if importlib.util.find_spec("wandb") is None:
        raise CaptionerError('train.log_to includes wandb, which is not installed: pip install "captioner[wandb]" '
                             '(or leave wandb out of train.log_to)')


class WandbLogger(Logger):
    """One W&B run (rank 0 only). saved: the checkpoint's {"run_id", "through"} (the run to continue and the last
    step it was sent), None for a new run; history: metrics.jsonl's records so far when resuming, of which those
    after `through` are sent first."""

    def __init__(self, cfg: Config, run_dir: Path, tags: dict, saved: dict | None = None, history: list[dict] = ()):
        import wandb
        through = saved.get("through", -1) if saved else -1
        # the last step given to W&B (sent by the next checkpoint): what a checkpoint records as `through`
        self.finished, self.pending = False, []
        self.last_step = max([through] + [r["step"] for r in history if isinstance(r.get("step"), int)])
        try:
            self.run = wandb.init(project=cfg.train.experiment or run_dir.resolve().parent.name or "captioner",
                                  name=run_dir.resolve().name, id=saved["run_id"] if saved else None,
                                  resume="allow", dir=str(run_dir), config={**flat_config(to_dict(cfg)), **tags},
                                  settings=wandb.Settings(console="off"))  # the CLI's own output stays as it is
        except Exception as e:  # noqa: BLE001 - W&B raises many kinds (network, auth, usage): one line
            raise CaptionerError(f"W&B: cannot start the run: {first_line(e, 300)} (WANDB_MODE=offline logs without an "
                                 f"account; or leave wandb out of train.log_to)") from None
        missing = [r for r in history if r.get("step", -1) > through and ("samples" in r or scalars(r))]
        for record in missing:
            if "samples" in record:
                self.samples(record["step"], record["epoch"], [SimpleNamespace(**s, image=None)
                                                               for s in record["samples"]])
            else:
                self.write(record)
        if missing:
            self.checkpointed()
            log.info("W&B run %s: %d records of metrics.jsonl it lacked sent", self.run.id, len(missing))
        log.info("logging to W&B run %s, project %r (%s)", self.run.id, self.run.project, run_dir / "wandb")

    def write(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.pending.append((record["step"], values))  # scalars, or a validation's samples (a list)
            self.last_step = max(self.last_step, record["step"])

    def samples(self, step: int, epoch: int, samples: list) -> None:
        self.pending.append((step, samples))  # a table is made when sent: its pictures are files until then
        self.last_step = max(self.last_step, step)

    def checkpointed(self) -> None:
        pending, self.pending = self.pending, []
        with tempfile.TemporaryDirectory(prefix="captioner-wandb-") as tmp:
            for step, values in pending:  # in step order: W&B takes the values of one step until a later one comes
                self.run.log(values if isinstance(values, dict) else {SAMPLES_KEY: _table(step, values, Path(tmp))},
                             step=step)

    def finish(self, run_dir: Path) -> None:
        import wandb

        def upload(folder: Path) -> None:
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model",
                                      description=f"best.pt of {run_dir.resolve().name} as a captioner model folder")
            artifact.add_dir(str(folder))  # copied to W&B's staging area here: the folder may go
            self.run.log_artifact(artifact)
        if log_best_model(run_dir, "W&B", "model", upload):
            self.finished = True

    def state(self) -> dict:
        return {"run_id": self.run.id, "through": self.last_step}

    def close(self) -> None:
        """Ends the W&B run: exit code 0 once finish() logged the model, else 1 (a stopped or failed run; --resume
        continues it). Records past the last checkpoint are dropped: the resumed run sends them again."""
        self.pending = []
        self.run.finish(exit_code=0 if self.finished else 1)


def _table(step: int, samples: list, folder: Path):
    """A validation's samples as a wandb.Table, the attention strips as JPEG files written in folder (W&B copies
    them when the table is logged; PIL images would be encoded again as PNG, 3x the time)."""
    import wandb
    table = wandb.Table(columns=list(TABLE_COLUMNS), allow_mixed_types=True)
    for i, (row, sample) in enumerate(zip(sample_rows(step, samples), samples)):
        jpeg, picture = attention_jpeg(sample), None
        if jpeg is not None:
            path = folder / f"attention_{step}_{i}.jpg"
            path.write_bytes(jpeg[0])
            picture = wandb.Image(str(path), caption=sample.caption)
        table.add_data(*(row[c] for c in TABLE_COLUMNS[:-1]), picture)
    return table
