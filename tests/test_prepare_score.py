"""`captioner prepare` and `captioner score`, and prepare -> train -> evaluate -> score on real COCO photos."""
import json
import logging
import re

import pytest
from PIL import Image

from captioner.jobs import evaluate, prepare, train
from captioner.cli import main
from captioner.config import load_config
from captioner.text import Vocabulary

from helpers import COCO_MINI, TINY


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


@pytest.fixture
def coco_files(tmp_path):
    annotations = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
                   "annotations": [{"id": 1, "image_id": 1, "caption": "a dog runs on the grass"},
                                   {"id": 2, "image_id": 2, "caption": "a cat sleeps on a sofa"},
                                   {"id": 3, "image_id": 3, "caption": "a bus on a street"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(annotations))
    return path


def _results(tmp_path, entries, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return str(path)


@pytest.mark.parametrize("entries, message", [
    ([{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"}, {"image_id": 1, "caption": "x"}],
     r"results.json: 1 image ids appear more than once \(first: 1\); a results file holds one caption per image"),
    ([{"image_id": 1, "caption": "a dog"}, {"image_id": 7, "caption": "a cat"}, {"image_id": 8, "caption": "a"}],
     r"results.json: 2 of 3 image ids are not in annotations file .*captions.json \(first: 7, 8\)"),
    ([{"image_id": "1", "caption": "a dog"}], r"entry 0 has image_id '1'; image ids are integers"),
    ([{"image_id": 1, "text": "a dog"}], r"entry 0 is not \{\"image_id\": ..., \"caption\": \"...\"\}"),
    ({"image_id": 1, "caption": "a dog"}, r"results.json must be a non-empty JSON list"),
])
def test_score_errors_are_one_line(tmp_path, coco_files, capsys, entries, message):
    results = _results(tmp_path, entries)
    assert main(["score", "--results", results, "--annotations", str(coco_files)]) == 2
    line = _error_line(capsys)
    assert line.startswith("captioner score: error: ")
    assert re.search(message, line), line


def test_score_missing_and_unreadable_files(tmp_path, coco_files, capsys):
    assert main(["score", "--results", str(tmp_path / "nope.json"), "--annotations", str(coco_files)]) == 2
    assert "results file" in (line := _error_line(capsys)) and "nope.json not found" in line
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": 1, "caption": "a dog"')
    assert main(["score", "--results", str(broken), "--annotations", str(coco_files)]) == 2
    assert "broken.json is not valid JSON" in _error_line(capsys)
    results = _results(tmp_path, [{"image_id": 1, "caption": "a dog"}])
    assert main(["score", "--results", results, "--annotations", str(tmp_path / "none.json")]) == 2
    assert "none.json not found" in _error_line(capsys)


def test_score_warns_on_empty_captions_and_scores_only_result_images(tmp_path, coco_files, capsys, caplog):
    results = _results(tmp_path, [{"image_id": 1, "caption": "a dog runs on the grass"},
                                  {"image_id": 2, "caption": "  "}])
    with caplog.at_level(logging.INFO, logger="captioner"):
        assert main(["score", "--results", results, "--annotations", str(coco_files), "--no-meteor",
                     "--out", str(tmp_path / "m.json")]) == 0
    assert "1 empty captions (image ids 2) are scored as empty" in caplog.text
    assert "scoring the 2 images" in caplog.text and "(of 3 in" in caplog.text
    out = capsys.readouterr().out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert "BLEU-4" in out and "METEOR   skipped" in out and "nltk corpus BLEU" in out
    assert metrics["images"] == 2 and metrics["meteor"] is None
    assert metrics["rouge_l"] == pytest.approx(0.5)  # image 1 perfect, image 2 empty
    assert json.loads((tmp_path / "m.json").read_text())["rouge_l"] == metrics["rouge_l"]


def test_prepare_flickr8k_reports_and_writes(tmp_path, capsys):
    text, images = tmp_path / "Flickr8k_text", tmp_path / "Flicker8k_Dataset"
    text.mkdir()
    images.mkdir()
    names = [f"{1000 + i}_abc.jpg" for i in range(10)]
    for name in names[:-1]:  # the last one is missing
        Image.new("RGB", (8, 8)).save(images / name)
    lines = [f"{n}#{k}\ta dog runs on the grass" for n in names[:6] for k in range(2)]
    lines += [f"{names[6]}#0\ta cat sleeps", f"{names[7]}#0\ta zebra sleeps", f"{names[8]}#0\tone two three four "
              "five six seven eight nine ten eleven twelve", f"{names[9]}#0\ta dog", "garbage line"]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:6]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text(f"{names[6]}\n{names[9]}\n")
    (text / "Flickr_8k.testImages.txt").write_text(f"{names[7]}\n{names[8]}\n")
    config = tmp_path / "f8k.yaml"
    config.write_text(f"dataset:\n  annotations: {text}/Flickr8k.token.txt\n  images: {images}\n  min_freq: 2\n"
                      f"  max_len: 10\n  max_missing_fraction: 0.2\n")
    out = tmp_path / "prepared"
    assert main(["prepare", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "format flickr8k" in printed and "1 image files missing and skipped" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_images"] == 1 and summary["missing_examples"][0].endswith(names[9])
    assert (out / "missing_images.txt").read_text().strip().endswith(names[9])
    splits = summary["splits"]
    assert [splits[s]["images"] for s in ("train", "val", "test")] == [6, 1, 2]
    assert splits["train"]["unk_rate"] == 0.0 and splits["train"]["captions"] == 12
    assert summary["vocab_size"] == 4 + 6  # a dog runs on the grass, all seen 12 times
    assert splits["val"]["unk_rate"] == pytest.approx(2 / 3, abs=1e-5)  # "cat sleeps" unknown, "a" known
    assert splits["test"]["truncated_captions"] == 1 and splits["test"]["length_max"] == 12
    assert json.loads((out / "splits.json").read_text())["val"] == [1006]
    test_refs = json.loads((out / "captions_test.json").read_text())
    assert [a["caption"] for a in test_refs["annotations"]][0] == "a zebra sleeps"
    # More missing than allowed: one clear line, nothing scored.
    assert main(["prepare", "--config", str(config), "--out", str(out), "dataset.max_missing_fraction=0.05"]) == 2
    assert "above dataset.max_missing_fraction=0.05" in _error_line(capsys)


@pytest.mark.slow
@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"{COCO_MINI} not present")
def test_prepare_train_evaluate_score_on_coco_mini(tmp_path, capsys):
    """Real COCO photos and annotation file: prepare's vocabulary is train's, and `score` on evaluate's results
    against prepare's captions_test.json gives evaluate's numbers."""
    cfg = load_config(TINY, [
        f"dataset.annotations={COCO_MINI}/annotations/captions_train2017.json", "dataset.format=auto",
        f"dataset.images={COCO_MINI}/train2017", f"dataset.root={tmp_path}", "dataset.min_freq=2",
        "dataset.max_len=12", "encoder.image_size=64", "model.embed_dim=32", "model.attention_dim=32",
        "model.decoder_dim=64", "train.epochs=1", "train.num_workers=0", "train.batch_size=64", "decode.max_len=12"])
    summary = prepare.main(prepare.PrepareJob(cfg))
    assert summary["format"] == "coco" and summary["missing_images"] == 0
    assert [summary["splits"][s]["images"] for s in ("train", "val", "test")] == [64, 8, 8]
    assert summary["splits"]["train"]["captions"] == 320
    result = train.main(train.TrainJob(cfg, tmp_path / "run", "cpu"))
    assert Vocabulary.load(tmp_path / "run" / "vocab.json") == Vocabulary.load(tmp_path / "prepared" / "vocab.json")
    metrics = evaluate.main(evaluate.EvaluateJob(result["best_checkpoint"], "test", beam_size=2, out_dir=str(tmp_path / "eval"),
                            device="cpu"))
    assert metrics["images"] == 8 and metrics["beam_size"] == 2 and metrics["decoding"] == "beam"
    assert metrics["split"] == "test" and metrics["checkpoint"] == result["best_checkpoint"]
    assert all(metrics[k] is not None and metrics[k] >= 0 for k in ("bleu4", "rouge_l", "cider", "nltk_bleu4"))
    assert main(["score", "--results", metrics["results_file"], "--annotations",
                 str(tmp_path / "prepared" / "captions_test.json")]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("bleu1", "bleu4", "meteor", "rouge_l", "cider", "nltk_bleu4"):
        assert scored[key] == metrics[key], key
    # The results also score directly against the original COCO annotation file (only their 8 images).
    assert main(["score", "--results", metrics["results_file"], "--annotations",
                 f"{COCO_MINI}/annotations/captions_train2017.json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cider"] == metrics["cider"]
