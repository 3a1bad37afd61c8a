"""Metrics: hand-checkable values, and agreement with coco-caption's own COCOEvalCap on the same files.

METEOR's java process takes ~10 s to start: only the agreement test runs it, and the official scorer and
ours share one process (pycocoevalcap's Meteor class, started once); the other tests pass meteor=False.
"""
import json
import math

import pytest

from captioner.jobs import score
from captioner.metrics import coco as metrics
from captioner.metrics.coco import caption_metrics, coco_caption_scores, corpus_bleu_scores, fallback_tokenize

from helpers import COCO_MINI

needs_java = pytest.mark.skipif(not metrics.java_available(), reason="java not installed")


@pytest.mark.slow  # several seconds: the fast subset stays under a minute
def test_identical_captions_score_one():
    captions = {1: "a man riding a wave on top of a surfboard", 2: "two dogs play with a red ball in the park"}
    scores = caption_metrics(captions, {i: [c] for i, c in captions.items()}, meteor=False)
    for n in range(1, 5):
        assert scores[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)  # coco-caption adds a 1e-9 smoothing term
        assert scores[f"nltk_bleu{n}"] == 1.0
    assert scores["rouge_l"] == 1.0
    assert scores["cider"] == pytest.approx(10.0)  # CIDEr-D is scaled by 10
    assert scores["meteor"] is None and scores["skipped"]["meteor"] == "not asked for"
    assert scores["spice"] is None and "download" in scores["skipped"]["spice"]
    assert scores["images"] == 2 and scores["scale"].startswith("0-1")


def test_known_pair_by_hand_and_against_the_scorer():
    """'a dog runs' vs 'a dog sleeps': 2 of 3 unigrams and 1 of 2 bigrams match, LCS is 2 of 3 words."""
    hyps, refs = {1: "A dog runs."}, {1: ["a dog sleeps"]}
    scores = coco_caption_scores(hyps, refs, meteor=False)
    assert scores["bleu1"] == pytest.approx(2 / 3, abs=1e-6)
    assert scores["bleu2"] == pytest.approx(math.sqrt(2 / 3 * 1 / 2), abs=1e-6)
    assert scores["bleu4"] < 1e-3  # no matching trigram
    assert scores["rouge_l"] == pytest.approx(2 / 3)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge
    tokenized_h, tokenized_r = {1: ["a dog runs"]}, {1: ["a dog sleeps"]}  # what PTBTokenizer makes of them
    assert [scores[f"bleu{n}"] for n in range(1, 5)] == Bleu(4).compute_score(tokenized_r, tokenized_h, verbose=0)[0]
    assert scores["rouge_l"] == Rouge().compute_score(tokenized_r, tokenized_h)[0]
    assert corpus_bleu_scores(hyps, refs)["bleu1"] == pytest.approx(2 / 3)  # the training-time function


@needs_java
@pytest.mark.slow  # runs the java tokenizer on many captions
def test_ptb_tokenizer_matches_coco_caption():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    captions = {1: ['A "quoted" dog\'s toy, can\'t (really) fly...', "A man in a t-shirt; 3.5 m/s!"],
                2: ["", "Café crème & croissant"]}
    official = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    assert metrics.ptb_tokenize(captions) == official
    assert official[1][0] == "a quoted dog 's toy ca n't -lrb- really -rrb- fly"  # coco-caption keeps -lrb-
    assert fallback_tokenize(captions) == official  # the no-java approximation on these


def _official_coco_eval(annotations, results, monkeypatch) -> dict:
    """coco-caption's own evaluation, as its example runs it, with SPICE patched out (it needs a download) and
    its Meteor() handed the already running pycocoevalcap Meteor process (same class and jar: only faster)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    monkeypatch.setattr(coco_eval, "Meteor", metrics._meteor)
    coco = COCO(str(annotations))
    coco_results = coco.loadRes(str(results))
    evaluator = coco_eval.COCOEvalCap(coco, coco_results)
    evaluator.params["image_id"] = coco_results.getImgIds()
    evaluator.evaluate()
    return evaluator.eval


HANDWRITTEN = {  # image id: (references, hypothesis): capitals, punctuation, quotes, contractions, numbers
    1: (["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean!",
         "Man on a surfboard riding a wave."], "a man riding a wave on a surfboard"),
    2: (["Two dogs playing with a red frisbee in the park.", "Two dogs play with a frisbee, on the grass."],
        "two dogs play with a red ball"),
    3: (['A "stop" sign at a street corner.', "A red stop sign on the corner of a street."], "a stop sign"),
    4: (["A kitchen with a stove, a sink and a refrigerator.", "The kitchen's counters are white."],
        "a kitchen with a stove and a sink"),
    5: (["It's a plate of food: broccoli (and rice).", "A plate with rice and broccoli on it."], "a plate of food"),
    6: (["Three people standing on a beach with 3 kites.", "People fly kites on the beach."],
        "people flying kites on a beach"),
    7: (["A bus that doesn't run", "A city bus parked by the curb."], "a bus parked on the side of a street"),
    8: (["A black-and-white cat sleeps on a laptop.", "A cat lying on a keyboard."], ""),  # an empty caption
}


@needs_java
@pytest.mark.slow  # starts METEOR's java process (a 2 GB heap and its paraphrase table)
def test_score_equals_coco_caption_official(tmp_path, monkeypatch):
    """The acceptance check: `captioner score` == COCOEvalCap on the same files, on hand-written captions and,
    when present, the 80 real COCO images' captions (hypothesis: a perturbed caption of the image or another)."""
    images, annotations, results = [], [], []
    for image_id, (refs, hyp) in HANDWRITTEN.items():
        images.append({"id": image_id, "file_name": f"{image_id}.jpg"})
        annotations += [{"id": len(annotations), "image_id": image_id, "caption": r} for r in refs]
        results.append({"image_id": image_id, "caption": hyp})
    images.append({"id": 999, "file_name": "999.jpg"})  # annotated but not in the results: not scored
    annotations.append({"id": len(annotations), "image_id": 999, "caption": "an image nobody captioned"})
    mini = COCO_MINI / "annotations" / "captions_train2017.json"
    if mini.is_file():
        data = json.loads(mini.read_text())
        by_image = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a["caption"])
        ids = sorted(by_image)
        for k, image_id in enumerate(ids):
            source = by_image[ids[(k + 1) % len(ids)]][0] if k % 3 == 0 else by_image[image_id][k % 5]
            words = [w for j, w in enumerate(source.split()) if k % 2 == 0 or j % 4 != 1]
            results.append({"image_id": image_id, "caption": " ".join(words)})
        images += data["images"]
        annotations += [{**a, "id": a["id"] + 10_000} for a in data["annotations"]]
    annotations_file, results_file = tmp_path / "captions.json", tmp_path / "results.json"
    annotations_file.write_text(json.dumps({"images": images, "annotations": annotations}))
    results_file.write_text(json.dumps(results))

    ours = score.main(score.ScoreJob(str(results_file), str(annotations_file), out=str(tmp_path / "metrics.json")))
    official = _official_coco_eval(annotations_file, results_file, monkeypatch)
    names = {"bleu1": "Bleu_1", "bleu2": "Bleu_2", "bleu3": "Bleu_3", "bleu4": "Bleu_4", "meteor": "METEOR",
             "rouge_l": "ROUGE_L", "cider": "CIDEr"}
    for key, official_key in names.items():
        assert round(ours[key], 4) == round(float(official[official_key]), 4), key
        assert ours[key] == pytest.approx(float(official[official_key]), abs=1e-12), key
    assert ours["images"] == len(results) and 0.2 < ours["bleu4"] < 0.9 and ours["meteor"] > 0.1
    assert json.loads((tmp_path / "metrics.json").read_text())["cider"] == ours["cider"]


def test_without_java_meteor_is_skipped_and_the_rest_still_runs(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    hyps = {1: "a man riding a wave on a surfboard", 2: "two dogs play with a red ball"}
    refs = {1: ["A man riding a wave on top of a surfboard."], 2: ["Two dogs play with a frisbee, on the grass."]}
    scores = caption_metrics(hyps, refs)
    assert scores["meteor"] is None and scores["skipped"]["meteor"] == "java not found"
    assert "java not found: METEOR skipped" in caplog.text
    assert scores["tokenizer"].startswith("python approximation")
    # ROUGE-L by hand on the tokenized text: LCS 8 of 8 and 8 of 10 words; LCS 5 of 7 and 5 of 9.
    f = lambda p, r: (1 + 1.2 ** 2) * p * r / (r + 1.2 ** 2 * p)  # noqa: E731
    assert scores["rouge_l"] == pytest.approx((f(8 / 8, 8 / 10) + f(5 / 7, 5 / 9)) / 2)
    assert 0 < scores["bleu4"] < 1 and scores["cider"] > 0


def test_unreferenced_or_empty_input_is_an_error():
    from captioner.errors import CaptionerError
    with pytest.raises(CaptionerError, match="no captions to score"):
        coco_caption_scores({}, {1: ["a"]}, meteor=False)
    with pytest.raises(CaptionerError, match=r"1 captioned images have no reference captions \(first: \[2\]\)"):
        coco_caption_scores({1: "a dog", 2: "a cat"}, {1: ["a dog"], 2: []}, meteor=False)
