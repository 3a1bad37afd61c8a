"""Pretrained weights come through the libraries' own cached, hash-checked loaders, from empty caches, with no
internet: torchvision's enum URL is pointed at a loopback server (tests/downloads.py), the Hugging Face cache
of timm and open_clip is filled in advance and the Hub is offline."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from captioner.errors import CaptionerError
from captioner.jobs import extract
from captioner.model.caption_model import build_encoder
from captioner.model.encoder import HookedEncoder

from downloads import (LoopbackServer, closed_port_url, fill_hub_cache, hashed_name, hub_files, saved_bytes,
                       serve_hub, tiny_state_dict)
from helpers import ROOT, TINY, small_config, small_overrides

WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture(scope="module")
def resnet18_file() -> tuple[str, bytes, dict]:
    """(torch.hub file name, bytes, state_dict) of small random resnet18 weights named by their sha256 prefix."""
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    state = tiny_state_dict(model)
    data = saved_bytes(state)
    return hashed_name("resnet18", data), data, state


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME (not even created): torch.hub's checkpoints folder is TORCH_HOME/hub/checkpoints."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


def _point_enum_at(monkeypatch, url: str) -> None:
    monkeypatch.setattr(WEIGHTS.value, "url", url)  # the real enum, its URL on loopback


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_extract_fetches_through_torch_hub_once_and_then_uses_the_cache(tmp_path, torch_home, resnet18_file,
                                                                       monkeypatch, capsys):
    name, data, state = resnet18_file
    cfg = small_config(tmp_path / "data", "dataset.synthetic_images=12", "encoder.layer=layer1",
                       "encoder.weights=IMAGENET1K_V1")
    with LoopbackServer({name: data}) as server:
        _point_enum_at(monkeypatch, server.url(name))
        first = extract.main(extract.ExtractJob(cfg, splits="train", device="cpu"))
        assert server.requests == [f"GET /{name}"]
        assert sorted(p.name for p in (torch_home / "hub" / "checkpoints").iterdir()) == [name]  # no .partial
        second = extract.main(extract.ExtractJob(cfg, splits="train", device="cpu", rebuild=True))
        assert server.requests == [f"GET /{name}"]  # the second run read the cache
    assert first["added"] == second["added"] > 0 and first["failed"] == 0
    assert "Downloading" not in capsys.readouterr().out  # torch.hub's note stays off the command's stdout
    encoder = build_encoder(cfg.encoder)  # the served weights, not a random init
    assert torch.equal(encoder.backbone.conv1.weight, state["conv1.weight"])


def test_corrupt_download_is_refused_in_one_line_and_leaves_no_file(torch_home, resnet18_file, monkeypatch):
    name, data, _ = resnet18_file
    with LoopbackServer({name: data[:-1] + bytes([data[-1] ^ 1])}) as server:  # one bit off its name's hash
        _point_enum_at(monkeypatch, server.url(name))
        with pytest.raises(CaptionerError) as e:
            HookedEncoder("resnet18", "layer1", weights="IMAGENET1K_V1", image_size=64)
    message = _one_line(e)
    assert f"download of {name} is incomplete or corrupt" in message and "not kept" in message
    assert list((torch_home / "hub" / "checkpoints").iterdir()) == []  # the folder was made; nothing in it


def test_interrupted_download_leaves_no_file(torch_home, resnet18_file, monkeypatch):
    name, data, _ = resnet18_file
    with LoopbackServer({name: data}, truncate={name}) as server:  # half the bytes, then the connection closes
        _point_enum_at(monkeypatch, server.url(name))
        with pytest.raises(CaptionerError) as e:
            HookedEncoder("resnet18", "layer1", weights="IMAGENET1K_V1", image_size=64)
    assert f"download of {name} is incomplete or corrupt" in _one_line(e)  # the hash check catches it
    assert list((torch_home / "hub" / "checkpoints").iterdir()) == []


def test_offline_names_the_file_to_place_and_where(torch_home, resnet18_file, monkeypatch):
    name, _, _ = resnet18_file
    _point_enum_at(monkeypatch, closed_port_url(name))
    with pytest.raises(CaptionerError) as e:
        HookedEncoder("resnet18", "layer1", weights="IMAGENET1K_V1", image_size=64)
    message = _one_line(e)
    place = torch_home / "hub" / "checkpoints" / name
    assert message.startswith(f"could not download {name} (") and "no network?" in message
    assert f"place it at {place} " in message and "encoder.weights" in message


def test_a_cache_filled_in_advance_is_used_without_network_and_checked(torch_home, resnet18_file, monkeypatch):
    name, data, state = resnet18_file
    _point_enum_at(monkeypatch, closed_port_url(name))  # any download attempt would fail
    placed = torch_home / "hub" / "checkpoints" / name
    placed.parent.mkdir(parents=True)
    placed.write_bytes(data)
    stale, fresh = placed.parent / f"{name}.0ld.partial", placed.parent / f"{name}.n3w.partial"
    encoder = HookedEncoder("resnet18", "layer1", weights="IMAGENET1K_V1", image_size=64)
    assert torch.equal(encoder.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])

    placed.write_bytes(data[: len(data) // 2])  # a truncated copy placed by hand: its hash no longer fits the name
    with pytest.raises(CaptionerError) as e:
        HookedEncoder("resnet18", "layer1", weights="IMAGENET1K_V1", image_size=64)
    message = _one_line(e)
    assert str(placed) in message and "delete it" in message

    # A killed download's .partial file is swept once stale; one still being written (recent) is left alone.
    placed.unlink()
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with pytest.raises(CaptionerError, match="could not download"):
        HookedEncoder("resnet18", "layer1", weights="IMAGENET1K_V1", image_size=64)
    assert not stale.exists() and fresh.exists()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path with the Hub offline (HF_HUB_OFFLINE=1): only the cache answers."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"  # constants are read at import: patch them too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


TIMM_REPO = "timm/test_resnet.r160_in1k"  # timm's own tiny test model (372k parameters) and its Hub repo


@pytest.fixture(scope="module")
def timm_weights() -> tuple[bytes, dict]:
    """(model.safetensors bytes, state_dict) of random timm test_resnet weights, with the classifier as on the Hub."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save

    torch.manual_seed(0)
    state = timm.create_model("test_resnet").state_dict()
    assert timm.models.get_pretrained_cfg("test_resnet.r160_in1k").hf_hub_id == TIMM_REPO
    return save(state), state


def _timm_encoder() -> HookedEncoder:
    return HookedEncoder("timm/test_resnet", "layer2", weights="r160_in1k", image_size=64)


def test_timm_tag_loads_from_a_filled_hugging_face_cache(offline_hub, timm_weights):
    from huggingface_hub import try_to_load_from_cache

    data, state = timm_weights
    with pytest.raises(CaptionerError) as e:  # nothing cached yet: one line naming the file and the cache
        _timm_encoder()
    message = _one_line(e)
    assert "could not download model.safetensors for timm/test_resnet weights r160_in1k" in message
    assert f"hf download {TIMM_REPO} model.safetensors" in message and str(offline_hub) in message

    snapshot = fill_hub_cache(offline_hub, TIMM_REPO, {"model.safetensors": data})
    assert try_to_load_from_cache(TIMM_REPO, "model.safetensors") == str(snapshot / "model.safetensors")
    encoder = _timm_encoder()
    assert torch.equal(encoder.backbone.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert encoder.preprocess.mean == (0.5, 0.5, 0.5) and encoder.interpolation == "bilinear"  # the tag's own

    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the cached blob no longer hashes to its name
    with pytest.raises(CaptionerError) as e:
        _timm_encoder()
    message = _one_line(e)
    assert f"model.safetensors of {TIMM_REPO} in the Hugging Face cache is incomplete or corrupt" in message
    assert "removed" in message and not blob.exists() and not (snapshot / "model.safetensors").exists()


def test_a_corrupt_blob_another_user_owns_is_not_said_to_be_removed(offline_hub, timm_weights, monkeypatch):
    """A shared HF_HOME: the corrupt blob belongs to another user, so removing it fails; the message must not send
    this user to run again (which would fail the same way forever)."""
    data, _ = timm_weights
    snapshot = fill_hub_cache(offline_hub, TIMM_REPO, {"model.safetensors": data})
    (snapshot / "model.safetensors").resolve().write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # no longer its name
    real_unlink = Path.unlink

    def not_ours(path, missing_ok=False):
        if str(path).startswith(str(offline_hub)):
            raise PermissionError(13, "Permission denied", str(path))
        real_unlink(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", not_ours)
    with pytest.raises(CaptionerError) as e:
        _timm_encoder()
    message = _one_line(e)
    assert "incomplete or corrupt" in message and "could not be removed" in message and "run again" not in message
    assert "Permission denied" in message and "set HF_HOME" in message
    assert (snapshot / "model.safetensors").resolve().exists()


def test_timm_tag_downloads_through_huggingface_hub_once(loopback_hub, timm_weights, monkeypatch):
    data, state = timm_weights
    path = f"/{TIMM_REPO}/resolve/main/model.safetensors"
    with LoopbackServer(*hub_files(TIMM_REPO, {"model.safetensors": data})) as server:
        serve_hub(monkeypatch, server.url(""))
        first = _timm_encoder()
        assert server.downloads == [path]
        second = _timm_encoder()  # the Hub client asks whether its copy is current (HEAD), downloads nothing
        assert server.downloads == [path] and server.requests[-1] == f"HEAD {path}"
    assert torch.equal(first.backbone.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert torch.equal(second.backbone.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


def test_corrupt_hub_download_is_refused_and_removed(loopback_hub, timm_weights, monkeypatch):
    data, _ = timm_weights
    wrong = hashlib.sha256(b"other bytes").hexdigest()  # the ETag (the sha256 the Hub promises) of other content
    with LoopbackServer(*hub_files(TIMM_REPO, {"model.safetensors": data}, etags={"model.safetensors": wrong})) \
            as server:
        serve_hub(monkeypatch, server.url(""))
        with pytest.raises(CaptionerError) as e:
            _timm_encoder()
    assert "incomplete or corrupt" in _one_line(e) and "removed" in str(e.value)
    repo = loopback_hub / ("models--" + TIMM_REPO.replace("/", "--"))
    assert list((repo / "blobs").iterdir()) == []  # neither the blob nor its snapshot link is left
    assert [p for p in (repo / "snapshots").rglob("*") if not p.is_dir()] == []


@pytest.mark.slow  # open_clip builds the whole 102M-parameter CLIP (text tower too) before loading: ~4 s
def test_open_clip_tag_loads_from_a_filled_hugging_face_cache(offline_hub):
    open_clip = pytest.importorskip("open_clip")
    repo = open_clip.get_pretrained_cfg("RN50-quickgelu", "openai")["hf_hub"].rstrip("/")
    state = tiny_state_dict(open_clip.create_model("RN50-quickgelu", device="meta"))
    fill_hub_cache(offline_hub, repo, {"open_clip_pytorch_model.bin": saved_bytes(state)})
    # 224 px, the size the weights were made for: open_clip resizes a ViT's position embedding, not RN50's
    encoder = HookedEncoder("open_clip/RN50-quickgelu", "layer2", weights="openai", image_size=224)
    assert torch.equal(encoder.backbone.layer2[0].conv1.weight, state["visual.layer2.0.conv1.weight"])
    assert encoder.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


# `captioner extract` itself, with the real enum's URL on loopback.
TORCHRUN_EXTRACT = """
import sys, torchvision
from captioner.cli import main
torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value.url = sys.argv[1]
raise SystemExit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_under_torchrun_one_process_per_node_downloads(tmp_path, resnet18_file):
    name, data, _ = resnet18_file
    script = tmp_path / "extract_with_loopback_weights.py"
    script.write_text(TORCHRUN_EXTRACT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path / "torch-home")}
    env.pop("WORLD_SIZE", None)

    def torchrun(url: str, data_root: Path) -> subprocess.CompletedProcess:
        overrides = small_overrides(data_root, "dataset.synthetic_images=12", "encoder.layer=layer1",
                                    "encoder.weights=IMAGENET1K_V1")
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), url, "extract", "--config", str(TINY), "--split", "train",
                               "--device", "cpu", *overrides],
                              env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)

    # Offline: the first process fails in one line; the second stops too instead of waiting for it.
    failed = torchrun(closed_port_url(name), tmp_path / "data-offline")
    assert failed.returncode != 0
    assert f"could not download {name}" in failed.stderr
    assert "stopped: fetching encoder.weights failed in this node's first process" in failed.stderr
    with LoopbackServer({name: data}) as server:
        done = torchrun(server.url(name), tmp_path / "data")
        assert done.returncode == 0, done.stderr[-3000:]
        assert server.requests == [f"GET /{name}"]  # one download for the node's two processes
