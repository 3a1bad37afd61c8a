"""Does int8 keep the accuracy of ORT float32, model by model? Per checkpoint: CIDEr-D, distinct captions, speed.

    python scripts/bench_quality.py --stages xe --seeds 3          # real-photo MobileNetV2 checkpoints
    python scripts/bench_onnx_accuracy.py --checkpoint ~/.cache/captioner/quality/runs/default/seed0/xe/best.pt \
        --checkpoint ~/.cache/captioner/quality/runs/default/seed1/xe/best.pt --json onnx_accuracy.json
    python scripts/bench_onnx_accuracy.py --checkpoint demo/run/best.pt --photos DIR --resnet152   # + features

Each --checkpoint (repeatable) is exported twice (`captioner export --format onnx`, then with `--quantize int8`,
calibrated on its own TRAINING split only: the export's default) into --work, and `captioner evaluate --runtime
onnxruntime` scores both on the checkpoint's --split (default test) with the checkpoint's own decoding. Printed
per model: CIDEr-D and distinct captions per 100 photos for ORT fp32 and int8, int8's relative difference on each,
`pass` when both are within 3% (not on average: every model), and int8's captioning speed relative to ORT fp32
at one thread (the split's photos end to end, decode + resize + encoder + the checkpoint's search, --rounds
rounds in alternating order, median ratio), and what quantization.json measured (the int8 folder keeps the float32
encoder where the int8 one misses the export's --feature-budget: "encoder_precision"). Then all the models' photos
pooled (captions changed, the paired CIDEr-D difference with its interval: "pooled"), and one JSON document.

The noise floor beside it ("int8_against_itself", "pooled_int8_against_itself"): the same int8 folder evaluated
again with onnxruntime's graph optimizations off (the QDQ graphs run as written instead of fused integer kernels).
Every 8-bit rounding resolved differently cascades through the encoder, so two executions of one int8 model
change about as many captions against each other as int8 does against float32 (docs/quality.md).

With --error-scales S1,S2,... also the int8 encoder's error made smaller or larger ("error_scales",
"pooled_error_scales"): the features float32's plus S times int8's difference, the same photos' error in its own
direction (int8_error_scale.py), scored with float32's decoder graphs. It says how close int8 must come to
float32 for the 3% bar: S 0.5 is about one more bit of precision throughout, S 1 the int8 encoder itself.

With --photos also the ORT encoders' feature error against PyTorch float32 on those photos (and with --resnet152
a random ResNet-152 layer4 encoder's). PyTorch runs float32 (compute.bf16=false compute.channels_last=false).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from captioner.config import EncoderConfig, ModelConfig  # noqa: E402
from captioner.data.datasets import load_records  # noqa: E402
from captioner.data.records import by_split  # noqa: E402
from captioner.engine.infer.onnx_export import GRAPHS, export_graphs  # noqa: E402
from captioner.engine.infer.onnx_runtime import EncoderSpec, OnnxBackend  # noqa: E402
from captioner.engine.infer.predictor import Predictor  # noqa: E402
from captioner.jobs.evaluate import EvaluateJob, main as evaluate  # noqa: E402
from captioner.jobs.export import ExportJob, main as export  # noqa: E402
from captioner.model.caption_model import CaptionModel  # noqa: E402

FLOAT32 = ["compute.bf16=false", "compute.channels_last=false", "cache.use=false"]
TOLERANCE = 0.03  # int8 passes when CIDEr-D and distinct captions are each within 3% of ORT float32's
DATASET_PATHS = ("root", "annotations", "images", "splits", "train_list", "val_list", "test_list")


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


def dataset_overrides(checkpoint: str) -> tuple[list[str], list[str]]:
    """(dataset.* overrides that point a model folder at the checkpoint's own dataset, the split's image files
    is filled by split_files): a model folder keeps no path of the machine that trained it."""
    cfg = Predictor.load(checkpoint, "cpu").cfg.dataset
    return [f"dataset.{key}={getattr(cfg, key)}" for key in DATASET_PATHS if getattr(cfg, key)], cfg


def scores(folder: Path, split: str, overrides: list[str], out: Path, optimization: str | None = None) -> dict:
    """ORT evaluation of folder on split with the checkpoint's decoding, one thread (onnxruntime's graph
    optimizations at optimization, None: all): CIDEr-D, distinct/100."""
    metrics = evaluate(EvaluateJob(str(folder), split, None, str(out), FLOAT32 + overrides, "cpu",
                                   runtime="onnxruntime", ort_threads=1, ort_optimization=optimization))
    return {"cider": round(metrics["cider"], 4), "distinct_per_100": round(100 * metrics["distinct_fraction"], 1),
            "images": metrics["split_images"]}


def photo_cider(work: Path, records, runs: tuple[str, str] = ("fp32", "int8")) -> dict:
    """{"fp32" / "int8": {photo: (its caption, its CIDEr-D against its references)}} of one model's evaluations
    work/eval-RUN (RUN: runs, named "fp32" and "int8" in the result) on records' split."""
    from quality_stats import photo_scores
    captions = {p: {str(r["image_id"]): r["caption"]
                    for r in json.loads((work / f"eval-{run}" / f"results_{records[0].split}.json").read_text())}
                for p, run in zip(("fp32", "int8"), runs)}
    references = {str(r.image_id): r.captions for r in records if str(r.image_id) in captions["fp32"]}
    return {p: {k: (c[k], score) for k, score in photo_scores({k: c[k] for k in references}, references)["cider"]
                .items()} for p, c in captions.items()}


def paired(photos: dict[str, dict[str, tuple[str, float]]]) -> dict:
    """How far the int8 captions are from fp32's, photo by photo (photo_cider's, of one model or of several
    pooled): the share of photos whose caption changed, and int8's relative CIDEr-D difference with its 95%
    bootstrap interval over photos (scripts/quality_stats.py). A model can miss the 3% tolerance by chance
    when many captions change; the interval says how likely."""
    from quality_stats import paired_gain
    fp32, int8 = photos["fp32"], photos["int8"]
    changed = sum(fp32[k][0] != int8[k][0] for k in fp32)
    return {"photos": len(fp32), "captions_changed": round(changed / max(len(fp32), 1), 3),
            "cider_relative_difference": paired_gain([{k: v[1] for k, v in fp32.items()}],
                                                     [{k: v[1] for k, v in int8.items()}])}


def pooled(per_model: list[dict]) -> dict:
    """paired() over every model's photos together (photo keys made unique per model): what int8 does to the
    captions of all the split photos, where one model's 141 photos are too few to say."""
    return paired({p: {f"{i}:{k}": v for i, photos in enumerate(per_model) for k, v in photos[p].items()}
                   for p in ("fp32", "int8")})


def speed(folders: dict[str, Path], files: list[str], rounds: int, batch: int) -> dict:
    """{precision: photos/s} captioning files end to end at one thread, and int8's median ratio to fp32."""
    predictors = {p: Predictor.load(f, "cpu", runtime="onnxruntime", session_options={"intra_op_threads": 1})
                  for p, f in folders.items()}
    rates, ratios = {p: [] for p in predictors}, []
    for r in range(rounds):
        order = list(predictors) if r % 2 == 0 else list(reversed(predictors))  # a passing load falls on both
        this = {}
        for precision in order:
            predictor = predictors[precision]
            start = time.perf_counter()
            for images in predictor.image_batches(files, batch):
                predictor.caption_batch(images.inputs)
            this[precision] = len(files) / (time.perf_counter() - start)
            rates[precision].append(this[precision])
        ratios.append(this["int8"] / this["fp32"])
    return {**{f"{p}_photos_per_s": round(statistics.median(v), 2) for p, v in rates.items()},
            "int8_over_fp32": round(statistics.median(ratios), 3), "threads": 1, "photos": len(files),
            "rounds": rounds}


def relative_difference(fp32: dict, other: dict) -> dict:
    """scores() of another run against fp32's: the relative difference of CIDEr-D and of distinct/100."""
    return {key: round((other[key] - fp32[key]) / max(abs(fp32[key]), 1e-12), 4)
            for key in ("cider", "distinct_per_100")}


def error_scale_sweep(folders: dict[str, Path], work: Path, args, overrides: list[str], records, fp32: dict,
                      files: list[str]) -> tuple[dict, dict]:
    """At each of args.error_scales, the int8 encoder's error times the scale with float32's decoders
    (int8_error_scale.py): the features' cosine to float32's on files, the model scored as int8 is, pass at
    TOLERANCE, and paired against fp32. Returns ({scale: that}, {scale: photo_cider's photos, for pooling})."""
    from int8_error_scale import error_scaled_folder
    from captioner.engine.infer.onnx_export import calibration_images
    from captioner.engine.infer.quantize.measure import compare, run_encoder
    size = json.loads((folders["fp32"] / "onnx.json").read_text())["encoder"]["image_size"]
    images = calibration_images(files, size, len(files))
    reference = run_encoder(folders["fp32"] / "encoder.onnx", images)
    results, photos_by_scale = {}, {}
    for scale in args.error_scales:
        key, name = f"{scale:g}", f"scaled{scale:g}"
        folder = error_scaled_folder(folders["fp32"], folders["int8"], scale, work / f"model-{name}")
        run = scores(folder, args.split, overrides, work / f"eval-{name}")
        photos_by_scale[key] = photo_cider(work, records, ("fp32", name))
        diff = relative_difference(fp32, run)
        results[key] = {"feature_cosine": compare(reference, run_encoder(folder / "encoder.onnx", images))
                        ["cosine_mean"], "ort": run, "relative_difference": diff,
                        "pass": all(abs(d) <= TOLERANCE for d in diff.values()), "paired": paired(photos_by_scale[key])}
    return results, photos_by_scale


def one_model(checkpoint: str, work: Path, args) -> dict:
    folders = {"fp32": work / "model-fp32", "int8": work / "model-int8"}
    export(ExportJob(checkpoint, str(folders["fp32"]), format="onnx", overwrite=True))
    export(ExportJob(checkpoint, str(folders["int8"]), format="onnx", quantize="int8", overwrite=True,
                     feature_budget=args.feature_budget))
    overrides, dataset = dataset_overrides(checkpoint)
    result = {"checkpoint": checkpoint, "split": args.split}
    runs = {p: scores(f, args.split, overrides, work / f"eval-{p}") for p, f in folders.items()}
    result.update({f"ort_{p}": r for p, r in runs.items()})
    result["int8_relative_difference"] = diff = relative_difference(runs["fp32"], runs["int8"])
    result["pass"] = all(abs(d) <= TOLERANCE for d in diff.values())
    split_records = by_split(load_records(dataset), args.split)
    result["photos"] = photo_cider(work, split_records)  # main() pools, then drops
    result["paired"] = paired(result["photos"])
    # The noise floor: the same int8 graphs run as written (onnxruntime's optimizations off) against the usual
    # fused kernels. Every 8-bit rounding resolved differently cascades through the encoder, so this changes
    # about as many captions as int8 against float32 does (docs/quality.md, "int8 against itself").
    scores(folders["int8"], args.split, overrides, work / "eval-int8-unoptimized", "disable")
    result["photos_itself"] = photo_cider(work, split_records, ("int8", "int8-unoptimized"))
    result["int8_against_itself"] = paired(result["photos_itself"])
    files = [r.path for r in split_records][:args.speed_photos]
    if args.error_scales:
        result["error_scales"], result["photos_scaled"] = error_scale_sweep(folders, work, args, overrides,
                                                                            split_records, runs["fp32"], files)
    result["speed"] = speed(folders, files, args.rounds, args.batch)
    record = json.loads((folders["int8"] / "quantization.json").read_text())
    tried = record["feature_error"].get("int8_tried", record["feature_error"])  # the int8 encoder's, shipped or not
    result["quantization"] = {"encoder_precision": record["encoder"]["precision"],
                              "int8_feature_cosine": tried["cosine_mean"],
                              "calibration_method": record["encoder"]["calibration_method"],
                              "excluded_nodes": len(record["encoder"]["excluded_nodes"]),
                              "feature_cosine": record["feature_error"]["cosine_mean"],
                              "budget_met": record["feature_error"]["budget_met"],
                              "calibration": record["calibration"]["source"]}
    if args.photos:
        files = photos(args.photos, args.count)
        result["feature_relative_error"] = feature_errors(folders, files)
        if args.resnet152:
            result["feature_relative_error"]["resnet152_224_ort_fp32"] = resnet152_error(files, work / "resnet152")
    return result


def line(r: dict) -> str:
    f, q, d = r["ort_fp32"], r["ort_int8"], r["int8_relative_difference"]
    ci = r["paired"]["cider_relative_difference"]["ci95"]
    return (f"{r['checkpoint']}: CIDEr-D fp32 {f['cider']:.4f} int8 {q['cider']:.4f} ({100 * d['cider']:+.1f}%), "
            f"distinct/100 fp32 {f['distinct_per_100']:.1f} int8 {q['distinct_per_100']:.1f} "
            f"({100 * d['distinct_per_100']:+.1f}%), {'PASS' if r['pass'] else 'FAIL'} (within "
            f"{TOLERANCE:.0%} on both), int8 {r['speed']['int8_over_fp32']:.2f}x ORT fp32 at 1 thread, "
            f"{r['ort_fp32']['images']} photos, {100 * r['paired']['captions_changed']:.0f}% of captions changed, "
            f"CIDEr-D change 95% interval {[f'{100 * v:+.1f}%' for v in ci]}; int8 against itself (onnxruntime's "
            f"optimizations off): {100 * r['int8_against_itself']['captions_changed']:.0f}% changed, "
            f"CIDEr-D {100 * r['int8_against_itself']['cider_relative_difference']['mean']:+.1f}%")


def scales(text: str) -> list[float]:
    """--error-scales: comma-separated numbers >= 0."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.25,0.5,1, got {text!r}")
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected numbers >= 0 such as 0.25,0.5,1, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a trained checkpoint (repeatable: each is exported, scored and timed)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--work", default=None, help="folder for the exports and evaluations (default: temporary)")
    parser.add_argument("--rounds", type=int, default=3, help="speed rounds (default 3)")
    parser.add_argument("--speed-photos", type=int, default=32, help="split photos the speed is timed on (32)")
    parser.add_argument("--batch", type=int, default=8, help="captioning batch for the speed (default 8)")
    parser.add_argument("--photos", default=None, help="also: a folder of photos for the feature check")
    parser.add_argument("--count", type=int, default=16, help="photos compared in the feature check (16)")
    parser.add_argument("--resnet152", action="store_true", help="also a random ResNet-152 encoder's features")
    parser.add_argument("--error-scales", type=scales, default=[],
                        help="also: the int8 encoder's error scaled by each of these (e.g. 0.25,0.5,1) with float32's "
                             "decoders; how close int8 must come for the 3%% bar (docs/quality.md)")
    parser.add_argument("--feature-budget", type=float, default=None,
                        help="export's --feature-budget for the int8 folder (default: export's, 0.99; 0.98 ships "
                        "the recipe models' int8 encoders, which the default keeps float32)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the speeds are at one thread; so are exports and evaluations (a shared CPU)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, checkpoint in enumerate(args.checkpoint):
            work = Path(args.work or tmp) / f"model{i}"
            results.append(one_model(checkpoint, work, args))
            print(line(results[-1]), flush=True)
    together = pooled([r.pop("photos") for r in results])
    itself = pooled([r.pop("photos_itself") for r in results])
    summary = {"models": results, "all_pass": all(r["pass"] for r in results), "tolerance": TOLERANCE,
               "pooled": together, "pooled_int8_against_itself": itself}
    if args.error_scales:
        summary["pooled_error_scales"] = {s: pooled([r["photos_scaled"][s] for r in results])
                                          for s in results[0]["error_scales"]}
        for r in results:
            del r["photos_scaled"]
    ci = together["cider_relative_difference"]
    print(f"int8 within {TOLERANCE:.0%} of ORT fp32 on CIDEr-D and distinct captions: "
          f"{sum(r['pass'] for r in results)}/{len(results)} models; all {together['photos']} photos pooled: "
          f"{100 * together['captions_changed']:.1f}% of captions changed, CIDEr-D "
          f"{100 * ci['mean']:+.1f}% [{100 * ci['ci95'][0]:+.1f}, {100 * ci['ci95'][1]:+.1f}]; the noise floor, "
          f"int8 against itself with onnxruntime's optimizations off: {100 * itself['captions_changed']:.1f}% "
          f"changed, CIDEr-D {100 * itself['cider_relative_difference']['mean']:+.1f}%")
    for s, p in summary.get("pooled_error_scales", {}).items():
        ci = p["cider_relative_difference"]
        print(f"int8's encoder error x{s} (feature cosine "
              f"{statistics.mean(r['error_scales'][s]['feature_cosine'] for r in results):.4f}): "
              f"{sum(r['error_scales'][s]['pass'] for r in results)}/{len(results)} models within {TOLERANCE:.0%}; "
              f"pooled {100 * p['captions_changed']:.1f}% of captions changed, CIDEr-D {100 * ci['mean']:+.1f}% "
              f"[{100 * ci['ci95'][0]:+.1f}, {100 * ci['ci95'][1]:+.1f}]")
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
