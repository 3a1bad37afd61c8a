"""The k-fold protocol of scripts/bench_quality.py: folds that cover every photo once, bootstrap intervals that
contain the truth and the paired SCST gain, on made-up scores (no training)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import quality_data  # noqa: E402
import quality_stats  # noqa: E402

from captioner.errors import CaptionerError  # noqa: E402


def _captions_file(folder: Path, photos: int) -> Path:
    (folder / "images").mkdir(parents=True)
    rows = ["image,caption"] + [f"p{i:03d}.jpg,a photo number {i}" for i in range(photos)]
    (folder / "captions.txt").write_text("\n".join(rows) + "\n")
    return folder


def _read(path: Path) -> list[str]:
    return path.read_text().split()


def test_every_photo_is_a_test_photo_in_exactly_one_fold(tmp_path):
    data = _captions_file(tmp_path / "data", 157)
    tests = []
    for fold in range(5):
        lists = quality_data.write_fold_lists(data, tmp_path / f"fold{fold}", 5, fold, val=20, min_train=50)
        parts = {split: set(_read(path)) for split, path in lists.items()}
        assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
        assert not parts["val"] & parts["test"] and len(parts["val"]) == 20
        assert len(parts["train"] | parts["val"] | parts["test"]) == 157
        tests += parts["test"]
    assert len(tests) == len(set(tests)) == 157
    assert {len(_read(tmp_path / f"fold{f}" / "test_images.txt")) for f in range(5)} <= {31, 32}
    again = quality_data.write_fold_lists(data, tmp_path / "again", 5, 3, val=20, min_train=50)
    assert _read(again["val"]) == _read(tmp_path / "fold3" / "val_images.txt")  # the same folds on every run


def test_too_few_photos_for_the_folds_is_one_clear_error(tmp_path):
    data = _captions_file(tmp_path / "data", 40)
    with pytest.raises(CaptionerError, match="leave 12 to train on, fewer than 50"):
        quality_data.write_fold_lists(data, tmp_path / "f", 5, 0, val=20, min_train=50)


def test_the_interval_holds_the_mean_and_narrows_with_more_photos():
    rng = np.random.default_rng(0)
    wide = [dict(enumerate(rng.normal(0.5, 0.2, 50).tolist()))]
    narrow = [dict(enumerate(rng.normal(0.5, 0.2, 2000).tolist()))]
    a, b = quality_stats.mean_interval(wide), quality_stats.mean_interval(narrow)
    assert a["ci95"][0] < a["mean"] < a["ci95"][1] and b["ci95"][0] < 0.5 < b["ci95"][1]
    assert b["ci95"][1] - b["ci95"][0] < (a["ci95"][1] - a["ci95"][0]) / 3


def test_the_paired_gain_sees_a_small_lift_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(1)
    start = rng.uniform(0.0, 2.0, 700)  # photos differ a lot; the later model adds 3% to each
    gain = quality_stats.paired_gain([dict(enumerate(start))], [dict(enumerate(start * 1.03))])
    assert gain["mean"] == pytest.approx(0.03, abs=1e-4) and gain["ci95"][0] > 0.029
    none = quality_stats.paired_gain([dict(enumerate(start))], [dict(enumerate(rng.permutation(start)))])
    assert none["ci95"][0] < 0 < none["ci95"][1]


def test_distinct_shares_average_to_distinct_captions_per_100_photos():
    unique = {f"p{i}": f"caption {i}" for i in range(100)}
    assert quality_stats.distinct_per_100(unique) == 100.0
    assert set(quality_stats.distinct_shares(unique).values()) == {100.0}
    runs = [{f"p{i}": f"caption {i % k}" for i in range(141)} for k in (141, 100, 7)]
    for run in runs:  # a per-photo share whose mean is the run's own number, so an interval holds its mean
        shares = quality_stats.distinct_shares(run)
        assert np.mean(list(shares.values())) == pytest.approx(100 * len(set(run.values())) / 141)
        result = quality_stats.mean_interval([shares])
        assert result["ci95"][0] <= result["mean"] <= result["ci95"][1]


def _fake_run(tmp_path: Path, fold: int, seed: int, photos: list[str], lift: float) -> dict:
    run = {"fold": f"fold{fold}", "seed": seed}
    for stage, factor in (("xe", 1.0), ("scst", 1.0 + lift)):
        folder = tmp_path / f"fold{fold}" / f"seed{seed}" / stage
        folder.mkdir(parents=True)
        for split, names in (("test", photos), ("val", photos[:3])):
            (folder / f"photos_{split}.json").write_text(json.dumps(
                {n: {"caption": f"{stage} {n}", "cider": factor * (1 + i % 3), "bleu4": 0.2} for i, n in
                 enumerate(names)}))
        scores = {"cider": factor * 2.0, "distinct_per_100": 100.0}
        run[stage] = {"checkpoint": str(folder / "best.pt"), "epoch": 1, "train_s": 1.0, "score_s": 1.0, "test": scores,
                      "val": scores}
    return run


def test_the_kfold_summary_pools_folds_and_pairs_stages(tmp_path):
    runs = [_fake_run(tmp_path, f, s, [f"f{f}p{i}" for i in range(10)], 0.1 if f else -0.05)
            for f in range(3) for s in (0, 1)]
    summary = quality_stats.kfold_summary(runs, ["xe", "scst"])
    assert summary["xe"]["test"]["photos"] == 30 and summary["xe"]["test"]["cider"]["mean"] == pytest.approx(1.9)
    assert summary["xe"]["test"]["distinct_per_100"]["min"] == 100.0
    assert summary["xe"]["test"]["distinct_per_100"]["mean"] == pytest.approx(100.0)
    gain = summary["scst"]["gain_over_xe"]
    assert gain["test"]["mean"] == pytest.approx((0.1 * 2 - 0.05) / 3, abs=1e-4)
    assert gain["runs_losing_test"] == 2 and len(gain["per_run_test"]) == 6
    assert [r["fold"] for r in summary["scst"]["runs"]] == ["fold0"] * 2 + ["fold1"] * 2 + ["fold2"] * 2


def test_a_start_that_scores_zero_has_no_relative_gain_but_still_counts_as_losing_or_not(tmp_path):
    runs = [_fake_run(tmp_path, f, 0, [f"f{f}p{i}" for i in range(5)], 0.1) for f in range(2)]
    runs[0]["xe"]["val"] = {**runs[0]["xe"]["val"], "cider": 0.0}
    runs[0]["scst"]["val"] = {**runs[0]["scst"]["val"], "cider": 0.0}
    runs[1]["xe"]["val"] = {**runs[1]["xe"]["val"], "cider": 0.5}
    runs[1]["scst"]["val"] = {**runs[1]["scst"]["val"], "cider": 0.4}
    gain = quality_stats.kfold_summary(runs, ["xe", "scst"])["scst"]["gain_over_xe"]
    assert gain["per_run_val"] == [None, -0.2] and gain["runs_losing_val"] == 1
    json.dumps(gain, allow_nan=False)


def test_merge_summarises_the_folds_of_several_processes_and_refuses_a_gap(tmp_path):
    import bench_quality

    runs = [_fake_run(tmp_path, f, 0, [f"f{f}p{i}" for i in range(10)], 0.1) for f in range(3)]
    files = []
    for name, part in (("a", runs[:2]), ("b", runs[2:])):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps({"benchmark": "b", "stages": ["xe", "scst"], "runs": part}))
    merged = bench_quality.merge([str(f) for f in files])
    assert merged["kfold"]["scst"]["gain_over_xe"]["test"]["mean"] == pytest.approx(0.1, abs=1e-4)
    assert merged["kfold"]["xe"]["test"]["photos"] == 30
    files[1].write_text(json.dumps({"benchmark": "b", "stages": ["xe", "scst"],
                                    "runs": [_fake_run(tmp_path / "s1", 2, 1, ["x"], 0.1)]}))
    with pytest.raises(CaptionerError, match="every seed needs every fold"):
        bench_quality.merge([str(f) for f in files])


@pytest.mark.slow  # java: the PTB tokenizer and METEOR
def test_per_photo_scores_average_to_coco_captions_corpus_cider_and_meteor():
    from captioner.metrics.coco import coco_caption_scores, java_available

    references = {"a": ["a dog runs on the grass", "a brown dog running", "dog in a field"],
                  "b": ["a man rides a bike", "a cyclist on a road", "a man on a bicycle"],
                  "c": ["two children play in the sand", "kids at the beach", "children digging sand"]}
    hypotheses = {"a": "a dog runs in a field", "b": "a man rides a red bike", "c": "a dog on the beach"}
    scores = quality_stats.photo_scores(hypotheses, references)
    corpus = coco_caption_scores(hypotheses, references)
    assert set(scores["cider"]) == set(hypotheses) and scores["cider"]["a"] > scores["cider"]["c"]
    assert np.mean(list(scores["cider"].values())) == pytest.approx(corpus["cider"], rel=1e-6)
    assert all(0 <= s <= 1 for s in scores["bleu4"].values())
    if java_available():  # METEOR's corpus score is not the per-photo mean, but close to it
        assert set(scores["meteor"]) == set(hypotheses)
        assert np.mean(list(scores["meteor"].values())) == pytest.approx(corpus["meteor"], abs=0.05)
    else:
        assert "meteor" not in scores
