"""Issue 21's "Done when": on the demo's 200 test images and a zoo of real-photo variants, the captions from
Captioner on paths, PIL images, arrays and tensors, from the exported folder, from `captioner caption` and from
`serve` are identical (the demo-style tiny model trained by conftest's `trained` fixture)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captioner import Captioner
from captioner.cli import main as cli
from captioner.data.datasets import by_split, load_records
from captioner.jobs.export import ExportJob, main as export

from helpers import in_memory_forms, photo_zoo, tiny_config

pytestmark = pytest.mark.slow  # trains (the session's tiny model), serves


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    """(the demo's 200 held-out test images: 2,000 synthetic images as `captioner demo` makes them, the photo zoo)."""
    root = tmp_path_factory.mktemp("demo-data")
    cfg = tiny_config(root, "dataset.synthetic_images=2000")
    test = [Path(r.path) for r in by_split(load_records(cfg.dataset), "test")]
    assert len(test) == 200
    return test, list(photo_zoo(tmp_path_factory.mktemp("zoo")).values())


def _texts(captions) -> list[str]:
    return [c.text for c in captions]


def test_same_captions_from_every_entry_point(trained, inputs, tmp_path):
    summary, _ = trained
    checkpoint = summary["best_checkpoint"]
    test, zoo = inputs
    paths = test + zoo
    cap = Captioner.from_pretrained(checkpoint, "cpu")
    reference = _texts(cap.caption(paths))
    assert len(set(reference[:200])) > 20 and len(set(reference[200:])) > 3  # captions that depend on the image

    # The same Captioner on each in-memory form. big.jpg is the one input decoded at reduced scale from its file,
    # which pixels already decoded cannot reproduce (tests/test_api.py shows how close they come): it is compared
    # as a path and as a lazily opened PIL image only.
    decoded = [p for p in paths if p.name != "big.jpg"]
    expected = {p: text for p, text in zip(paths, reference)}
    forms = {p: in_memory_forms(p) for p in decoded}
    from PIL import Image
    assert _texts(cap.caption([Image.open(p) for p in paths])) == reference
    for kind in ("pil_loaded", "array", "tensor", "tensor_float"):
        items = [forms[p][kind] if kind in forms[p] else forms[p]["array"] for p in decoded]  # 16-bit: arrays
        assert _texts(cap.caption(items)) == [expected[p] for p in decoded], kind

    # The exported folder, float32: the same captions; bf16 weights: nearly all of them.
    export(ExportJob(checkpoint, str(tmp_path / "model")))
    assert _texts(Captioner.from_pretrained(tmp_path / "model", "cpu").caption(paths)) == reference
    export(ExportJob(checkpoint, str(tmp_path / "model-bf16"), dtype="bf16"))
    bf16 = _texts(Captioner.from_pretrained(tmp_path / "model-bf16", "cpu").caption(paths))
    assert sum(a == b for a, b in zip(bf16, reference)) >= 0.9 * len(paths)

    # `captioner caption` on the checkpoint and on the folder (decoding in 2 worker processes).
    listing = tmp_path / "paths.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    for source in (checkpoint, str(tmp_path / "model")):
        out = tmp_path / f"captions-{Path(source).name}.jsonl"
        assert cli(["-q", "caption", "--checkpoint", source, str(listing), "--out", str(out), "--device", "cpu"]) == 0
        records = {r["file"]: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
        assert [records[str(p)] for p in paths] == reference, source

    # `captioner evaluate` on the folder: the checkpoint's dataset and scores. The folder names its dataset
    # without the path (config.json holds no path of this machine): the user says where it lies here.
    scores = []
    here = f"dataset.root={trained[1].dataset.root}"
    for source, where in ((checkpoint, []), (str(tmp_path / "model"), [here])):
        out = tmp_path / f"eval-{Path(source).name}"
        assert cli(["-q", "evaluate", "--checkpoint", source, "--out", str(out), "--device", "cpu", *where]) == 0
        scores.append(json.loads((out / "metrics_test.json").read_text()))
    assert scores[0]["cider"] == scores[1]["cider"] and scores[0]["split_images"] == scores[1]["split_images"]

    # `captioner serve` on the folder: the same files uploaded, batched across requests by the server.
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from captioner.jobs import serve
    app, _ = serve.build(serve.ServeJob(str(tmp_path / "model"), device="cpu", max_batch=16))
    served = []
    with TestClient(app) as client:
        for i in range(0, len(paths), 32):
            files = [("image", (p.name, p.read_bytes())) for p in paths[i:i + 32]]
            answer = client.post("/v1/caption", files=files)
            assert answer.status_code == 200, answer.text
            served += [r["caption"] for r in answer.json()["results"]]
    assert served == reference
    torch.set_num_threads(1)  # serve's setup may have changed it; the rest of the session keeps one thread
