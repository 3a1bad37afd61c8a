"""Text: tokenization (below the model: data, metrics and the vocabulary all split words the same way), words back
into captions, and the vocabulary (words <-> ids: a plain token list, saved as JSON and inside checkpoints, never
pickled).

    tokenize("A dog runs.")                       # ["a", "dog", "runs"]
    vocab = Vocabulary.build(["A dog runs.", "a cat"], min_freq=1)
    ids = vocab.encode("a dog", max_len=30)      # [<start>, a, dog, <end>]
    vocab.decode(ids)                             # "a dog"
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.files import write_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = [PAD, START, END, UNK]  # fixed ids 0..3

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Scripts written without spaces between words: each character is a token (as COCO-CN and AIC-ICC
# character-level baselines do; a word segmenter would need a dictionary download).
_CHARACTER_SCRIPTS = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
                      (0xFF66, 0xFF9F), (0x20000, 0x3134F))


def _one_per_character(ch: str) -> bool:
    return any(low <= ord(ch) <= high for low, high in _CHARACTER_SCRIPTS)


def _is_word_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LN" and ch != "_"


# Characters that end a line for some reader (Python's splitlines, Java's PTBTokenizer, a terminal) or are no text
# at all: C0 and C1 controls (tab, line feed, vertical tab, form feed, carriage return, U+0085 next line, ...),
# U+2028 line and U+2029 paragraph separators, and lone surrogates (invalid in UTF-8).
_NOT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def normalize_text(text: str) -> str:
    """A caption as every scorer and the vocabulary read it: line and paragraph separators and control
    characters become spaces, so a caption is one line whatever it holds. One invisible U+2028 among 200
    captions used to shift the PTB tokenizer's lines and score every later caption against the wrong
    references. The one normalisation before scoring: tokenize, the metrics and the vocabulary call it."""
    return _NOT_TEXT.sub(" ", text)


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers of any script, punctuation split off and dropped; Chinese and Japanese
    characters one token each. Needs no NLTK data download.

    ASCII text takes the one regular expression it always took, so scores on English captions are unchanged
    (and equal coco-caption's); other text is NFC-normalised (a precomposed and a combining "é" are one
    letter) and read character by character, keeping the combining marks of Devanagari, Thai or Arabic.
    """
    text = normalize_text(text)
    if text.isascii():
        return _WORD.findall(text.lower())
    text = unicodedata.normalize("NFC", text).lower().replace("\u2019", "'")
    tokens, word = [], []
    for i, ch in enumerate(text):
        if _one_per_character(ch):
            tokens.extend(["".join(word), ch] if word else [ch])
            word = []
        elif _is_word_char(ch) or (word and unicodedata.category(ch)[0] == "M"):
            word.append(ch)
        elif ch == "'" and word and i + 1 < len(text) and _is_word_char(text[i + 1]):
            word.append(ch)  # don't, l'homme: one token, as the ASCII expression keeps them
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    return tokens


def join_words(words: list[str]) -> str:
    """Words back into a caption: spaces between words, none between Chinese or Japanese characters."""
    text = ""
    for word in words:
        glued = text and _one_per_character(text[-1]) and _one_per_character(word[0])
        text += word if glued or not text else " " + word
    return text


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
        return join_words(words)

    def save(self, path: str | Path) -> None:
        write_json(path, {"tokens": self.tokens}, "vocabulary", indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CaptionerError(f"vocabulary file {path} is unreadable: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):  # e.g. a bare list of words
            found = f"a JSON {type(data).__name__}" if not isinstance(data, dict) else "an object without a list there"
            raise CaptionerError(f"vocabulary file {path} must be a JSON object {{\"tokens\": [word, ...]}}, "
                                 f"got {found}")
        try:
            return cls(data["tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise CaptionerError(f"vocabulary file {path} is unreadable: {e}") from None
