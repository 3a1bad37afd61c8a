"""ONNX export and the ONNX Runtime backend: the exported graphs compute what the PyTorch model computes, and
the one set of decoding loops runs over either backend."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from captioner.config import EncoderConfig, ModelConfig
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel
from captioner.model.decoding import SearchOptions, beam_search, decode, greedy_decode
from captioner.model.encoder import HookedEncoder
from captioner.model.truncated import TruncatedEncoder

pytest.importorskip("onnxruntime")

from captioner.cli import main as cli  # noqa: E402
from captioner.engine.runtime import compute  # noqa: E402
from captioner.engine.infer.onnx_export import GRAPHS, export_graphs, quantize_graphs  # noqa: E402
from captioner.engine.infer.onnx_runtime import EncoderSpec, OnnxBackend  # noqa: E402
from captioner.engine.infer.predictor import Predictor  # noqa: E402
from captioner.jobs.export import ExportJob, main as export  # noqa: E402

from helpers import COCO_MINI, noise_pngs, read_records, varied_checkpoint  # noqa: E402

PHOTOS = sorted((COCO_MINI / "train2017").glob("*.jpg"))[:16]


def _backend(folder, model, precision="float32"):
    return OnnxBackend({name: folder / f"{name}.onnx" for name in GRAPHS}, EncoderSpec.of(model.encoder),
                       model.decoder.vocab_size, precision=precision)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model, ORT backend) of a random ResNet-18 captioner at 64 px, exported once for the module."""
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(32, 32, 48, dropout=0.3), 40)
    folder = tmp_path_factory.mktemp("onnx")
    assert export_graphs(model.eval(), folder) == ["encoder.onnx", "decoder_init.onnx", "decoder_step.onnx"]
    return model, _backend(folder, model), folder


def test_truncated_encoder_equals_the_hooked_one_and_stops_at_the_layer():
    enc = HookedEncoder("resnet18", "layer3", image_size=64)
    cut = TruncatedEncoder(enc)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(enc(images), cut(images))
        assert torch.equal(enc(images.float() / 255), cut(images.float() / 255))
    # The graph ends at layer3: nothing of layer4, avgpool or fc is in it.
    assert not any(name.startswith(("layer4", "avgpool", "fc")) for name, _ in cut.trunk.named_modules() if name)
    assert len(enc.backbone.layer3._forward_hooks) == 1  # the hooked encoder keeps its hook


def test_ort_features_and_captions_equal_pytorch(small):
    model, backend, _ = small
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.encode(images)
    features = backend.encode(images)
    assert features.shape == raw.shape == (5, 512, 2, 2)
    assert _relative(raw, features) < 1e-4
    for run in (lambda m, r: greedy_decode(m, r, SearchOptions(max_len=12)),
                lambda m, r: beam_search(m, r, SearchOptions(beam_size=3, max_len=12, length_penalty=0.5))):
        torch_out, ort_out = run(model, raw), run(backend, features)
        assert torch.equal(torch_out.tokens, ort_out.tokens)
        assert torch.allclose(torch_out.scores, ort_out.scores, atol=1e-4)
        assert torch.allclose(torch_out.alphas, ort_out.alphas, atol=1e-5)
    sampled = decode(backend, features, SearchOptions(max_len=6, sample=True))  # sampling drives the same sessions
    assert sampled.tokens.shape[0] == 5 and (sampled.lengths >= 1).all()
    model.train()
    try:  # through the step interface, PyTorch decoding still runs in eval mode and gives the mode back
        twelve = SearchOptions(max_len=12)
        assert torch.equal(greedy_decode(model, raw, twelve).tokens, greedy_decode(backend, features, twelve).tokens)
        assert model.training
    finally:
        model.eval()


def test_ort_top_k_top_p_and_n_best_run_the_same_loops(small):
    """Top-k / top-p sampling and n-best returns are decode()'s, so ONNX Runtime has them too: top_k=1 draws
    PyTorch's greedy caption, the n best beams are PyTorch's, and a seeded top-p draw repeats."""
    model, backend, _ = small
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.encode(images)
    features = backend.encode(images)
    greedy = greedy_decode(model, raw, SearchOptions(max_len=10))
    for options in (SearchOptions(max_len=10, sample=True, top_k=1), SearchOptions(max_len=10, sample=True, top_p=1e-6)):
        assert torch.equal(decode(backend, features, options).tokens, greedy.tokens)
        assert torch.equal(decode(model, raw, options).tokens, greedy.tokens)
    nbest = SearchOptions(beam_size=4, max_len=10, num_return_sequences=3)
    torch_out, ort_out = decode(model, raw, nbest), decode(backend, features, nbest)
    assert ort_out.tokens.shape[0] == 12 and torch.equal(torch_out.tokens, ort_out.tokens)
    assert torch.allclose(torch_out.scores, ort_out.scores, atol=1e-4)
    nucleus = SearchOptions(max_len=10, sample=True, top_p=0.9, top_k=20, num_return_sequences=2)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(decode(backend, features, nucleus).tokens)
    assert torch.equal(draws[0], draws[1]) and draws[0].shape[0] == 8


def test_dynamic_batch_and_one_image_alone_equals_in_a_batch(small):
    model, backend, _ = small
    images = torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8)
    options = SearchOptions(beam_size=3, max_len=10)
    batched = beam_search(backend, backend.encode(images), options)
    alone = beam_search(backend, backend.encode(images[4:5]), options)
    n = int(alone.lengths[0])
    assert torch.equal(batched.tokens[4, :n], alone.tokens[0, :n])


def test_missing_extra_is_one_line(monkeypatch, small):
    from captioner.engine.infer import onnx_export
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    model, _, folder = small
    for attempt in (lambda: onnx_export.export_graphs(model, folder / "again"),
                    lambda: _backend(folder, model)):
        with pytest.raises(CaptionerError) as e:
            attempt()
        assert 'pip install "captioner[onnx]"' in str(e.value) and "\n" not in str(e.value)


def test_corrupt_graph_is_one_line(small, tmp_path):
    model, _, folder = small
    for name in GRAPHS:
        (tmp_path / f"{name}.onnx").write_bytes((folder / f"{name}.onnx").read_bytes())
    (tmp_path / "decoder_step.onnx").write_bytes(b"not a graph")
    with pytest.raises(CaptionerError, match="decoder_step.onnx: onnxruntime cannot load it"):
        _backend(tmp_path, model)
    (tmp_path / "decoder_step.onnx").unlink()
    with pytest.raises(CaptionerError, match="missing: decoder_step.onnx"):
        _backend(tmp_path, model)


@pytest.mark.slow
def test_int8_graphs_are_quantized_and_close(small, tmp_path):
    model, _, folder = small
    calibration = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    quantize_graphs(folder, tmp_path, calibration, budget=0.0)  # the int8 encoder whatever it measures
    import onnx
    ops = {name: {n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node} for name in GRAPHS}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops["encoder"]  # QDQ around the convolutions
    assert "MatMulInteger" in ops["decoder_step"] and "MatMulInteger" in ops["decoder_init"]
    int8 = _backend(tmp_path, model, "int8")
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.encode(images)
    assert _relative(raw, int8.encode(images)) < 0.2  # int8 of random weights: close, not equal
    out = beam_search(int8, int8.encode(images), SearchOptions(beam_size=3, max_len=8))
    assert torch.isfinite(out.scores).all() and (out.lengths >= 1).all()
    for i in range(4):  # each image's beam alone writes what it wrote in the batch: int8 ranges are per row
        alone = beam_search(int8, int8.encode(images[i:i + 1]), SearchOptions(beam_size=3, max_len=8))
        n = int(alone.lengths[0])  # the batch's tokens are padded to its longest caption
        assert torch.equal(alone.tokens[0, :n], out.tokens[i, :n]) and torch.equal(alone.scores[0], out.scores[i])
        assert int(out.lengths[i]) == n


@pytest.mark.slow  # an unreachable budget: the sensitivity pass tries every convolution (40 s)
def test_an_int8_encoder_under_the_budget_is_not_shipped(small, tmp_path, caplog):
    """The budget is a promise: an int8 encoder whose features miss it leaves the float32 encoder in the folder
    (byte for byte), the decoder int8, and the record, onnx.json's words and the card say so."""
    import onnx
    from captioner.engine.infer.model_card import _int8_section
    from captioner.engine.infer.onnx_export import _encoder_words
    _, _, folder = small
    quantize_graphs(folder, tmp_path, torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8), budget=1.0)
    assert (tmp_path / "encoder.onnx").read_bytes() == (folder / "encoder.onnx").read_bytes()
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(tmp_path / "decoder_step.onnx")).graph.node}
    record = json.loads((tmp_path / "quantization.json").read_text())
    encoder, error = record["encoder"], record["feature_error"]
    assert encoder["precision"] == "float32" and "under the budget 1" in encoder["kept_float32_because"]
    assert error["cosine_mean"] == 1.0 and error["budget_met"] and error["int8_tried"]["cosine_mean"] < 1.0
    assert "the encoder stays float32" in caplog.text and "--feature-budget" in caplog.text
    words = _encoder_words(encoder, 8)
    assert words.startswith("float32, not int8: its int8 version reached cosine")
    card = "\n".join(_int8_section({"quantization": {
        "encoder": words, "encoder_precision": "float32", "decoder": "dynamic int8", "calibration_images": 8,
        "calibration_source": "noise", "record": "quantization.json"}}, "m"))
    assert "- Encoder: float32, not int8" in card and "43.5%" not in card  # the int8 encoder's numbers do not apply


@pytest.mark.slow
def test_resnet152_shaped_encoder_round_trip(tmp_path):
    """The product's default encoder (ResNet-152 layer4, random weights) exports and equals PyTorch, at 96 px
    to keep it affordable (a 3x3 grid)."""
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="resnet152", image_size=96), ModelConfig(32, 32, 48), 30).eval()
    export_graphs(model, tmp_path)
    backend = _backend(tmp_path, model)
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.encode(images)
    features = backend.encode(images)
    assert features.shape == (2, 2048, 3, 3) and _relative(raw, features) < 1e-4
    eight = SearchOptions(max_len=8)
    assert torch.equal(greedy_decode(model, raw, eight).tokens, greedy_decode(backend, features, eight).tokens)


@pytest.mark.slow
def test_bench_runtimes_smoke_writes_the_three_rows(tmp_path, capsys):
    import json

    from captioner.cli import main
    out = tmp_path / "bench.json"
    # each arch hooks its own last stage (layer4 of ResNet-18, features of MobileNetV2)
    assert main(["bench", "--smoke", "--runtimes", "--device", "cpu", "--threads", "1", "--json", str(out),
                 "runtime_archs=resnet18,mobilenet_v2"]) == 0
    table = capsys.readouterr().out
    for arch in ("resnet18", "mobilenet_v2"):
        rows = json.loads(out.read_text())["runtimes"][arch]
        for name in ("torch_fp32", "ort_fp32", "ort_int8"):
            for key in ("caption_images_per_s", "encoder_images_per_s", "caption_speedup", "encoder_speedup"):
                assert rows[name][key] > 0
            assert name in table
        assert rows["torch_fp32"]["caption_speedup"] == 1.0
    assert "last stage at 64" in table
    # the baseline is float32 also where auto means bf16, and the header says so
    assert "torch_fp32 in float32" in table and not json.loads(out.read_text())["settings"]["bf16_active"]


def test_bench_runtimes_checks_every_arch_before_measuring_any(monkeypatch, capsys):
    from captioner.cli import main
    from captioner.jobs.bench import runtimes

    def measured(*args, **kwargs):
        raise AssertionError("exported before every arch was checked")
    monkeypatch.setattr(runtimes, "export_graphs", measured)
    assert main(["bench", "--smoke", "--runtimes", "--device", "cpu", "runtime_archs=resnet18,mobilenet_v2",
                 "layer=layer4"]) == 2
    assert "layer 'layer4' not in mobilenet_v2" in capsys.readouterr().err


# ---------------------------------------------------------------- model folders: export, --runtime onnxruntime


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    """(checkpoint, its model folder with float32 ONNX graphs) of an untrained model with varied captions."""
    checkpoint = varied_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")
    out = tmp_path_factory.mktemp("export") / "model"
    result = export(ExportJob(str(checkpoint), str(out), format="onnx"))
    assert {"encoder.onnx", "decoder_init.onnx", "decoder_step.onnx", "onnx.json", "model.safetensors"} <= \
        set(result["files"])
    return checkpoint, out


@pytest.mark.skipif(not PHOTOS, reason="needs ../shared/data/coco-mini")
def test_folder_round_trip_equal_captions_on_real_photos(onnx_folder, tmp_path, capsys, monkeypatch):
    checkpoint, folder = onnx_folder
    # float32 against float32: PyTorch's compute.bf16=auto turns bf16 on where the CPU has native bf16 units
    monkeypatch.setattr(compute, "cpu_capability", lambda: compute.CpuCapability("AVX2", False, False))
    meta = json.loads((folder / "config.json").read_text())
    assert meta["files"]["onnx_encoder"] == "encoder.onnx" and meta["files"]["onnx"] == "onnx.json"
    torch_run, ort_run = (Predictor.load(folder, "cpu", runtime=r) for r in ("torch", "onnxruntime"))
    assert torch_run.model is not None and ort_run.model is None and ort_run.runtime == "onnxruntime float32"
    assert ort_run.encoder.grid == torch_run.encoder.grid and ort_run.image_size == torch_run.image_size
    # ORT vs PyTorch features on 16 real photos, decoded by the one pipeline
    images = next(iter(torch_run.image_batches([str(p) for p in PHOTOS], 16))).inputs
    with torch.no_grad():
        raw = torch_run.model.encode(images)
    assert _relative(raw, ort_run.backend.encode(images)) < 1e-4
    assert [c.caption for c in torch_run.caption_batch(images)] == [c.caption for c in ort_run.caption_batch(images)]
    # the commands: caption with each runtime writes the same captions, under different model identities
    outs = {}
    for runtime in ("torch", "onnxruntime"):
        outs[runtime] = tmp_path / f"{runtime}.jsonl"
        assert cli(["caption", "--checkpoint", str(folder), *map(str, PHOTOS[:6]), "--out", str(outs[runtime]),
                    "--workers", "0", "--device", "cpu", "--runtime", runtime]) == 0
    torch_records, ort_records = (read_records(outs[r]) for r in ("torch", "onnxruntime"))
    assert [r["caption"] for r in torch_records] == [r["caption"] for r in ort_records]
    assert torch_records[0]["model"] != ort_records[0]["model"]  # one output never mixes the two runtimes
    from captioner import Captioner
    cap = Captioner.from_pretrained(folder, device="cpu", runtime="onnxruntime")
    assert [c.text for c in cap.caption([str(p) for p in PHOTOS[:6]])] == [r["caption"] for r in torch_records]


def test_runtime_refusals_are_one_line(onnx_folder, tmp_path, capsys):
    checkpoint, folder = onnx_folder
    plain = tmp_path / "plain"
    export(ExportJob(str(checkpoint), str(plain)))  # safetensors only
    old = tmp_path / "old"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((old / "onnx.json").read_text())
    (old / "onnx.json").write_text(json.dumps({**manifest, "format_version": 0}))
    cases = {str(checkpoint): "is not a folder: captioner export --checkpoint",
             str(plain): "holds no ONNX graphs",
             str(old): "holds ONNX graphs of format 0, older than the format 1 this captioner runs: export it again"}
    images = noise_pngs(tmp_path / "images", 1, 32)
    for source, words in cases.items():
        assert cli(["caption", "--checkpoint", source, str(images), "--runtime", "onnxruntime", "--device",
                    "cpu", "--out", str(tmp_path / "c.jsonl")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    with pytest.raises(CaptionerError, match="--quantize applies to the ONNX graphs: add --format onnx"):
        ExportJob(str(checkpoint), str(tmp_path / "x"), quantize="int8")
    with pytest.raises(CaptionerError, match="--calibrate applies to --quantize int8"):
        ExportJob(str(checkpoint), str(tmp_path / "x"), format="onnx", calibrate=str(tmp_path))


def test_serve_takes_compute_overrides_for_a_float32_baseline(onnx_folder, monkeypatch):
    """scripts/bench_serve.py --runtimes serves PyTorch with compute.bf16=false: on a CPU where auto means bf16,
    the server must run float32, or "ORT against PyTorch fp32" compares with bf16."""
    from captioner.cli import build_parser, build_job
    from captioner.jobs.serve import ServedModel
    _, folder = onnx_folder
    monkeypatch.setattr(compute, "cpu_capability", lambda: compute.CpuCapability("AVX512", True, False))
    _, job = build_job(build_parser().parse_args(["serve", "--checkpoint", str(folder), "compute.bf16=false"]))
    assert job.overrides == ["compute.bf16=false"]
    assert ServedModel(str(folder), "cpu").predictor.compute.bf16  # auto on a native-bf16 CPU
    assert not ServedModel(str(folder), "cpu", overrides=job.overrides).predictor.compute.bf16
    with pytest.raises(CaptionerError, match="compute"):
        ServedModel(str(folder), "cpu", overrides=["compute.nope=1"])
    with pytest.raises(CaptionerError, match="model and training settings are fixed"):
        build_job(build_parser().parse_args(["serve", "--checkpoint", str(folder), "model.embed_dim=8"]))


def test_onnx_runtime_says_what_runs_and_refuses_pytorch_switches(onnx_folder, tmp_path, monkeypatch, capsys, caplog):
    """On a CPU where auto means bf16, ONNX Runtime still runs the graphs as exported: the compute line, the API's
    dtype and the predictor's switches say so (they said bf16 autocast, channels_last), and asking for bf16 with
    ONNX Runtime is one line naming the key, from the CLI and the API."""
    from captioner import Captioner
    _, folder = onnx_folder
    monkeypatch.setattr(compute, "cpu_capability", lambda: compute.CpuCapability("AVX512", True, False))
    monkeypatch.setattr(compute, "_announced", set())
    with caplog.at_level("INFO", logger="captioner"):
        cap = Captioner.from_pretrained(str(folder), runtime="onnxruntime")
    assert "compute: ONNX Runtime runs the float32 graphs on CPUExecutionProvider" in caplog.text
    assert "bf16 autocast" not in caplog.text
    assert cap.dtype == torch.float32 and not cap.predictor.compute.bf16 and not cap.predictor.compute.channels_last
    assert Captioner.from_pretrained(str(folder)).dtype == torch.bfloat16  # PyTorch: auto is bf16 here
    with pytest.raises(CaptionerError, match=r"compute.bf16=true \(or dtype=bfloat16\) applies to the PyTorch"):
        Captioner.from_pretrained(str(folder), runtime="onnxruntime", dtype=torch.bfloat16)
    images = noise_pngs(tmp_path / "images", 1, 32)
    assert cli(["caption", "--checkpoint", str(folder), str(images), "--runtime", "onnxruntime", "--out",
                str(tmp_path / "c.jsonl"), "compute.channels_last=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "compute.channels_last=true" in err and "float32 graphs" in err and len(err.splitlines()) == 1


def test_export_onnx_without_the_extra_is_one_line(onnx_folder, tmp_path, monkeypatch, capsys):
    checkpoint, _ = onnx_folder
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert cli(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith('pip install "captioner[onnx]"') and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.skipif(not PHOTOS, reason="needs ../shared/data/coco-mini")
def test_int8_export_calibrated_on_a_folder(onnx_folder, tmp_path, capsys):
    checkpoint, _ = onnx_folder
    out = tmp_path / "int8"
    assert cli(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", "onnx", "--quantize",
                "int8", "--calibrate", str(PHOTOS[0].parent), "--calibration-images", "8"]) == 0
    manifest = json.loads((out / "onnx.json").read_text())
    assert manifest["precision"] == "int8" and manifest["quantization"]["calibration_images"] == 8
    record = json.loads((out / "quantization.json").read_text())
    calibration = record["calibration"]
    assert {k: calibration[k] for k in ("count", "source", "image_size", "fit_images", "held_out_images")} == {
        "count": 8, "source": f"--calibrate {PHOTOS[0].parent.name}",
        "image_size": [manifest["encoder"]["image_size"]] * 2, "fit_images": 6, "held_out_images": 2}
    encoder = record["encoder"]
    assert encoder["per_channel"] and set(encoder["excluded_nodes"]) == set(encoder["excluded_why"])
    assert encoder["sensitivity"]["nodes_ranked_by_feature_loss"] > 0  # measured at the features, not by rule
    assert set(encoder["calibration_candidates"]) == {"MinMax", "Percentile", "Percentile-99.99", "Entropy"}
    chosen = encoder["calibration_candidates"][encoder["calibration_method"]]["cosine_mean"]
    assert chosen == max(c["cosine_mean"] for c in encoder["calibration_candidates"].values())
    error = record["feature_error"]
    assert error["images"] == 2 and 0 < error["relative_error"] < 1 and 0.5 < error["cosine_mean"] <= 1
    assert error["cosine_mean"] >= chosen  # the sensitivity pass keeps only what brings it closer
    assert error["budget_met"] == (error["cosine_mean"] >= record["budget"]["min"])
    assert manifest["quantization"]["feature_cosine"] == error["cosine_mean"]
    # onnx.json's words agree with the record: the nodes in float and whether GPTQ rounded the weights.
    words = manifest["quantization"]["encoder"]
    assert f"Conv layers, {len(encoder['excluded_nodes']) or 'none'} kept in float" in words
    assert ("rounded by GPTQ" in words) == encoder["weight_rounding"]["applied"]
    assert encoder["weight_rounding"]["cosine_after"] > 0 and encoder["weight_rounding"]["rounded"] > 0
    assert json.loads((out / "config.json").read_text())["files"]["quantization"] == "quantization.json"
    int8 = Predictor.load(out, "cpu", runtime="onnxruntime")
    assert int8.runtime == "onnxruntime int8"
    records = int8.caption_batch(next(iter(int8.image_batches([str(p) for p in PHOTOS[:4]], 4))).inputs)
    assert all(r.caption for r in records)
