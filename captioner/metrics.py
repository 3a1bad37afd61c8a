"""Caption metrics. Corpus BLEU-1..4 (nltk, on our tokenizer's words), on a 0-1 scale.

    corpus_bleu_scores({"1": ["a dog runs"]}, {"1": ["a dog runs", "the dog is running"]})
"""
from __future__ import annotations

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

from captioner.vocab import tokenize


def corpus_bleu_scores(hypotheses: dict, references: dict) -> dict[str, float]:
    """hypotheses {image_id: caption}, references {image_id: [captions]} -> {"bleu1".."bleu4"} on ids in hypotheses."""
    ids = [i for i in hypotheses if references.get(i)]
    if not ids:
        return {f"bleu{n}": 0.0 for n in range(1, 5)}
    hyps = [tokenize(hypotheses[i]) for i in ids]
    refs = [[tokenize(r) for r in references[i]] for i in ids]
    smooth = SmoothingFunction().method1  # no zero score (and no warning) when an n-gram order has no match
    weights = {1: (1.0,), 2: (0.5, 0.5), 3: (1 / 3,) * 3, 4: (0.25,) * 4}
    return {f"bleu{n}": float(corpus_bleu(refs, hyps, weights=w, smoothing_function=smooth))
            for n, w in weights.items()}
