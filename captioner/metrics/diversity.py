"""How much the captions depend on the image: a model that writes one caption for everything shows here.

    caption_diversity({1: "a dog runs", 2: "a dog runs", 3: "a man sits"})
    -> {"distinct_captions": 2, "distinct_fraction": 0.667, "vocab_used": 5, "mean_length": 3.0}
"""
from __future__ import annotations

from captioner.text import tokenize


def caption_diversity(hypotheses: dict) -> dict:
    """hypotheses {image_id: caption} -> distinct captions (count and fraction of the images), distinct words
    used over all captions, and mean caption length in words (captioner's tokenizer)."""
    words = [tokenize(c) for c in hypotheses.values()]
    distinct = len({tuple(w) for w in words})
    return {"distinct_captions": distinct,
            "distinct_fraction": distinct / len(words) if words else 0.0,
            "vocab_used": len({w for caption in words for w in caption}),
            "mean_length": sum(map(len, words)) / len(words) if words else 0.0}
