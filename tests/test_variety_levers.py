"""The variety levers' keys: label smoothing, SCST's diversity term, and the decode.* options reaching the decoder."""
import re

import pytest
import torch
import torch.nn.functional as F

from captioner.config import ModelConfig, load_config
from captioner.data.records import ImageRecord
from captioner.engine.infer.predict import DecodeSettings, caption_batch
from captioner.engine.runtime.compute import setup_compute
from captioner.engine.train.scst import Rewarder, SelfCriticalLoss, similarity_to_other_images
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel
from captioner.model.decoder import caption_loss
from captioner.model.decoding import SearchOptions, decode
from captioner.text import Vocabulary

from helpers import GridStub


def test_label_smoothing_moves_the_target_towards_uniform():
    torch.manual_seed(0)
    logits, alphas = torch.randn(2, 3, 7), torch.full((2, 3, 4), 0.25)
    captions = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])
    lengths = torch.tensor([4, 3])
    plain, ce = caption_loss(logits, alphas, captions, lengths, alpha_c=0.0)
    smooth, smooth_ce = caption_loss(logits, alphas, captions, lengths, alpha_c=0.0, label_smoothing=0.2)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logp = F.log_softmax(logits[mask], dim=-1)
    targets = captions[:, 1:][mask]
    expected = (0.8 * -logp.gather(1, targets[:, None]).squeeze(1) + 0.2 * -logp.mean(dim=1)).mean()
    assert torch.allclose(smooth, expected) and torch.allclose(plain, ce) and not torch.allclose(plain, smooth)


def test_similarity_to_other_images_finds_generic_captions():
    end, pad = 2, 0
    tokens = torch.tensor([[5, 6, 7, end, pad],   # image 0: "a dog runs"
                           [5, 6, 7, end, pad],   # image 1: the same caption
                           [8, 9, 10, 11, end],   # image 2: its own words
                           [8, 9, 10, 11, end],   # image 2 again: the same image does not count
                           [5, 6, 7, end, 9]])    # image 3: after <end> nothing counts
    images = torch.tensor([0, 1, 2, 2, 3])
    similarity = similarity_to_other_images(tokens, images)
    assert similarity[[0, 1, 4]].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert similarity[[2, 3]].tolist() == pytest.approx([0.0, 0.0])
    partly = similarity_to_other_images(torch.tensor([[5, 6, 7, 8, end], [5, 6, 9, 10, end]]), torch.tensor([0, 1]))
    # 4 words + 3 word pairs each, sharing 2 words and 1 pair: cosine 3/7
    assert partly.tolist() == pytest.approx([3 / 7, 3 / 7], abs=1e-6)
    assert similarity_to_other_images(tokens[:2], torch.tensor([0, 0])).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_scst_diversity_term_lowers_the_reward_by_the_similarity(baseline):
    captions = [["a dog runs on grass", "a brown dog runs"], ["a man rides a bike"], ["two girls play on grass"]]
    records = [ImageRecord(image_id=i, path=f"{i}.jpg", captions=c, split="train") for i, c in enumerate(captions)]
    vocab = Vocabulary.build([c for caps in captions for c in caps])
    torch.manual_seed(0)
    model = CaptionModel(None, ModelConfig(16, 16, 16, dropout=0.0), len(vocab), encoder=GridStub())
    rewarder, raw, images = Rewarder(records, vocab, 16), torch.randn(3, 24, 3, 3), torch.tensor([0, 1, 2])
    results = {}
    for weight in (0.0, 0.5):
        loss_fn = SelfCriticalLoss(model, rewarder, samples=4, baseline=baseline, max_len=6, diversity=weight)
        torch.manual_seed(1)  # the same samples both times
        loss, _, _ = loss_fn(raw, images)
        results[weight] = (loss.item(), loss_fn.stats)
    plain, diverse = results[0.0][1], results[0.5][1]
    assert "similarity" not in plain and 0 < diverse["similarity"] <= 1
    assert diverse["reward"] == pytest.approx(plain["reward"])  # the logged reward stays CIDEr-D
    if baseline == "mean":  # the baseline is the penalised rewards' mean
        assert diverse["baseline"] == pytest.approx(plain["baseline"] - 0.5 * diverse["similarity"], abs=1e-5)
    assert results[0.0][0] != pytest.approx(results[0.5][0])


@pytest.mark.parametrize("key,value,message", [
    ("train.label_smoothing", "1.0", "train.label_smoothing must be in [0, 1)"),
    ("train.scst_diversity", "-0.1", "train.scst_diversity must be >= 0"),
    ("train.scst_xe_weight", "-1", "train.scst_xe_weight must be >= 0"),
    ("train.scst_temperature", "0", "train.scst_temperature must be in [0.0001, 10000]"),
    ("decode.block_ngram", "-1", "decode.block_ngram' must be >= 0"),
    ("decode.groups", "0", "decode.groups' must be >= 1"),
    ("decode.groups", "2", "decode.beam_size (3) must be a multiple of decode.groups (2)"),
    ("decode.diversity", "-1", "decode.diversity must be >= 0")])
def test_variety_keys_refuse_bad_values(key, value, message):
    with pytest.raises(CaptionerError, match=re.escape(message)):
        load_config(None, [f"{key}={value}"])


def test_decode_settings_take_the_decode_keys_to_the_one_decode_path():
    cfg = load_config(None, ["decode.block_ngram=3", "decode.beam_size=4", "decode.groups=2", "decode.diversity=0.5",
                       "compute.bf16=false"])  # float32 here, as decode() below runs, on any CPU
    compute = setup_compute(cfg.compute, torch.device("cpu"))
    settings = DecodeSettings.of(cfg, compute=compute)
    assert (settings.block_ngram, settings.groups, settings.diversity, settings.beam_size) == (3, 2, 0.5, 4)
    assert DecodeSettings.of(cfg, beam_size=3, compute=compute).groups == 1  # --beam 3: no groups (warned)
    torch.manual_seed(0)
    model = CaptionModel(None, ModelConfig(16, 16, 16, dropout=0.0), 12, encoder=GridStub()).eval()
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(8)])
    raw = torch.randn(3, 24, 3, 3) * 4
    captioned = caption_batch(model, vocab, raw, settings)
    expected = decode(model, raw, SearchOptions(4, cfg.decode.max_len, block_ngram=3, groups=2, diversity=0.5))
    assert [c.score for c in captioned] == pytest.approx(expected.scores.tolist(), abs=1e-5)


def test_suppress_unk_never_writes_unk_and_changes_nothing_else():
    torch.manual_seed(0)
    model = CaptionModel(None, ModelConfig(16, 16, 16, dropout=0.0), 12, encoder=GridStub()).eval()
    with torch.no_grad():  # a decoder that prefers <unk> wherever it may
        model.decoder.out.bias[Vocabulary.unk_id] += 50.0
    raw = torch.randn(4, 24, 3, 3) * 4
    for beam in (1, 3):
        plain = decode(model, raw, SearchOptions(beam, max_len=6))
        kept = decode(model, raw, SearchOptions(beam, max_len=6, suppress_unk=True))
        assert (plain.tokens == Vocabulary.unk_id).any(), "the biased decoder writes <unk> without the option"
        assert not (kept.tokens == Vocabulary.unk_id).any() and (kept.lengths >= 2).all()
    cfg = load_config(None, ["decode.suppress_unk=true"])
    assert DecodeSettings.of(cfg, compute=setup_compute(cfg.compute, torch.device("cpu"))).suppress_unk


def test_suppress_unk_reaches_sampling_and_self_critical_samples():
    """Sampled decoding and SCST's samples never draw <unk> with the option, and their log-probabilities are
    those of the distribution renormalised without it (the policy decoding runs)."""
    from captioner.model.sample import sample_captions
    torch.manual_seed(0)
    model = CaptionModel(None, ModelConfig(16, 16, 16, dropout=0.0), 12, encoder=GridStub()).eval()
    with torch.no_grad():
        model.decoder.out.bias[Vocabulary.unk_id] += 3.0  # <unk> likely, not certain
    raw = torch.randn(4, 24, 3, 3) * 4
    drawn = decode(model, raw.repeat(8, 1, 1, 1), SearchOptions(max_len=6, sample=True))
    kept = decode(model, raw.repeat(8, 1, 1, 1), SearchOptions(max_len=6, sample=True, suppress_unk=True))
    assert (drawn.tokens == Vocabulary.unk_id).any() and not (kept.tokens == Vocabulary.unk_id).any()
    out = sample_captions(model, raw, max_len=6, suppress_unk=True)
    # the first word's log-probability under the model's distribution without <unk>
    logp, _, _ = model.decoder.step(torch.full((4,), Vocabulary.start_id), model.decoder.init_state(model.project(raw)))
    renormalised = F.log_softmax(logp.masked_fill(torch.arange(12) == Vocabulary.unk_id, float("-inf")), dim=1)
    first = out.tokens[:, 0]
    assert torch.allclose(out.log_probs[:, 0], renormalised.gather(1, first[:, None]).squeeze(1), atol=1e-5)
    records = [ImageRecord(f"i{i}.png", ["w1 w2 w3"], "train") for i in range(4)]
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(8)])
    loss_fn = SelfCriticalLoss(model.train(), Rewarder(records, vocab, 8), samples=4, baseline="greedy", max_len=6,
                               suppress_unk=True)
    loss, _, _ = loss_fn(raw, torch.arange(4))
    assert torch.isfinite(loss)
