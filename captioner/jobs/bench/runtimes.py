"""`captioner bench --runtimes`: PyTorch float32 against ONNX Runtime float32 and int8, side by side.

For each arch of sizes.runtime_archs (default ResNet-152 and ResNet-18 at the preset's image size) one random
captioner is exported (onnx_export.py: float32, then int8 calibrated on the bench's own JPEGs), and the three
runtimes caption the same JPEG files end to end (decode, resize, encoder, beam search: what `captioner
caption` runs, through Predictor) and encode the same uint8 batches. The runtimes take turns within each
round, their order rotating from round to round, so a load that comes and goes on a shared machine falls on
all of them; each speedup is the median over rounds of that round's ratio to torch_fp32.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from captioner.config import Config, EncoderConfig, ModelConfig
from captioner.engine.infer.backend import TorchBackend
from captioner.engine.infer.onnx_export import GRAPHS, calibration_images, export_graphs, quantize_graphs
from captioner.engine.infer.onnx_runtime import EncoderSpec, OnnxBackend
from captioner.engine.infer.predict import DecodeSettings
from captioner.engine.infer.predictor import Predictor
from captioner.engine.runtime.compute import Compute
from captioner.jobs.bench.sizes import BenchSizes
from captioner.model.caption_model import CaptionModel, build_encoder, recorded_encoder_config
from captioner.text import SPECIALS, Vocabulary

log = logging.getLogger("captioner")

RUNTIMES = ("torch_fp32", "ort_fp32", "ort_int8")


def _encoders(sizes: BenchSizes) -> dict:
    """{arch: (its EncoderConfig, the random encoder)} for every arch of sizes.runtime_archs, all built before
    anything is measured: an unknown arch or a layer it lacks fails in seconds, not after the first arch's
    minutes of quantization."""
    built = {}
    for arch in [a.strip() for a in sizes.runtime_archs.split(",") if a.strip()]:
        cfg = EncoderConfig(arch=arch, layer=sizes.layer, image_size=sizes.image_size)
        encoder = build_encoder(cfg)
        built[arch] = (recorded_encoder_config(cfg, encoder), encoder)
    return built


def _predictors(sizes: BenchSizes, arch: str, built: tuple, workdir: Path, calibration: list[str]) -> dict:
    """{runtime: Predictor} of one random captioner on built (_encoders): PyTorch float32, its ONNX export, and
    that in int8."""
    encoder_cfg, encoder = built
    torch.manual_seed(0)
    vocab = Vocabulary(SPECIALS + [f"w{i}" for i in range(sizes.vocab_size - len(SPECIALS))])
    model = CaptionModel(encoder_cfg, ModelConfig(sizes.embed_dim, sizes.attention_dim, sizes.decoder_dim),
                         len(vocab), encoder=encoder).eval()
    fp32, int8 = workdir / f"{arch}-fp32", workdir / f"{arch}-int8"
    tick = time.perf_counter()
    export_graphs(model, fp32)
    exported = time.perf_counter() - tick
    quantize_graphs(fp32, int8, calibration_images(calibration, sizes.image_size, sizes.calibration_images))
    log.info("bench: %s exported in %.0fs, quantized in %.0fs", arch, exported, time.perf_counter() - tick - exported)
    spec, cpu = EncoderSpec.of(model.encoder), torch.device("cpu")
    backends = {"torch_fp32": TorchBackend(model),
                "ort_fp32": OnnxBackend({g: fp32 / f"{g}.onnx" for g in GRAPHS}, spec, len(vocab), cpu),
                "ort_int8": OnnxBackend({g: int8 / f"{g}.onnx" for g in GRAPHS}, spec, len(vocab), cpu,
                                        precision="int8")}
    fp32_compute = Compute(cpu, False, False, False, False, "float32")  # torch_fp32 is float32, whatever bf16 says
    settings = DecodeSettings(sizes.beam_size, sizes.max_len)
    return {name: Predictor(model if name == "torch_fp32" else None, vocab, Config(encoder=encoder_cfg), fp32_compute,
                            settings, f"bench {arch} {name}", backend)
            for name, backend in backends.items()}


def _caption_rate(predictor: Predictor, paths: list[str], batch: int, workers: int) -> float:
    """Images per second captioning the JPEG files end to end, as `captioner caption` does."""
    start = time.perf_counter()
    for _ in predictor.caption_batches(predictor.image_batches(paths, batch, workers)):
        pass
    return len(paths) / (time.perf_counter() - start)


def _encoder_rate(predictor: Predictor, batches: list[torch.Tensor]) -> float:
    """Images per second through the encoder alone, on uint8 batches already in memory."""
    start = time.perf_counter()
    with torch.inference_mode():
        for images in batches:
            predictor.backend.encode(images)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def measure_runtimes(sizes: BenchSizes, compute: Compute, workdir: Path, paths: list[str]) -> dict:
    """{arch: {runtime: {"caption_images_per_s", "encoder_images_per_s", "caption_speedup",
    "encoder_speedup"}}}: medians over sizes.runtime_rounds rounds, speedups against torch_fp32."""
    if compute.device.type != "cpu":
        log.warning("bench --runtimes compares CPU runtimes: CUDAExecutionProvider rows are not measured here")
    results = {}
    files = paths[: sizes.runtime_images]
    encoders = _encoders(sizes)
    for arch in list(encoders):
        predictors = _predictors(sizes, arch, encoders.pop(arch), workdir, paths)
        images = calibration_images(files, sizes.image_size, len(files)).split(sizes.runtime_batch)
        for p in predictors.values():  # warm-up: one batch each (ORT plans its memory on the first run)
            _caption_rate(p, files[: sizes.runtime_batch], sizes.runtime_batch, 0)
        rates = {name: {"caption": [], "encoder": []} for name in RUNTIMES}
        for round_ in range(sizes.runtime_rounds):
            order = RUNTIMES[round_ % 3:] + RUNTIMES[: round_ % 3]
            for name in order:
                rates[name]["encoder"].append(_encoder_rate(predictors[name], images))
                rates[name]["caption"].append(_caption_rate(predictors[name], files, sizes.runtime_batch,
                                                            sizes.num_workers))
            log.info("bench %s round %d: %s", arch, round_ + 1, ", ".join(
                f"{n} {rates[n]['caption'][-1]:.2f} img/s" for n in RUNTIMES))
        rows = {}
        for name in RUNTIMES:
            row = {}
            for what in ("caption", "encoder"):
                ratios = [r / t for r, t in zip(rates[name][what], rates["torch_fp32"][what])]
                row[f"{what}_images_per_s"] = round(statistics.median(rates[name][what]), 3)
                row[f"{what}_speedup"] = round(statistics.median(ratios), 3)
                row[f"{what}_rounds"] = [round(r, 3) for r in rates[name][what]]
            rows[name] = row
        # what the int8 row ran: an encoder under the feature budget stays float32 (onnx_export.quantize_graphs)
        record = json.loads((workdir / f"{arch}-int8" / "quantization.json").read_text(encoding="utf-8"))
        rows["ort_int8"]["encoder_precision"] = record["encoder"]["precision"]
        rows["ort_int8"]["int8_feature_cosine"] = record["feature_error"].get("int8_tried",
                                                                             record["feature_error"])["cosine_mean"]
        results[arch] = rows
        del predictors
    return results


def format_runtimes(results: dict, sizes: dict) -> list[str]:
    """The table's lines for the runtime comparison."""
    lines = [f"  runtimes: caption = JPEG files end to end, beam {sizes['beam_size']}, batch {sizes['runtime_batch']}, "
             f"{sizes['runtime_images']} images x {sizes['runtime_rounds']} rounds (medians; speedup vs torch_fp32)"]
    for arch, rows in results.items():
        for name, row in rows.items():
            encoder = (f"   (encoder {row['encoder_precision']}: int8 features cosine "
                       f"{row['int8_feature_cosine']:.4f})" if "encoder_precision" in row else "")
            lines.append(f"  {arch:<10} {name:<11} caption {row['caption_images_per_s']:>8.2f} images/s "
                         f"{row['caption_speedup']:>5.2f}x   encoder {row['encoder_images_per_s']:>8.2f} images/s "
                         f"{row['encoder_speedup']:>5.2f}x{encoder}")
    return lines
