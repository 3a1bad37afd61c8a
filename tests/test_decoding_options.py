"""decode.block_ngram, decode.groups and decode.diversity in the one decode path (greedy and beam search), and
SearchOptions, which carries every search option to it."""
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from captioner.config import ModelConfig
from captioner.engine.infer.predict import DecodeSettings, caption_batch
from captioner.model.decoding import SearchOptions, beam_search, decode, greedy_decode, repeated_ngram_words
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary

from helpers import GridStub


@pytest.fixture(scope="module")
def model():
    """An untrained decoder with a small vocabulary: its captions repeat words and n-grams freely."""
    torch.manual_seed(0)
    return CaptionModel(None, ModelConfig(16, 16, 24, dropout=0.0), 12, encoder=GridStub()).eval()


def _words(tokens: torch.Tensor) -> list[list[int]]:
    return [[t for t in row.tolist() if t > 2] for row in tokens]  # drop <pad>, <start>, <end>


def _ngrams(words: list[int], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def test_repeated_ngram_words_bans_what_would_repeat():
    history = torch.tensor([[5, 6, 7, 5, 6], [5, 6, 7, 8, 9]])
    banned = repeated_ngram_words(history, 3, 12)
    assert banned[0].nonzero().flatten().tolist() == [7]  # "5 6 7" again
    assert not banned[1].any()
    assert repeated_ngram_words(history, 1, 12)[1].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    assert repeated_ngram_words(history[:, :2], 3, 12) is None and repeated_ngram_words(history, 0, 12) is None


@pytest.mark.parametrize("n", [1, 2, 3])
def test_block_ngram_leaves_no_repeated_ngram_in_greedy_or_beam(model, n):
    raw = torch.randn(6, 24, 3, 3) * 4
    plain = greedy_decode(model, raw, SearchOptions(max_len=14))
    assert any(len(set(_ngrams(w, n))) < len(_ngrams(w, n)) for w in _words(plain.tokens))  # the model repeats
    for out in (greedy_decode(model, raw, SearchOptions(max_len=14, block_ngram=n)),
                beam_search(model, raw, SearchOptions(beam_size=3, max_len=14, block_ngram=n))):
        for words in _words(out.tokens):
            assert len(words) >= 1 and len(set(_ngrams(words, n))) == len(_ngrams(words, n)), words
    assert torch.equal(decode(model, raw, SearchOptions(1, 14, block_ngram=0)).tokens, plain.tokens)  # 0: off


def _log_prob(model, raw, tokens):
    """The total log-probability decoding assigns to tokens (B, L): <pad>/<start> never, <end> not first."""
    captions = torch.cat([torch.ones(len(tokens), 1, dtype=torch.long), tokens], dim=1)
    logits, _ = model.decoder.forward_stepwise(model.project(raw), captions)
    logp = F.log_softmax(logits, dim=-1).gather(2, tokens.unsqueeze(2)).squeeze(2)
    return (logp * (tokens != 0)).sum(dim=1)


def test_diverse_groups_without_diversity_are_greedy_searches_and_scores_stay_log_probs(model):
    raw = torch.randn(5, 24, 3, 3) * 4
    greedy = greedy_decode(model, raw, SearchOptions(max_len=10))
    same = beam_search(model, raw, SearchOptions(3, 10, groups=3, diversity=0.0))  # 3 identical greedy groups
    assert torch.equal(same.tokens, greedy.tokens)
    for groups, diversity in ((1, 0.0), (3, 2.0), (2, 0.5)):
        out = beam_search(model, raw, SearchOptions(beam_size=6 if groups == 2 else 3, max_len=10, groups=groups,
                                                    diversity=diversity))
        assert torch.allclose(out.scores, _log_prob(model, raw, out.tokens), atol=1e-4)  # no penalty inside
        assert (out.lengths >= 2).all()
    plain = beam_search(model, raw, SearchOptions(beam_size=4, max_len=10))
    grouped = beam_search(model, raw, SearchOptions(4, 10, groups=1, diversity=3.0))  # one group: no penalty
    assert torch.equal(plain.tokens, grouped.tokens)
    with pytest.raises(ValueError, match="multiple of groups"):
        beam_search(model, raw, SearchOptions(beam_size=3, groups=2))


def test_search_options_from_decode_settings_decode_as_the_keyword_signatures_did():
    """DecodeSettings.search_options carries every search option, and greedy, beam and sampled decoding give
    the tokens the one-keyword-per-option signatures gave before SearchOptions (pinned from that code path)."""
    settings = DecodeSettings(beam_size=4, max_len=7, length_penalty=0.7, bf16=False, temperature=0.8, block_ngram=2,
                              groups=2, diversity=0.5, suppress_unk=True)
    options = settings.search_options
    assert options == SearchOptions(beam_size=4, max_len=7, length_penalty=0.7, block_ngram=2, groups=2,
                                    diversity=0.5, suppress_unk=True, sample=False, temperature=0.8)
    torch.manual_seed(0)
    model = CaptionModel(None, ModelConfig(16, 16, 16, dropout=0.0), 12, encoder=GridStub()).eval()
    with torch.no_grad():
        model.decoder.out.bias[Vocabulary.unk_id] += 2.0  # greedy and beam would write <unk>: suppress_unk matters
    raw = torch.randn(3, 24, 3, 3) * 4
    greedy = decode(model, raw, replace(options, beam_size=1))
    beam = decode(model, raw, options)
    torch.manual_seed(1)
    sampled = decode(model, raw, replace(options, sample=True))
    assert greedy.tokens.tolist() == [[7, 7, 5, 7, 6, 7, 2, 0], [7, 7, 5, 7, 6, 7, 2, 0], [7, 7, 5, 7, 10, 7, 6, 2]]
    assert beam.tokens.tolist() == [[6, 10, 10, 2, 0, 0, 0, 0], [7, 7, 5, 7, 6, 7, 2, 0], [6, 10, 10, 6, 2, 0, 0, 0]]
    assert sampled.tokens.tolist() == [[5, 5, 8, 5, 2, 0, 0, 0], [5, 11, 5, 6, 11, 9, 6, 2],
                                       [11, 10, 10, 7, 7, 8, 9, 2]]
    for out, scores in ((greedy, [-18.4394, -18.2856, -21.311]), (beam, [-11.2868, -18.2856, -13.977]),
                        (sampled, [-11.0124, -15.5396, -14.498])):
        assert out.scores.tolist() == pytest.approx(scores, abs=1e-3)
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(8)])
    assert [c.score for c in caption_batch(model, vocab, raw, settings)] == beam.scores.tolist()  # the same path


@pytest.mark.parametrize("changes, message", [
    ({"beam_size": 0}, "beam_size must be >= 1"), ({"max_len": 0}, "max_len must be >= 1"),
    ({"block_ngram": -1}, "block_ngram must be >= 0"), ({"groups": 0}, "groups must be >= 1"),
    ({"beam_size": 3, "groups": 2}, "beam_size 3 must be a multiple of groups 2"),
    ({"temperature": 0.0, "sample": True}, "temperature must be > 0")])
def test_search_options_refuse_bad_values_where_they_are_built(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SearchOptions(**changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        DecodeSettings(**changes).search_options


def test_groups_bind_only_where_beam_search_runs():
    """Greedy and sampling ignore groups (as before SearchOptions): options derived for them stay valid."""
    SearchOptions(beam_size=1, groups=2)
    SearchOptions(beam_size=3, groups=2, sample=True)
    SearchOptions(beam_size=3, temperature=0.0)  # the temperature binds only sampling, as before
