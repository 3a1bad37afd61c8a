"""captioner.Captioner: every input form reaches the model as its file does, one call for one or many images,
streaming, errors naming the item, the Hub through a stand-in client, --version, and the README's example."""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import captioner
from captioner import Caption, Captioner, CaptionerError
from captioner.cli import main as cli
from captioner.data.images import read_any
from captioner.engine.infer import hub
from captioner.jobs.export import ExportJob, main as export

from helpers import ROOT, in_memory_forms, photo_zoo, varied_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return varied_checkpoint(tmp_path_factory.mktemp("api") / "best.pt")


@pytest.fixture(scope="module")
def cap(checkpoint):
    return Captioner.from_pretrained(checkpoint, "cpu", batch_size=4)


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    """Photos at most 200 pixels wide: below the 64x64 model's reduced-scale JPEG decoding threshold (256), but
    big.jpg (see test_every_input_form_reaches_the_model_as_its_file_does)."""
    zoo = photo_zoo(tmp_path_factory.mktemp("zoo"), max_side=200)
    del zoo["big.jpg"]
    return zoo


def test_every_input_form_reaches_the_model_as_its_file_does(tmp_path):
    """Paths, lazily opened PIL images, decoded PIL images, numpy arrays and uint8/float tensors of the same
    pixels give the same (3, S, S) model input. A JPEG big enough for reduced-scale decoding (big.jpg) is the
    one exception: a path and a lazily opened PIL image are decoded at reduced scale, pixels already decoded
    can only be resized from full size (a fraction of an intensity level apart on average)."""
    zoo = photo_zoo(tmp_path, max_side=320)  # 128x128 inputs: only big.jpg (1280 wide) is decoded at reduced scale
    for name, path in zoo.items():
        reference, size = read_any(path, name, 128)
        for kind, item in in_memory_forms(path).items():
            image, item_size = read_any(item, f"{name} as {kind}", 128)
            assert item_size == size, (name, kind)
            if name == "big.jpg" and kind != "pil":
                assert 0 < (image.float() - reference.float()).abs().mean() < 1.0, (name, kind)
            else:
                assert torch.equal(image, reference), (name, kind)
    upright = in_memory_forms(zoo["rotated_exif.jpg"])["array"]
    assert upright.shape[0] == Image.open(zoo["rotated_exif.jpg"]).width  # stored sideways, shown upright


def test_captions_are_the_same_for_paths_pil_arrays_and_tensors(cap, small_zoo):
    paths = list(small_zoo.values())
    by_path = cap.caption(paths)
    assert len({c.text for c in by_path}) >= 3  # different photos get different captions: the test can fail
    forms = [in_memory_forms(p) for p in paths]
    for kind in ("pil", "pil_loaded", "array", "tensor", "tensor_float"):
        items = [f[kind] if kind in f else f["array"] for f in forms]  # 16-bit PNGs stay arrays
        got = cap.caption(items)
        assert [c.text for c in got] == [c.text for c in by_path], kind
        assert [c.score for c in got] == pytest.approx([c.score for c in by_path], abs=1e-5), kind
    assert [c.text for c in cap.caption([p.read_bytes() for p in paths])] == [c.text for c in by_path]  # as serve
    mixed = [paths[0], Image.open(paths[1]), in_memory_forms(paths[2])["array"], str(paths[3]), open(paths[4], "rb"),
             io.BytesIO(paths[5].read_bytes())]
    assert [c.text for c in cap.caption(mixed)] == [c.text for c in by_path[:6]]
    assert [c.source for c in cap.caption(mixed[:4])] == [str(paths[0]), "images[1]", "images[2]", str(paths[3])]
    assert cap.caption(paths[0].read_bytes()).text == by_path[0].text  # bytes are one image, not a sequence


def test_one_image_many_images_batches_and_attention(cap, small_zoo):
    path = small_zoo["photo.jpg"]
    one = cap.caption(path)
    assert isinstance(one, Caption) and one.text == " ".join(one.words) and one.score < 0
    assert str(one) == one.text and repr(one).startswith("Caption(text=")
    assert cap(path).text == one.text  # callable like a pipeline
    with_attention = cap.caption(path, attention=True)
    grid = cap.predictor.model.grid
    assert with_attention.attention.shape == (len(one.words), *grid) and one.attention is None
    # bf16 autocast where the CPU has native bf16 units (compute.bf16=auto): maps then sum to 1 within bf16's step
    assert torch.allclose(with_attention.attention.sum(dim=(1, 2)), torch.ones(len(one.words)), atol=1e-2)
    batch = torch.stack([in_memory_forms(p)["tensor"] for p in (small_zoo["photo.jpg"], small_zoo["grey.jpg"])
                         if in_memory_forms(p)["tensor"].dim() == 3])
    assert isinstance(cap.caption(batch[:1]), list) and len(cap.caption(batch)) == len(batch)  # 4-D: a batch
    assert cap.caption([]) == [] and cap.caption(iter([path])) [0].text == one.text
    assert cap.image_size == 64 and cap.device == torch.device("cpu") and "squeezenet1_1" in repr(cap)


def test_stream_reads_only_a_few_batches_ahead(cap, small_zoo):
    path = small_zoo["photo.jpg"]
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield path

    stream = cap.stream(endless())
    first = [next(stream) for _ in range(3)]
    assert len({c.text for c in first}) == 1
    assert len(pulled) <= cap.batch_size * 2 + 1  # one chunk (2 batches without workers), not the whole input


def test_bad_inputs_raise_one_error_naming_the_item(cap, small_zoo, tmp_path):
    good = small_zoo["photo.jpg"]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    cases = [([good, 42], r"^images\[1\]: int is not an image type"),
             ([good, tmp_path / "nope.jpg"], r"nope\.jpg: no such file"),
             ([tmp_path / "broken.jpg"], r"broken\.jpg: "),
             ([good, np.zeros((3, 8, 8), np.uint8)], r"images\[1\]: array of shape \(3, 8, 8\).*transpose\(1, 2, 0\)"),
             ([torch.rand(3, 8, 8) * 2], r"images\[0\]: float values must lie in \[0, 1\]"),
             ([np.full((4, 4), np.nan, np.float32)], r"images\[0\]: 16 of 16 pixel values are NaN or infinite"),
             ([np.zeros((4, 4), np.int64)], r"int64 pixels: give uint8 \(0-255\), uint16"),
             ([torch.zeros(2, 5, 8, 8)[0]], r"tensor of shape \(5, 8, 8\) is not an image"),
             ([np.zeros((0, 5, 3), np.uint8)], r"holds no pixels"),
             ([tmp_path], r"is a folder, not an image file"),
             ([b""], r"images\[0\]: empty file"),
             ([b"<html>oops</html>"], r"images\[0\]: not an image: looks like an HTML page"),
             ([io.StringIO("text")], r"opened in text mode")]
    for images, message in cases:
        with pytest.raises(CaptionerError, match=message):
            cap.caption(images)
    kept = cap.caption([good, 42, good], errors="keep")
    assert [bool(c.error) for c in kept] == [False, True, False] and kept[1].text == ""
    assert kept[0].text == kept[2].text == cap.caption(good).text
    small = Captioner(cap.predictor, max_pixels=100)
    with pytest.raises(CaptionerError, match="above the limit of 100 pixels"):
        small.caption(np.zeros((20, 20, 3), np.uint8))
    for kwargs, message in [({"errors": "ignore"}, "errors must be one of raise, keep")]:
        with pytest.raises(CaptionerError, match=message):
            cap.caption(good, **kwargs)
    with pytest.raises(CaptionerError, match="argument batch_size must be >= 1, got 0"):
        Captioner(cap.predictor, batch_size=0)
    with pytest.raises(CaptionerError, match="argument beam_size must be >= 1, got 0"):
        Captioner.from_pretrained(cap.predictor.source, "cpu", beam_size=0)
    with pytest.raises(CaptionerError, match="runtime 'onnx' is not available"):
        Captioner.from_pretrained(cap.predictor.source, "cpu", runtime="onnx")
    with pytest.raises(CaptionerError, match="not found"):
        Captioner.from_pretrained(tmp_path / "missing.pt")


def test_exported_folder_captions_as_the_checkpoint(cap, checkpoint, small_zoo, tmp_path):
    export(ExportJob(str(checkpoint), str(tmp_path / "model")))
    folder = Captioner.from_pretrained(tmp_path / "model", "cpu", batch_size=3)  # other batches: same captions
    paths = list(small_zoo.values())
    assert [c.text for c in folder.caption(paths)] == [c.text for c in cap.caption(paths)]
    beam1 = Captioner.from_pretrained(tmp_path / "model", "cpu", beam_size=1)
    assert beam1.predictor.settings.beam_size == 1


class LocalHub:
    """A stand-in for the huggingface_hub module: repos are folders under root (no network)."""

    def __init__(self, root: Path):
        self.root, self.downloads = root, []
        hub_module = self

        class HfApi:
            def create_repo(self, repo_id, private=False, exist_ok=False):
                (hub_module.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
                return f"https://huggingface.co/{repo_id}"

            def upload_folder(self, repo_id, folder_path, commit_message=""):
                target = hub_module.root / repo_id
                for f in Path(folder_path).iterdir():
                    (target / f.name).write_bytes(f.read_bytes())

        self.HfApi = HfApi

    def snapshot_download(self, repo_id, revision=None, **kwargs):
        self.downloads.append((repo_id, revision))
        if not (self.root / repo_id).is_dir():
            raise FileNotFoundError(f"404 Client Error: Repository Not Found for url: {repo_id}")
        return str(self.root / repo_id)


def test_hub_push_and_from_pretrained_through_a_local_stand_in(cap, checkpoint, small_zoo, tmp_path, monkeypatch,
                                                               capsys):
    local = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "client", lambda: local)
    assert cli(["-q", "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model"),
                "--push", "alice/tiny-captioner"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["pushed"] == "https://huggingface.co/alice/tiny-captioner"
    assert sorted(p.name for p in (tmp_path / "hub" / "alice" / "tiny-captioner").iterdir()) == \
        ["README.md", "config.json", "model.safetensors", "vocab.json"]
    card = (tmp_path / "model" / "README.md").read_text()
    assert 'Captioner.from_pretrained("alice/tiny-captioner")' in card
    monkeypatch.chdir(tmp_path)  # "alice/tiny-captioner" is no local path here
    from_hub = Captioner.from_pretrained("alice/tiny-captioner", "cpu", revision="v1")
    assert local.downloads == [("alice/tiny-captioner", "v1")]
    path = small_zoo["photo.jpg"]
    assert from_hub.caption(path).text == cap.caption(path).text
    assert cli(["-q", "caption", "--checkpoint", "alice/tiny-captioner", str(path), "--out", "c.jsonl",
                "--workers", "0", "--device", "cpu"]) == 0
    assert json.loads(Path("c.jsonl").read_text().splitlines()[0])["caption"] == cap.caption(path).text
    with pytest.raises(CaptionerError, match="alice/other is not a file or folder here, and the Hugging Face Hub "
                                             "could not provide it"):
        Captioner.from_pretrained("alice/other")


def test_missing_hub_extra_is_one_line(tmp_path, monkeypatch, checkpoint, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as when it is not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CaptionerError, match=r'pip install "captioner\[hub\]"'):
        Captioner.from_pretrained("alice/tiny-captioner")
    assert cli(["export", "--checkpoint", str(checkpoint), "--out", "m", "--push", "alice/x"]) == 2
    assert 'pip install "captioner[hub]"' in capsys.readouterr().err
    assert hub.looks_like_repo_id("alice/x") and not hub.looks_like_repo_id("runs/x/best.pt")
    assert not hub.looks_like_repo_id("a/b/c") and not hub.looks_like_repo_id("../x")


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"captioner {captioner.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", captioner.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {captioner.__version__}" in changelog and "## 0.1.0" in changelog
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "captioner" / "py.typed").is_file()


def readme_python_api_block() -> str:
    """The first ```python block of README.md's "Python API" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(checkpoint, tmp_path, monkeypatch, capsys):
    code = readme_python_api_block()
    folder = tmp_path / "demo" / "run"
    folder.mkdir(parents=True)
    (folder / "best.pt").write_bytes(Path(checkpoint).read_bytes())
    photo_zoo(tmp_path / "zoo", max_side=200)["photo.jpg"].rename(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Caption(text=" in printed or printed.strip()


@pytest.mark.slow
def test_import_and_help_do_not_load_torch():
    code = ("import sys, captioner; from captioner.cli import build_parser; build_parser().format_help(); "
            "print('torch' in sys.modules, captioner.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.stdout.split() == ["False", captioner.__version__], out.stderr


@pytest.mark.slow
def test_real_hub_client_loads_a_repo_from_its_offline_cache(cap, checkpoint, small_zoo, tmp_path):
    """huggingface_hub itself (no stand-in) resolves owner/name through its cache, laid out here as a download
    leaves it; HF_HUB_OFFLINE=1 keeps it off the network. `captioner caption` runs in a fresh process."""
    pytest.importorskip("huggingface_hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--alice--tiny-captioner"
    export(ExportJob(str(checkpoint), str(repo / "snapshots" / commit)))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    photo = small_zoo["photo.jpg"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "captioner", "-q", "caption", "--checkpoint", "alice/tiny-captioner",
                          str(photo), "--out", str(tmp_path / "c.jsonl"), "--device", "cpu", "--workers", "0"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "c.jsonl").read_text())["caption"] == cap.caption(photo).text
    missing = subprocess.run([sys.executable, "-m", "captioner", "caption", "--checkpoint", "alice/other",
                              str(photo)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "alice/other is not a file or folder here, and the Hugging Face Hub could not provide it" in missing.stderr
