"""Fast CIDEr-D on token ids, vectorised over a batch of candidates with numpy (no java, no subprocess).

    scorer = CiderD(references, vocab_size=len(vocab))   # references[i]: token-id lists of image i's captions
    rewards = scorer.score(tokens, lengths, images)       # tokens (M, L), lengths (M,), images (M,) -> (M,)
    cider_d({1: "a dog runs"}, {1: ["a dog", "a brown dog runs"]})  # on whitespace-tokenized strings

Equal (to float rounding) to pycocoevalcap's Cider, i.e. CIDEr-D: n-grams 1..4, tf-idf vectors with
document frequencies over the images' reference sets and log(number of images) as the reference length,
candidate counts clipped at the reference's (min(hyp, ref) * ref), a Gaussian length penalty with sigma 6,
the mean over n-gram orders and references, times 10. Like coco-caption it measures the "length" for the
penalty in bigrams (its counts2vec counts n == 1, i.e. 2-grams), which this module keeps on purpose.

Document frequencies come from the references given to the constructor: the set being scored (as
coco-caption does; `cider_d`) or, for SCST rewards, all training references, computed once per run.
N-grams are integer keys (a base-`vocab_size` number of n digits), so vocab_size**4 must fit in int64.
"""
from __future__ import annotations

import numpy as np

from captioner.text import normalize_text

ORDERS = 4
SIGMA = 6.0


def _pad(sequences) -> tuple[np.ndarray, np.ndarray]:
    """List of token-id sequences -> (tokens (M, L) int64, lengths (M,) int64)."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    tokens = np.zeros((len(sequences), max(1, int(lengths.max(initial=0)))), dtype=np.int64)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
    return tokens, lengths


def _ngrams(tokens: np.ndarray, lengths: np.ndarray, n: int, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Every n-gram inside each row's length -> (row (K,), key (K,)); key = the n ids as base-`base` digits."""
    M, L = tokens.shape
    if L < n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    keys = np.zeros((M, L - n + 1), dtype=np.int64)
    for j in range(n):
        keys = keys * base + tokens[:, j: L - n + 1 + j]  # (M, L-n+1)
    valid = (np.arange(L - n + 1)[None, :] + n) <= lengths[:, None]  # (M, L-n+1)
    rows = np.broadcast_to(np.arange(M)[:, None], keys.shape)[valid]
    return rows, keys[valid]


def _counts(rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, key) occurrences -> distinct (row, key, term frequency)."""
    if keys.size == 0:
        return rows, keys, np.zeros(0, np.int64)
    distinct, dense = np.unique(keys, return_inverse=True)
    width = len(distinct)
    pairs, tf = np.unique(rows * width + dense.reshape(-1), return_counts=True)
    return pairs // width, distinct[pairs % width], tf


def _bigram_length(lengths: np.ndarray) -> np.ndarray:
    return np.maximum(lengths - 1, 0).astype(np.float64)  # coco-caption's "length": the number of bigrams


class CiderD:
    """CIDEr-D against fixed references; document frequencies from those references.

    Args:
        references: references[i] is a list of token-id sequences (words only: no <start>/<end>/<pad>) of image i.
        vocab_size: every id is < vocab_size (default: 1 + the largest reference id).
    """

    def __init__(self, references, vocab_size: int | None = None, sigma: float = SIGMA):
        flat = [list(r) for refs in references for r in refs]
        image_of = np.repeat(np.arange(len(references)), [len(refs) for refs in references]).astype(np.int64)
        tokens, lengths = _pad(flat) if flat else (np.zeros((0, 1), np.int64), np.zeros(0, np.int64))
        self.vocab_size = int(vocab_size if vocab_size is not None else tokens.max(initial=0) + 1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"reference token ids must be in [0, {self.vocab_size})")
        if float(self.vocab_size) ** ORDERS >= 2.0 ** 63:
            raise ValueError(f"vocabulary of {self.vocab_size} ids is too large for int64 4-gram keys (max 55108)")
        self.sigma, self.images = sigma, len(references)
        self.ref_count = np.array([len(refs) for refs in references], dtype=np.int64)  # (I,)
        self.ref_start = np.concatenate([[0], np.cumsum(self.ref_count)[:-1]]).astype(np.int64)  # (I,)
        self.ref_length = _bigram_length(lengths)  # (R,)
        self.ref_len = np.log(float(max(self.images, 1)))  # coco-caption's log(number of images)
        self.keys, self.df, self.join_key, self.join_ref, self.join_val = [], [], [], [], []
        self.ref_norm = np.zeros((len(flat), ORDERS))  # (R, 4)
        for n in range(1, ORDERS + 1):
            ref, key, tf = _counts(*_ngrams(tokens, lengths, n, self.vocab_size))
            keys, gid = np.unique(key, return_inverse=True)
            gid = gid.reshape(-1)
            # Document frequency: the number of images whose reference set holds the n-gram.
            per_image = np.unique(image_of[ref] * max(len(keys), 1) + gid)
            df = np.bincount(per_image % max(len(keys), 1), minlength=len(keys))
            value = tf * (self.ref_len - np.log(np.maximum(1.0, df[gid])))  # tf-idf of each (ref, n-gram)
            self.ref_norm[:, n - 1] = np.sqrt(np.bincount(ref, value ** 2, minlength=len(flat)))
            # Lookup table for the clipped dot products: (image, n-gram) -> that image's references holding it.
            join = image_of[ref] * max(len(keys), 1) + gid
            order = np.argsort(join, kind="stable")
            self.keys.append(keys)
            self.df.append(df)
            self.join_key.append(join[order])
            self.join_ref.append(ref[order])
            self.join_val.append(value[order])

    def score(self, tokens, lengths, images) -> np.ndarray:
        """CIDEr-D of each candidate against its image's references.

        Args:
            tokens: (M, L) int ids; only the first lengths[m] of row m count (cut at <end> before calling).
            lengths: (M,) words per candidate (0: empty caption, scores 0).
            images: (M,) index into the constructor's references of each candidate's image.
        Returns:
            (M,) float64 scores on coco-caption's 0-10 scale.
        """
        tokens, lengths, images = (np.asarray(x, dtype=np.int64) for x in (tokens, lengths, images))
        M = len(lengths)
        if M == 0:
            return np.zeros(0)
        tokens = tokens.reshape(M, -1)
        inside = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        if inside.any() and (tokens[inside].min() < 0 or tokens[inside].max() >= self.vocab_size):
            raise ValueError(f"candidate token ids must be in [0, {self.vocab_size})")
        width = int(self.ref_count[images].max(initial=1))  # most references of one candidate's image
        dots = np.zeros((ORDERS, M * width))  # clipped dot product with each reference, per order
        norms = np.zeros((ORDERS, M))
        for n in range(1, ORDERS + 1):
            keys, df = self.keys[n - 1], self.df[n - 1]
            row, key, tf = _counts(*_ngrams(tokens, lengths, n, self.vocab_size))
            pos = np.searchsorted(keys, key)
            found = pos < len(keys)
            found[found] = keys[pos[found]] == key[found]
            freq = np.where(found, df[np.minimum(pos, max(len(keys) - 1, 0))] if len(keys) else 0, 0)
            value = tf * (self.ref_len - np.log(np.maximum(1.0, freq)))  # (K,) candidate tf-idf
            norms[n - 1] = np.sqrt(np.bincount(row, value ** 2, minlength=M))
            # Join each found candidate n-gram with the references of its image that hold it.
            row, value, pos = row[found], value[found], pos[found]
            join = images[row] * max(len(keys), 1) + pos
            lo = np.searchsorted(self.join_key[n - 1], join, side="left")
            hits = np.searchsorted(self.join_key[n - 1], join, side="right") - lo
            which = np.repeat(np.arange(len(row)), hits)
            at = np.repeat(lo - np.cumsum(hits) + hits, hits) + np.arange(hits.sum())  # positions in the table
            ref, ref_value = self.join_ref[n - 1][at], self.join_val[n - 1][at]
            local = ref - self.ref_start[images[row[which]]]  # which of the image's references
            clipped = np.minimum(value[which], ref_value) * ref_value
            dots[n - 1] = np.bincount(row[which] * width + local, clipped, minlength=M * width)
        j = np.arange(width)[None, :]  # (1, W)
        has = j < self.ref_count[images][:, None]  # (M, W) which reference slots exist
        ref = np.where(has, self.ref_start[images][:, None] + j, 0)  # (M, W) global reference index
        ref_norm = self.ref_norm[ref].transpose(2, 0, 1)  # (R, 4) -> (4, M, W)
        dots = dots.reshape(ORDERS, M, width)
        denominator = norms[:, :, None] * ref_norm  # (4, M, W)
        safe = np.where(denominator != 0, denominator, 1.0)
        cosine = np.where(denominator != 0, dots / safe, dots)
        delta = _bigram_length(lengths)[:, None] - self.ref_length[ref]  # (M, W)
        penalty = np.exp(-(delta ** 2) / (2 * self.sigma ** 2))
        per_ref = (cosine * penalty[None]).mean(axis=0) * has  # (M, W): mean over the 4 orders
        return per_ref.sum(axis=1) / np.maximum(self.ref_count[images], 1) * 10.0


def cider_d(hypotheses: dict, references: dict) -> tuple[float, dict]:
    """coco-caption's Cider().compute_score on already tokenized strings (words split on whitespace):
    hypotheses {id: caption}, references {id: [captions]} -> (mean, {id: score}). Document frequencies
    from the references of the ids in hypotheses."""
    ids = list(hypotheses)
    words: dict[str, int] = {}
    encode = lambda text: [words.setdefault(w, len(words)) for w in normalize_text(text).split()]  # noqa: E731
    refs = [[encode(r) for r in references[i]] for i in ids]
    candidates = [encode(hypotheses[i]) for i in ids]
    scorer = CiderD(refs, vocab_size=max(len(words), 1))
    scores = scorer.score(*_pad(candidates), np.arange(len(ids))) if ids else np.zeros(0)
    return float(scores.mean()) if ids else 0.0, dict(zip(ids, scores.tolist()))
