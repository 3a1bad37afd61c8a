"""MLflow (train.log_to: [jsonl, mlflow], `pip install "captioner[mlflow]"`): one MLflow run per training run.

Where: the tracking server or store of MLFLOW_TRACKING_URI, else RUN_DIR/mlflow.db (SQLite) with artifacts in
RUN_DIR/mlartifacts/, so that nothing is written elsewhere unasked (`mlflow ui --backend-store-uri
sqlite:///RUN_DIR/mlflow.db` shows it). The experiment is train.experiment, else the run dir's parent folder's name.

What: the config as params ("train.lr", ...); the scalars of metrics.jsonl under TensorBoard's names
("train/loss", "epoch/val_cider") at the same steps, with the same float64 values; tags captioner.version,
captioner.git_commit (when captioner runs from a git checkout), captioner.device, captioner.dtype; per validation
a table samples/step_NNNNNN.json (columns step, file, caption, references, as mlflow.log_table writes one)
and the attention strips as attention/step_NNNNNN/I.jpg (sample I), uploaded together; at the end best.pt as a model folder inside an mlflow.pyfunc model
"model" (captioner/mlflow_model.py: `mlflow models serve -m runs:/RUN_ID/model` captions images), registered
as train.register_as when set.

When: records are sent to MLflow right after the checkpoint that covers them is on disk (every
train.checkpoint_every steps and at each epoch's end), never before, because MLflow cannot take a metric back: a
killed run leaves MLflow at its last.pt, and the resumed run (the same MLflow run, its id kept in the checkpoint)
sends each step once. On resume, whatever metrics.jsonl holds past what the MLflow run holds is sent first (a
kill between a checkpoint and its sending, or a run that turns mlflow on at --resume).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace


from captioner.config import Config, to_dict
from captioner.engine.train.loggers.base import (Logger, attention_jpeg, flat_config, log_best_model, sample_rows,
                                                 scalars)
from captioner.errors import CaptionerError, first_line

log = logging.getLogger("captioner")

LOCAL_STORE = "mlflow.db"  # RUN_DIR/mlflow.db: the tracking store when MLFLOW_TRACKING_URI is not set
LOCAL_ARTIFACTS = "mlartifacts"  # RUN_DIR/mlartifacts/: that store's artifacts
MODEL_NAME = "model"  # runs:/RUN_ID/model
MODEL_ARTIFACT = "model_folder"  # the pyfunc model's artifact: the folder `captioner export` writes
SAMPLES_FOLDER = "samples"  # samples/step_NNNNNN.json
ATTENTION_FOLDER = "attention"  # attention/step_NNNNNN/I.jpg
BATCH = {"metrics": 1000, "params": 100}  # MLflow's log_batch limits
PARAM_LENGTH = 6000  # MLflow's longest param value
SERVER_TIMEOUT_S = 10  # check_server's wait for a first answer


def check_mlflow() -> None:
    """One clear line before anything runs when train.log_to asks for MLflow and it is not installed, or names a
    tracking server that does not answer."""
    if importlib.util.find_spec("mlflow") is None:
        raise CaptionerError('train.log_to includes mlflow, which is not installed: pip install "captioner[mlflow]" '
                             '(or leave mlflow out of train.log_to)')
    check_server(os.environ.get("MLFLOW_TRACKING_URI", ""))


def check_server(uri: str, timeout: float = SERVER_TIMEOUT_S) -> None:
    """An http(s) tracking URI must answer at all: MLflow's own client retries a refused connection with backoff
    for about 4 minutes before it fails, printing a line per try. Any HTTP answer (even 401 or 404) will do:
    MLflow itself then says what is wrong."""
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", None) or e
        raise CaptionerError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer: {why}; start it, "
                             f"fix the URI, unset it to log to RUN_DIR/mlflow.db, or leave mlflow out of "
                             f"train.log_to") from None


def tracking_uri(run_dir: Path) -> str:
    """MLFLOW_TRACKING_URI, else the SQLite store inside the run dir."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / LOCAL_STORE).resolve()}"


def _failure(what: str, uri: str, e: Exception, after: str = "") -> CaptionerError:
    """One line. after: what the run left behind (a failure while training comes after last.pt is saved)."""
    first = first_line(e, 300)
    if "MLFLOW_ALLOW_FILE_STORE" in str(e):  # newer MLflow refuses a folder as store unless told: keep its way out
        first = ("this MLflow refuses a folder as tracking store: set MLFLOW_TRACKING_URI=sqlite:///FOLDER/mlflow.db, "
                 "or MLFLOW_ALLOW_FILE_STORE=true to keep the folder")
    return CaptionerError(f"MLflow at {uri}: cannot {what}: {first} ({after}check MLFLOW_TRACKING_URI, or "
                          f"leave mlflow out of train.log_to)")


class MlflowLogger(Logger):
    """One MLflow run (rank 0 only). saved: the checkpoint's {"run_id"} of the run to continue, None for a new
    one; history: metrics.jsonl's records so far when resuming, of which what the MLflow run lacks is sent."""

    def __init__(self, cfg: Config, run_dir: Path, tags: dict, saved: dict | None = None, history: list[dict] = ()):
        from mlflow import MlflowClient
        self.cfg, self.run_dir = cfg, run_dir
        self.uri = tracking_uri(run_dir)
        self.finished = False  # finish() logged the model: the MLflow run ends FINISHED
        self.pending: list = []  # ("metrics", [Metric]) or ("samples", step, samples): sent when checkpointed
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._continue(saved) if saved else None
            if self.run_id is None:
                self.run_id = self._start(cfg, run_dir, tags)
                logged: dict = {}
            else:
                logged = self._logged()
        except CaptionerError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow raises many kinds (HTTP, SQL, its own): one line each
            raise _failure("start the run", self.uri, e) from None
        missing = [r for r in history if self._is_missing(r, logged)]
        for record in missing:
            if "samples" in record:
                self.pending.append(("samples", record["step"], record["samples"]))
            else:
                self.write(record, logged)
        if missing:
            self.checkpointed()  # what metrics.jsonl holds up to last.pt, now in MLflow too
            log.info("MLflow run %s: %d records of metrics.jsonl it lacked sent", self.run_id, len(missing))
        log.info("logging to MLflow run %s, experiment %r, at %s", self.run_id, self.experiment, self.uri)

    def _start(self, cfg: Config, run_dir: Path, tags: dict) -> str:
        from mlflow.entities import Param
        self.experiment = cfg.train.experiment or run_dir.resolve().parent.name or "captioner"
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:  # the local store keeps its artifacts in the run dir too (MLflow's default is ./mlruns of the cwd)
            location = None if os.environ.get("MLFLOW_TRACKING_URI") else (run_dir / LOCAL_ARTIFACTS).resolve().as_uri()
            try:
                experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
            except Exception:  # noqa: BLE001 - created meanwhile by another run
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name, tags=tags).info.run_id
        params = [Param(key, str(value)[:PARAM_LENGTH]) for key, value in flat_config(to_dict(cfg)).items()]
        for start in range(0, len(params), BATCH["params"]):
            self.client.log_batch(run_id, params=params[start:start + BATCH["params"]])
        return run_id

    def _continue(self, saved: dict) -> str | None:
        """The saved run's id when this tracking server holds it (marked running again), else None."""
        try:
            run = self.client.get_run(saved["run_id"])
        except Exception:  # noqa: BLE001 - not found here: MLFLOW_TRACKING_URI changed since
            log.warning("MLflow run %s of last.pt is not at %s: a new MLflow run gets this run's whole history",
                        saved["run_id"], self.uri)
            return None
        self.experiment = self.client.get_experiment(run.info.experiment_id).name
        self.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def _logged(self) -> dict:
        """{metric key: its last step in the MLflow run, SAMPLES_FOLDER: the last samples table's step}."""
        logged = {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                  for key in self.client.get_run(self.run_id).data.metrics}
        steps = [int(Path(f.path).stem.split("_")[-1]) for f in self.client.list_artifacts(self.run_id, SAMPLES_FOLDER)]
        logged[SAMPLES_FOLDER] = max(steps, default=-1)
        return logged

    @staticmethod
    def _is_missing(record: dict, logged: dict) -> bool:
        if "samples" in record:
            return record["step"] > logged.get(SAMPLES_FOLDER, -1)
        return any(record["step"] > logged.get(key, -1) for key in scalars(record))

    def write(self, record: dict, logged: dict | None = None) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, record["step"]) for key, value in scalars(record).items()
                   if logged is None or record["step"] > logged.get(key, -1)]
        if metrics:
            self.pending.append(("metrics", metrics))

    def samples(self, step: int, epoch: int, samples: list) -> None:
        self.pending.append(("samples", step, samples))

    def checkpointed(self) -> None:
        pending, self.pending = self.pending, []
        metrics = [m for entry in pending if entry[0] == "metrics" for m in entry[1]]
        try:
            for start in range(0, len(metrics), BATCH["metrics"]):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + BATCH["metrics"]])
            for _, step, samples in (entry for entry in pending if entry[0] == "samples"):
                self._log_samples(step, samples)
        except Exception as e:  # noqa: BLE001
            raise _failure(f"log to run {self.run_id}", self.uri, e,
                           f"training stopped with last.pt saved: `captioner train --resume {self.run_dir}` continues "
                           f"it and sends what MLflow lacks; ") from None

    def _log_samples(self, step: int, samples: list) -> None:
        """samples/step_N.json (log_table's format: {"columns", "data"}) and attention/step_N/I.jpg, in one upload:
        log_table and log_image took 2 s and 0.24 s per strip against a tracking server
        (docs/guides/watching-training.md)."""
        samples = [SimpleNamespace(**s, image=None) if isinstance(s, dict) else s for s in samples]  # replayed
        rows = sample_rows(step, samples)
        columns = ["step", "file", "caption", "references"]
        with tempfile.TemporaryDirectory(prefix="captioner-mlflow-") as tmp:
            table = Path(tmp) / SAMPLES_FOLDER / f"step_{step:06d}.json"
            table.parent.mkdir()
            table.write_text(json.dumps({"columns": columns, "data": [[row[c] for c in columns] for row in rows]}))
            strips = Path(tmp) / ATTENTION_FOLDER / f"step_{step:06d}"
            for i, sample in enumerate(samples):
                jpeg = attention_jpeg(sample)
                if jpeg is not None:
                    strips.mkdir(parents=True, exist_ok=True)
                    (strips / f"{i}.jpg").write_bytes(jpeg[0])
            self.client.log_artifacts(self.run_id, tmp)

    def finish(self, run_dir: Path) -> None:
        """best.pt as a model folder inside the pyfunc model "model" (registered as train.register_as)."""
        if log_best_model(run_dir, "MLflow", MODEL_ARTIFACT, self._log_model):
            self.finished = True

    def _log_model(self, folder: Path) -> None:
        try:
            log_pyfunc_model(self.uri, self.run_id, folder, self.cfg.train.register_as or None)
        except CaptionerError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _failure(f"log the model to run {self.run_id}", self.uri, e) from None

    def state(self) -> dict:
        return {"run_id": self.run_id}

    def close(self) -> None:
        """Ends the MLflow run: FINISHED once finish() logged its model, else KILLED (a stopped or failed run,
        which --resume marks running again). Records past the last checkpoint are dropped: last.pt does not hold
        them, and the resumed run sends them again."""
        self.pending = []
        try:
            self.client.set_terminated(self.run_id, "FINISHED" if self.finished else "KILLED")
        except Exception as e:  # noqa: BLE001 - the training itself is done and saved
            log.warning("MLflow run %s could not be marked ended: %s", self.run_id, e)


def log_pyfunc_model(uri: str, run_id: str, folder: Path, register_as: str | None) -> None:
    """The model folder as the pyfunc model MODEL_NAME of the run (captioner/mlflow_model.py is its code),
    registered as register_as when given. MLflow logs models through its global tracking URI and active run
    only: both are set for the call and put back after."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    from captioner import __version__
    code = importlib.util.find_spec("captioner.mlflow_model").origin  # the file, not imported here
    previous = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    # MLflow's own chatter at the end of a run: a coloured warning that the model has no input example (its
    # signature says the columns) and progress bars of its artifact round trip; the user's setting wins.
    quiet_bars = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    if quiet_bars:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=code, artifacts={MODEL_ARTIFACT: str(folder)},
                                    signature=model_signature(), pip_requirements=[f"captioner=={__version__}"],
                                    registered_model_name=register_as)
    finally:
        mlflow.set_tracking_uri(previous)
        if quiet_bars:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)


def model_signature():
    """The pyfunc model's columns (captioner/mlflow_model.py): image (base64) or path in, both optional (a row
    gives one); caption, score and error out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    return ModelSignature(inputs=Schema([ColSpec("string", "image", required=False),
                                         ColSpec("string", "path", required=False)]),
                          outputs=Schema([ColSpec("string", "caption"), ColSpec("double", "score"),
                                          ColSpec("string", "error")]))
