"""The model-handling half of the Python API (captioner/api_model.py), notebook style: load with a device and a
dtype, .to(), the nn.Module and its transform used by hand give caption()'s caption, save_pretrained ->
from_pretrained captions identically, push_to_hub through the local Hub stand-in, the @overload'ed signatures,
and one Captioner shared by threads."""
from __future__ import annotations

import re
import threading
import time
import typing

import pytest
import torch
from PIL import Image

from captioner import Caption, Captioner, CaptionerError
from captioner.api_model import ImageTransform, compute_for_dtype
from captioner.engine.infer import hub
from captioner.model.decoding import SearchOptions, decode
from captioner.model.encoder import HookedEncoder

from helpers import noise_pngs, varied_checkpoint
from test_api import LocalHub


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return varied_checkpoint(tmp_path_factory.mktemp("api-model") / "best.pt")


@pytest.fixture(scope="module")
def cap(checkpoint):
    return Captioner.from_pretrained(checkpoint, device="cpu", dtype=torch.float32, batch_size=3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return sorted(noise_pngs(tmp_path_factory.mktemp("photos"), 5, 48).iterdir())


def test_dtype_by_any_name_and_to_returns_self(checkpoint, cap, photos):
    assert cap.dtype == torch.float32 and not cap.predictor.settings.bf16
    for name in (torch.bfloat16, "bfloat16", "bf16", "BF16"):
        assert compute_for_dtype(name, None).bf16 == "true"
    for name in (torch.float32, "float32", "fp32"):
        assert compute_for_dtype(name, None).bf16 == "false"
    bf16 = Captioner.from_pretrained(checkpoint, "cpu", torch_dtype="bf16")  # transformers' name, an alias
    assert bf16.dtype == torch.bfloat16 and bf16.predictor.compute.bf16 and bf16.predictor.settings.bf16
    for bad in (torch.float16, "half", 3):
        with pytest.raises(CaptionerError, match="torch.bfloat16"):
            Captioner.from_pretrained(checkpoint, "cpu", dtype=bad)
    with pytest.raises(CaptionerError, match="disagree"):
        Captioner.from_pretrained(checkpoint, "cpu", dtype="bf16", torch_dtype=torch.float32)
    # .to() chains, switches precision both ways, moves devices; float32 again captions as before
    other = Captioner.from_pretrained(checkpoint, "cpu", dtype="float32", batch_size=3)
    before = [c.text for c in other.caption(photos)]
    assert other.to(torch.bfloat16) is other and other.dtype == torch.bfloat16
    bf16_texts = [c.text for c in other.caption(photos)]
    assert all(bf16_texts)
    assert other.to("cpu").to(torch.float32).dtype == torch.float32 and other.device == torch.device("cpu")
    assert [c.text for c in other.caption(photos)] == before
    assert next(other.model.parameters()).dtype == torch.float32  # bf16 is autocast: the weights stay float32


def test_transform_and_model_by_hand_give_captions_result(cap, photos):
    transform = cap.transform
    assert isinstance(transform, ImageTransform)
    model = cap.model
    assert isinstance(model, torch.nn.Module) and not model.training
    options = SearchOptions(beam_size=cap.predictor.settings.beam_size, max_len=cap.predictor.settings.max_len)
    for path in photos:
        x = transform(Image.open(path))  # a PIL image in, the model's input tensor out
        assert x.shape == (3, cap.image_size, cap.image_size) and x.dtype == torch.uint8
        assert torch.equal(x, transform(path))  # the same preprocessing whatever the input form
        with torch.inference_mode():
            raw = model.encode(x[None].to(cap.device))  # (1, 3, S, S) -> (1, C, H, W)
            out = decode(model, raw, options)
        assert cap.vocab.decode(out.tokens[0].tolist()) == cap.caption(path).text
    with pytest.raises(CaptionerError, match="image"):
        transform(b"not an image")


def test_save_pretrained_round_trip_captions_identically(checkpoint, photos, tmp_path):
    cap = Captioner.from_pretrained(checkpoint, "cpu", beam_size=1)  # its settings travel with the folder
    folder = cap.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "vocab.json"]
    again = Captioner.from_pretrained(folder, "cpu")
    assert again.predictor.settings.beam_size == 1
    assert [(c.text, round(c.score, 4)) for c in again.caption(photos)] == \
        [(c.text, round(c.score, 4)) for c in cap.caption(photos)]
    with pytest.raises(CaptionerError, match="overwrite=True"):
        cap.save_pretrained(folder)
    cap.save_pretrained(folder, overwrite=True, dtype=torch.bfloat16)  # stored in bf16: half the size
    assert '"dtype": "bfloat16"' in (folder / "config.json").read_text()
    with pytest.raises(CaptionerError, match="loaded from"):
        again.save_pretrained(folder, overwrite=True)


def test_push_to_hub_through_the_stand_in(cap, photos, tmp_path, monkeypatch):
    local = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "client", lambda: local)
    assert cap.push_to_hub("alice/pushed") == "https://huggingface.co/alice/pushed"
    repo = tmp_path / "hub" / "alice" / "pushed"
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "config.json", "model.safetensors", "vocab.json"]
    assert 'Captioner.from_pretrained("alice/pushed")' in (repo / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    # float32 as cap: on a CPU with native bf16, the default (auto) would run bf16
    assert [c.text for c in Captioner.from_pretrained("alice/pushed", "cpu", dtype="float32").caption(photos)] == \
        [c.text for c in cap.caption(photos)]
    with pytest.raises(CaptionerError, match="owner/name"):
        cap.push_to_hub("no-owner")


def test_caption_overloads_tell_one_from_many():
    returns = [o.__annotations__["return"] for o in typing.get_overloads(Captioner.caption)]
    assert returns == ["Caption", "Caption | list[Caption]", "list[Caption]"]
    assert "Thread safety" in Captioner.__doc__


def test_threads_sharing_one_captioner_get_the_serial_captions(checkpoint, tmp_path, monkeypatch):
    # The hooked encoder holds its capture on itself from the hook to forward's return: widened here (a sleep
    # lets other threads run), so that a Captioner without its lock would swap or lose captures.
    real_hook = HookedEncoder._hook

    def slow_hook(self, module, inputs, output):
        try:
            real_hook(self, module, inputs, output)
        finally:
            time.sleep(0.002)

    monkeypatch.setattr(HookedEncoder, "_hook", slow_hook)
    cap = Captioner.from_pretrained(checkpoint, "cpu", batch_size=2)
    paths = sorted(str(p) for p in noise_pngs(tmp_path / "noise", 6, 40).iterdir())
    serial = [c.text for c in cap.caption(paths)]
    assert len(set(serial)) > 1  # different images, different captions: a swap between threads would show
    results, failures = {}, []

    def work(i):
        try:
            order = paths[i % 2::2] + paths[(i + 1) % 2::2]  # each thread its own order and batches
            results[i] = dict(zip(order, (c.text for c in cap.caption(order))))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    for got in results.values():
        assert [got[p] for p in paths] == serial
    assert isinstance(cap.caption(paths[0]), Caption)


def test_readme_model_handling_example_runs(checkpoint, tmp_path, monkeypatch, capsys):
    from test_api import ROOT
    page = (ROOT / "docs/reference/python-api.md").read_text()  # the README's Python API section moved here
    code = re.findall(r"```python\n(.*?)```", page, re.S)[1]  # the second block: the model itself
    assert "save_pretrained" in code and "transform" in code
    (tmp_path / "demo" / "run").mkdir(parents=True)
    (tmp_path / "demo" / "run" / "best.pt").write_bytes(checkpoint.read_bytes())
    next(noise_pngs(tmp_path / "noise", 1, 48).iterdir()).rename(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/reference/python-api.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed and printed == Captioner.from_pretrained(checkpoint, "cpu").caption(tmp_path / "photo.jpg").text
    assert (tmp_path / "my-model" / "config.json").is_file()


def test_a_notebook_session_end_to_end(checkpoint, photos, tmp_path, monkeypatch):
    """Issue 34's notebook, in one session: load, per-call generation (beam 5, max_len 8, top-p 0.9 sampling, 3
    returned sequences), bf16, .transform + .model by hand, save_pretrained -> from_pretrained, push_to_hub."""
    cap = Captioner.from_pretrained(checkpoint, device="cpu", dtype="float32")
    beams = cap.caption(photos[0], beam_size=5, max_len=8, num_return_sequences=3)
    assert len(beams.sequences) == 3 and len({text for text, _ in beams.sequences}) == 3
    assert beams.sequences[0] == (beams.text, beams.score) and all(len(t.split()) <= 8 for t, _ in beams.sequences)
    scores = [score for _, score in beams.sequences]
    assert scores == sorted(scores, reverse=True)
    torch.manual_seed(0)
    drawn = cap.caption(photos, sample=True, top_p=0.9, num_return_sequences=3)
    torch.manual_seed(0)
    assert [c.sequences for c in cap.caption(photos, sample=True, top_p=0.9, num_return_sequences=3)] == \
        [c.sequences for c in drawn]  # seeded sampling repeats
    assert all(len(c.sequences) == 3 for c in drawn)
    assert cap.caption(photos[0]).text == cap.caption(photos[0], beam_size=cap.predictor.settings.beam_size).text
    bf16 = Captioner.from_pretrained(checkpoint, device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and all(c.text for c in bf16.caption(photos))
    options = SearchOptions(beam_size=cap.predictor.settings.beam_size, max_len=cap.predictor.settings.max_len)
    with torch.inference_mode():
        out = decode(cap.model, cap.model.encode(cap.transform(Image.open(photos[1]))[None]), options)
    assert cap.vocab.decode(out.tokens[0].tolist()) == cap.caption(photos[1]).text
    again = Captioner.from_pretrained(cap.save_pretrained(tmp_path / "mine"), device="cpu", dtype="float32")
    assert [c.text for c in again.caption(photos)] == [c.text for c in cap.caption(photos)]
    local = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "client", lambda: local)
    monkeypatch.chdir(tmp_path)
    cap.push_to_hub("alice/notebook")
    assert [c.text for c in Captioner.from_pretrained("alice/notebook", "cpu", dtype="float32").caption(photos)] == \
        [c.text for c in cap.caption(photos)]
