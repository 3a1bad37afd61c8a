"""A CaptionModel as three ONNX graphs that a host loop drives, and their int8 versions.

    files = export_graphs(model, folder)                 # encoder.onnx, decoder_init.onnx, decoder_step.onnx
    quantize_graphs(folder, folder_int8, calibration)    # the same three in int8 (calibration: uint8 images)

- encoder.onnx: images (B, 3, S, S) uint8 -> features (B, C, H, W) float32, the hooked layer's grid, with the
  normalisation inside. Traced from model/truncated.py's TruncatedEncoder, which ends at the hooked layer
  (the hook's exception cannot be traced) and is checked against the hooked encoder before it is written.
- decoder_init.onnx: features (B, C, H, W) -> h, c (B, H), regions (B, N, D), projected (B, N, A): the
  projector, the initial LSTM state and the attention's per-region projection, computed once per image.
- decoder_step.onnx: tokens (B,) int64, h, c, regions, projected -> log_probs (B, V) float32, h, c, alpha (B, N).

The batch axis is dynamic everywhere (B images, or B * beam rows in the step). What stays on the host is
model/decoding.py's loops (greedy, beam, sampling: the same code as for PyTorch, over steps.py's interface)
and the image pipeline (decode, resize).

int8: the decoder graphs get dynamic quantization of their matrix products (weights int8, each activation row
quantized per call with its own range, so that a caption does not depend on its batch: quantize/rowwise.py); the
encoder gets static QDQ quantization of its convolutions (per-channel weights), with the calibration method and
the nodes kept in float chosen by measurement on real images (quantize/).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.errors import CaptionerError
from captioner.files import write_json
from captioner.model.truncated import TruncatedEncoder
from captioner.progress import quiet_library_logs

log = logging.getLogger("captioner")

OPSET = 17
GRAPHS = ("encoder", "decoder_init", "decoder_step")
ONNX_EXTRA = 'pip install "captioner[onnx]"'
# The graphs' interface (names, shapes, what is inside) as onnx.json records it; a folder whose graphs have
# another version is refused in one line (export it again).
ONNX_FORMAT_VERSION = 1
MANIFEST = "onnx.json"
QUANTIZATION_FILE = "quantization.json"  # int8 folders: the quantization settings used, machine-readable
# How the graphs were made and which axes vary, as onnx.json and config.json state them.
EXPORTER = {"name": "torch.onnx.export", "dynamo": False, "torch_version": torch.__version__,
            "note": "the TorchScript-based exporter; its deprecation and tracer warnings are silenced"}
PRECISIONS = ("float32", "int8")


def require_onnx(what: str = "ONNX export"):
    """(onnx, onnxruntime), or a one-line CaptionerError naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise CaptionerError(f"{what} needs the onnx and onnxruntime packages ({e.name} is missing): "
                             f"{ONNX_EXTRA}") from None
    return onnx, onnxruntime


class DecoderInit(nn.Module):
    """features (B, C, H, W) -> h, c (B, H), regions (B, N, D), projected (B, N, A)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features):
        return self.model.decoder.init_state(self.model.project(features))


class DecoderStep(nn.Module):
    """tokens (B,), h, c (B, H), regions (B, N, D), projected (B, N, A) -> log_probs (B, V), h, c, alpha (B, N)."""

    def __init__(self, model):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens, h, c, regions, projected):
        logits, (h, c, _, _), alpha = self.decoder.step(tokens, (h, c, regions, projected))
        return F.log_softmax(logits.float(), dim=-1), h, c, alpha


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    batch = {name: {0: "batch"} for name in inputs + outputs}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes are not news here
        warnings.simplefilter("ignore")
        # nn.MultiheadAttention (open_clip's towers) takes a fused fast path in eval mode that has no ONNX
        # symbolic (aten::_native_multi_head_attention); its plain path computes the same attention.
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=batch, opset_version=OPSET, do_constant_folding=True)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def check_truncated(model, truncated: TruncatedEncoder, images: torch.Tensor) -> float:
    """The largest difference between the hooked encoder and its truncated copy on images, relative to the
    features' scale; a CaptionerError above 1e-5 (the cut must compute exactly the hooked layer)."""
    with torch.no_grad():
        hooked, cut = model.encode(images).float(), truncated(images)
    if hooked.shape != cut.shape:
        raise CaptionerError(f"the truncated {model.encoder.arch} gives {tuple(cut.shape)}, the hooked encoder "
                             f"{tuple(hooked.shape)}: cannot export this encoder")
    error = float((hooked - cut).abs().max() / hooked.abs().max().clamp_min(1e-12))
    if error > 1e-5:
        raise CaptionerError(f"the truncated {model.encoder.arch} differs from the hooked encoder by {error:.2e} "
                             f"(relative): cannot export this encoder")
    return error


@torch.no_grad()
def export_graphs(model, folder: str | Path) -> list[str]:
    """model (a CaptionModel, on any device) -> folder/encoder.onnx, decoder_init.onnx, decoder_step.onnx in
    float32; returns the file names. The model is exported from a CPU float32 copy and left as it was."""
    require_onnx()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _cpu_copy(model)
    enc = model.encoder
    size = enc.image_size
    images = torch.randint(0, 256, (2, enc.in_channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    truncated = TruncatedEncoder(enc)
    check_truncated(model, truncated, images)
    _export(truncated, (images,), folder / "encoder.onnx", ["images"], ["features"])
    features = model.encode(images)  # (2, C, H, W)
    _export(DecoderInit(model), (features,), folder / "decoder_init.onnx", ["features"],
            ["h", "c", "regions", "projected"])
    h, c, regions, projected = model.decoder.init_state(model.project(features))
    tokens = torch.tensor([1, 1], dtype=torch.long)
    _export(DecoderStep(model), (tokens, h, c, regions, projected), folder / "decoder_step.onnx",
            ["tokens", "h", "c", "regions", "projected"], ["log_probs", "h_next", "c_next", "alpha"])
    return [f"{name}.onnx" for name in GRAPHS]


def _cpu_copy(model):
    """model on the CPU in float32 and eval mode: a copy when it lives elsewhere, else model itself in eval."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        import copy
        model = copy.deepcopy(model).to("cpu", torch.float32)
    return model.eval()


def calibration_images(paths: list[str], image_size: int, count: int) -> torch.Tensor:
    """(N, 3, S, S) uint8: the first count readable images of paths, decoded and resized by the one image
    pipeline (as captioning reads them); unreadable files are skipped with a warning."""
    from captioner.data.pipeline import image_batches
    kept, skipped = [], []
    for batch in image_batches(list(paths), image_size, 16, 0, torch.device("cpu")):
        good = batch.readable()
        skipped += [e for e in batch.errors if e]
        kept.append(batch.inputs[good])
        if sum(len(k) for k in kept) >= count:
            break
    for error in skipped[:3]:
        log.warning("calibration: skipped %s", error)
    images = torch.cat(kept)[:count] if kept else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    if len(images) == 0:
        raise CaptionerError(f"no readable calibration image among {len(paths)} files")
    return images


def quantize_graphs(source: str | Path, target: str | Path, calibration: torch.Tensor,
                    calibration_source: str | None = None, budget: float | None = None) -> list[str]:
    """source's float32 graphs -> target's int8 graphs: static QDQ for the encoder, its calibration method and
    the nodes it keeps in float chosen by measurement on calibration ((N, 3, S, S) uint8 images of the training
    data, from calibration_source; quantize/encoder.py), dynamic int8 for the decoder's matrix products, and
    target/quantization.json recording what was chosen and measured. An int8 encoder whose features miss budget
    (the mean cosine to float32's; None: FEATURE_BUDGET) is not shipped: target keeps the float32 encoder. Returns
    the graphs' file names."""
    require_onnx("int8 quantization")
    from captioner.engine.infer.quantize.encoder import FEATURE_BUDGET, quantize_encoder_measured
    from captioner.engine.infer.quantize.record import quantization_record
    from captioner.engine.infer.quantize.rowwise import quantize_dynamic_rowwise
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if calibration.dtype != torch.uint8 or calibration.dim() != 4 or len(calibration) == 0:
        raise CaptionerError(f"calibration images must be (N, C, S, S) uint8 with N >= 1, got "
                             f"{tuple(calibration.shape)} {calibration.dtype}")
    with tempfile.TemporaryDirectory(prefix="captioner-quantize-") as tmp, warnings.catch_warnings(), quiet_library_logs():
        warnings.simplefilter("ignore")
        budget = FEATURE_BUDGET if budget is None else budget
        plan = quantize_encoder_measured(source / "encoder.onnx", Path(tmp) / "encoder-int8.onnx", calibration,
                                         Path(tmp), budget=budget)
        # The budget is a promise, not a goal: an encoder that misses it stays float32, the decoder int8 (on the
        # benchmark its captions were float32's on ~88% of the photos; the int8 encoder changed ~40%).
        kept = plan.error["cosine_mean"] >= budget
        shutil.copyfile(Path(tmp) / "encoder-int8.onnx" if kept else source / "encoder.onnx", target / "encoder.onnx")
        if not kept:
            log.warning("int8: the encoder stays float32 (its int8 features reached cosine %.4f of float32's, under "
                        "the budget %g: %s); the decoder is int8. export --feature-budget %.2f would ship the int8 "
                        "encoder", plan.error["cosine_mean"], budget, plan.search.why_stopped,
                        math.floor(plan.error["cosine_mean"] * 100) / 100)
        for name in ("decoder_init", "decoder_step"):
            # Per-channel 7-bit weights (the VPMADDUBSW saturation, calibrate.py): measured on a real-photo
            # MobileNetV2 model (beam 3, 100 test photos), the int8 decoder with the float32 encoder writes the
            # float32 captions on 91% of the photos, CIDEr-D 0.3458 both; the int8 encoder is what loses accuracy.
            quantize_dynamic_rowwise(source / f"{name}.onnx", target / f"{name}.onnx")
    write_json(target / QUANTIZATION_FILE, quantization_record(plan, calibration, calibration_source, kept),
               "quantization record", indent=1)
    return [f"{name}.onnx" for name in GRAPHS]


def axes(image_size: int) -> dict:
    """The graphs' fixed and dynamic axes, in words and numbers (onnx.json, config.json, the model card)."""
    return {"dynamic": {"batch": "axis 0 of every input and output (B images, or B * beam rows in the step)"},
            "fixed": {"image_size": image_size, "note": f"the image size is fixed in the graph: encoder.onnx takes "
                      f"{image_size}x{image_size} images only (resize before), so the grid and N are fixed too"}}


def _encoder_words(encoder: dict, images: int) -> str:
    """quantization.json's encoder section in one phrase, for onnx.json and the card."""
    if encoder.get("precision") == "float32":
        return f"float32, not int8: {encoder['kept_float32_because']}"
    kept = len(encoder["excluded_nodes"]) or "none"
    gptq = ", rounded by GPTQ" if encoder["weight_rounding"].get("applied") else ""
    words = (f"static QDQ int8 of the Conv layers, {kept} kept in float by the sensitivity pass: per-channel "
             f"7-bit weights (reduce_range{gptq}), uint8 activations ({encoder['calibration_method']} ranges from "
             f"{images} calibration images, the method chosen by measurement)")
    linear = encoder.get("linear_layers") or {}
    if linear.get("applied"):
        int8 = linear["nodes"] - len(linear.get("in_float", []))
        return words + f", and {int8} of its {linear['nodes']} linear layers (MatMul/Gemm) dynamic int8"
    if linear.get("nodes"):
        return words + f"; its {linear['nodes']} linear layers (MatMul/Gemm) float32 (as int8 they missed the budget)"
    return words


def write_onnx_files(folder: str | Path, model, precision: str = "float32",
                     calibration: torch.Tensor | None = None, calibration_source: str | None = None,
                     feature_budget: float | None = None) -> tuple[dict[str, str], dict]:
    """The three graphs (float32, or int8 calibrated on calibration's (N, 3, S, S) uint8 images, with
    quantization.json) and onnx.json into folder; returns ({role: file name}, {"onnx": how they were made}) for
    the model folder's config.json (model_folder.ExtraWriter)."""
    if precision not in PRECISIONS:
        raise CaptionerError(f"--quantize must be one of {', '.join(p for p in PRECISIONS if p != 'float32')}, "
                             f"got {precision!r}")
    if precision == "int8" and calibration is None:
        raise CaptionerError("int8 quantization needs calibration images")
    folder = Path(folder)
    if precision == "float32":
        export_graphs(model, folder)
    else:
        with tempfile.TemporaryDirectory(prefix="captioner-onnx-") as tmp:
            export_graphs(model, tmp)
            quantize_graphs(tmp, folder, calibration, calibration_source, feature_budget)
        record = json.loads((folder / QUANTIZATION_FILE).read_text(encoding="utf-8"))
    enc = model.encoder
    # How the int8 graphs were made and how close they came, in short: onnx.json and config.json (the card) hold
    # it; quantization.json holds every choice and measurement.
    summary = None if precision == "float32" else {
        "encoder": _encoder_words(record["encoder"], len(calibration)),
        "encoder_precision": record["encoder"]["precision"],
        "feature_cosine": record["feature_error"]["cosine_mean"],
        "feature_budget": record["budget"]["min"], "budget_met": record["feature_error"]["budget_met"],
        "decoder": "dynamic int8 of MatMul/Gemm (per-channel 7-bit weights, each activation row quantized per call)",
        "calibration_images": len(calibration), "calibration_source": record["calibration"]["source"],
        "record": QUANTIZATION_FILE}
    manifest = {
        "format_version": ONNX_FORMAT_VERSION, "opset": OPSET, "exporter": EXPORTER, "precision": precision,
        "axes": axes(enc.image_size),
        "graphs": {name: f"{name}.onnx" for name in GRAPHS},
        "encoder": {"arch": enc.arch, "layer": enc.layer, "image_size": enc.image_size,
                    "in_channels": enc.in_channels, "channels": enc.channels, "grid": list(enc.grid),
                    "preprocess": {"mean": list(enc.preprocess.mean), "std": list(enc.preprocess.std),
                                   "interpolation": enc.interpolation}},
        "vocab_size": model.decoder.vocab_size,
        "interface": {
            "encoder": "images (B, in_channels, S, S) uint8 -> features (B, C, H, W) float32, normalisation inside",
            "decoder_init": "features (B, C, H, W) -> h (B, H), c (B, H), regions (B, N, D), projected (B, N, A)",
            "decoder_step": "tokens (B,) int64, h, c, regions, projected -> log_probs (B, V), h_next, c_next, "
                            "alpha (B, N)",
            "host": "greedy / beam / sampling loops (captioner.model.decoding) and image decoding + resize"},
        "quantization": summary,
    }
    write_json(folder / MANIFEST, manifest, "ONNX manifest", indent=1)
    files = {"onnx": MANIFEST, **{f"onnx_{name}": f"{name}.onnx" for name in GRAPHS}}
    if precision == "int8":
        files["quantization"] = QUANTIZATION_FILE
    described = {"opset": OPSET, "exporter": f"{EXPORTER['name']} (dynamo=False, torch {torch.__version__})",
                 "precision": precision, "axes": manifest["axes"], "quantization": summary}
    return files, {"onnx": described}
