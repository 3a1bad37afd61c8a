"""Strict datasets: duplicate image ids, one file under two ids, captions split across extra CSV columns, a
synthetic folder made with other settings, empty splits and datasets without captions are errors or named
warnings with counts (in `prepare`'s summary too), never silent."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import main
from captioner.config import DatasetConfig
from captioner.data.datasets import read_dataset
from captioner.data.synthetic import generate
from captioner.errors import CaptionerError


@pytest.fixture
def photos(tmp_path) -> Path:
    for i in range(10):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"p{i}.png")
    return tmp_path


def _coco(folder: Path, images, annotations) -> Path:
    path = folder / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def _read(path: Path, **settings):
    return read_dataset(DatasetConfig(annotations=str(path), **settings))


def _prepare(config: Path, out: Path | None, *overrides: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["prepare", "--config", str(config), *(["--out", str(out)] if out else []), *overrides])
    return code, stdout.getvalue(), stderr.getvalue()


def test_two_files_under_one_coco_id_is_an_error_naming_both(photos):
    path = _coco(photos, [{"id": 1, "file_name": "p0.png"}, {"id": 1, "file_name": "p1.png"}],
                 [{"image_id": 1, "caption": "a red square"}, {"image_id": 1, "caption": "a dark square"}])
    with pytest.raises(CaptionerError, match=r"1 image ids are given to two different files \(first: id 1 is "
                                             r"p0.png and p1.png\)"):
        _read(path)


def test_a_repeated_coco_entry_is_counted_once_with_a_warning(photos, caplog):
    path = _coco(photos, [{"id": i, "file_name": f"p{i}.png"} for i in range(4)] + [{"id": 2, "file_name": "p2.png"}],
                 [{"image_id": i, "caption": f"a square number {i}"} for i in range(4)])
    with caplog.at_level(logging.WARNING, "captioner"):
        _, records = _read(path)
    assert len(records) == 4 and "1 duplicate entries in 'images'" in caplog.text


@pytest.mark.parametrize("kind", ["coco", "csv", "jsonl"])
def test_one_file_under_two_ids_is_an_error(photos, kind):
    if kind == "coco":
        path = _coco(photos, [{"id": 1, "file_name": "p0.png"}, {"id": 2, "file_name": "./p0.png"}],
                     [{"image_id": 1, "caption": "a red square"}, {"image_id": 2, "caption": "a square"}])
    elif kind == "csv":
        path = photos / "captions.csv"
        path.write_text("image,caption,image_id\np0.png,a red square,1\n./p0.png,a square,2\np1.png,a dog,3\n")
    else:
        path = photos / "captions.jsonl"
        path.write_text('{"image": "p0.png", "caption": "a red square"}\n'
                        f'{{"image": "{photos / "p0.png"}", "caption": "a square"}}\n')
    with pytest.raises(CaptionerError, match=r"1 image files are listed under more than one id"):
        _read(path)


def test_one_csv_image_with_two_ids_is_an_error(photos):
    path = photos / "captions.csv"
    path.write_text("image,caption,image_id\np0.png,a red square,1\np0.png,a square,2\n")
    with pytest.raises(CaptionerError, match=r"p0.png has image_id 1 on one row and 2 on another"):
        _read(path)


def test_a_caption_cut_by_unquoted_commas_is_kept_whole_with_a_warning(photos, caplog):
    path = photos / "captions.csv"
    path.write_text("image,caption\np0.png,a dog, running, on grass\np1.png,\"a cat, asleep\"\np2.png,a bird\n")
    with caplog.at_level(logging.WARNING, "captioner"):
        _, records = _read(path)
    captions = {Path(r.path).name: r.captions for r in records}
    assert captions["p0.png"] == ["a dog, running, on grass"]  # not "a dog"
    assert captions["p1.png"] == ["a cat, asleep"] and captions["p2.png"] == ["a bird"]
    assert "1 rows have more ','-separated fields than the header (lines 2)" in caplog.text


def test_extra_fields_before_the_last_column_are_malformed_rows(photos, caplog):
    path = photos / "captions.csv"
    path.write_text("image,caption,split\np0.png,a dog, running,train\np1.png,a cat,train\np2.png,a bird,test\n")
    with caplog.at_level(logging.WARNING, "captioner"):
        _, records = _read(path)
    assert sorted(Path(r.path).name for r in records) == ["p1.png", "p2.png"]
    assert "1 malformed lines skipped (lines 2)" in caplog.text and "must be quoted" in caplog.text


def test_a_synthetic_folder_made_with_other_settings_is_refused(tmp_path):
    generate(tmp_path / "syn", num_images=12, seed=0)
    before = (tmp_path / "syn" / "captions.json").read_bytes()
    generate(tmp_path / "syn", num_images=12, seed=0)  # the same settings: reused as it is
    for changed, says in (({"num_images": 20}, "dataset.synthetic_images 12 (the config asks for 20)"),
                          ({"seed": 1}, "dataset.synthetic_seed 0 (the config asks for 1)"),
                          ({"val_fraction": 0.2}, "dataset.val_fraction 0.1 (the config asks for 0.2)")):
        with pytest.raises(CaptionerError, match="was generated with other settings") as refused:
            generate(tmp_path / "syn", **{"num_images": 12, "seed": 0, **changed})
        assert says in str(refused.value)
    assert (tmp_path / "syn" / "captions.json").read_bytes() == before


def test_a_synthetic_folder_from_before_the_settings_were_recorded_is_checked_by_size(tmp_path):
    root = generate(tmp_path / "old", num_images=12, seed=0)
    data = json.loads((root / "captions.json").read_text())
    del data["info"]
    (root / "captions.json").write_text(json.dumps(data))
    generate(root, num_images=12, seed=0)
    with pytest.raises(CaptionerError, match="dataset.synthetic_images 12"):
        generate(root, num_images=30, seed=0)


def test_a_dataset_without_captions_is_an_error(photos):
    path = _coco(photos, [{"id": i, "file_name": f"p{i}.png"} for i in range(3)], [])
    with pytest.raises(CaptionerError, match=r"holds no captions \(3 images, none with a caption\)"):
        _read(path)


def test_prepare_names_every_warning_with_its_count_in_the_summary(photos, tmp_path):
    # 10 images: 2 without captions, one listed twice; no val or test split (all train in the splits file).
    path = _coco(photos, [{"id": i, "file_name": f"p{i}.png"} for i in range(10)] + [{"id": 3, "file_name": "p3.png"}],
                 [{"image_id": i, "caption": f"a red square number {i}"} for i in range(8)])
    (photos / "splits.json").write_text(json.dumps({"train": list(range(10)), "val": [], "test": []}))
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset:\n  annotations: {path}\n  splits: {photos / 'splits.json'}\n")
    code, out, err = _prepare(config, tmp_path / "prepared")
    assert code == 0, err
    summary = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    warnings = "\n".join(summary["warnings"])
    assert "1 duplicate entries in 'images'" in warnings
    assert "2 of 10 images have no caption" in warnings
    assert "the val split is empty: training cannot select a checkpoint" in warnings
    assert "the test split is empty" in warnings
    assert "4 warnings (also in summary.json)" in out and "the val split is empty" in out


def test_prepare_refuses_a_train_split_without_captions(photos, tmp_path):
    path = _coco(photos, [{"id": i, "file_name": f"p{i}.png"} for i in range(4)],
                 [{"image_id": 3, "caption": "a red square"}])
    (photos / "splits.json").write_text(json.dumps({"train": [0, 1, 2], "val": [3], "test": []}))
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset:\n  annotations: {path}\n  splits: {photos / 'splits.json'}\n")
    code, _, err = _prepare(config, tmp_path / "prepared")
    assert code == 2 and "the train split has 3 images and no captions" in err
    assert not (tmp_path / "prepared").exists()


def test_a_caption_longer_than_the_csv_field_limit_is_read(photos):
    path = photos / "captions.csv"
    path.write_text("image,caption\np0.png,a red square\np1.png," + "dog " * 50_000 + "\n")  # 200,000 characters
    _, records = _read(path)
    assert len(records) == 2 and len(records[1].captions[0]) == 199_999


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_skipped_rows_name_their_reason(photos, caplog, kind):
    rows = [("p0.png", "a red square", "train"), ("p1.png", "", "train"), ("p2.png", "a dog", "tst"),
            ("p3.png", "a cat", "tst"), ("p4.png", "a bird", "test"), ("p5.png", "a fox", "val")]
    path = photos / f"captions.{kind}"
    if kind == "csv":
        path.write_text("image,caption,split\n" + "".join(f"{i},{c},{s}\n" for i, c, s in rows))
    else:
        path.write_text("".join(json.dumps({"image": i, "caption": c, "split": s}) + "\n" for i, c, s in rows))
    with caplog.at_level(logging.WARNING, "captioner"):
        _, records = _read(path)
    assert sorted(Path(r.path).name for r in records) == ["p0.png", "p4.png", "p5.png"]
    first = 2 if kind == "csv" else 1  # the CSV's header is line 1
    assert f"1 rows skipped (lines {first + 1}): an empty caption" in caplog.text
    assert f"2 rows skipped (lines {first + 2}, {first + 3}): split 'tst', not one of train, val, test" in caplog.text
    assert "malformed" not in caplog.text


def test_a_file_whose_every_row_has_an_unknown_split_is_an_error_naming_it(photos):
    path = photos / "captions.csv"
    path.write_text("image,caption,split\np0.png,a red square,tst\np1.png,a dog,tst\n")
    with pytest.raises(CaptionerError, match=r"no usable caption row; 2 rows have split 'tst', not one of train"):
        _read(path)


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_repeated_row_is_counted_once_with_a_warning(photos, caplog, kind):
    rows = [("p0.png", "a red square"), ("p0.png", "a dark square"), ("p1.png", "a dog")] * 2
    path = photos / f"captions.{kind}"
    if kind == "csv":
        path.write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    else:
        path.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    with caplog.at_level(logging.WARNING, "captioner"):
        _, records = _read(path)
    assert {Path(r.path).name: r.captions for r in records} == {"p0.png": ["a red square", "a dark square"],
                                                                "p1.png": ["a dog"]}
    assert "3 rows repeat an earlier row's image and caption and are counted once (first: p0.png, 'a red square')" \
        in caplog.text


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_image_names_written_on_windows_find_their_files(photos, kind):
    (photos / "imgs").mkdir()
    for name in ("p0.png", "p1.png"):
        (photos / name).rename(photos / "imgs" / name)
    path = photos / f"captions.{kind}"
    rows = [("imgs\\p0.png", "a red square"), ("imgs\\p1.png", "a dark square")]
    if kind == "csv":
        path.write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    else:
        path.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    _, records = _read(path)
    assert sorted(r.path for r in records) == [str(photos / "imgs" / "p0.png"), str(photos / "imgs" / "p1.png")]


def test_a_quote_left_open_is_named_by_the_lines_it_joined(photos, caplog):
    path = photos / "captions.csv"
    path.write_text('image,caption\np0.png,"a red square\np1.png,a dog\np2.png,a cat\np3.png,"a bird"\np4.png,a fox\n')
    with caplog.at_level(logging.WARNING, "captioner"):
        _, records = _read(path)
    assert "1 rows span several lines (lines 2-5): a quote left open" in caplog.text
    assert sorted(Path(r.path).name for r in records) == ["p0.png", "p4.png"]  # p1..p3 went into p0's caption


def test_captions_without_a_word_are_dropped_with_a_warning(photos, caplog):
    path = photos / "captions.csv"
    path.write_text("image,caption\np0.png,a red square\np0.png,🐶🎉 !!\np1.png,...\np2.png,un café\n")
    with caplog.at_level(logging.WARNING, "captioner"):
        _, records = _read(path)
    captions = {Path(r.path).name: r.captions for r in records}
    assert captions == {"p0.png": ["a red square"], "p1.png": [], "p2.png": ["un café"]}
    assert "2 captions hold no word (only symbols, emoji or punctuation) and are not used" in caplog.text
    assert "1 of 3 images have no caption and are not used" in caplog.text


def test_prepare_writes_beside_ones_own_captions_file_when_no_root_is_set(photos, tmp_path, monkeypatch):
    (photos / "captions.csv").write_text("image,caption\n" + "".join(f"p{i}.png,a square number {i}\n"
                                                                        for i in range(10)))
    config = photos / "mine.yaml"
    config.write_text("dataset:\n  annotations: captions.csv\n  val_fraction: 0.2\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = _prepare(config, None)
    assert code == 0, err
    assert (photos / "prepared" / "summary.json").is_file()  # was ./data/synthetic/prepared of the working folder
    assert not (work / "data").exists()


def test_a_default_prepare_folder_that_cannot_be_written_names_out(photos, tmp_path):
    """The default output lies beside the captions file, perhaps a shared read-only folder: the refusal says how
    to write elsewhere; a folder the user gave is refused as it is."""
    (photos / "captions.csv").write_text("image,caption\n" + "".join(f"p{i}.png,a square number {i}\n"
                                                                    for i in range(10)))
    config = photos / "mine.yaml"
    config.write_text("dataset:\n  annotations: captions.csv\n  val_fraction: 0.2\n")
    (photos / "prepared").write_text("in the way")  # a file where the folder would go
    code, _, err = _prepare(config, None)
    assert code == 2 and "is a file, not a folder; write the prepared files elsewhere with --out DIR" in err
    code, _, err = _prepare(config, photos / "prepared")
    assert code == 2 and "--out DIR" not in err and len(err.strip().splitlines()) == 1
