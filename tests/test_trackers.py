"""MLflow and Weights & Biases: train.log_to sends what metrics.jsonl holds to a real MLflow tracking server (and its
model registry) and to an offline W&B run, each step once across a kill -9 and --resume; the logged MLflow model
serves the captions `captioner caption` writes."""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from captioner.cli import main as cli
from captioner.config import load_config
from captioner.engine.train.loggers import check_log_to, scalars
from captioner.errors import CaptionerError

from helpers import ROOT, TINY, killed_child, metric_lines, small_overrides

# 60 synthetic images at val_fraction 0.15: 7 steps per epoch, a validation at steps 7 and 14 with 8 samples each.
TRACKED = ["dataset.val_fraction=0.15"]


def _expected_metrics(run_dir) -> dict:
    """{key: [(step, value)]} of metrics.jsonl by the trackers' naming rule (loggers/base.py scalars)."""
    expected = {}
    for record in metric_lines(run_dir):
        for key, value in scalars(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    return expected


# ---------------------------------------------------------------- refusals (fast)

def test_an_unknown_sink_is_refused_with_the_valid_ones():
    with pytest.raises(CaptionerError) as e:
        load_config(TINY, ["train.log_to=[jsonl,comet]"])
    assert "jsonl, tensorboard, mlflow, wandb" in str(e.value) and "comet" in str(e.value)


@pytest.mark.parametrize("sink", ["mlflow", "wandb"])
def test_a_missing_tracker_package_names_the_extra_to_install(sink, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == sink else find_spec(name, *a))
    with pytest.raises(CaptionerError) as e:
        check_log_to(["jsonl", sink])
    message = str(e.value)
    assert f'pip install "captioner[{sink}]"' in message and "\n" not in message
    check_log_to(["jsonl"])  # jsonl needs nothing


def test_an_mlflow_server_that_does_not_answer_is_refused_at_once_in_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(CaptionerError) as e:
        check_log_to(["jsonl", "mlflow"])
    message = str(e.value)
    assert time.monotonic() - start < 5  # MLflow's own client retried for about 4 minutes
    assert "does not answer" in message and "Connection refused" in message and "\n" not in message


def test_any_http_answer_lets_mlflow_itself_speak(monkeypatch):
    import http.server
    import threading
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 to every GET
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
        check_log_to(["jsonl", "mlflow"])
    finally:
        server.shutdown()
        server.server_close()


def test_mlflow_refusing_a_folder_store_gets_its_way_out_in_the_line():
    from captioner.engine.train.loggers.mlflow_log import _failure
    refusal = Exception("The filesystem tracking backend (e.g., './mlruns') is in maintenance mode ... " + "x" * 400
                        + " set `MLFLOW_ALLOW_FILE_STORE=true` to opt out of this exception.")
    message = str(_failure("start the run", "/data/mlruns", refusal))
    assert "MLFLOW_ALLOW_FILE_STORE=true" in message and "sqlite:///" in message  # was cut off at 300 characters


def test_mlflow_failing_while_training_says_the_run_is_saved_and_how_to_continue(tmp_path):
    from captioner.engine.train.loggers.mlflow_log import MlflowLogger

    class DeadClient:
        def log_batch(self, *args, **kwargs):
            raise ConnectionError("Max retries exceeded")

    logger = MlflowLogger.__new__(MlflowLogger)  # as left by __init__ once the server has gone away
    logger.client, logger.uri, logger.run_id, logger.run_dir = DeadClient(), "http://mlflow:5000", "abc", tmp_path
    logger.pending = [("metrics", ["a metric"])]
    with pytest.raises(CaptionerError) as e:
        logger.checkpointed()
    assert f"last.pt saved: `captioner train --resume {tmp_path}`" in str(e.value) and "\n" not in str(e.value)


def test_the_config_takes_an_experiment_and_a_registered_name():
    cfg = load_config(TINY, ["train.log_to=[jsonl,mlflow,wandb]", "train.experiment=coco", "train.register_as=cap"])
    assert cfg.train.log_to == ["jsonl", "mlflow", "wandb"]
    assert (cfg.train.experiment, cfg.train.register_as) == ("coco", "cap")


# ---------------------------------------------------------------- a real MLflow tracking server

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Spawned:
    """A server process in its own process group on a loopback port, stopped (the whole group) by stop()."""

    def __init__(self, args: list[str], ready_path: str, log: Path, env: dict | None = None, timeout: float = 240):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen([*args, "--host", "127.0.0.1", "--port", str(self.port)],
                                        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(self.url + ready_path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"no answer at {self.url}{ready_path}: {log.read_text()[-3000:]}")

    def stop(self):
        """SIGTERM to the group, then SIGKILL to what is left of it (mlflow server's job runners outlive it)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break  # the whole group is gone
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.process.wait(20)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("mlflow-server")
    server = Spawned([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                      f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", (folder / "artifacts").as_uri(),
                      "--workers", "1"], "/health", folder / "server.log")
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def mlflow_run(small_root, tracking_server, tmp_path_factory):
    """A small run logging to the server, killed (-9) at step 5, two steps after its step-3 checkpoint, and
    resumed to its end: (run dir, MlflowClient, the MLflow run)."""
    from mlflow import MlflowClient
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    args = ["-q", "train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu",
            *small_overrides(small_root, *TRACKED, "train.log_to=[jsonl,mlflow]", "train.experiment=captioner-tests",
                             "train.register_as=captioner-tiny")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking_server}
    done = subprocess.run([sys.executable, "-c", killed_child(5, logger="RunLog", flush=True),
                           str(torch.get_num_threads()), *args], env=env, cwd=str(ROOT), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 3
    client = MlflowClient(tracking_server)
    experiment = client.get_experiment_by_name("captioner-tests")
    killed = client.search_runs([experiment.experiment_id])
    assert len(killed) == 1 and max(m.step for m in client.get_metric_history(killed[0].info.run_id,
                                                                                "train/loss")) == 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_server)
        assert cli(["train", "--resume", str(run_dir), "--device", "cpu"]) == 0
    assert not (run_dir / "mlflow.db").exists()  # MLFLOW_TRACKING_URI given: nothing local
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == killed[0].info.run_id  # the resumed run is the same one
    return run_dir, client, runs[0]


@pytest.mark.slow
def test_mlflow_holds_the_config_every_step_of_metrics_jsonl_once_the_samples_and_the_model(mlflow_run, tmp_path):
    run_dir, client, run = mlflow_run
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.log_to"] == "jsonl, mlflow" and params["model.decoder_dim"] == "32"
    assert params["train.experiment"] == "captioner-tests" and float(params["train.lr"]) > 0
    tags = run.data.tags
    assert tags["captioner.device"] == "cpu" and tags["captioner.dtype"] in ("float32", "bfloat16")
    import captioner
    assert tags["captioner.version"] == captioner.__version__
    if (ROOT / ".git").exists():
        assert len(tags["captioner.git_commit"]) == 40

    expected = _expected_metrics(run_dir)
    assert {"train/loss", "train/lr", "train/elapsed_s", "epoch/val_cider", "epoch/train_loss"} <= set(expected)
    assert set(run.data.metrics) == set(expected)
    for key, points in expected.items():  # each step once, with metrics.jsonl's values
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == points, key
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 15))

    lines = metric_lines(run_dir)
    sampled = [x for x in lines if "samples" in x]
    assert [x["step"] for x in sampled] == [7, 14]
    for record in sampled:
        path = client.download_artifacts(run_id, f"samples/step_{record['step']:06d}.json", str(tmp_path))
        table = json.loads(Path(path).read_text())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert [r["caption"] for r in rows] == [s["caption"] for s in record["samples"]]
        assert [r["file"] for r in rows] == [Path(s["file"]).name for s in record["samples"]]
        assert all(r["step"] == record["step"] for r in rows)
    for step in (7, 14):
        strips = [f.path for f in client.list_artifacts(run_id, f"attention/step_{step:06d}")]
        assert strips == [f"attention/step_{step:06d}/{i}.jpg" for i in range(8)]

    models = client.search_logged_models([run.info.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run_id and models[0].name == "model"
    folder = Path(_download_model(run_id, tmp_path / "model"))
    meta = json.loads((folder / "artifacts" / "model_folder" / "config.json").read_text())
    assert meta["format"] == "captioner-model" and meta["source"]["checkpoint"] == "best.pt"
    versions = client.search_model_versions("name='captioner-tiny'")
    assert len(versions) == 1 and versions[0].run_id == run_id


def _download_model(run_id: str, dst: Path) -> str:
    import mlflow
    return mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(dst))


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_captions_of_captioner_caption(mlflow_run, tracking_server,
                                                                           small_root, tmp_path):
    run_dir, _, run = mlflow_run
    images = sorted(Path(small_root).rglob("*.jpg"))[:4]
    assert len(images) == 4
    out = tmp_path / "captions.jsonl"
    assert cli(["-q", "caption", "--checkpoint", str(run_dir / "best.pt"), *map(str, images), "--out", str(out),
                "--device", "cpu"]) == 0
    by_file = {Path(x["file"]).name: x["caption"]
               for x in map(json.loads, out.read_text().splitlines())}
    served = Spawned([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run.info.run_id}/model",
                      "--env-manager", "local", "--workers", "1"], "/ping", tmp_path / "serve.log",
                     env={"MLFLOW_TRACKING_URI": tracking_server})
    try:
        records = [{"image": base64.b64encode(p.read_bytes()).decode()} for p in images[:2]] + \
                  [{"path": str(p)} for p in images[2:]] + [{"image": "not base64!"}]
        answer = httpx.post(f"{served.url}/invocations", json={"dataframe_records": records}, timeout=120)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
    finally:
        served.stop()
    assert [p["caption"] for p in predictions[:4]] == [by_file[p.name] for p in images]
    assert all(p["error"] == "" and p["caption"] for p in predictions[:4])
    assert predictions[4]["caption"] == "" and "not base64" in predictions[4]["error"]


# ---------------------------------------------------------------- Weights & Biases, offline

def _wandb_records(run_dir) -> list[dict]:
    """Every record of the run's offline .wandb files, oldest run first, read by wandb's own reader."""
    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        records += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return records


@pytest.mark.slow
def test_an_offline_wandb_run_holds_every_scalar_and_the_sample_tables_and_resume_keeps_its_id(
        small_root, tmp_path, monkeypatch):
    """Also: MLflow turned on at the resume, without MLFLOW_TRACKING_URI, gets the run's whole history in a
    store inside the run dir."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("DIR", "DATA_DIR", "CACHE_DIR", "CONFIG_DIR", "ARTIFACT_DIR"):  # nothing outside tmp_path
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / f"wandb-{name.lower()}"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    overrides = small_overrides(small_root, *TRACKED, "train.log_to=[jsonl,wandb]", "train.epochs=1")
    assert cli(["-q", "train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu", *overrides]) == 0
    first = torch.load(run_dir / "last.pt", weights_only=True)["trackers"]["wandb"]["run_id"]
    assert cli(["-q", "train", "--resume", str(run_dir), "--device", "cpu", "train.epochs=2",
                "train.log_to=[jsonl,wandb,mlflow]"]) == 0
    assert torch.load(run_dir / "last.pt", weights_only=True)["trackers"]["wandb"]["run_id"] == first

    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{first}") for f in folders)  # one W&B run, two sessions
    records = _wandb_records(run_dir)
    assert {r["run"]["run_id"] for r in records if r["type"] == "run"} == {first}
    logged = {}
    for record in (r for r in records if r["type"] == "history"):
        step = record["history"]["step"]["num"]
        for key, value in record["history"]["item"].items():
            if "/" in key:
                logged.setdefault(key, []).append((step, value))
    expected = _expected_metrics(run_dir)
    assert set(logged) == set(expected)
    for key, points in expected.items():  # each step once, metrics.jsonl's values (JSON round trip)
        assert logged[key] == [(s, pytest.approx(v, rel=1e-12)) for s, v in points], key

    sampled = [x for x in metric_lines(run_dir) if "samples" in x]
    tables = sorted(run_dir.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == len(sampled) == 2
    for path, record in zip(tables, sampled):
        table = json.loads(path.read_text())
        assert table["columns"] == ["step", "file", "caption", "references", "attention"]
        assert [row[2] for row in table["data"]] == [s["caption"] for s in record["samples"]]
    staged = [c for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "run_table"
              for c in r["artifact"]["manifest"]["contents"] if c["path"].startswith("media/images/")]
    assert len(staged) == 16 and all(Path(c["local_path"]).is_file() for c in staged)  # 8 strips per validation
    models = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "model"]
    assert models and {c["path"] for c in models[-1]["manifest"]["contents"]} >= {"config.json", "model.safetensors",
                                                                                   "vocab.json", "README.md"}

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == tmp_path.name]  # the run dir's parent
    [run] = client.search_runs([experiment.experiment_id])
    for key, points in expected.items():  # steps 1-7 from metrics.jsonl at the resume, then 8-14 live
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) == points, key
    assert [f.path for f in client.list_artifacts(run.info.run_id, "samples")] == [
        "samples/step_000007.json", "samples/step_000014.json"]
    assert (run_dir / "mlartifacts").is_dir()  # the artifacts beside the store, not in the working folder


@pytest.mark.slow
def test_logging_the_mlflow_model_prints_no_mlflow_chatter(tmp_path, capfd, monkeypatch):
    from mlflow import MlflowClient

    from captioner.engine.train.loggers.mlflow_log import log_pyfunc_model
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    capfd.readouterr()
    log_pyfunc_model(uri, run_id, folder, None)
    printed = "".join(capfd.readouterr())
    assert "input example" not in printed and "Downloading artifacts" not in printed, printed[-2000:]
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # given back
    assert [m.name for m in client.search_logged_models([experiment])] == ["model"]
