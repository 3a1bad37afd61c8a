"""Deploying ONNX: every backbone family exports, a folder without the PyTorch weights (--onnx-only) runs, the
standalone examples/onnx_caption.py (numpy + onnxruntime + Pillow) writes captioner's captions, and the ONNX
Runtime providers and session options reach every command and the Python API."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.config import EncoderConfig, ModelConfig
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel
from captioner.model.decoding import SearchOptions, greedy_decode

pytest.importorskip("onnxruntime")

from captioner.cli import main as cli  # noqa: E402
from captioner.engine.infer.onnx_export import _encoder_words, export_graphs, quantize_graphs  # noqa: E402
from captioner.engine.infer.predictor import Predictor  # noqa: E402
from captioner.jobs.export import ExportJob  # noqa: E402

from helpers import COCO_MINI, noise_pngs, read_records, varied_checkpoint  # noqa: E402
from test_onnx import _backend, _relative  # noqa: E402 (one copy of the backend and error helpers)

PHOTOS = sorted((COCO_MINI / "train2017").glob("*.jpg"))[:3]


# ---------------------------------------------------------------- every backbone family exports


# Each 6-25 s on a shared CPU (int8 calibration included): slow; the fast subset's `small` fixture covers ResNet.
FAMILIES = [  # (arch, hooked layer, smallest image size that gives a grid of at least 2x2)
    pytest.param("resnet18", "layer4", 64, id="torchvision-resnet", marks=pytest.mark.slow),
    pytest.param("timm/convnext_atto", "stages.2", 32, id="timm-convnext", marks=pytest.mark.slow),
    pytest.param("timm/vit_tiny_patch16_224", "blocks.2", 32, id="timm-vit", marks=pytest.mark.slow),
    pytest.param("open_clip/ViT-B-32", "transformer.resblocks.1", 64, id="open_clip-vit", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch, layer, size", FAMILIES)
def test_every_backbone_family_exports_float32_and_int8(arch, layer, size, tmp_path):
    """Each family the product trains (random weights) exports; ORT float32 greedy captions equal PyTorch's,
    and its int8 graphs run and caption."""
    if arch.startswith(("timm/", "open_clip/")):
        pytest.importorskip(arch.split("/")[0])
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch=arch, layer=layer, image_size=size), ModelConfig(32, 32, 48), 30).eval()
    export_graphs(model, tmp_path / "fp32")
    backend = _backend(tmp_path / "fp32", model)
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = model.encode(images)
    features = backend.encode(images)
    assert features.shape == raw.shape and features.shape[2] * features.shape[3] >= 2
    assert _relative(raw, features) < 1e-4
    eight = SearchOptions(max_len=8)
    assert torch.equal(greedy_decode(model, raw, eight).tokens, greedy_decode(backend, features, eight).tokens)
    quantize_graphs(tmp_path / "fp32", tmp_path / "int8", torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8))
    # A ViT's linear layers (attention projections, MLPs) are int8 too, not only its patch convolution; the
    # CNNs here have none (convnext_atto writes its MLPs as 1x1 convolutions).
    encoder = json.loads((tmp_path / "int8" / "quantization.json").read_text())["encoder"]
    linear = encoder["linear_layers"]
    assert (linear["nodes"] > 0) == ("vit" in arch.lower()) and linear["applied"] == (linear["nodes"] > 0)
    words = _encoder_words(encoder, 4)  # onnx.json's and the card's phrase
    assert (f"and {linear['nodes']} of its {linear['nodes']} linear layers (MatMul/Gemm) dynamic int8" in words) == \
        linear["applied"]
    int8 = _backend(tmp_path / "int8", model, "int8")
    out = greedy_decode(int8, int8.encode(images), eight)
    assert (out.lengths >= 1).all() and torch.isfinite(out.scores).all()


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    """(checkpoint, its float32 ONNX model folder with model.safetensors) of an untrained model with varied
    captions."""
    checkpoint = varied_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")
    out = tmp_path_factory.mktemp("export") / "model"
    assert cli(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", "onnx"]) == 0
    return checkpoint, out


@pytest.fixture(scope="module")
def deploy_folder(onnx_folder, tmp_path_factory):
    """onnx_folder's checkpoint exported with --onnx-only (no model.safetensors)."""
    out = tmp_path_factory.mktemp("deploy") / "model"
    assert cli(["export", "--checkpoint", str(onnx_folder[0]), "--out", str(out), "--format", "onnx",
                "--onnx-only"]) == 0
    return out


def test_onnx_only_folder_runs_without_the_pytorch_weights(onnx_folder, deploy_folder, tmp_path):
    checkpoint, full = onnx_folder
    out = deploy_folder
    assert not (out / "model.safetensors").exists() and (out / "encoder.onnx").is_file()
    meta = json.loads((out / "config.json").read_text())
    assert "weights" not in meta["files"]
    # config.json, onnx.json and the card say how the graphs were made and that the image size is fixed
    manifest = json.loads((out / "onnx.json").read_text())
    assert meta["onnx"]["opset"] == manifest["opset"] == 17 and manifest["exporter"]["dynamo"] is False
    assert manifest["axes"]["fixed"]["image_size"] == meta["preprocessing"]["image_size"]
    card = (out / "README.md").read_text()
    assert "opset 17" in card and "dynamo=False" in card and "fixed in the graph" in card
    assert 'runtime="onnxruntime"' in card and "--runtime onnxruntime" in card and "model.safetensors" not in card
    ort_full, ort_deploy = (Predictor.load(f, "cpu", runtime="onnxruntime") for f in (full, out))
    images = torch.randint(0, 256, (3, 3, ort_full.image_size, ort_full.image_size), dtype=torch.uint8)
    assert [c.caption for c in ort_full.caption_batch(images)] == [c.caption for c in ort_deploy.caption_batch(images)]
    with pytest.raises(CaptionerError, match="ONNX graphs only.*--runtime onnxruntime"):
        Predictor.load(out, "cpu")
    with pytest.raises(CaptionerError, match="--onnx-only .* add --format onnx"):
        ExportJob(str(checkpoint), str(tmp_path / "x"), onnx_only=True)


# ---------------------------------------------------------------- examples/onnx_caption.py: numpy + onnxruntime only

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "onnx_caption.py"
# Run in a fresh interpreter where importing torch or captioner fails, as on a machine without them.
BLOCKED = ("import sys, runpy\n"
           "class Block:\n"
           "    def find_spec(self, name, path=None, target=None):\n"
           "        if name.split('.')[0] in ('torch', 'captioner'):\n"
           "            raise ImportError(f'{name} is blocked')\n"
           "sys.meta_path.insert(0, Block())\n")
RUN_EXAMPLE = "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"


def _demo_images(folder: Path) -> list[str]:
    """A few demo-like images: real photos when coco-mini is here; always noise PNGs of two sizes and colour
    blocks (which the varied model captions differently from each other, as noise it does not)."""
    noise = [str(p) for p in sorted(noise_pngs(folder / "small", 3, 80).glob("*.png"))
             + sorted(noise_pngs(folder / "large", 3, 160).glob("*.png"))]
    blocks = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)]):
        pixels = np.zeros((96, 96, 3), np.uint8)
        pixels[:] = colour
        pixels[20:60, 30:70] = 255 - np.array(colour, np.uint8)
        blocks.append(str(folder / f"block{i}.png"))
        Image.fromarray(pixels).save(blocks[-1])
    return [str(p) for p in PHOTOS[:3]] + noise + blocks


def _captioner_captions(folder, images, tmp_path, *options) -> list[str]:
    out = tmp_path / f"c{len(list(tmp_path.glob('c*.jsonl')))}.jsonl"
    assert cli(["caption", "--checkpoint", str(folder), *images, "--out", str(out), "--workers", "0", "--device",
                "cpu", "--runtime", "onnxruntime", *options]) == 0
    return [r["caption"] for r in read_records(out)]


def test_example_equals_captioner_in_process(deploy_folder, tmp_path):
    import runpy
    example = runpy.run_path(str(EXAMPLE))
    images = _demo_images(tmp_path / "images")
    model = example["Model"](str(deploy_folder), ["CPUExecutionProvider"])
    suppress_unk = model.config["decode"]["suppress_unk"]  # as captioner reads it from config.json
    pixels = np.stack([example["load_image"](p, model.image_size, model.interpolation) for p in images])
    greedy = example["caption"](model, pixels, 1, 12, 0.0, suppress_unk)
    assert greedy == _captioner_captions(deploy_folder, images, tmp_path, "--beam", "1")
    beam = example["caption"](model, pixels, 3, 12, 0.5, suppress_unk)
    assert beam == _captioner_captions(deploy_folder, images, tmp_path, "--beam", "3", "--length-penalty", "0.5")
    assert beam != greedy or len(set(beam)) > 1  # varied captions: the comparison says something


@pytest.mark.slow  # spawns an interpreter
def test_example_runs_with_torch_and_captioner_unimportable(deploy_folder, tmp_path):
    import subprocess
    images = _demo_images(tmp_path / "images")
    blocked = subprocess.run([sys.executable, "-c", BLOCKED + "import torch"], capture_output=True, text=True)
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr
    for options in (["--beam-size", "1"], ["--beam-size", "3", "--length-penalty", "0.5"]):
        run = subprocess.run([sys.executable, "-c", BLOCKED + RUN_EXAMPLE, str(EXAMPLE), str(deploy_folder), *images,
                              "--json", *options], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        got = [json.loads(line)["caption"] for line in run.stdout.splitlines()]
        beam = ["--beam", options[1]] + (["--length-penalty", "0.5"] if len(options) > 2 else [])
        assert got == _captioner_captions(deploy_folder, images, tmp_path, *beam)


def _run_example(capsys, *args) -> tuple[int, list[str], list[str]]:
    """examples/onnx_caption.py's main in this process: (exit status, stdout lines, stderr lines)."""
    import runpy
    status = runpy.run_path(str(EXAMPLE))["main"]([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def _bad_images(folder: Path) -> list[str]:
    """A truncated JPEG and an HTML page saved as .png."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    (folder / "page.png").write_text("<html><body>not an image</body></html>")
    return [str(folder / "broken.jpg"), str(folder / "page.png")]


def test_example_skips_an_unreadable_image_and_captions_the_others(deploy_folder, tmp_path, capsys):
    good = _demo_images(tmp_path / "good")[-3:]  # colour blocks: captioned differently from each other
    expected = _captioner_captions(deploy_folder, good, tmp_path, "--beam", "1")
    capsys.readouterr()
    broken, page = _bad_images(tmp_path / "bad")
    status, out, err = _run_example(capsys, deploy_folder, good[0], broken, good[1], page, good[2], "--beam-size", "1")
    assert status == 0  # as `captioner caption`: the run goes on, 1 only with --strict
    assert [line.split("\t") for line in out] == [[path, text] for path, text in zip(good, expected)]
    assert len(err) == 2 and broken in err[0] and page in err[1] and all("not an image" in line for line in err)
    status, out, err = _run_example(capsys, deploy_folder, *good, broken, "--strict", "--beam-size", "1")
    assert status == 1 and len(out) == 3 and len(err) == 1 and broken in err[0]


def test_example_expands_a_folder_to_its_images(deploy_folder, tmp_path, capsys):
    folder = noise_pngs(tmp_path / "photos", 3, 80)
    (folder / "notes.txt").write_text("not an image")
    (folder / "._img000.png").write_bytes(b"macOS resource fork")  # hidden: left out, as by captioner
    (folder / "sub.jpg").mkdir()  # a folder with an image extension: left out
    noise_pngs(folder / "sub", 1, 80)  # not recursive
    extra = noise_pngs(tmp_path / "extra", 1, 64) / "img000.png"
    status, out, err = _run_example(capsys, deploy_folder, folder, extra, "--json")
    files = [str(folder / f"img{i:03d}.png") for i in range(3)] + [str(extra)]
    assert status == 0 and err == [] and [json.loads(line)["image"] for line in out] == files
    by_file = _run_example(capsys, deploy_folder, *files, "--json")[1]
    assert out == by_file
    _bad_images(tmp_path / "bad")
    status, out, err = _run_example(capsys, deploy_folder, tmp_path / "bad")  # unreadable images only
    assert status == 0 and out == [] and len(err) == 2
    (tmp_path / "empty").mkdir()
    assert _run_example(capsys, deploy_folder, tmp_path / "empty")[0::2] == \
        (2, [f"error: no images in {tmp_path / 'empty'}"])


def test_example_batches_give_the_same_captions(deploy_folder, tmp_path, capsys):
    images = _demo_images(tmp_path / "images")[-5:]  # a noise PNG and four colour blocks
    for beam in ("1", "3"):
        whole = _run_example(capsys, deploy_folder, *images, "--beam-size", beam, "--batch-size", "16")
        pairs = _run_example(capsys, deploy_folder, *images, "--beam-size", beam, "--batch-size", "2")
        assert whole[0] == pairs[0] == 0 and len(whole[1]) == 5 and whole[1] == pairs[1]
    import runpy
    example = runpy.run_path(str(EXAMPLE))
    model = example["Model"](str(deploy_folder))
    sizes = [len(pixels) for _, pixels in example["batches"](model, images + _bad_images(tmp_path / "bad"), 2)]
    assert sizes == [2, 2, 1]  # the last batch: one image and two unreadable ones; one batch in memory at a time
    with pytest.raises(SystemExit):
        example["main"]([str(deploy_folder), images[0], "--batch-size", "0"])
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_example_refuses_a_bad_model_folder_in_one_line(onnx_folder, deploy_folder, tmp_path, capsys):
    import shutil
    image = str(noise_pngs(tmp_path / "images", 1, 64) / "img000.png")
    plain = tmp_path / "plain"  # `captioner export` without --format onnx: model.safetensors, config.json
    assert cli(["export", "--checkpoint", str(onnx_folder[0]), "--out", str(plain)]) == 0
    capsys.readouterr()
    swapped, vocab, runtime = (tmp_path / name for name in ("swapped", "vocab", "runtime"))
    for folder in (swapped, vocab, runtime):
        shutil.copytree(deploy_folder, folder)
    shutil.copy(deploy_folder / "decoder_init.onnx", swapped / "decoder_step.onnx")
    for folder in (vocab, runtime):  # as a decoder_step.onnx from a model with another vocabulary
        tokens = json.loads((folder / "vocab.json").read_text())["tokens"]
        (folder / "vocab.json").write_text(json.dumps({"tokens": tokens + ["extra", "words"]}))
    no_onnx_json = tmp_path / "no_onnx_json"
    shutil.copytree(deploy_folder, no_onnx_json)
    (no_onnx_json / "onnx.json").unlink()
    expected = {plain: f"{plain} has no onnx.json: export it with `captioner export --format onnx`",
                no_onnx_json: f"{no_onnx_json} has no onnx.json: export it with `captioner export --format onnx`",
                tmp_path / "missing": "no such model folder",
                tmp_path / "images": "has no config.json: not a model folder",
                swapped: "decoder_step.onnx's inputs are features, not tokens, h, c, regions, projected",
                vocab: "decoder_step.onnx's log_probs has dims [None, "}
    for folder, words in expected.items():
        status, out, err = _run_example(capsys, folder, image)
        assert status == 2 and out == [] and len(err) == 1 and str(folder) in err[0] and words in err[0], err
    assert _run_example(capsys, deploy_folder, tmp_path / "nope.png")[0::2] == \
        (2, [f"error: {tmp_path / 'nope.png'}: no such file or folder"])
    # a mismatch the load check misses is still one line at run time
    import runpy
    example = runpy.run_path(str(EXAMPLE))
    example["Model"].check = lambda self: None
    assert example["main"]([str(runtime), image, "--beam-size", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{runtime}: the graphs fail at run time" in err[0]


@pytest.mark.slow  # spawns an interpreter
def test_example_bad_input_is_one_line_without_a_traceback(onnx_folder, deploy_folder, tmp_path):
    import subprocess
    image = str(noise_pngs(tmp_path / "images", 1, 64) / "img000.png")
    broken = _bad_images(tmp_path / "bad")[0]
    plain = tmp_path / "plain"
    assert cli(["export", "--checkpoint", str(onnx_folder[0]), "--out", str(plain)]) == 0
    for args, status, lines in (([plain, image], 2, 1), ([deploy_folder, image, broken, tmp_path / "images"], 0, 1)):
        run = subprocess.run([sys.executable, "-c", BLOCKED + RUN_EXAMPLE, str(EXAMPLE), *map(str, args)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == status and len(run.stderr.splitlines()) == lines, run.stderr
        assert "Traceback" not in run.stderr and str(args[0] if status else broken) in run.stderr


# ---------------------------------------------------------------- providers and session options


def test_providers_and_session_options_on_caption_evaluate_serve_and_the_api(deploy_folder, tmp_path, capsys):
    from captioner import Captioner
    from captioner.cli import build_job, build_parser
    images = sorted(str(p) for p in noise_pngs(tmp_path / "images", 2, 48).glob("*.png"))
    default = _captioner_captions(deploy_folder, images, tmp_path)
    tuned = _captioner_captions(deploy_folder, images, tmp_path, "--providers", "CPUExecutionProvider",
                                "--ort-threads", "1", "--ort-optimization", "basic")
    assert tuned == default
    cap = Captioner.from_pretrained(deploy_folder, device="cpu", runtime="onnxruntime",
                                    providers=["CPUExecutionProvider"],
                                    session_options={"intra_op_threads": 1, "graph_optimization": "disable"})
    assert cap.predictor.backend.providers == ["CPUExecutionProvider"]
    assert [c.text for c in cap.caption(images)] == default
    for command in ("evaluate", "serve"):
        args = ["--checkpoint", str(deploy_folder), "--runtime", "onnxruntime", "--providers",
                "CPUExecutionProvider", "--ort-threads", "2", "--ort-optimization", "extended"]
        _, job = build_job(build_parser().parse_args([command, *args]))
        assert (job.providers, job.ort_threads, job.ort_optimization) == (["CPUExecutionProvider"], 2, "extended")
    from captioner.jobs.serve import ServedModel
    served = ServedModel(str(deploy_folder), "cpu", runtime="onnxruntime", providers=["CPUExecutionProvider"],
                         session_options={"intra_op_threads": 1})
    assert served.predictor.backend.providers == ["CPUExecutionProvider"]
    # refusals: one line each, the available providers listed
    assert cli(["caption", "--checkpoint", str(deploy_folder), *images, "--runtime", "onnxruntime", "--device", "cpu",
                "--providers", "NoSuchExecutionProvider", "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'NoSuchExecutionProvider' is not available here" in err and "CPUExecutionProvider" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(CaptionerError, match="session option 'threads' is not supported; valid: intra_op_threads"):
        Predictor.load(deploy_folder, "cpu", runtime="onnxruntime", session_options={"threads": 1})
    with pytest.raises(CaptionerError, match="must be an integer >= 1"):
        Predictor.load(deploy_folder, "cpu", runtime="onnxruntime", session_options={"intra_op_threads": 0})
    with pytest.raises(CaptionerError, match="apply to --runtime onnxruntime"):
        Predictor.load(deploy_folder, "cpu", providers=["CPUExecutionProvider"])  # before any weights are read
