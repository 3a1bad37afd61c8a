"""Each dataset reader on small files written here in the real layouts, with malformed lines and missing images."""
import json
import logging
from collections import Counter

import pytest
from PIL import Image

from captioner.config import Config, DatasetConfig, apply_overrides
from captioner.data.datasets import by_split, detect_format, load_records, read_dataset
from captioner.errors import CaptionerError


def _images(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / name)
    return folder


def _dataset(annotations, images, **kw):
    return DatasetConfig(format=kw.pop("format", "auto"), annotations=str(annotations), images=str(images),
                         root=str(annotations.parent), **kw)


def test_coco_captions_json(tmp_path, caplog):
    images = _images(tmp_path / "val2014", *(f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3, 4)))
    data = {"info": {}, "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (4, 1, 2, 3)],
            "annotations": [{"id": 10, "image_id": 1, "caption": "A dog runs. "},
                            {"id": 11, "image_id": 1, "caption": "a brown dog"},
                            {"image_id": 2, "caption": "two cats"},  # no 'id': hand-made files often lack it
                            {"id": 13, "image_id": 3, "caption": "   "},  # blank: dropped
                            {"id": 14, "image_id": 4, "caption": "a red bus"},
                            {"id": 15, "image_id": 99, "caption": "an image not in 'images'"}]}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    (tmp_path / "splits.json").write_text(json.dumps({"train": [1, 2], "val": [3], "test": [4]}))
    assert detect_format(path)[0] == "coco"
    with caplog.at_level(logging.WARNING, logger="captioner"):
        fmt, records = read_dataset(_dataset(path, images, splits="splits.json"))
    assert fmt == "coco" and "1 image ids absent from its 'images' list" in caplog.text
    assert [(r.image_id, r.split, r.captions) for r in records] == [
        (1, "train", ["A dog runs.", "a brown dog"]), (2, "train", ["two cats"]), (3, "val", []),
        (4, "test", ["a red bus"])]
    assert records[0].path == str(images / "COCO_val2014_000000000001.jpg")
    # Without a splits file: a deterministic split by image id (val_fraction to val and again to test).
    _, records = read_dataset(_dataset(path, images, val_fraction=0.25))
    assert [r.split for r in records] == ["train", "train", "val", "test"]

    data["annotations"][1] = {"id": 11, "image_id": 1}
    path.write_text(json.dumps(data))
    with pytest.raises(CaptionerError, match=r"captions_val2014.json: annotations\[1\] lacks 'image_id' or a"):
        read_dataset(_dataset(path, images))


def _karpathy_image(cocoid, split, filepath="val2014", sentences=None):
    name = f"COCO_{filepath}_{cocoid:012d}.jpg"
    sentences = sentences or [{"tokens": ["a", "man", "on", "a", "bike"], "raw": "A man on a bike.", "imgid": 0,
                               "sentid": cocoid * 10}]
    return {"filepath": filepath, "sentids": [s.get("sentid", 0) for s in sentences], "filename": name,
            "imgid": cocoid, "split": split, "sentences": sentences, "cocoid": cocoid}


def test_karpathy_coco_json(tmp_path):
    _images(tmp_path / "train2014", "COCO_train2014_000000000009.jpg")
    _images(tmp_path / "val2014", *(f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)))
    data = {"images": [_karpathy_image(9, "train", "train2014"), _karpathy_image(1, "val"),
                       _karpathy_image(2, "test", sentences=[{"tokens": ["two", "dogs"]}]),  # no raw: tokens joined
                       _karpathy_image(3, "restval")], "dataset": "coco"}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    records = load_records(_dataset(path, tmp_path))
    assert {r.image_id: r.split for r in records} == {9: "train", 1: "val", 2: "test", 3: "train"}
    assert records[0].path == str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    assert records[0].captions == ["A man on a bike."] and records[2].captions == ["two dogs"]
    assert {r.image_id for r in load_records(_dataset(path, tmp_path, restval="drop"))} == {9, 1, 2}

    data["images"][1]["split"] = "dev"
    path.write_text(json.dumps(data))
    with pytest.raises(CaptionerError, match=r"images\[1\] .* has split 'dev'; expected one of train, val, test"):
        load_records(_dataset(path, tmp_path))


def test_karpathy_flickr_json_ids_from_file_names(tmp_path):
    names = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"]
    images = _images(tmp_path / "Flicker8k_Dataset", *names)
    data = {"images": [{"filename": n, "imgid": i, "split": s, "sentences": [{"raw": "a child .", "tokens": []}]}
                       for i, (n, s) in enumerate(zip(names, ["train", "test"]))], "dataset": "flickr8k"}
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps(data))
    records = load_records(_dataset(path, images, format="karpathy"))
    assert [(r.image_id, r.split) for r in records] == [(1000268201, "train"), (1001773457, "test")]


FLICKR_TOKENS = """1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs in an entry way .
1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .
1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting
this line has no tab and no hash
1002674143_1b742ab4b8.jpg#0\t
1002674143_1b742ab4b8.jpg\tno caption number
1002674143_1b742ab4b8.jpg#0\tA little girl covered in paint sits in front of a painted rainbow .
1003163366_44323f5815.jpg#0\tA man lays on a bench while his dog sits by him .
2258277193_586949ec62.jpg.1#0\tin the token file but in no split list, like the real one

"""


def _flickr8k(tmp_path, present=("1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg",
                                 "1002674143_1b742ab4b8.jpg", "1003163366_44323f5815.jpg")):
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text(FLICKR_TOKENS)
    (text / "Flickr_8k.trainImages.txt").write_text("1000268201_693b08cb0e.jpg\n1001773457_577c3a7d70.jpg\n")
    (text / "Flickr_8k.devImages.txt").write_text("1002674143_1b742ab4b8.jpg\n")
    (text / "Flickr_8k.testImages.txt").write_text("1003163366_44323f5815.jpg\n\n")
    return text / "Flickr8k.token.txt", _images(tmp_path / "Flicker8k_Dataset", *present)


def test_flickr8k_token_file_and_split_lists(tmp_path, caplog):
    tokens, images = _flickr8k(tmp_path)
    assert detect_format(tokens)[0] == "flickr8k"
    with caplog.at_level(logging.WARNING, logger="captioner"):
        fmt, records = read_dataset(_dataset(tokens, images))
    assert fmt == "flickr8k"
    assert "Flickr8k.token.txt: 3 malformed lines skipped (lines 4, 5, 6)" in caplog.text
    split_of = {r.image_id: (r.split, len(r.captions)) for r in records}
    assert split_of == {1000268201: ("train", 2), 1001773457: ("train", 1), 1002674143: ("val", 1),
                        1003163366: ("test", 1), 2258277193: ("unused", 1)}
    assert records[0].captions[1] == "A girl going into a wooden building ."
    assert len(load_records(_dataset(tokens, images))) == 4  # the unused image is left out


def test_missing_images_skipped_or_fatal(tmp_path, caplog):
    tokens, images = _flickr8k(tmp_path, present=("1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg",
                                                  "1003163366_44323f5815.jpg"))
    with caplog.at_level(logging.WARNING, logger="captioner"):
        records = load_records(_dataset(tokens, images, max_missing_fraction=0.5))
    assert len(records) == 3 and "1 of 4 image files are missing and skipped" in caplog.text
    assert "1002674143_1b742ab4b8.jpg" in caplog.text
    with pytest.raises(CaptionerError, match=r"1 of 4 image files are missing \(25%, above "
                                             r"dataset.max_missing_fraction=0.1; first: .*1002674143_1b742ab4b8.jpg"):
        load_records(_dataset(tokens, images, max_missing_fraction=0.1))
    with pytest.raises(CaptionerError, match="4 of 4 image files are missing .* Check dataset.images"):
        load_records(_dataset(tokens, tmp_path / "wrong_folder"))


def test_csv_kaggle_flickr8k_form(tmp_path, caplog):
    images = _images(tmp_path / "Images", "1000268201_693b08cb0e.jpg", "b.jpg", "c.jpg", "d.jpg")
    path = tmp_path / "captions.txt"  # Kaggle's Flickr8k: a CSV named .txt
    path.write_text('\ufeffimage,caption\n'
                    '1000268201_693b08cb0e.jpg,"A child in a pink dress, climbing stairs ."\n'
                    '1000268201_693b08cb0e.jpg,A girl going into a wooden building .\n'
                    'b.jpg,\n'  # no caption
                    'b.jpg,a dog\n'
                    'c.jpg,"a cat, asleep"\n'
                    'd.jpg,"a quoted caption\nspanning two lines"\n'
                    'only-one-field\n')
    assert detect_format(path)[0] == "csv"
    with caplog.at_level(logging.WARNING, logger="captioner"):
        _, records = read_dataset(_dataset(path, images, val_fraction=0.25))
    assert "1 malformed lines skipped (lines 9)" in caplog.text and "1 rows skipped (lines 4): an empty caption" \
        in caplog.text
    captions = {r.path.rsplit("/", 1)[1]: r.captions for r in records}
    assert captions["1000268201_693b08cb0e.jpg"] == ["A child in a pink dress, climbing stairs .",
                                                     "A girl going into a wooden building ."]
    assert captions["c.jpg"] == ["a cat, asleep"] and captions["d.jpg"] == ["a quoted caption\nspanning two lines"]
    assert Counter(r.split for r in records) == {"train": 2, "val": 1, "test": 1}
    # Not all file names start with digits: ids are 0..N-1 in name order.
    assert sorted(r.image_id for r in records) == [0, 1, 2, 3]


def test_csv_flickr30k_pipe_form(tmp_path, caplog):
    images = _images(tmp_path / "flickr30k_images", "1000092795.jpg", "10002456.jpg")
    path = tmp_path / "results.csv"
    path.write_text("image_name| comment_number| comment\n"
                    "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
                    "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
                    "10002456.jpg| 4 Several men in hard hats are operating a giant pulley system .\n"  # real defect
                    "10002456.jpg| 0| Workers look down from up above on a piece of equipment .\n")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        _, records = read_dataset(_dataset(path, images, format="csv"))
    assert "1 malformed lines skipped (lines 4)" in caplog.text
    assert [(r.image_id, len(r.captions)) for r in records] == [(10002456, 1), (1000092795, 2)]
    assert records[1].captions[1] == "Two young , White males are outside near many bushes ."



def test_csv_split_and_image_id_columns_and_lists(tmp_path):
    images = _images(tmp_path / "img", "a.jpg", "b.jpg", "c.jpg")
    path = tmp_path / "mine.csv"
    path.write_text("file_name;text;split;image_id\na.jpg;a red car;train;7\nb.jpg;a blue car;dev;8\n"
                    "c.jpg;a green car;test;9\nc.jpg;a green van;test;9\n")
    records = load_records(_dataset(path, images))
    assert [(r.image_id, r.split, len(r.captions)) for r in records] == [(7, "train", 1), (8, "val", 1),
                                                                         (9, "test", 2)]
    (tmp_path / "tr.txt").write_text("a.jpg\nb.jpg\n")
    (tmp_path / "te.txt").write_text("c.jpg\n")
    records = load_records(_dataset(path, images, train_list="tr.txt", test_list="te.txt"))
    assert [r.split for r in records] == ["train", "train", "test"]
    with pytest.raises(CaptionerError, match=r"val image list .*nope.txt not found"):
        load_records(_dataset(path, images, val_list="nope.txt"))
    bad = tmp_path / "bad.csv"
    bad.write_text("picture,words\nx.jpg,a car\n")
    with pytest.raises(CaptionerError, match="bad.csv: the first line must be a header naming an image column"):
        load_records(_dataset(bad, images, format="csv"))


def test_jsonl(tmp_path, caplog):
    images = _images(tmp_path / "photos", "0001.jpg", "0002.jpg")
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "0001.jpg", "caption": "a dog on a beach"}\n'
                    '{"image": "0002.jpg", "captions": ["two cats", "cats asleep"], "split": "test"}\n'
                    '{"image": "0003.jpg"}\n'
                    'not json\n')
    assert detect_format(path)[0] == "jsonl"
    same_as_json = tmp_path / "captions.json"  # JSON Lines under a .json name
    same_as_json.write_text(path.read_text())
    assert detect_format(same_as_json)[0] == "jsonl"
    with caplog.at_level(logging.WARNING, logger="captioner"):
        _, records = read_dataset(_dataset(path, images))
    assert "2 malformed lines skipped (lines 3, 4)" in caplog.text
    assert [(r.image_id, r.split, r.captions) for r in records] == [
        (1, "train", ["a dog on a beach"]), (2, "test", ["two cats", "cats asleep"])]


def test_format_detection_and_config_errors(tmp_path):
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello world\n")
    with pytest.raises(CaptionerError, match="cannot tell the format of .*notes.txt .*set dataset.format"):
        load_records(_dataset(unknown, tmp_path))
    other_json = tmp_path / "other.json"
    other_json.write_text('{"images": [{"id": 1}]}')
    with pytest.raises(CaptionerError, match="neither COCO captions format .* nor a Karpathy split file"):
        load_records(_dataset(other_json, tmp_path))
    with pytest.raises(CaptionerError, match=r"annotations file .*absent.json not found"):
        load_records(_dataset(tmp_path / "absent.json", tmp_path))
    with pytest.raises(CaptionerError, match="dataset.format must be one of: auto, synthetic, coco, karpathy"):
        apply_overrides(Config(), ["dataset.format=flickr"])
    with pytest.raises(CaptionerError, match="dataset.restval must be train or drop"):
        apply_overrides(Config(), ["dataset.restval=val"])
    with pytest.raises(CaptionerError, match="needs dataset.annotations"):
        load_records(DatasetConfig(format="karpathy"))
    assert by_split([], "train") == []


def test_tiny_config_takes_ones_own_captions(tmp_path):
    """The README's first example: the shipped tiny.yaml with dataset.annotations and dataset.images given on the
    command line reads that file (tiny.yaml said format: synthetic, which refused them); without them it is still
    the demo's synthetic shapes."""
    from captioner.config import load_config
    images = _images(tmp_path / "my_photos", "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    (tmp_path / "my_captions.csv").write_text("image,caption\n" + "".join(f"{n},a red square number {i}\n"
                                                                         for i, n in enumerate(sorted(
                                                                             p.name for p in images.iterdir()))))
    cfg = load_config("tiny.yaml", [f"dataset.annotations={tmp_path / 'my_captions.csv'}",
                                    f"dataset.images={images}", "dataset.val_fraction=0.25"])
    _, records = read_dataset(cfg.dataset)
    assert sorted(r.path.rsplit("/", 1)[1] for r in records) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert Counter(r.split for r in records) == {"train": 2, "val": 1, "test": 1}
    shapes = load_config("tiny.yaml", [f"dataset.root={tmp_path / 'shapes'}", "dataset.synthetic_images=20"])
    fmt, records = read_dataset(shapes.dataset)
    assert fmt == "synthetic" and len(records) == 20
