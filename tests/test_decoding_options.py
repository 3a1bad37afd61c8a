"""decode.block_ngram, decode.groups and decode.diversity in the one decode path (greedy and beam search)."""
import pytest
import torch
import torch.nn.functional as F

from captioner.config import ModelConfig
from captioner.model.decoding import SearchOptions, beam_search, decode, greedy_decode, repeated_ngram_words
from captioner.model.caption_model import CaptionModel

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
