import pytest

from captioner.config import Config, apply_overrides, load_config, valid_keys
from captioner.errors import CaptionerError
from captioner.text import Vocabulary, tokenize

from helpers import TINY


def test_yaml_and_overrides_are_typed():
    cfg = load_config(TINY, ["encoder.layer=layer3", "train.lr=1e-3", "train.epochs=2", "encoder.weights=null",
                             "train.precompute_features=false"])
    assert cfg.encoder.arch == "resnet18" and cfg.encoder.layer == "layer3"
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 2 and cfg.train.precompute_features is False
    assert cfg.encoder.weights is None


def test_unknown_key_lists_valid_ones(tmp_path):
    with pytest.raises(CaptionerError) as e:
        apply_overrides(Config(), ["encoder.layr=layer3"])
    assert "encoder.layer" in str(e.value) and all(k in str(e.value) for k in valid_keys())
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(CaptionerError, match=r"bad.yaml: unknown config key 'train.epoch'"):
        load_config(bad)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=many", "expects int"), ("train.lr=-1", "train.lr must be > 0"),
    ("decode.beam_size=0", "beam_size' must be >= 1"), ("novalue", "section.key=value"),
    ("train.val_beam_size=-1", r"train.val_beam_size' must be >= 0 \(0: decode.beam_size, 1: greedy\), got -1"),
    ("train.validate_init=maybe", "validate_init"),
    ("train.scst_max_len=-1", r"train.scst_max_len' must be >= 0, got -1")])
def test_bad_values_rejected(override, message):
    with pytest.raises(CaptionerError, match=message):
        apply_overrides(Config(), [override])


def test_vocab_round_trip(tmp_path):
    captions = ["A dog runs.", "a dog sits", "A CAT, sleeping!"]
    vocab = Vocabulary.build(captions, min_freq=2)
    assert vocab.tokens[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and set(vocab.tokens[4:]) == {"a", "dog"}
    ids = vocab.encode("a dog sleeps", max_len=10)
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id and ids[3] == vocab.unk_id
    assert vocab.decode(ids) == "a dog <unk>"
    assert len(vocab.encode("a a a a a", max_len=3)) == 5
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == vocab
    assert tokenize("Two dogs' toys, 3 balls.") == ["two", "dogs", "toys", "3", "balls"]
