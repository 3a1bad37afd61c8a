"""Shared fixtures: a small synthetic dataset, one tiny trained model (built once per test session), one
untrained checkpoint and one folder of every kind of input. Plain builders live in helpers.py.

Run in parallel with pytest-xdist as `python -m pytest -n auto --dist loadgroup`: each test file then goes to one
worker whole (its module fixtures are built once), and the tests that use `trained` go to one worker together,
first, so that the model is trained once (see pytest_xdist_make_scheduler below)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from captioner.jobs import train
from helpers import make_input_folder, tiny_config, untrained_checkpoint

# One thread: on 2 cores shared with anything else, two threads per process oversubscribe and run 10x slower.
torch.set_num_threads(1)

SHARED_TRAINED = "trained"  # the xdist group of the tests that use the `trained` fixture


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """The tests that use `trained` form one xdist group and run first: the group is the longest unit of work
    (a minute of training, then those tests), so it must not be the last one handed out."""
    uses_trained = [item for item in items if SHARED_TRAINED in getattr(item, "fixturenames", ())]
    for item in uses_trained:
        item.add_marker(pytest.mark.xdist_group(SHARED_TRAINED))
    items[:] = uses_trained + [item for item in items if item not in uses_trained]


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # optional: the hook exists only where xdist is installed
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup here: an xdist_group goes to one worker whole, and so does every test file (like
    --dist loadfile), in collection order (the `trained` group first, see above)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FilesAndGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = super()._split_scope(nodeid)
            return group if group != nodeid else nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False  # xdist would hand out the units with the most tests first
    return FilesAndGroups(config, log)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthetic_root):
    """(summary, cfg) of a tiny model trained on synthetic shapes: the learning, CLI and SCST tests use it.
    Training takes most of a minute: tests that use it are marked slow."""
    logging.getLogger("captioner").setLevel(logging.WARNING)
    cfg = tiny_config(synthetic_root, "train.epochs=12")
    run_dir = tmp_path_factory.mktemp("run")
    return train.main(train.TrainJob(cfg, run_dir, "cpu")), cfg


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """A fresh folder per test module for helpers.small_config's small synthetic set."""
    return tmp_path_factory.mktemp("small-synthetic")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """An untrained configs/tiny.yaml model (128x128 input, a 4x4 attention grid) for the caption and serve
    tests: the tools' behaviour needs no good captions."""
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", "decode.max_len=8")


@pytest.fixture(scope="session")
def mixed(tmp_path_factory):
    """(folder, good names, {bad name: words of its error}): every kind of image and every kind of broken file."""
    folder = tmp_path_factory.mktemp("mixed") / "photos"
    good, bad = make_input_folder(folder)
    return folder, good, bad


@pytest.fixture
def loopback_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path (HF_HOME), online, and the Hub's address to be pointed at a
    loopback server with downloads.serve_hub."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache
