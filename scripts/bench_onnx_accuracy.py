"""How close ONNX Runtime (float32 and int8) comes to PyTorch float32: features, captions, BLEU-4; printed as JSON.

    captioner demo --out demo                                             # a trained checkpoint
    python scripts/bench_onnx_accuracy.py --checkpoint demo/run/best.pt --photos ../shared/data/coco-mini/train2017
    python scripts/bench_onnx_accuracy.py --checkpoint demo/run/best.pt --photos DIR --resnet152 --threads 1

The checkpoint is exported twice (`captioner export --format onnx`, then with `--quantize int8`, calibrated on
its own training split) into --work. Then:
- features: the largest difference of the ORT encoder's features from PyTorch's on --photos (16 real photos),
  relative to the features' scale; with --resnet152 also for a random ResNet-152 layer4 encoder at 224 px.
- captions: `captioner evaluate` on the checkpoint's test split with each runtime, greedy and beam 3: BLEU-4 and
  CIDEr-D, and the fraction of images whose caption equals PyTorch's.
PyTorch runs float32 (compute.bf16=false compute.channels_last=false) and reads no feature cache (the demo's
is bfloat16): float32 is compared with float32 on any CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from captioner.config import EncoderConfig, ModelConfig  # noqa: E402
from captioner.engine.infer.onnx_export import GRAPHS, export_graphs  # noqa: E402
from captioner.engine.infer.onnx_runtime import EncoderSpec, OnnxBackend  # noqa: E402
from captioner.engine.infer.predictor import Predictor  # noqa: E402
from captioner.jobs.evaluate import EvaluateJob, main as evaluate  # noqa: E402
from captioner.jobs.export import ExportJob, main as export  # noqa: E402
from captioner.model.caption_model import CaptionModel  # noqa: E402

FLOAT32 = ["compute.bf16=false", "compute.channels_last=false", "cache.use=false"]
RUNS = {"torch_fp32": ("fp32", "torch"), "ort_fp32": ("fp32", "onnxruntime"), "ort_int8": ("int8", "onnxruntime")}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def photos(folder: str, count: int) -> list[str]:
    return [str(p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")][:count]


def feature_errors(folders: dict[str, Path], files: list[str]) -> dict:
    """{runtime: relative error of its features against PyTorch float32's} on the files."""
    torch_run = Predictor.load(folders["fp32"], "cpu", overrides=FLOAT32[:2])
    images = next(iter(torch_run.image_batches(files, len(files)))).inputs
    with torch.inference_mode():
        raw = torch_run.model.encode(images).float()
    return {f"ort_{precision}": round(relative(raw, Predictor.load(folder, "cpu", runtime="onnxruntime")
                                               .backend.encode(images)), 7)
            for precision, folder in folders.items()}


def resnet152_error(files: list[str], work: Path) -> float:
    """ORT float32 against PyTorch float32 features of a random ResNet-152 layer4 encoder at 224 px."""
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="resnet152", image_size=224), ModelConfig(32, 32, 48), 30).eval()
    export_graphs(model, work)
    backend = OnnxBackend({g: work / f"{g}.onnx" for g in GRAPHS}, EncoderSpec.of(model.encoder), 30)
    from captioner.data.pipeline import image_batches
    images = next(iter(image_batches(files, 224, len(files), 0, torch.device("cpu")))).inputs
    with torch.inference_mode():
        raw = model.encode(images).float()
    return round(relative(raw, backend.encode(images)), 7)


def captions(folders: dict[str, Path], work: Path, split: str) -> dict:
    """{beam: {runtime: {bleu4, cider, same_as_torch}}} from `captioner evaluate` with each runtime."""
    out = {}
    for beam in (1, 3):
        rows, results = {}, {}
        for name, (precision, runtime) in RUNS.items():
            metrics = evaluate(EvaluateJob(str(folders[precision]), split, beam, str(work / f"eval-{name}-b{beam}"),
                                           list(FLOAT32), "cpu", runtime=runtime))
            results[name] = {r["image_id"]: r["caption"] for r in json.loads(Path(metrics["results_file"]).read_text())}
            rows[name] = {"bleu4": round(metrics["bleu4"], 4), "cider": round(metrics["cider"], 4),
                          "images": len(results[name])}
        for name, row in rows.items():
            same = sum(results[name][i] == c for i, c in results["torch_fp32"].items())
            row["same_as_torch"] = round(same / len(results["torch_fp32"]), 4)
            row["bleu4_minus_torch"] = round(row["bleu4"] - rows["torch_fp32"]["bleu4"], 4)
        out["greedy" if beam == 1 else f"beam{beam}"] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint (demo/run/best.pt)")
    parser.add_argument("--photos", required=True, help="a folder of real photos for the feature check")
    parser.add_argument("--count", type=int, default=16, help="photos compared (default: 16)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--work", default=None, help="folder for the exports and evaluations (default: temporary)")
    parser.add_argument("--resnet152", action="store_true", help="also a random ResNet-152 encoder's features")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        folders = {"fp32": work / "model-fp32", "int8": work / "model-int8"}
        export(ExportJob(args.checkpoint, str(folders["fp32"]), format="onnx", overwrite=True))
        export(ExportJob(args.checkpoint, str(folders["int8"]), format="onnx", quantize="int8", overwrite=True))
        files = photos(args.photos, args.count)
        result = {"checkpoint": args.checkpoint, "threads": torch.get_num_threads(), "photos": len(files),
                  "feature_relative_error": feature_errors(folders, files)}
        if args.resnet152:
            result["feature_relative_error"]["resnet152_224_ort_fp32"] = resnet152_error(files, work / "resnet152")
        result["captions"] = captions(folders, work, args.split)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
