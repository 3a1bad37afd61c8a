"""The fast CIDEr-D (captioner.metrics.cider) against pycocoevalcap's Cider on the same tokenized captions."""
import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.metrics.cider import CiderD, cider_d

WORDS = "a the dog cat runs on grass red blue big small".split()


def _caption(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def test_equals_pycocoevalcap_on_generated_captions():
    rng = random.Random(0)
    gts = {i: [_caption(rng, 1, 12) for _ in range(rng.randint(1, 6))] for i in range(120)}
    res = {i: _caption(rng, 0, 14) for i in range(120)}
    res[0], gts[0] = "dog dog dog dog", ["dog"]  # repeated words clipped at a one-word reference
    res[1] = ""  # an empty candidate
    res[2], gts[2] = "a", ["a", "dog"]  # one-word candidate and references (no bigrams: "length" 0)
    res[3], gts[3] = "red red blue red", ["red red", "blue red red red"]
    gts[4] = [""] + gts[4]  # an empty reference
    official_mean, official = Cider().compute_score(gts, {i: [c] for i, c in res.items()})
    mean, ours = cider_d(res, gts)
    assert np.abs(np.array([ours[i] for i in res]) - np.array(official)).max() < 1e-6
    assert mean == pytest.approx(official_mean, abs=1e-6)
    assert ours[1] == 0.0 and ours[0] > 0.0


def test_identical_caption_scores_ten_and_batch_order_does_not_matter():
    refs = [[[5, 6, 7, 8]], [[9, 10, 11]], [[5, 9, 12]]]
    scorer = CiderD(refs, vocab_size=20)
    tokens = np.array([[5, 6, 7, 8], [9, 10, 11, 2], [12, 12, 0, 0]])
    lengths, images = np.array([4, 3, 2]), np.array([0, 1, 2])
    scores = scorer.score(tokens, lengths, images)
    assert scores[0] == pytest.approx(10.0)
    assert scores[1] == pytest.approx(7.5)  # ids after the length ignored; 3 words have no 4-gram: 3 of 4 orders
    flipped = scorer.score(tokens[::-1], lengths[::-1], images[::-1])
    assert np.allclose(flipped[::-1], scores)
    # The same candidate scored for another image gets that image's score.
    assert scorer.score(tokens[:1], lengths[:1], [1])[0] == pytest.approx(0.0)


def test_training_references_give_document_frequencies_once():
    """Rewards against fixed training references: scoring a subset never changes the idf."""
    rng = random.Random(1)
    vocab = {w: i + 4 for i, w in enumerate(WORDS)}
    captions = [[_caption(rng, 1, 8) for _ in range(5)] for _ in range(30)]
    refs = [[[vocab[w] for w in c.split()] for c in caps] for caps in captions]
    scorer = CiderD(refs, vocab_size=4 + len(WORDS))
    candidates = [_caption(rng, 1, 8) for _ in range(30)]
    ids = [[vocab[w] for w in c.split()] for c in candidates]
    tokens = np.zeros((30, 8), dtype=np.int64)
    for i, c in enumerate(ids):
        tokens[i, :len(c)] = c
    lengths = np.array([len(c) for c in ids])
    _, official = Cider().compute_score({i: caps for i, caps in enumerate(captions)},
                                        {i: [c] for i, c in enumerate(candidates)})
    assert np.abs(scorer.score(tokens, lengths, np.arange(30)) - np.array(official)).max() < 1e-6
    some = np.array([3, 17, 17, 29])
    assert np.abs(scorer.score(tokens[some], lengths[some], some) - np.array(official)[some]).max() < 1e-6


def test_refuses_ids_outside_the_vocabulary():
    scorer = CiderD([[[1, 2]]], vocab_size=3)
    with pytest.raises(ValueError):
        scorer.score(np.array([[1, 7]]), np.array([2]), np.array([0]))
    with pytest.raises(ValueError):
        CiderD([[[1, 2]]], vocab_size=60000)
