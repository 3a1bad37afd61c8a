"""Score a COCO-format results file against reference captions, with coco-caption's metrics.

    captioner score --results runs/coco/results_test.json --annotations data/coco/annotations/captions_val2014.json
    captioner score --results results.json --annotations data/prepared/captions_test.json --out metrics.json

RESULTS is [{"image_id": 391895, "caption": "a man riding a bike"}, ...], one caption per image (what
`captioner evaluate` writes). ANNOTATIONS is a COCO captions file, read with pycocotools exactly as
coco-caption reads it; a Karpathy split file, Flickr token file, CSV or JSONL (the dataset readers' formats)
works too. Only the images in the results are scored, as in coco-caption's own example
(cocoEval.params['image_id'] = cocoRes.getImgIds()), so scoring the 5,000 Karpathy-test results against the
whole captions_val2014.json is right. The numbers equal COCOEvalCap.evaluate's on the same files (SPICE aside).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from captioner.config import DatasetConfig
from captioner.data.datasets import detect_format, read_dataset
from captioner.data.coco import coco_index
from captioner.data.records import read_json
from captioner.errors import CaptionerError
from captioner.files import check_writable, write_json
from captioner.io_paths import refuse_overlap
from captioner.metrics.coco import caption_metrics

log = logging.getLogger("captioner")


def _first(items, n: int = 5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")


def read_results(path: str | Path) -> dict:
    """{image_id: caption} from a COCO results file; duplicates and malformed entries are errors naming them."""
    path = Path(path)
    results = read_json(path, "results file")
    if not isinstance(results, list) or not results:
        raise CaptionerError(f"results file {path} must be a non-empty JSON list of "
                             f'{{"image_id": ..., "caption": ...}} objects')
    captions, seen_twice = {}, []
    for i, entry in enumerate(results):
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise CaptionerError(f"results file {path}: entry {i} is not {{\"image_id\": ..., \"caption\": \"...\"}}: "
                                 f"{json.dumps(entry)[:100]}")
        image_id = entry["image_id"]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise CaptionerError(f"results file {path}: entry {i} has image_id {image_id!r}; "
                                 f"image ids are integers, as in the annotations file")
        if image_id in captions:
            seen_twice.append(image_id)
        captions[image_id] = entry["caption"]
    if seen_twice:
        raise CaptionerError(f"results file {path}: {len(set(seen_twice))} image ids appear more than once "
                             f"(first: {_first(dict.fromkeys(seen_twice))}); a results file holds one caption "
                             f"per image")
    empty = [i for i, c in captions.items() if not c.strip()]
    if empty:
        log.warning("results file %s: %d empty captions (image ids %s) are scored as empty (zero for those images)",
                    path, len(empty), _first(empty))
    return captions


def read_references(path: str | Path) -> tuple[str, dict]:
    """(format, {image_id: [captions]}) from a COCO captions file (captions exactly as pycocotools indexes
    them, which is what coco-caption scores against) or any format the dataset readers know."""
    path = Path(path)
    try:
        fmt, data = detect_format(path)
    except CaptionerError as e:  # score has no dataset.format to set: say what --annotations takes
        if "set dataset.format" not in str(e):
            raise
        raise CaptionerError(f"--annotations {path}: not a captions file score can read (COCO captions JSON, "
                             f"a Karpathy split, Flickr8k tokens, CSV or JSONL of image,caption rows)") from None
    if fmt == "coco":
        coco = coco_index(data, path)
        return fmt, {image_id: [a["caption"] for a in coco.imgToAnns.get(image_id, [])] for image_id in coco.imgs}
    _, records = read_dataset(DatasetConfig(format=fmt, annotations=str(path), root="."))
    return fmt, {r.image_id: r.captions for r in records}


@dataclass
class ScoreJob:
    """`captioner score`'s options."""
    results: str  # [{"image_id", "caption"}] JSON
    annotations: str  # the references: a COCO captions file or any captions file the dataset readers know
    out: str | None = None  # also write the metrics JSON here
    meteor: bool = True  # METEOR starts a java process (~10 s)


def main(job: ScoreJob) -> dict:
    """Score results against annotations; returns (and writes to out, if given) the metrics dict."""
    results, annotations, out = job.results, job.annotations, job.out
    if out:
        refuse_overlap({"--out": out}, {"--results": results, "--annotations": annotations})
        check_writable(out, "metrics file")  # before scoring, which may take minutes
    hypotheses = read_results(results)
    fmt, references = read_references(annotations)
    unknown = [i for i in hypotheses if i not in references]
    if unknown:
        raise CaptionerError(f"results file {results}: {len(unknown)} of {len(hypotheses)} image ids are not in "
                             f"annotations file {annotations} (first: {_first(unknown)}); score against the "
                             f"captions file of the split the results come from")
    uncaptioned = [i for i in hypotheses if not references[i]]
    if uncaptioned:
        raise CaptionerError(f"annotations file {annotations}: {len(uncaptioned)} images of the results have no "
                             f"reference captions (first: {_first(uncaptioned)})")
    if len(hypotheses) < len(references):
        log.info("scoring the %d images in %s (of %d in %s)", len(hypotheses), results, len(references), annotations)
    metrics = {"results_file": str(results), "annotations_file": str(annotations), "annotations_format": fmt,
               **caption_metrics(hypotheses, references, job.meteor)}
    if out:
        out_path = Path(out)
        write_json(out_path, metrics, "metrics file", indent=1)
        metrics["metrics_file"] = str(out_path)
    return metrics


def summary_lines(metrics: dict) -> list[str]:
    """Human-readable lines: coco-caption's metrics, then nltk's BLEU, then what was skipped."""
    names = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
             "rouge_l": "ROUGE-L", "cider": "CIDEr-D"}
    lines = [f"{metrics['images']} images, coco-caption metrics ({metrics['tokenizer']}):"]
    lines += [f"  {label:<8} {metrics[key]:.4f}" if metrics[key] is not None else f"  {label:<8} skipped"
              for key, label in names.items()]
    lines.append("  nltk corpus BLEU-1..4 (captioner tokenizer): "
                 + " ".join(f"{metrics[f'nltk_bleu{n}']:.4f}" for n in range(1, 5)))
    lines += [f"  {name.upper()} skipped: {why}" for name, why in metrics["skipped"].items()]
    return lines
