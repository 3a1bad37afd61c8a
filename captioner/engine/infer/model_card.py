"""A model folder's README.md: a model card with Hugging Face YAML front matter, written from the folder's
config.json content and, when given, the metrics file `captioner evaluate` wrote.

    text = model_card(meta, metrics=check_metrics(scores, "metrics_test.json"), license="apache-2.0",
                      onnx_precision="int8")

The card states only what the folder knows: the backbone's library, name and weights, the preprocessing and the
weights' dtype are config.json's own values (the encoder's record), the runtime and precision those of the files
in the folder. Metrics are shown only when they were measured on the model the folder holds (float32 weights
run by PyTorch); for bf16 weights or int8 graphs the card says where they were measured instead. The licence is
--license ("unknown" unless given), with the backbone weights' own licence where their library records it
(timm's pretrained_cfg). No path of the exporting machine: config.json's are names already.
Built on huggingface_hub's ModelCard / ModelCardData when the [hub] extra is installed, plain YAML otherwise:
the same inputs give the same text.
"""
from __future__ import annotations

import math

import yaml

from captioner.errors import CaptionerError

METRIC_NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                "rouge_l": "ROUGE-L", "cider": "CIDEr-D", "spice": "SPICE"}
_HUB_METRIC_TYPES = {"bleu1": "bleu", "bleu2": "bleu", "bleu3": "bleu", "bleu4": "bleu", "meteor": "meteor",
                     "rouge_l": "rouge", "cider": "cider", "spice": "spice"}
# coco-caption's scales: CIDEr-D is 10x a mean cosine similarity, every other score lies in 0..1
# The int8 decoder with the float32 encoder on the real-photo benchmark (docs/quality.md, "int8 decoder only")
DECODER_ONLY_MEASURED = ("12.5% of the captions changed (with the int8 encoder too: 44.5%) while CIDEr-D moved "
                         "+0.1% (95% interval -1.5% to +1.8%), each of the 5 models within 1.4%")
_METRIC_RANGES = {k: (0.0, 10.0 if k == "cider" else 1.0) for k in METRIC_NAMES}


def check_metrics(metrics: dict, where: str) -> dict:
    """metrics, its caption scores checked: each a finite number in its range, or null (skipped). Anything else
    (NaN, true, 42 for BLEU) is one CaptionerError naming the key: a card must not publish a broken number."""
    for key, (low, high) in _METRIC_RANGES.items():
        value = metrics.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise CaptionerError(f"{where}: {key} is {value!r}: must be a finite number in {low:g}..{high:g} "
                                 f"(or null when not computed)")
    return metrics


def _scores(metrics: dict | None) -> dict[str, float]:
    return {k: float(metrics[k]) for k in METRIC_NAMES if metrics and metrics.get(k) is not None}


def weights_origin(arch: str, weights: str | None) -> dict:
    """What the backbone's library records about its pretrained weights tag: {"license", "base_model"} (the Hub
    repo they come from), each only where recorded. Random weights and local files: {}."""
    prefix, slash, name = arch.partition("/")
    if not weights or not slash or "." in weights or "/" in weights:  # torchvision records neither; a file name
        return {}
    try:
        if prefix == "timm":
            import timm
            cfg = timm.models.get_pretrained_cfg(f"{name}.{weights}")
            cfg = cfg.to_dict() if cfg is not None else {}
            return {k: v for k, v in {"license": cfg.get("license"), "base_model": cfg.get("hf_hub_id")}.items() if v}
        if prefix == "open_clip":
            import open_clip
            hub_id = (open_clip.get_pretrained_cfg(name, weights) or {}).get("hf_hub", "").strip("/")
            return {"base_model": hub_id} if hub_id else {}
    except (ImportError, RuntimeError, KeyError, ValueError):  # extra not installed, tag unknown: nothing recorded
        pass
    return {}


def _onnx_only(meta: dict, text: str) -> str:
    """text for a folder without PyTorch weights (export --onnx-only), else ""."""
    return text if "weights" not in meta["files"] else ""


def _runtime(meta: dict, onnx_precision: str | None) -> str:
    if "weights" not in meta["files"]:
        return f"ONNX Runtime runs the {onnx_precision} graphs (`--runtime onnxruntime`); no PyTorch weights."
    torch_line = f"PyTorch runs `{meta['files']['weights']}` ({meta['dtype']} weights)"
    if onnx_precision is None:
        return torch_line + "."
    return (f"ONNX Runtime runs the {onnx_precision} graphs (`{meta['files'].get('onnx', 'onnx.json')}` lists them; "
            f"`--runtime onnxruntime`); {torch_line} (the default runtime).")


def _measured_here(meta: dict, metrics: dict | None, onnx_precision: str | None) -> bool:
    """Whether the metrics describe this folder's model: the float32 weights PyTorch runs, without int8 graphs
    that a user of this folder would run instead."""
    return (bool(_scores(metrics)) and meta["dtype"] == "float32" and onnx_precision != "int8"
            and "weights" in meta["files"]
            and metrics.get("runtime", "torch") == "torch")


def _front_matter(meta: dict, metrics: dict | None, name: str, license: str, origin: dict, shown: bool) -> str:
    arch, dataset = meta["architecture"], meta["config"]["dataset"]
    front = {"license": license, "library_name": "captioner", "pipeline_tag": "image-to-text",
             "tags": ["image-captioning", "show-attend-and-tell", arch["library"], arch["encoder"], "safetensors"]
             + (["onnx"] if "onnx" in meta["files"] else [])}
    if origin.get("base_model"):
        front["base_model"] = origin["base_model"]
    scores = _scores(metrics) if shown else {}
    split = (metrics or {}).get("split", "test")
    results = [{"task_type": "image-to-text", "task_name": "Image captioning", "dataset_type": dataset["format"],
                "dataset_name": f"{dataset['format']} ({split} split)", "dataset_split": split,
                "metric_type": _HUB_METRIC_TYPES[k], "metric_name": METRIC_NAMES[k], "metric_value": round(v, 4)}
               for k, v in scores.items()]
    try:
        from huggingface_hub import EvalResult, ModelCardData
    except ImportError:
        if results:
            front["model-index"] = [{"name": name, "results": [{
                "task": {"type": "image-to-text", "name": "Image captioning"},
                "dataset": {"name": results[0]["dataset_name"], "type": dataset["format"], "split": split},
                "metrics": [{"type": r["metric_type"], "value": r["metric_value"], "name": r["metric_name"]}
                            for r in results]}]}]
        return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"
    data = ModelCardData(**front, model_name=name if results else None,
                         eval_results=[EvalResult(**r) for r in results] or None)
    return "---\n" + data.to_yaml() + "\n---\n"


def _dataset_words(config: dict) -> str:
    d = config["dataset"]
    if d["format"] == "synthetic" or (d["format"] == "auto" and not d["annotations"]):
        return f"captioner's synthetic shapes ({d['synthetic_images']} generated images, seed {d['synthetic_seed']})"
    named = d["annotations"] or d["root"]  # a name: config.json holds no paths
    return f"a {d['format'] if d['format'] != 'auto' else ''} captions dataset (`{named}`)".replace("a  ", "a ")


def _metrics_section(meta: dict, metrics: dict | None, onnx_precision: str | None, shown: bool) -> list[str]:
    scores = _scores(metrics)
    if not scores:
        return ["No test metrics were given to `captioner export` (`--metrics metrics_test.json`, written by "
                "`captioner evaluate`): measure this model on your own data before relying on it."]
    if not shown:
        measured = "the float32 PyTorch model this folder was exported from"
        if metrics.get("runtime", "torch") != "torch":
            measured = f"the {metrics['runtime']} runtime of another export"
        here = f"{onnx_precision} ONNX graphs" if onnx_precision == "int8" else f"{meta['dtype']} weights"
        return [f"The metrics given to `captioner export` were measured on {measured}, not on this folder's "
                f"{here}, so none are shown. Measure this folder with `captioner evaluate --checkpoint "
                f"path/to/this/folder" + (" --runtime onnxruntime" if onnx_precision else "") + "`."]
    images = metrics.get("split_images") or metrics.get("images")
    beam = metrics.get("beam_size")
    lines = [f"Measured on this folder's float32 weights with PyTorch: the {metrics.get('split', 'test')} split "
             f"({images} images), {'greedy decoding' if beam == 1 else f'beam search (beam {beam})'}, scored by "
             f"{metrics.get('scorer', 'coco-caption')} (scale 0-1, CIDEr-D 0-10)"
             + ("; the ONNX graphs were not measured" if onnx_precision else "") + ":", "",
             "| " + " | ".join(METRIC_NAMES[k] for k in scores) + " |",
             "|" + "---|" * len(scores),
             "| " + " | ".join(f"{v:.3f}" for v in scores.values()) + " |"]
    skipped = metrics.get("skipped") or {}
    if skipped:
        lines += ["", "Not computed: " + "; ".join(f"{METRIC_NAMES.get(k, k)} ({why})" for k, why in skipped.items())
                  + "."]
    return lines


def _int8_section(onnx: dict | None, load_from: str) -> list[str]:
    """What a user of int8 graphs should know: how they were made and how close they measured (config.json's
    onnx.quantization, written by the export), and that their captions are not float32's."""
    q = (onnx or {}).get("quantization") or {}
    lines = ["## int8 quantization", ""]
    compare = (f"Compare on your own photos: `captioner evaluate --checkpoint {load_from} --runtime onnxruntime` "
               f"beside the float32 export.")
    float_encoder = q.get("encoder_precision") == "float32"  # its int8 version missed the budget: decoder int8 only
    if q:
        measured = (" The folder keeps the float32 encoder (`captioner export --feature-budget` sets the budget; "
                    "below it int8 captions differ from float32's on many photos)." if float_encoder else
                    f" Its features measured cosine {q['feature_cosine']:.4f} to float32's on held-out calibration "
                    f"images ({'meeting' if q['budget_met'] else 'under'} the budget {q['feature_budget']:g}).")
        lines += [f"- Encoder: {q['encoder']}.{measured}",
                  f"- Decoder: {q['decoder']}.",
                  f"- Calibrated on {q['calibration_images']} images from {q['calibration_source'] or 'the export'}; "
                  f"`{q['record']}` holds every choice and measurement."]
    if float_encoder:
        return lines + ["- With the float32 encoder, the int8 decoder's captions are float32's on most photos. On "
                        "captioner's real-photo benchmark (MobileNetV2 models, 705 Flickr8k photos) "
                        + DECODER_ONLY_MEASURED + ". " + compare, ""]
    return lines + [
        ("- " if q else "") + "int8 captions are not float32's: beam search turns small feature differences into "
        "other words on many photos. On captioner's real-photo benchmark (MobileNetV2 models, 705 Flickr8k photos) "
        "43.5% of the captions changed while CIDEr-D moved -1.3% (95% interval -5.0% to +3.2%). " + compare, ""]


def _license_section(license: str, origin: dict, weights_words: str) -> list[str]:
    lines = [f"The model files are released under the licence `{license}`" +
             (" (none was given to `captioner export --license`)." if license == "unknown" else ".")]
    if origin.get("license"):
        lines.append(f"The backbone's pretrained weights ({weights_words}) are under `{origin['license']}`, as "
                     f"their library records it.")
    lines.append("Check the licences of the backbone weights, the training images and their captions before using "
                 "the model commercially.")
    return [" ".join(lines)]


def model_card(meta: dict, metrics: dict | None = None, repo_id: str | None = None, license: str = "unknown",
               onnx_precision: str | None = None) -> str:
    """README.md text for the model folder whose config.json content is meta. metrics: a checked metrics file
    (check_metrics); onnx_precision: the precision of the folder's ONNX graphs (None: no ONNX graphs)."""
    arch, pre, config = meta["architecture"], meta["preprocessing"], meta["config"]
    onnx = meta.get("onnx") if isinstance(meta.get("onnx"), dict) else None  # how the ONNX graphs were made
    onnx_precision = onnx_precision or (onnx or {}).get("precision")
    dec, m, t, enc = config["decode"], config["model"], config["train"], config["encoder"]
    name = repo_id or f"captioner {arch['encoder']} {arch['layer']}"
    load_from = repo_id or "path/to/this/folder"
    onnx_keyword, onnx_flag = _onnx_only(meta, ', runtime="onnxruntime"'), _onnx_only(meta, " --runtime onnxruntime")
    grid = "x".join(map(str, arch["grid"]))
    origin = weights_origin(arch["encoder"], enc.get("weights"))
    weights = (f"`{enc['weights']}`" if enc.get("weights")
               else f"random initialisation (encoder.seed {enc.get('seed')})")
    frozen = f"frozen except from `{enc['finetune_from']}` on" if enc.get("finetune_from") else "frozen"
    source = meta.get("source") or {}
    shown = _measured_here(meta, metrics, onnx_precision)
    objective = "self-critical (CIDEr-D) training" if t.get("objective") == "scst" else "cross-entropy"
    trained = f"{objective}, run configured for {t['epochs']} epochs"
    if source.get("epoch") is not None:
        trained += f"; these are the weights after epoch {source['epoch']} (step {source.get('step')})"
    decoding = ("Sampling" if dec["sample"] else "Greedy decoding" if dec["beam_size"] == 1
                else f"Beam search (beam {dec['beam_size']})")
    mean, std = (", ".join(f"{x:.4g}" for x in pre[k]) for k in ("mean", "std"))
    lines = [
        _front_matter(meta, metrics, name, license, origin, shown),
        f"# {name}", "",
        f"An image-captioning model made with [captioner](https://pypi.org/project/captioner/) "
        f"{meta['captioner_version']}: a {frozen} {arch['library']} `{arch['encoder']}` whose `{arch['layer']}` "
        f"output ({arch['channels']} channels on a {grid} grid) a soft-attention LSTM decoder (Show, Attend and "
        f"Tell) reads, one word at a time.", "",
        "## Architecture", "",
        f"- Encoder: {arch['library']} `{arch['encoder']}`, hooked at `{arch['layer']}`, {frozen}; weights: "
        f"{weights}.",
        f"- Decoder: embedding {m['embed_dim']}, attention {m['attention_dim']} ({m['attention']}), LSTM "
        f"{m['decoder_dim']}, features `{m['features']}`, initial state `{m['init_state']}`, context gate "
        f"{'on' if m.get('gate') else 'off'}.",
        (f"- {arch['parameters']:,} parameters; weights stored as {meta['dtype']} in `{meta['files']['weights']}`; "
         if "weights" in meta["files"] else f"- {arch['parameters']:,} parameters, in the ONNX graphs only; ")
        + f"vocabulary of {meta['vocab_size']} tokens in `{meta['files']['vocab']}`.",
        f"- Runtime: {_runtime(meta, onnx_precision)}",
        *([f"- ONNX graphs ({onnx['precision']}): opset {onnx['opset']}, exported by {onnx['exporter']}; batch "
           f"axis dynamic, {onnx['axes']['fixed']['note']}."] if onnx else []),
        f"- Input: RGB resized to {pre['image_size']}x{pre['image_size']} ({pre['interpolation']}), EXIF "
        f"orientation applied, transparency composited onto white, normalised with mean ({mean}) and std ({std}); "
        f"captioner does this itself.", "",
        "## Training data", "",
        f"Trained on {_dataset_words(config)}, captions cut to {config['dataset']['max_len']} words"
        + (f", words seen fewer than {config['dataset']['min_freq']} times mapped to `<unk>`"
           if config["dataset"]["min_freq"] > 1 else "") + f"; {trained}.", "",
        "## Evaluation", "", *_metrics_section(meta, metrics, onnx_precision, shown), "",
        *(_int8_section(onnx, load_from) if onnx_precision == "int8" else []),
        "## Decoding defaults", "",
        f"{decoding}, at most {dec['max_len']} words, length penalty {dec['length_penalty']:g}"
        + (f", temperature {dec['temperature']:g}" if dec["sample"] else "") + "; every one can be changed when "
        "loading.", "",
        "## How to use", "",
        "```python",
        "from captioner import Captioner",
        "",
        f'cap = Captioner.from_pretrained("{load_from}"{onnx_keyword})',
        'print(cap.caption("photo.jpg").text)      # a path, a PIL image, an HxWx3 uint8 array or a (3, H, W) tensor',
        "```", "",
        "```bash",
        f"captioner caption --checkpoint {load_from} photos/ --out captions.jsonl"
        + (" --runtime onnxruntime" if onnx_precision else ""),
        f"captioner serve --checkpoint {load_from}{onnx_flag}",
        "```", "",
        _onnx_only(meta, "This folder holds ONNX graphs only (`--onnx-only`): run it with `--runtime onnxruntime`, "
                         "or without captioner by `examples/onnx_caption.py` (numpy, onnxruntime, Pillow).")
        or "Loading reads `config.json`, `vocab.json` and `model.safetensors` only: no pickle, no code runs.", "",
        "## Intended use and limits", "",
        "For captioning images like the ones it was trained on, and for research on attention captioning. It "
        "describes what it has seen in its training captions only: images unlike them get fluent but wrong "
        "captions. Captions can carry the biases of the training captions (who is described and how); do not use "
        "them for decisions about people, or as the only description where accessibility depends on it.", "",
        "## License", "", *_license_section(license, origin, weights), "",
    ]
    if source.get("sha256"):
        lines += ["## Provenance", "", f"Exported from `{source.get('checkpoint')}` (SHA-256 "
                  f"`{source['sha256']}`) by `captioner export`, format version {meta['format_version']}.", ""]
    return "\n".join(lines)
