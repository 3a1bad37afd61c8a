"""Messages from the cause: a YAML alias bomb is a parser limit (at once, not out of memory a minute later), a full
disk during a save names the disk and keeps last.pt, an unreadable checkpoint says permission denied, every int
key states its real lower bound, train.scst_temperature has one, and a ViT image_size its patch size does not
divide is refused naming the patch size."""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import io
import os
import re
import time
import typing

import pytest
import torch

from captioner.cli import main
from captioner.config import Config, load_config
from captioner.engine.infer.checkpoint import load_checkpoint, save_checkpoint
from captioner.errors import CaptionerError

from helpers import SMALL_MODEL, untrained_checkpoint

LAUGHS = "lol: &l0 [a, a, a, a, a, a, a, a, a]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))


def _cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@pytest.mark.parametrize("text, says", [
    (LAUGHS, "alias expansion limit"),  # 9**10 strings once expanded: a "billion laughs"
    ("train:\n  log_to: &x [a, [b, *x]]\n", "recursive alias"),
    ("train:\n  log_to: " + "[" * 80 + "]" * 80 + "\n", "depth limit"),
    ("a: &a [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n"
     "b: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[*a]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n", "depth limit"),
])
def test_a_yaml_over_a_parser_limit_is_refused_at_once(text, says, tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(text)
    start = time.perf_counter()
    code, err = _cli(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    seconds = time.perf_counter() - start
    assert code == 2 and seconds < 2, (code, seconds, err)
    assert says in err and "YAML parser limit" in err and str(config) in err, err
    assert "memory" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_bomb_in_a_value_whose_error_shows_it(tmp_path):
    """train.log_to's refusal shows the value: before the limit, that repr expanded every alias (minutes, then
    out of memory)."""
    config = tmp_path / "c.yaml"
    levels = ["&l0 [a, a, a, a, a, a, a, a, a]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    config.write_text(f"train:\n  log_to: [{', '.join(levels)}]\n")
    start = time.perf_counter()
    with pytest.raises(CaptionerError, match="alias expansion limit"):
        load_config(config)
    assert time.perf_counter() - start < 2


class _FullDisk(io.BufferedWriter):
    """A file on a disk that fills up after 4 KiB."""

    def write(self, data):
        if self.tell() + len(data) > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_full_disk_while_saving_names_the_disk_and_keeps_last_pt(tmp_path, monkeypatch):
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    save_checkpoint(last, {"model": {"w": torch.ones(4)}, "config": {}, "vocab": ["a"]})
    before = last.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: _FullDisk(io.FileIO(fd, "wb"))
                        if "w" in mode else real_fdopen(fd, mode, *a, **k))
    with pytest.raises(CaptionerError) as failed:  # torch.save's own writer meets ENOSPC in the file's write
        save_checkpoint(last, {"model": {"w": torch.zeros(100_000)}, "config": {}, "vocab": ["a"]})
    monkeypatch.undo()
    message = str(failed.value)
    assert failed.value.exit_status == 1  # the machine, not the input
    assert f"cannot write checkpoint {last}: No space left on device (the disk mounted at " in message, message
    assert "MB free" in message and message.endswith("; the previous last.pt is intact"), message
    assert "enforce fail" not in message and "inline_container" not in message
    assert last.read_bytes() == before and load_checkpoint(last)["vocab"] == ["a"]
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temporary left


def test_a_write_failure_without_an_os_error_drops_torchs_cpp_location(tmp_path, monkeypatch):
    from captioner.engine.infer import checkpoint as checkpoints

    def fails(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(checkpoints.torch, "save", fails)
    with pytest.raises(CaptionerError) as failed:
        save_checkpoint(tmp_path / "last.pt", {"model": {}})
    message = str(failed.value)
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'last.pt'}: PytorchStreamWriter failed writing "
                              f"file data/0: file write failed (the disk mounted at "), message
    assert "enforce fail" not in message and "inline_container" not in message


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return untrained_checkpoint(tmp_path_factory.mktemp("perm") / "best.pt", *SMALL_MODEL, "decode.max_len=4")


def test_an_unreadable_checkpoint_says_permission_denied(checkpoint, monkeypatch, tmp_path):
    real_open = builtins.open

    def denied(file, *args, **kwargs):  # what chmod 000 does for anyone but root
        if os.fspath(file) == checkpoint if isinstance(file, (str, os.PathLike)) else False:
            raise PermissionError(errno.EACCES, "Permission denied", checkpoint)
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(CaptionerError, match="Permission denied") as refused:
        load_checkpoint(checkpoint)
    assert "truncated" not in str(refused.value) and checkpoint in str(refused.value)
    (tmp_path / "a.png").write_bytes(b"")
    code, err = _cli(["caption", "--checkpoint", checkpoint, str(tmp_path / "a.png"), "--out",
                      str(tmp_path / "c.jsonl"), "--device", "cpu", "--workers", "0"])
    assert code == 2 and re.search("permission denied", err, re.I) and "truncated" not in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway (the test above simulates it)")
def test_a_chmod_000_checkpoint_says_permission_denied(checkpoint, tmp_path):
    copy = tmp_path / "locked.pt"
    copy.write_bytes(open(checkpoint, "rb").read())
    copy.chmod(0)
    try:
        with pytest.raises(CaptionerError, match="Permission denied"):
            load_checkpoint(copy)
    finally:
        copy.chmod(0o644)


def _int_keys() -> list[str]:
    keys = []
    for section, section_type in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(section_type)
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(section_type) if hints[f.name] is int]
    return keys


# Keys whose bound depends on another key: what makes the smallest value valid.
CONTEXT = {"train.scst_samples": ["train.scst_baseline=greedy"]}


@pytest.mark.parametrize("key", _int_keys())
def test_every_int_key_states_its_real_lower_bound(key):
    """The bound the message gives is the real one: that value is accepted, one less is refused saying so."""
    with pytest.raises(CaptionerError) as refused:
        load_config(None, [*CONTEXT.get(key, []), f"{key}=-1"])
    found = re.search(r"must be >= (\d+)", str(refused.value))
    assert found, f"{key}: {refused.value}"
    low = int(found.group(1))
    load_config(None, [*CONTEXT.get(key, []), f"{key}={low}"])
    if low > 0:
        with pytest.raises(CaptionerError, match=rf">= {low}( \(.*\))?, got {low - 1}"):
            load_config(None, [*CONTEXT.get(key, []), f"{key}={low - 1}"])


@pytest.mark.parametrize("value", ["1e-300", "0", "-1", "1e9"])
def test_scst_temperature_has_a_working_range(value):
    with pytest.raises(CaptionerError, match=r"train.scst_temperature must be in \[0.0001, 10000\]"):
        load_config(None, [f"train.scst_temperature={value}"])
    assert load_config(None, ["train.scst_temperature=1e-4"]).train.scst_temperature == 1e-4


def test_the_lowest_scst_temperature_samples_finite_words():
    """At the lower bound the sampled log-probabilities are finite (far below it they overflow to -inf)."""
    from captioner.model.sample import sample_captions
    from captioner.model.caption_model import CaptionModel
    cfg = load_config(None, [*SMALL_MODEL, "encoder.arch=squeezenet1_1", "encoder.layer=features"])
    torch.manual_seed(0)
    model = CaptionModel(cfg.encoder, cfg.model, 12).eval()
    raw = torch.randn(2, model.encoder.channels, *model.encoder.grid)
    out = sample_captions(model, raw, max_len=5, temperature=1e-4)
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.entropy).all()


def test_a_vit_image_size_its_patches_do_not_divide_is_refused():
    pytest.importorskip("timm")
    from captioner.model.caption_model import build_encoder
    cfg = load_config(None, ["encoder.arch=timm/vit_tiny_patch16_224", "encoder.layer=blocks.0",
                             "encoder.image_size=230"])
    with pytest.raises(CaptionerError, match=r"encoder.image_size 230 is not a multiple of "
                                             r"timm/vit_tiny_patch16_224's patch size 16: the last 6 rows and "
                                             r"columns of pixels would never be seen; use 224 or 240"):
        build_encoder(cfg.encoder)


def test_patch_size_reads_the_library_attribute():
    from captioner.model.encoder import patch_size
    embed = torch.nn.Module()
    embed.patch_size = (14, 16)
    vit = torch.nn.Module()
    vit.patch_embed = embed
    assert patch_size(vit) == (14, 16)
    embed.dynamic_img_pad = True  # pads the image to whole patches: no pixel is lost
    assert patch_size(vit) is None
    tower = torch.nn.Module()
    tower.patch_size = (32, 32)  # open_clip's VisionTransformer
    assert patch_size(tower) == (32, 32) and patch_size(torch.nn.Conv2d(3, 8, 3)) is None
