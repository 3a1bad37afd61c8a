import pytest
import torch

from captioner.model.decoding import greedy_decode
from captioner.engine.infer.checkpoint import load_checkpoint, load_model, save_checkpoint
from captioner.config import load_config
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary

from helpers import SHAPE_CAPTIONS, SMALL_MODEL, TINY, untrained_checkpoint


def _small(tmp_path):
    """The saved untrained model, and the model, vocabulary and config it should load as, built here."""
    path = tmp_path / "ckpt.pt"
    untrained_checkpoint(path, *SMALL_MODEL, seed=1)
    cfg = load_config(TINY, SMALL_MODEL)
    vocab = Vocabulary.build(SHAPE_CAPTIONS)
    torch.manual_seed(1)
    model = CaptionModel(cfg.encoder, cfg.model, len(vocab))
    return model, vocab, cfg, path


def test_round_trip_with_weights_only(tmp_path):
    model, vocab, cfg, path = _small(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["vocab"] == vocab.tokens and state["config"]["encoder"]["arch"] == "resnet18"
    loaded, loaded_vocab, loaded_cfg = load_model(path)
    assert loaded_vocab == vocab and loaded_cfg == cfg
    images = torch.rand(2, 3, 64, 64)
    model.eval()
    assert torch.equal(model.encode(images), loaded.encode(images))
    raw = model.encode(images)
    assert torch.equal(greedy_decode(model, raw).tokens, greedy_decode(loaded, raw).tokens)


def test_wrapper_prefixes_are_stripped(tmp_path):
    model, vocab, cfg, path = _small(tmp_path)
    state = torch.load(path, weights_only=True)
    state["model"] = {"module." + k: v for k, v in state["model"].items()}
    save_checkpoint(path, state)
    loaded = load_model(path)[0].state_dict()
    assert loaded.keys() == model.state_dict().keys()  # "module." gone from every key
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    _, _, _, path = _small(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptionerError, match=r"is truncated or corrupt \(its zip archive is incomplete\)"):
        load_checkpoint(path)
    path.write_text("hello")
    with pytest.raises(CaptionerError, match="is not a PyTorch checkpoint"):
        load_checkpoint(path)
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module: refused, and no advice to unpickle it
    with pytest.raises(CaptionerError, match="holds Python objects") as refused:
        load_checkpoint(path)
    assert "weights_only" not in str(refused.value) and len(str(refused.value)) < 300
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CaptionerError, match="lacks model, config, vocab"):
        load_checkpoint(path)
    with pytest.raises(CaptionerError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
