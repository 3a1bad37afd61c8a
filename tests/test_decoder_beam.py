import pytest
import torch

from captioner.model.decoding import SearchOptions, beam_search, greedy_decode
from captioner.config import EncoderConfig, ModelConfig
from captioner.model.decoder import caption_loss
from captioner.model.caption_model import CaptionModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(64, 64, 96, dropout=0.3), 40)
    return m.eval()


def test_teacher_forcing_shapes_and_masked_loss(model):
    raw = model.encode(torch.rand(3, 3, 64, 64))
    assert raw.shape == (3, 512, 2, 2)
    captions = torch.randint(4, 40, (3, 9))
    captions[:, 0] = 1
    lengths = torch.tensor([9, 6, 4])
    logits, alphas = model(raw, captions)
    assert logits.shape == (3, 8, 40) and alphas.shape == (3, 8, 4)
    assert torch.allclose(alphas.sum(-1), torch.ones(3, 8), atol=1e-5)
    loss, _ = caption_loss(logits, alphas, captions, lengths, 1.0)
    # What lies beyond each caption's length never changes the loss.
    changed = captions.clone()
    changed[1, 6:], changed[2, 4:] = 0, 5
    logits2, alphas2 = model(raw, changed)
    loss2, _ = caption_loss(logits2, alphas2, changed, lengths, 1.0)
    assert torch.allclose(loss, loss2)


def test_beam_one_equals_greedy(model):
    raw = torch.randn(5, 512, 2, 2) * 100
    g = greedy_decode(model, raw, SearchOptions(max_len=12))
    b = beam_search(model, raw, SearchOptions(beam_size=1, max_len=12))
    assert torch.equal(g.tokens, b.tokens)
    assert torch.allclose(g.scores, b.scores, atol=1e-5)


def test_batched_beam_equals_per_image_beam(model):
    raw = torch.randn(6, 512, 2, 2) * 100
    options = SearchOptions(beam_size=4, max_len=10, length_penalty=0.7)
    batched = beam_search(model, raw, options)
    for i in range(6):
        single = beam_search(model, raw[i:i + 1], options)
        n = int(single.lengths[0])
        assert torch.equal(batched.tokens[i, :n], single.tokens[0, :n])
        assert torch.allclose(batched.scores[i], single.scores[0], atol=1e-4)
        assert torch.allclose(batched.alphas[i, :n], single.alphas[0, :n], atol=1e-5)


def test_untrained_model_always_gets_a_caption_within_max_len(model):
    raw = torch.randn(4, 512, 2, 2)
    for out in (greedy_decode(model, raw, SearchOptions(max_len=3)), beam_search(model, raw, SearchOptions(3, 3))):
        assert out.tokens.shape[1] <= 4
        assert (out.lengths >= 1).all() and (out.lengths <= 4).all()
        ends = (out.tokens == 2).sum(dim=1)
        assert (ends == 1).all()  # exactly one <end>, forced at the limit when needed
        assert out.alphas.shape[:2] == out.tokens.shape and torch.isfinite(out.scores).all()


def test_decoding_leaves_training_mode_alone(model):
    model.train()
    greedy_decode(model, torch.randn(1, 512, 2, 2), SearchOptions(max_len=2))
    assert model.training and not model.encoder.backbone.training
    model.eval()


def test_huge_random_features_stay_finite():
    # Random-init ResNet-152 layer4 reaches ~1e8: the LayerNorm after the projector must absorb it.
    m = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(32, 32, 32), 20)
    logits, _ = m(torch.randn(2, 512, 2, 2) * 1e8, torch.ones(2, 4, dtype=torch.long))
    assert torch.isfinite(logits).all()


def test_sampling_draws_from_the_model_and_returns_its_log_probs(model):
    from captioner.model.decoding import decode
    from captioner.model.sample import sample_captions
    raw = torch.randn(4, 512, 2, 2) * 100
    torch.manual_seed(1)
    a = decode(model, raw, SearchOptions(max_len=10, sample=True))
    torch.manual_seed(1)
    b = decode(model, raw, SearchOptions(max_len=10, sample=True))
    assert torch.equal(a.tokens, b.tokens)  # seeded: reproducible
    assert ((a.tokens == 2).sum(dim=1) == 1).all()  # every caption ends, by max_len at the latest
    torch.manual_seed(1)
    out = sample_captions(model, raw.repeat_interleave(50, 0), max_len=10, temperature=1.0)
    assert not torch.equal(out.tokens[0], out.tokens[1]) or not torch.equal(out.tokens[1], out.tokens[2])
    assert torch.equal(out.mask, torch.arange(out.tokens.shape[1])[None] < out.lengths[:, None])
    assert (out.log_probs[~out.mask] == 0).all() and (out.log_probs[out.mask] <= 0).all()
    # Teacher forcing the drawn words gives the same log-probabilities (model in eval mode: no dropout).
    row = 0
    words = out.tokens[row, : int(out.lengths[row])]
    captions = torch.cat([torch.tensor([1]), words]).unsqueeze(0)
    logits, _ = model(raw[:1], captions)
    forced = torch.log_softmax(logits, -1)[0].gather(1, words[:, None]).squeeze(1)
    drawn = out.log_probs[row, : len(words)]
    if int(out.lengths[row]) == 11:  # a forced <end> carries no log-probability
        forced, drawn = forced[:-1], drawn[:-1]
    assert torch.allclose(forced, drawn, atol=1e-5)
    # A low temperature concentrates the draws on the greedy caption.
    cold = sample_captions(model, raw[:1].repeat(20, 1, 1, 1), max_len=10, temperature=1e-6).tokens
    greedy = greedy_decode(model, raw[:1], SearchOptions(max_len=10)).tokens
    assert (cold[:, : greedy.shape[1]] == greedy).all()


class _Counted:
    """DecoderSteps that count their steps."""

    def __init__(self, model):
        from captioner.model.steps import TorchSteps
        self.inner, self.calls = TorchSteps(model), 0
        self.vocab_size = self.inner.vocab_size

    def start(self, raw):
        return self.inner.start(raw)

    def step(self, tokens, state):
        self.calls += 1
        return self.inner.step(tokens, state)

    def evaluating(self):
        return self.inner.evaluating()


@pytest.fixture(scope="module")
def spread_model():
    """Decoder weights N(0, 0.5): captions of 7 to 23 words on these features, some beams wandering to max_len."""
    torch.manual_seed(0)
    m = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(64, 64, 96, dropout=0.3), 40).eval()
    with torch.no_grad():
        for p in m.decoder.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    torch.manual_seed(1)
    return m, torch.randn(8, 512, 2, 2)[[3, 4, 6, 7]]


@pytest.mark.parametrize("n, block_ngram", [(1, 0), (2, 0), (1, 2), (3, 0)])
def test_beam_search_stops_once_results_are_final_and_returns_what_the_full_search_does(spread_model, monkeypatch,
                                                                                         n, block_ngram):
    """Ranked by log-probability alone, an image whose n best finished beams beat its open ones is decided:
    the search stops there, with the tokens, scores and attention a search run to the end returns."""
    import captioner.model.decoding as decoding
    model, raw = spread_model
    options = SearchOptions(beam_size=4, max_len=25, block_ngram=block_ngram, num_return_sequences=n)
    early, full = _Counted(model), _Counted(model)
    fast = beam_search(early, raw, options)
    monkeypatch.setattr(decoding, "_decided", lambda log_probs, finished, n, exact: finished.all(dim=1))
    slow = beam_search(full, raw, options)
    assert early.calls < full.calls if (n, block_ngram) == (1, 0) else early.calls <= full.calls
    assert torch.equal(fast.lengths, slow.lengths) and torch.equal(fast.scores, slow.scores)
    for i, length in enumerate(fast.lengths.tolist()):
        assert torch.equal(fast.tokens[i, :length], slow.tokens[i, :length])
        assert torch.equal(fast.alphas[i, :length], slow.alphas[i, :length])


def test_with_a_length_penalty_or_groups_the_search_runs_until_every_beam_finished(model):
    """A length penalty or diverse groups can promote a longer beam later: no early decision there."""
    from captioner.model.decoding import _decided
    log_probs = torch.tensor([[-1.0, -5.0]])
    finished = torch.tensor([[True, False]])
    assert bool(_decided(log_probs, finished, 1, exact_stop=True)[0])
    assert not bool(_decided(log_probs, finished, 1, exact_stop=False)[0])
    assert not bool(_decided(torch.tensor([[-5.0, -1.0]]), finished, 1, exact_stop=True)[0])  # open beam ahead
    assert not bool(_decided(torch.tensor([[-1.0, -1.0]]), finished, 1, exact_stop=True)[0])  # a tie: not yet
