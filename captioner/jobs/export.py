"""Export a checkpoint as a model folder that any tool can read and captioner loads without pickle.

    captioner export --checkpoint runs/coco/best.pt --out model/
    captioner export --checkpoint runs/coco/best.pt --out model-bf16/ --dtype bf16 --metrics runs/coco/metrics_test.json
    captioner export --checkpoint runs/coco/best.pt --out model/ --push alice/captioner-coco     # the [hub] extra
    captioner export --checkpoint best.pt --out model-onnx/ --format onnx                     # + ONNX graphs
    captioner export --checkpoint best.pt --out model-int8/ --format onnx --quantize int8 --calibrate photos/
    captioner export --checkpoint best.pt --out deploy/ --format onnx --onnx-only            # no model.safetensors
    captioner caption --checkpoint model/ photos/          # caption, evaluate and serve take the folder as they take a .pt

The folder (engine/infer/model_folder.py): model.safetensors (every weight the model computes with, backbone
included; --dtype bf16 halves it for inference), config.json (format version, the files, encoder, model and
decode settings, vocabulary size, preprocessing), vocab.json and README.md, a model card with Hugging Face front
matter (engine/infer/model_card.py). It appears all at once (written beside it, then renamed). --checkpoint may
also be a model folder (to re-export it in bf16, say) or a Hub repo id.

--format onnx adds encoder.onnx, decoder_init.onnx, decoder_step.onnx and onnx.json (engine/infer/onnx_export.py)
to the same folder, which `--runtime onnxruntime` runs (the PyTorch runtime still reads model.safetensors).
--onnx-only leaves model.safetensors out: a deployment folder that onnxruntime alone runs (examples/onnx_caption.py,
no captioner or torch needed; `--runtime onnxruntime` in captioner).
--quantize int8 makes those graphs int8, the encoder calibrated on --calibration-images images (64) spread over
--calibrate DIR, or over the training split of the checkpoint's own dataset: the calibration method and the
convolutions kept in float are chosen by measurement on a held-out quarter of them (engine/infer/quantize/, up to
5 minutes); the recipe, every candidate's error and the final features' measured error go into quantization.json.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from captioner.engine.infer import hub
from captioner.engine.infer.checkpoint import load_checkpoint, model_from_checkpoint
from captioner.engine.infer.model_card import METRIC_NAMES, check_metrics, model_card
from captioner.engine.infer.model_folder import (CONFIG_FILE, DTYPES, is_model_folder, load_model_folder, model_hash,
                                                 read_folder_config, resolve_model, write_model_folder)
from captioner.config import require_min
from captioner.errors import CaptionerError
from captioner.files import check_writable, read_text
from captioner.io_paths import refuse_overlap

log = logging.getLogger("captioner")

# What --format adds to the folder: the weights are always model.safetensors; onnx adds the ONNX graphs and
# onnx.json, listed in config.json's `files` beside the others (_extra_writers).
FORMATS = ("safetensors", "onnx")
QUANTIZE = ("int8",)


@dataclass
class ExportJob:
    """`captioner export`'s options."""
    checkpoint: str  # a .pt written by `captioner train`, a model folder, or a Hub repo id
    out: str  # the model folder to write
    dtype: str = "float32"  # float32 | bf16 (weights stored in bfloat16: half the size, for inference)
    format: str = "safetensors"  # safetensors | onnx (FORMATS)
    metrics: str | None = None  # a metrics_SPLIT.json written by `captioner evaluate`, for the model card
    push: str | None = None  # also upload the folder to this Hugging Face Hub repo (owner/name)
    private: bool = False  # --push: create the repo private
    overwrite: bool = False  # replace an existing model folder at out
    quantize: str | None = None  # int8: --format onnx graphs quantized (static QDQ encoder, dynamic decoder)
    calibrate: str | None = None  # images to calibrate int8 on (a folder or a list); None: the training split
    calibration_images: int = 64  # how many of them
    feature_budget: float | None = None  # int8 encoder kept only if its features reach this cosine (None: 0.99)
    onnx_only: bool = False  # --format onnx: leave model.safetensors out (a deployment folder for onnxruntime)
    license: str = "unknown"  # the model card's licence (a Hub licence id such as mit or apache-2.0)

    def __post_init__(self):
        require_min(("--calibration-images", self.calibration_images, 1))
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise CaptionerError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if (self.quantize or self.calibrate) and self.format != "onnx":
            raise CaptionerError(f"--{'quantize' if self.quantize else 'calibrate'} applies to the ONNX graphs: add "
                                 f"--format onnx")
        if self.onnx_only and self.format != "onnx":
            raise CaptionerError("--onnx-only leaves the PyTorch weights out of an ONNX folder: add --format onnx")
        if self.calibrate and not self.quantize:
            raise CaptionerError("--calibrate applies to --quantize int8 (float32 graphs need no calibration)")
        if self.feature_budget is not None and not self.quantize:
            raise CaptionerError("--feature-budget applies to --quantize int8 (float32 graphs are float32's)")
        if self.feature_budget is not None and not 0 <= self.feature_budget <= 1:
            raise CaptionerError(f"--feature-budget is a cosine similarity from 0 to 1 (0: the int8 encoder whatever "
                                 f"it measures), got {self.feature_budget:g}")
        if self.format == "onnx":
            from captioner.engine.infer.onnx_export import require_onnx
            require_onnx("--format onnx")  # the missing extra in one line, before anything is loaded
        if self.dtype not in DTYPES:
            raise CaptionerError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.format not in FORMATS:
            raise CaptionerError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.push is not None and not hub.looks_like_repo_id(self.push):
            raise CaptionerError(f"--push {self.push!r} is not a Hub repo id: give owner/name "
                                 f"(e.g. alice/captioner-coco)")
        if not self.license.strip() or any(c.isspace() for c in self.license):
            raise CaptionerError(f"--license {self.license!r} must be one licence id without spaces (e.g. mit, "
                                 f"apache-2.0, cc-by-4.0, other), or unknown")
        if self.private and self.push is None:
            raise CaptionerError("--private applies to --push: give the repo to push to")


def read_metrics(path: str | Path, checkpoint: Path) -> dict:
    """A metrics file `captioner evaluate` wrote, checked to hold coco-caption scores; a warning when it names
    another checkpoint than the one exported."""
    try:
        metrics = json.loads(read_text(path, "metrics file", setting=""))
    except json.JSONDecodeError as e:
        raise CaptionerError(f"metrics file {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(metrics, dict) or not any(isinstance(metrics.get(k), (int, float)) for k in METRIC_NAMES):
        raise CaptionerError(f"metrics file {path} holds no caption scores ({', '.join(METRIC_NAMES)}): give the "
                             f"metrics_SPLIT.json that `captioner evaluate` wrote")
    check_metrics(metrics, f"metrics file {path}")
    scored = metrics.get("checkpoint")
    if isinstance(scored, str) and Path(scored).name != checkpoint.name and Path(scored).resolve() != checkpoint.resolve():
        log.warning("%s scored %s, not %s: the model card will show its numbers anyway", path, scored, checkpoint)
    return metrics


def _load(source: Path):
    """(model, vocab, cfg, provenance) from a checkpoint file or a model folder."""
    if is_model_folder(source):
        model, vocab, cfg = load_model_folder(source)
        return model, vocab, cfg, provenance(source)
    state = load_checkpoint(source)
    model, vocab, cfg = model_from_checkpoint(state, source)
    return model.eval(), vocab, cfg, provenance(source, state)


def provenance(source: Path, state: dict | None = None) -> dict:
    """Where a model folder's weights came from (config.json's `source`): a model folder's own record, or the
    checkpoint's name, hash and progress (state: the checkpoint already read; None reads it, memory-mapped)."""
    if is_model_folder(source):
        return read_folder_config(source).get("source", {})
    state = state if state is not None else load_checkpoint(source, mmap=True)
    return {"checkpoint": source.name, "sha256": model_hash(source, digits=64),
            "epoch": state.get("epoch"), "step": state.get("step"), "val_scores": state.get("val_scores")}


def check_out(out: Path, overwrite: bool, names: tuple[str, str] = ("--out", "--overwrite")) -> None:
    """Refuse an out folder that cannot be written, or that holds something and overwrite is off. names: how the
    caller's user spells the folder and the switch (Captioner.save_pretrained says folder and overwrite=True)."""
    check_writable(out, "model folder", folder=True)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a model folder" if (out / CONFIG_FILE).is_file() else "a non-empty folder"
        raise CaptionerError(f"{names[0]} {out} is {what} already; add {names[1]} to replace a model folder, or give "
                             f"another {names[0]}")


def write_export(out: Path, model, vocab, cfg, source: dict, *, dtype: str = "float32", metrics: dict | None = None,
                 push: str | None = None, overwrite: bool = False, extra_files: tuple = (),
                 weights: bool = True, license: str = "unknown", onnx_precision: str | None = None
                 ) -> dict[str, int]:
    """The model folder `captioner export` writes (Captioner.save_pretrained writes it through here too): weights,
    config.json, vocab.json and the model card (its scores from metrics, its usage naming push). Returns
    {file name: bytes}. weights=False leaves model.safetensors out (an ONNX-only folder)."""
    write_model_folder(out, model, vocab, cfg, dtype=dtype, source=source, overwrite=overwrite,
                       card=lambda meta: model_card(meta, metrics, push, license, onnx_precision),
                       extra_files=extra_files, weights=weights)
    return {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}


def _calibration_paths(job: ExportJob, cfg) -> tuple[list[str], str]:
    """job.calibration_images image files spread evenly over --calibrate, or over the dataset's train split, and
    where they come from in words without this machine's paths (quantization.json)."""
    from captioner.data.inputs import find_images
    if job.calibrate:
        if not Path(job.calibrate).exists():
            raise CaptionerError(f"--calibrate {job.calibrate} not found: give a folder (or .txt list) of images like "
                                 f"those the model will caption")
        paths = find_images([job.calibrate], recursive=True)
        where, source = job.calibrate, f"--calibrate {Path(job.calibrate).name}"
    else:
        from captioner.data.datasets import by_split, load_records
        try:
            paths = [r.path for r in by_split(load_records(cfg.dataset), "train")]
        except CaptionerError as e:
            raise CaptionerError(f"--quantize int8 calibrates on the model's training images, which cannot be read "
                                 f"here ({e}); give --calibrate DIR, a folder of images like those the model will "
                                 f"caption") from None
        where = f"the train split of {cfg.dataset.annotations or cfg.dataset.root}"
        source = f"the train split of the model's {cfg.dataset.format} dataset"
    if not paths:
        raise CaptionerError(f"no images to calibrate int8 on in {where}: give --calibrate DIR")
    step = max(len(paths) // job.calibration_images, 1)
    log.info("calibrating int8 on %d images of %s", min(len(paths), job.calibration_images), where)
    return paths[::step][: job.calibration_images], source


def _extra_writers(job: ExportJob, cfg, model) -> tuple:
    """The writers of --format's files beyond model.safetensors (write_model_folder's extra_files)."""
    if job.format != "onnx":
        return ()
    from captioner.engine.infer.onnx_export import calibration_images, write_onnx_files
    images = source = None
    if job.quantize:
        paths, source = _calibration_paths(job, cfg)
        images = calibration_images(paths, model.encoder.image_size, job.calibration_images)
    return (lambda folder, model, dtype: write_onnx_files(folder, model, job.quantize or "float32", images, source,
                                                          job.feature_budget),)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main(job: ExportJob) -> dict:
    """Write the model folder (and push it when asked).

    Returns {"out", "format", "dtype", "files": {name: bytes}, "bytes", "checkpoint", "checkpoint_bytes",
    "pushed": the repo URL or None}."""
    out = Path(job.out)
    image_folder = job.calibrate if job.calibrate and Path(job.calibrate).is_dir() else None  # else a list file
    refuse_overlap({"--out": out}, {"--checkpoint": Path(job.checkpoint).expanduser(), "--metrics": job.metrics,
                                    "--calibrate": None if image_folder else job.calibrate},
                   folders={"--calibrate": image_folder})
    check_out(out, job.overwrite)
    source = resolve_model(job.checkpoint)
    refuse_overlap({"--out": out}, {"--checkpoint": source})  # a Hub model's downloaded copy too
    if not source.exists():
        raise CaptionerError(f"checkpoint {source} not found")
    metrics = read_metrics(job.metrics, source) if job.metrics else None
    if metrics is None and (source.parent / "metrics_test.json").is_file():
        log.info("%s lies beside the checkpoint: add --metrics %s to put its scores in the model card",
                 source.parent / "metrics_test.json", source.parent / "metrics_test.json")
    model, vocab, cfg, made_from = _load(source)
    files = write_export(out, model, vocab, cfg, made_from, dtype=job.dtype, metrics=metrics, push=job.push,
                         overwrite=job.overwrite, extra_files=_extra_writers(job, cfg, model),
                         weights=not job.onnx_only, license=job.license,
                         onnx_precision=(job.quantize or "float32") if job.format == "onnx" else None)
    if job.push:
        log.info("pushing %s to the Hugging Face Hub as %s", out, job.push)
    pushed = hub.upload(out, job.push, job.private) if job.push else None
    return {"out": str(out), "format": job.format, "dtype": job.dtype, "quantize": job.quantize, "files": files,
            "bytes": sum(files.values()),
            "checkpoint": str(source), "checkpoint_bytes": _size(source), "pushed": pushed}


def summary_lines(result: dict) -> list[str]:
    """What `captioner export` prints above its JSON line."""
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    graphs = f", {result['quantize'] or 'float32'} ONNX graphs" if result["format"] == "onnx" else ""
    weights = "no PyTorch weights" if "model.safetensors" not in result["files"] else f"{result['dtype']} weights"
    lines = [f"exported {result['checkpoint']} ({mb(result['checkpoint_bytes'])}) -> {result['out']}/ "
             f"({mb(result['bytes'])}, {weights}{graphs})"]
    lines += [f"  {name:<20} {mb(size):>10}" for name, size in result["files"].items()]
    if result["pushed"]:
        lines.append(f"  pushed to {result['pushed']}")
    return lines
