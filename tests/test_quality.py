"""The quality benchmark (scripts/bench_quality.py, scripts/quality_data.py) without downloads: weight conversion,
split lists, caption diversity, its option checks, and the whole two-stage recipe on a tiny photo set."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from captioner.config import load_config, to_dict
from captioner.data.cache import weights_fingerprint
from captioner.errors import CaptionerError
from captioner.metrics.diversity import caption_diversity
from captioner.model.encoder import HookedEncoder

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str):
    """A module of scripts/, loaded by path (scripts/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


quality_data = _script("quality_data")
bench_quality = _script("bench_quality")


def test_renamed_mobilenet_features_load_into_the_hooked_encoder(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v2().eval()
    # the wheel's layout: feature layers only, under other names, in the same order
    renamed = {f"layer_{i}": t for i, (k, t) in enumerate(source.state_dict().items()) if k.startswith("features.")}
    path = tmp_path / "mnv2.pth"
    torch.save(quality_data.convert_mobilenet_v2(renamed), path)
    enc = HookedEncoder("mobilenet_v2", "features", weights=str(path), image_size=64)
    assert enc.channels == 1280 and enc.grid == (2, 2)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.features(enc.normalize(images))
    assert torch.allclose(enc(images), expected, atol=1e-5)
    # the classifier the file lacks is the same (zeros) under any seed: a feature cache's fingerprint matches
    torch.manual_seed(1)
    again = HookedEncoder("mobilenet_v2", "features", weights=str(path), image_size=64)
    assert weights_fingerprint(again) == weights_fingerprint(enc)
    # the classifier was never in the file and is never computed; the computed layers must all be there
    del renamed["layer_0"]
    with pytest.raises(CaptionerError, match="cannot fill"):
        quality_data.convert_mobilenet_v2(renamed)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("features.18")}
    torch.save(partial, path)
    with pytest.raises(CaptionerError, match="missing keys features.18"):
        HookedEncoder("mobilenet_v2", "features", weights=str(path), image_size=64)


def test_split_lists_hold_out_the_last_photos(tmp_path):
    names = [f"{i:04d}.jpg" for i in range(300)]
    (tmp_path / "captions.txt").write_text("image,caption\n" + "".join(f"{n},a photo {n}\n" for n in names))
    lists = quality_data.write_split_lists(tmp_path, tmp_path / "cache")
    parts = {s: p.read_text().split() for s, p in lists.items()}
    assert parts["test"] == names[-100:] and parts["val"] == names[-160:-100] and parts["train"] == names[:140]
    with pytest.raises(CaptionerError, match="needs at least 310"):
        quality_data.write_split_lists(tmp_path, tmp_path / "cache", test=150, val=60)


def test_caption_diversity_counts_distinct_captions_and_words():
    d = caption_diversity({1: "A dog runs.", 2: "a dog runs", 3: "a man sits on a bench"})
    assert d["distinct_captions"] == 2 and d["distinct_fraction"] == pytest.approx(2 / 3)
    assert d["vocab_used"] == 7 and d["mean_length"] == pytest.approx((3 + 3 + 6) / 3)


def test_benchmark_refuses_bad_options_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert bench_quality.cli(["--data", missing, "--cache", str(tmp_path)]) == 2
    assert "holds no captions.txt" in capsys.readouterr().err
    data = _photos(tmp_path / "photos", 12)
    for options, message in ((["--stages", "scst"], "--stages must be xe or xe,scst"),
                             (["--stages", "scst,xe"], "--stages must be"), (["--seeds", "0"], "--seeds must be >= 1"),
                             (["model.nope=1"], "unknown config key 'model.nope'")):
        code = bench_quality.cli(["--data", str(data), "--cache", str(tmp_path / "cache"), *options])
        assert code == 2 and message in capsys.readouterr().err, options


def test_the_scst_stage_must_train_the_cross_entropy_model(tmp_path):
    data = _photos(tmp_path / "photos", 12)
    with pytest.raises(CaptionerError, match="must describe the same model"):
        bench_quality.main(data, tmp_path / "cache", 1, _tiny(tmp_path), ["model.dropout=0.1"], test_images=2,
                           val_images=2, min_train=4)


def test_aggregate_gives_mean_std_and_the_scst_gain():
    runs = [{"xe": {"test": {"cider": 0.2}, "train_s": 1, "score_s": 1, "epoch": 3},
             "scst": {"test": {"cider": 0.22}, "train_s": 2, "score_s": 1, "epoch": 1}},
            {"xe": {"test": {"cider": 0.4}, "train_s": 3, "score_s": 1, "epoch": 2},
             "scst": {"test": {"cider": 0.4}, "train_s": 2, "score_s": 1, "epoch": 4}}]
    out = bench_quality.aggregate(runs, ["xe", "scst"], ["test"])
    assert out["xe"]["test"]["cider"] == {"mean": 0.3, "std": pytest.approx(0.1414, abs=1e-4)}
    assert out["scst"]["test"]["cider_gain_over_xe"]["mean"] == pytest.approx(0.05)
    assert out["xe"]["epochs_selected"] == [3, 2] and out["scst"]["train_s"]["mean"] == 2


def test_reuse_takes_a_finished_run_of_the_same_training_config(tmp_path):
    cfg = load_config(None, ["train.epochs=2", "train.seed=1"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (run / "metrics.jsonl").write_text('{"epoch": 1, "epoch_s": 10.0}\n{"step": 5}\n{"epoch": 2, "epoch_s": 12.5}\n')
    assert bench_quality.finished_run(run, cfg) is None  # no best.pt
    (run / "best.pt").write_bytes(b"")
    assert bench_quality.finished_run(run, cfg) == 22.5
    scoring = load_config(None, ["train.epochs=2", "train.seed=1", "decode.beam_size=5", "decode.block_ngram=3",
                                 "compute.num_workers=0", "train.val_beam_size=3"])  # else validation follows the beam
    assert bench_quality.finished_run(run, scoring) == 22.5  # scoring keys only: the same training
    for other in (["train.seed=2"], ["decode.max_len=16"], ["train.epochs=3"]):  # another run, or unfinished
        assert bench_quality.finished_run(run, load_config(None, ["train.epochs=2", "train.seed=1", *other])) is None
    saved = to_dict(cfg)  # an SCST run saves the preprocessing of the model it started from; the config leaves it unset
    saved["encoder"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], interpolation="bicubic")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert cfg.encoder.mean is None and bench_quality.finished_run(run, cfg) == 22.5
    assert bench_quality.finished_run(run, load_config(None, ["train.epochs=2", "train.seed=1",
                                                              "encoder.interpolation=bilinear"])) is None


def _photos(folder: Path, count: int) -> Path:
    """A Kaggle-Flickr8k-layout folder: captions.txt and images/ of noise JPEGs, two captions each."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for i in range(count):
        name = f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "images" / name)
        colour = ("red", "blue", "green")[i % 3]
        lines += [f"{name},a {colour} dog runs on the grass", f"{name},the {colour} dog is running"]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    return folder


def _tiny(tmp_path: Path) -> list[str]:
    """Overrides for both stages: a random MobileNetV2 file (no download), a 1x1 grid, a tiny decoder."""
    weights = tmp_path / "mnv2.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
    return [f"encoder.weights={weights}", "encoder.image_size=32", "model.embed_dim=8", "model.attention_dim=8",
            "model.decoder_dim=8", "dataset.min_freq=1", "train.epochs=1", "train.batch_size=8", "decode.batch_size=8",
            "decode.max_len=6", "compute.num_workers=0", "compute.encode_batch_size=8"]


@pytest.mark.slow
def test_benchmark_runs_both_stages_and_scores_the_selected_checkpoints(tmp_path, monkeypatch):
    from captioner.metrics import coco

    # No java: the Python tokenizer and no METEOR, whose per-photo java scoring takes seconds for every stage
    # scored (64 of this test's 85 s); tests/test_metrics.py and test_quality_stats.py cover the java path.
    monkeypatch.setattr(coco, "java_available", lambda: False)
    data = _photos(tmp_path / "photos", 12)
    results = bench_quality.main(data, tmp_path / "cache", 1, _tiny(tmp_path), ["train.scst_samples=2"],
                                 val_images=2, min_train=4, threads=1, folds=2)
    json.dumps(results, allow_nan=False)  # printable
    assert results["split"] == {"train": 4, "val": 2, "test": 6} and results["stages"] == ["xe", "scst"]
    assert results["folds"] == ["fold0", "fold1"]
    assert "best.pt" in results["checkpoint"] and "val cider" in results["checkpoint"]
    for stage in ("xe", "scst"):
        for split in ("val", "test"):
            assert set(bench_quality.REPORTED) - {"meteor"} <= set(results[stage][split])  # METEOR needs java
            assert 0 <= results[stage][split]["distinct_per_100"]["mean"] <= 100
        assert results[stage]["train_s"]["mean"] > 0
    # One epoch each; SCST's best.pt is its epoch 1 or, where that lost on val, its starting weights (epoch 0)
    assert results["xe"]["epochs_selected"] == [1, 1] and set(results["scst"]["epochs_selected"]) <= {0, 1}
    assert "cider_gain_over_xe" in results["scst"]["test"]  # None when cross-entropy scored 0 (untrained)
    # k-fold: every photo is a test photo exactly once, pooled with an interval per stage
    kfold = results["kfold"]
    assert kfold["folds"] == 2 and kfold["xe"]["test"]["photos"] == 12
    tested = [set(json.loads((Path(r["xe"]["checkpoint"]).parent / "photos_test.json").read_text()))
              for r in results["runs"]]
    assert not tested[0] & tested[1] and len(tested[0] | tested[1]) == 12
    low, high = kfold["xe"]["test"]["cider"]["ci95"]
    assert low <= kfold["xe"]["test"]["cider"]["mean"] <= high
    assert len(kfold["scst"]["gain_over_xe"]["per_run_test"]) == 2
    first = results["runs"][0]
    assert first["fold"] == "fold0" and first["seed"] == 0 and results["runs"][1]["fold"] == "fold1"
    scst_dir = Path(first["scst"]["checkpoint"]).parent
    init = json.loads((scst_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert init["event"] == "init_from" and init["checkpoint"] == first["xe"]["checkpoint"]
    assert init["objective"] == "scst" and (scst_dir / "results_test.json").is_file()
    # every validation logs its distinct captions, so a run collapsing shows per epoch
    epochs = [json.loads(line) for line in (Path(first["xe"]["checkpoint"]).parent / "metrics.jsonl").read_text()
              .splitlines() if "val_cider" in line]
    assert epochs and all(0 < e["val_distinct_fraction"] <= 1 for e in epochs)
    # --reuse: the same runs rescored with other decoding, nothing trained again
    again = bench_quality.main(data, tmp_path / "cache", 1, [*_tiny(tmp_path), "decode.beam_size=1"],
                               ["train.scst_samples=2"], val_images=2, min_train=4, reuse=True, folds=2)
    assert again["reused"] == ["fold0 seed0 xe", "fold0 seed0 scst", "fold1 seed0 xe", "fold1 seed0 scst"]
    assert again["runs"][0]["xe"]["train_s"] <= first["xe"]["train_s"] and again["decoding"]["xe"]["beam_size"] == 1
    assert json.loads((scst_dir / "metrics_test.json").read_text())["beam_size"] == 1
