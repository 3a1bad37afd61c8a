"""Words <-> ids. A plain token list, saved as JSON and inside checkpoints (never pickled).

    vocab = Vocabulary.build(["A dog runs.", "a cat"], min_freq=1)
    ids = vocab.encode("a dog", max_len=30)      # [<start>, a, dog, <end>]
    vocab.decode(ids)                             # "a dog"
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from captioner.errors import CaptionerError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = [PAD, START, END, UNK]  # fixed ids 0..3

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers; punctuation dropped. Needs no NLTK data download."""
    return _WORD.findall(text.lower())


class Vocabulary:
    def __init__(self, tokens: list[str]):
        if list(tokens[: len(SPECIALS)]) != SPECIALS:
            raise CaptionerError(f"vocabulary must start with {SPECIALS}, got {list(tokens[:4])}")
        if len(set(tokens)) != len(tokens):
            raise CaptionerError("vocabulary holds duplicate tokens")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions, min_freq: int = 1) -> "Vocabulary":
        counts = Counter(w for c in captions for w in tokenize(c))
        # Sorted by count then word so the same captions always give the same ids.
        words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + words)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def encode(self, caption: str, max_len: int) -> list[int]:
        """<start> w1 .. wn <end> with at most max_len words."""
        words = tokenize(caption)[:max_len]
        return [self.start_id] + [self.index.get(w, self.unk_id) for w in words] + [self.end_id]

    def decode(self, ids) -> str:
        """Words up to the first <end>; <start> and <pad> skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"tokens": self.tokens}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        try:
            return cls(json.loads(Path(path).read_text())["tokens"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CaptionerError(f"vocabulary file {path} is unreadable: {e}") from None
