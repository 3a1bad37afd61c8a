"""A model folder's README.md: a model card with Hugging Face-style YAML front matter, written from the folder's
config.json content and, when given, the metrics file `captioner evaluate` wrote.

    text = model_card(meta, cfg, metrics=json.load(open("runs/x/metrics_test.json")), repo_id="alice/cap")

Everything in it comes from the model's own config and files (nothing is guessed): architecture, training data,
test metrics, decoding defaults, intended use and limits, how to load it. The same inputs give the same text.
"""
from __future__ import annotations

import yaml

from captioner.config import Config

METRIC_NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                "rouge_l": "ROUGE-L", "cider": "CIDEr-D", "spice": "SPICE"}
_HUB_METRIC_TYPES = {"bleu1": "bleu", "bleu2": "bleu", "bleu3": "bleu", "bleu4": "bleu", "meteor": "meteor",
                     "rouge_l": "rouge", "cider": "cider", "spice": "spice"}


def _reported(metrics: dict | None) -> dict[str, float]:
    """The coco-caption scores a metrics file holds (None: skipped, left out)."""
    if not metrics:
        return {}
    return {k: float(metrics[k]) for k in METRIC_NAMES if isinstance(metrics.get(k), (int, float))}


def _dataset_words(cfg: Config) -> str:
    d = cfg.dataset
    if d.format == "synthetic" or (d.format == "auto" and not d.annotations):  # auto without a file: synthetic
        return f"captioner's synthetic shapes ({d.synthetic_images} generated images, seed {d.synthetic_seed})"
    source = d.annotations or d.root
    return f"{d.format if d.format != 'auto' else 'a'} captions dataset ({source})"


def _front_matter(meta: dict, cfg: Config, metrics: dict | None, name: str) -> str:
    arch = meta["architecture"]
    front = {"license": "mit", "library_name": "captioner", "pipeline_tag": "image-to-text",
             "tags": ["image-captioning", "show-attend-and-tell", arch["encoder"], "safetensors"]}
    scores = _reported(metrics)
    if scores:
        split = metrics.get("split", "test")
        front["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-to-text", "name": "Image captioning"},
            "dataset": {"name": f"{cfg.dataset.format} ({split} split)", "type": cfg.dataset.format,
                        "split": split},
            "metrics": [{"type": _HUB_METRIC_TYPES[k], "name": METRIC_NAMES[k], "value": round(v, 4)}
                        for k, v in scores.items()]}]}]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"


def _metrics_section(metrics: dict | None) -> list[str]:
    scores = _reported(metrics)
    if not scores:
        return ["No test metrics were given to `captioner export` (`--metrics metrics_test.json`, written by "
                "`captioner evaluate`): measure this model on your own data before relying on it."]
    images = metrics.get("split_images") or metrics.get("images")
    beam = metrics.get("beam_size")
    lines = [f"On the {metrics.get('split', 'test')} split ({images} images), "
             f"{'greedy decoding' if beam == 1 else f'beam search (beam {beam})'}, scored by "
             f"{metrics.get('scorer', 'coco-caption')} (scale 0-1, CIDEr-D 0-10):", "",
             "| " + " | ".join(METRIC_NAMES[k] for k in scores) + " |",
             "|" + "---|" * len(scores),
             "| " + " | ".join(f"{v:.3f}" for v in scores.values()) + " |"]
    skipped = metrics.get("skipped") or {}
    if skipped:
        lines += ["", "Not computed: " + "; ".join(f"{METRIC_NAMES.get(k, k)} ({why})" for k, why in skipped.items())
                  + "."]
    return lines


def _onnx_only(meta: dict, text: str) -> str:
    """text for a folder without PyTorch weights (export --onnx-only), else ""."""
    return text if "weights" not in meta["files"] else ""


def model_card(meta: dict, cfg: Config, metrics: dict | None = None, repo_id: str | None = None) -> str:
    """README.md text for the model folder whose config.json content is meta."""
    arch, pre, dec = meta["architecture"], meta["preprocessing"], cfg.decode
    m, t = cfg.model, cfg.train
    name = repo_id or f"captioner {arch['encoder']} {arch['layer']}"
    load_from = repo_id or "path/to/this/folder"
    onnx_keyword, onnx_flag = _onnx_only(meta, ', runtime="onnxruntime"'), _onnx_only(meta, " --runtime onnxruntime")
    grid = "x".join(map(str, arch["grid"]))
    weights = cfg.encoder.weights or f"random initialisation (encoder.seed {cfg.encoder.seed})"
    frozen = (f"frozen except from `{cfg.encoder.finetune_from}` on" if cfg.encoder.finetune_from else "frozen")
    source = meta.get("source") or {}
    objective = "self-critical (CIDEr-D) training" if t.objective == "scst" else "cross-entropy"
    trained = f"{objective}, run configured for {t.epochs} epochs"
    if source.get("epoch") is not None:
        trained += f"; these are the weights after epoch {source['epoch']} (step {source.get('step')})"
    lines = [
        _front_matter(meta, cfg, metrics, name),
        f"# {name}", "",
        f"An image-captioning model made with [captioner](https://pypi.org/project/captioner/) "
        f"{meta['captioner_version']}: a {frozen} {arch['encoder']} whose `{arch['layer']}` output ({arch['channels']} "
        f"channels on a {grid} grid) a soft-attention LSTM decoder (Show, Attend and Tell) reads, one word at a "
        f"time.", "",
        "## Architecture", "",
        f"- Encoder: torchvision `{arch['encoder']}`, hooked at `{arch['layer']}`, {frozen}; weights: {weights}.",
        f"- Decoder: embedding {m.embed_dim}, attention {m.attention_dim} ({m.attention}), LSTM {m.decoder_dim}, "
        f"features `{m.features}`, initial state `{m.init_state}`, context gate {'on' if m.gate else 'off'}.",
        (f"- {arch['parameters']:,} parameters; weights stored as {meta['dtype']} in `{meta['files']['weights']}`; "
         if "weights" in meta["files"] else f"- {arch['parameters']:,} parameters, in the ONNX graphs only; ")
        + f"vocabulary of {meta['vocab_size']} tokens in `{meta['files']['vocab']}`.",
        *([f"- ONNX graphs ({meta['onnx']['precision']}): opset {meta['onnx']['opset']}, exported by "
           f"{meta['onnx']['exporter']}; batch axis dynamic, {meta['onnx']['axes']['fixed']['note']}."]
          if isinstance(meta.get("onnx"), dict) else []),
        f"- Input: RGB resized to {pre['image_size']}x{pre['image_size']} (bicubic), EXIF orientation applied, "
        f"transparency composited onto white, ImageNet mean/std; captioner does this itself.", "",
        "## Training data", "",
        f"Trained on {_dataset_words(cfg)}, captions cut to {cfg.dataset.max_len} words"
        + (f", words seen fewer than {cfg.dataset.min_freq} times mapped to `<unk>`" if cfg.dataset.min_freq > 1
           else "") + f"; {trained}.", "",
        "## Evaluation", "", *_metrics_section(metrics), "",
        "## Decoding defaults", "",
        f"{'Sampling' if dec.sample else 'Greedy decoding' if dec.beam_size == 1 else f'Beam search (beam {dec.beam_size})'}"
        f", at most {dec.max_len} words, length penalty {dec.length_penalty:g}"
        + (f", temperature {dec.temperature:g}" if dec.sample else "") + "; every one can be changed when loading.", "",
        "## How to use", "",
        "```python",
        "from captioner import Captioner",
        "",
        f'cap = Captioner.from_pretrained("{load_from}"{onnx_keyword})',
        'print(cap.caption("photo.jpg").text)      # a path, a PIL image, an HxWx3 uint8 array or a (3, H, W) tensor',
        "```", "",
        "```bash",
        f"captioner caption --checkpoint {load_from} photos/ --out captions.jsonl{onnx_flag}",
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
        "## License", "",
        "The model files are released under the MIT license, as captioner. Check the license of the training "
        "images and captions before using the model commercially.", "",
    ]
    if source.get("sha256"):
        lines += ["## Provenance", "", f"Exported from `{source.get('checkpoint')}` (SHA-256 "
                  f"`{source['sha256']}`) by `captioner export`, format version {meta['format_version']}.", ""]
    return "\n".join(lines)
