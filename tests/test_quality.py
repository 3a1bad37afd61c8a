"""The quality benchmark's pieces that need no download: weight conversion, split lists, caption diversity."""
import pytest
import torch
import torchvision

from captioner.data.cache import weights_fingerprint
from captioner.errors import CaptionerError
from captioner.jobs.quality import convert_mobilenet_v2, write_split_lists
from captioner.metrics.diversity import caption_diversity
from captioner.model.encoder import HookedEncoder


def test_renamed_mobilenet_features_load_into_the_hooked_encoder(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v2().eval()
    # the wheel's layout: feature layers only, under other names, in the same order
    renamed = {f"layer_{i}": t for i, (k, t) in enumerate(source.state_dict().items()) if k.startswith("features.")}
    path = tmp_path / "mnv2.pth"
    torch.save(convert_mobilenet_v2(renamed), path)
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
        convert_mobilenet_v2(renamed)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("features.18")}
    torch.save(partial, path)
    with pytest.raises(CaptionerError, match="missing keys features.18"):
        HookedEncoder("mobilenet_v2", "features", weights=str(path), image_size=64)


def test_split_lists_hold_out_the_last_photos(tmp_path):
    names = [f"{i:04d}.jpg" for i in range(300)]
    (tmp_path / "captions.txt").write_text("image,caption\n" + "".join(f"{n},a photo {n}\n" for n in names))
    lists = write_split_lists(tmp_path, tmp_path / "cache")
    parts = {s: p.read_text().split() for s, p in lists.items()}
    assert parts["test"] == names[-100:] and parts["val"] == names[-160:-100] and parts["train"] == names[:140]


def test_caption_diversity_counts_distinct_captions_and_words():
    d = caption_diversity({1: "A dog runs.", 2: "a dog runs", 3: "a man sits on a bench"})
    assert d["distinct_captions"] == 2 and d["distinct_fraction"] == pytest.approx(2 / 3)
    assert d["vocab_used"] == 7 and d["mean_length"] == pytest.approx((3 + 3 + 6) / 3)
