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
    # the section's keys, not all 90 (a 1,500-character line)
    encoder_keys = [k.partition(".")[2] for k in valid_keys() if k.startswith("encoder.")]
    assert "did you mean encoder.layer?" in str(e.value) and all(k in str(e.value) for k in encoder_keys)
    assert "train.lr" not in str(e.value)
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


def test_text_where_a_number_is_expected_is_refused_but_yaml_11_floats_read(tmp_path):
    """PyYAML reads 1e-3 as text (YAML 1.1): that still becomes a float, in a file and in a key=value override;
    "128" quoted is text, refused with the key and the expected type."""
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 1e-3\n  weight_decay: 1.0e2\n")
    cfg = load_config(good, ["model.dropout=5e-1", "model.embed_dim=64"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.model.dropout, cfg.model.embed_dim) == (1e-3, 100.0, 0.5, 64)
    for text, message in (('model:\n  embed_dim: "128"\n', "'model.embed_dim' expects int"),
                          ("train:\n  lr: '0.001'\n", "'train.lr' expects float")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(CaptionerError, match=message):
            load_config(bad)
    with pytest.raises(CaptionerError, match="'model.embed_dim' expects int"):
        apply_overrides(Config(), ["model.embed_dim=abc"])
