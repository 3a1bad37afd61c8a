"""The whole product on timm and open_clip backbones (random weights, 64 px, 60 synthetic images): extract into
the feature cache, train one epoch from it, caption with a gallery from the checkpoint alone; preprocessing
recorded in the checkpoint and reused; a resumed run keeps it."""
import html
import json
import logging
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.config import from_dict, inherit_preprocess, load_config, to_dict
from captioner.data.images import load_image
from captioner.data.synthetic import write_jpegs
from captioner.engine.infer.checkpoint import load_checkpoint, load_model
from captioner.engine.infer.predictor import Predictor
from captioner.errors import CaptionerError
from captioner.jobs import caption, extract, train
from captioner.model.caption_model import CaptionModel, recorded_encoder_config

from helpers import TINY, small_config

# Found, not imported: timm and open_clip take seconds to import, and every pytest-xdist worker collects this file.
pytestmark = pytest.mark.skipif(not (find_spec("timm") and find_spec("open_clip")),
                                reason='the [timm] and [clip] extras are not installed: pip install -e ".[timm,clip]"')

BACKBONES = [  # arch, layer, grid at 64 px, the library's own mean
    ("timm/convnext_atto", "stages.2", (160, 4, 4), (0.485, 0.456, 0.406)),
    ("timm/vit_tiny_patch16_224", "blocks.11", (192, 4, 4), (0.5, 0.5, 0.5)),
    ("open_clip/ViT-B-32", "transformer.resblocks.11", (768, 2, 2), (0.48145466, 0.4578275, 0.40821073)),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch, layer, grid, mean", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_extract_train_from_cache_caption_with_gallery(arch, layer, grid, mean, tmp_path, caplog):
    cfg = small_config(tmp_path / "data", f"encoder.arch={arch}", f"encoder.layer={layer}", "train.epochs=1",
                       "train.checkpoint_every=0", f"cache.dir={tmp_path / 'cache'}")
    extracted = extract.main(extract.ExtractJob(cfg, "train,val,test", device="cpu"))
    assert extracted["added"] == 60 and extracted["failed"] == 0
    assert json.loads((tmp_path / "cache" / "header.json").read_text())["preprocess"]["mean"] == pytest.approx(mean)

    with caplog.at_level(logging.INFO, logger="captioner"):
        summary = train.main(train.TrainJob(cfg, tmp_path / "run", "cpu"))
    assert "train split: features of 48 images from cache" in caplog.text  # trained from the cache, no encoder run
    saved = load_checkpoint(summary["last_checkpoint"])["config"]["encoder"]
    assert saved["mean"] == pytest.approx(mean) and saved["interpolation"] == "bicubic"  # the weights' own, recorded

    model, _, _ = load_model(summary["last_checkpoint"])  # rebuilt from the checkpoint alone: no tag, no file
    assert (model.encoder.channels, *model.encoder.grid) == grid and model.encoder.preprocess.mean == pytest.approx(mean)

    photos = tmp_path / "photos"
    write_jpegs(photos, 3, 80, 60)
    out, gallery = tmp_path / "captions.jsonl", tmp_path / "gallery.html"
    caption.main(caption.CaptionJob(summary["last_checkpoint"], [str(photos)], out=str(out), html=str(gallery),
                                    device="cpu", num_workers=0))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["caption"] for r in rows)
    page = html.unescape(gallery.read_text())
    assert page.count("data:image/png;base64") >= 3 and f"of {grid[1]}x{grid[2]}" in page  # attention per word


@pytest.mark.slow
def test_resumed_run_keeps_the_recorded_preprocessing(tmp_path):
    """A run over a ViT with its own mean (0.5) resumed under the same config, which leaves preprocessing unset."""
    cfg = small_config(tmp_path / "data", "encoder.arch=timm/vit_tiny_patch16_224", "encoder.layer=blocks.3",
                       "train.epochs=1", "train.checkpoint_every=0", "cache.use=false")
    train.main(train.TrainJob(cfg, tmp_path / "run", "cpu"))
    longer = from_dict(to_dict(cfg))
    longer.train.epochs = 2
    assert longer.encoder.mean is None
    summary = train.main(train.TrainJob(longer, tmp_path / "run", "cpu", resume=True))
    assert summary["epochs"] == 2
    assert load_checkpoint(summary["last_checkpoint"])["config"]["encoder"]["mean"] == [0.5, 0.5, 0.5]
    # the same command again finds the same run (not "a different run")
    again = train.main(train.TrainJob(longer, tmp_path / "run", "cpu"))
    assert again["epochs"] == 2


def test_a_checkpoint_rebuilds_the_encoder_with_its_recorded_preprocessing(tmp_path):
    """The checkpoint's mean, std and resize filter win over what the library would give the weights today."""
    cfg = small_config(tmp_path, "encoder.arch=timm/vit_tiny_patch16_224", "encoder.layer=blocks.0",
                       "encoder.image_size=32")
    model = CaptionModel(cfg.encoder, cfg.model, 10)
    recorded = recorded_encoder_config(cfg.encoder, model.encoder)
    assert recorded.mean == [0.5, 0.5, 0.5] and recorded.interpolation == "bicubic"
    recorded.mean, recorded.interpolation = [0.25, 0.5, 0.75], "bilinear"  # as if the library had changed since
    saved = {**to_dict(cfg), "encoder": {**to_dict(cfg)["encoder"], **vars(recorded)}}
    vocab = ["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(6))]
    torch.save({"model": model.state_dict(), "config": saved, "vocab": vocab}, tmp_path / "x.pt")
    loaded, _, _ = load_model(tmp_path / "x.pt")
    assert loaded.encoder.preprocess.mean == (0.25, 0.5, 0.75) and loaded.encoder.interpolation == "bilinear"
    batches = Predictor.load(tmp_path / "x.pt", "cpu").image_batches([str(tmp_path / "x.pt")])
    assert batches.files.interpolation == "bilinear"  # what caption, evaluate, serve and Captioner resize with
    # a config that leaves them unset inherits them; one that sets them keeps its own
    assert inherit_preprocess(to_dict(cfg), saved)["encoder"]["mean"] == [0.25, 0.5, 0.75]
    mine = {**to_dict(cfg), "encoder": {**to_dict(cfg)["encoder"], "mean": [0.1, 0.1, 0.1]}}
    assert inherit_preprocess(mine, saved)["encoder"]["mean"] == [0.1, 0.1, 0.1]


def test_bilinear_weights_resize_bilinearly(tmp_path):
    photo = tmp_path / "p.png"
    pixels = (torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(photo)
    bicubic, bilinear = load_image(str(photo), 32), load_image(str(photo), 32, interpolation="bilinear")
    expected = torch.from_numpy(np.array(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR)))
    assert torch.equal(bilinear, expected.permute(2, 0, 1)) and not torch.equal(bicubic, bilinear)


def test_preprocessing_keys_from_the_command_line():
    cfg = load_config(TINY, ["encoder.mean=[0.5,0.5,0.5]", "encoder.std=[1,1,1]", "encoder.interpolation=bilinear"])
    assert cfg.encoder.mean == [0.5, 0.5, 0.5] and cfg.encoder.std == [1.0, 1.0, 1.0]
    for bad, message in (("encoder.mean=0.5", "expects a list of float"), ("encoder.mean=[0.5,0.5]", "one value per"),
                         ("encoder.std=[0,1,1]", "encoder.std must be > 0"), ("encoder.interpolation=lanczos",
                                                                               "bicubic, bilinear")):
        with pytest.raises(CaptionerError, match=message):
            load_config(TINY, [bad])
