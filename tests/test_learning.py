"""The tiny model must actually learn the synthetic shapes, measured on held-out images."""
import json
import math
from pathlib import Path

import pytest
import torch

from captioner.jobs import evaluate
from captioner.model.decoding import greedy_decode
from captioner.engine.infer.checkpoint import load_model
from captioner.data.datasets import by_split, load_records
from captioner.data.images import load_image

pytestmark = pytest.mark.slow  # the session's tiny model is trained for them


def test_tiny_model_learns_held_out_bleu4(trained, tmp_path):
    summary, cfg = trained
    assert summary["best_bleu4"] > 0.45  # validation, greedy
    metrics = evaluate.main(evaluate.EvaluateJob(summary["best_checkpoint"], "test", beam_size=3, out_dir=str(tmp_path), device="cpu"))
    assert metrics["images"] == 100 and metrics["beam_size"] == 3
    assert metrics["bleu4"] >= 0.5, metrics
    # the diversity diagnostics agree with the results file
    captions = {r["caption"] for r in json.loads((tmp_path / "results_test.json").read_text())}
    assert metrics["distinct_captions"] == len(captions)
    assert metrics["distinct_fraction"] == metrics["distinct_captions"] / 100 and metrics["vocab_used"] >= 5
    results = json.loads((tmp_path / "results_test.json").read_text())
    assert len(results) == 100 and {"image_id", "caption"} <= set(results[0])
    metrics_file = Path(summary["best_checkpoint"]).parent / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    losses = [x["loss_avg"] for x in lines if "loss_avg" in x]  # mean over each logging window
    assert losses[-1] < losses[0] * 0.8
    # the cross-entropy alone beside the loss, which adds model.alpha_c's attention penalty (several nats on a
    # small grid: a loss above ln(vocabulary size) read as a model worse than chance)
    steps = [x for x in lines if "loss" in x and x.get("loss") is not None]
    vocab = len(load_model(summary["best_checkpoint"])[1])
    assert all(0 < x["xe"] <= x["loss_avg"] + 1e-6 for x in steps)  # both means over the logging window
    assert any(x["xe"] < x["loss_avg"] - 1e-3 for x in steps) and steps[-1]["xe"] < steps[0]["xe"] * 0.8
    assert steps[0]["xe"] < math.log(vocab)


def test_different_images_get_different_captions(trained):
    summary, cfg = trained
    model, vocab, _ = load_model(summary["best_checkpoint"])
    records = by_split(load_records(cfg.dataset), "test")[:12]
    images = torch.stack([load_image(r.path, cfg.encoder.image_size) for r in records])
    captions = {vocab.decode(t) for t in greedy_decode(model, model.encode(images)).tokens.tolist()}
    assert len(captions) >= 8
    assert all(len(c.split()) >= 5 for c in captions)
