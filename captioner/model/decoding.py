"""Greedy, beam-search and sampled decoding, batched over images on the model's device.

    options = SearchOptions(beam_size=3, max_len=20)       # every decode-time search option, in one place
    out = decode(model, raw, options)                      # raw: (B, C, H, W) encoder activations
    out = decode(ort_steps, raw, options)                  # the same loops over another backend (steps.py)
    out.tokens (B, L) ids ending in <end> then <pad>; out.scores (B,); out.alphas (B, L, N); out.lengths (B,)
    SearchOptions(num_return_sequences=n): B*n rows, image b's n captions at rows b*n .. b*n+n-1, best first

Every image gets a caption of at least one word: <end> may not come first (an untrained model or a wide beam
would otherwise return "" for every image, since the empty caption is the most probable one), <pad> and
<start> are never emitted as words, and when no hypothesis has ended by max_len words <end> is forced, so
the best hypothesis found so far is returned (never an empty result or a crash). Beam size 1 equals greedy.

`model` is a CaptionModel or any DecoderSteps (model/steps.py): the loops only start a caption and take one
word at a time through that interface, so PyTorch modules and ONNX Runtime sessions run the same algorithm.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from captioner.model.sample import sample_captions
from captioner.model.steps import as_steps
from captioner.text import Vocabulary


@dataclass(frozen=True)
class SearchOptions:
    """How decode() searches, in one object: a new option is a field here (and one of DecodeSettings in
    engine/infer/predict.py, whose search_options copies these fields by name), not a keyword threaded through
    every decoding function and caller. Which fields each search reads: decode()'s docstring."""
    beam_size: int = 1  # 1 is greedy
    max_len: int = 30  # longest caption, in words (<end> is forced after it)
    length_penalty: float = 0.0  # beam ranking: 0 by total log-probability; 1 by mean per word (GNMT)
    block_ngram: int = 0  # > 0: no caption repeats one of its n-grams of this length (greedy and beam)
    groups: int = 1  # diverse beam search: beam groups (beam_size must be a multiple)
    diversity: float = 0.0  # diverse beam search: penalty per earlier group that chose the same word
    suppress_unk: bool = False  # never write <unk> (greedy, beam and sampling)
    sample: bool = False  # draw each word from the model's distribution (the beam options are then ignored)
    temperature: float = 1.0  # sampling only: < 1 sharper, > 1 more varied
    top_k: int = 0  # sampling only: draw from the k likeliest words (0: off)
    top_p: float = 1.0  # sampling only: draw from the nucleus of probability top_p (1.0: off)
    num_return_sequences: int = 1  # captions per image, best first: the n best beams (n <= beam_size) or n samples

    def __post_init__(self):
        # Checked where the options are built, so a bad value fails before any model runs, every problem named.
        # The ranges are decode.*'s (config/validate.py); groups must divide beam_size only where beam search
        # runs: greedy and sampling ignore groups, so options derived for them from beam options stay valid.
        beams = self.beam_size > 1 and not self.sample
        checks = [(self.beam_size >= 1, f"beam_size must be >= 1, got {self.beam_size}"),
                  (self.max_len >= 1, f"max_len must be >= 1, got {self.max_len}"),
                  (self.block_ngram >= 0, f"block_ngram must be >= 0 (0: off), got {self.block_ngram}"),
                  (self.groups >= 1, f"groups must be >= 1, got {self.groups}"),
                  (self.groups < 1 or not beams or self.beam_size % self.groups == 0,
                   f"beam_size {self.beam_size} must be a multiple of groups {self.groups}"),
                  # unused unless sampling: as before, a greedy or beam search ignores it
                  (not self.sample or self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
                  (self.top_k >= 0, f"top_k must be >= 0 (0: off), got {self.top_k}"),
                  (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1] (1: off), got {self.top_p}"),
                  (self.num_return_sequences >= 1,
                   f"num_return_sequences must be >= 1, got {self.num_return_sequences}"),
                  (self.sample or self.num_return_sequences <= self.beam_size,
                   f"num_return_sequences {self.num_return_sequences} needs sampling or a beam search of at least "
                   f"that many beams (beam_size {self.beam_size})")]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("invalid SearchOptions: " + "; ".join(problems))


@dataclass
class Decoded:
    """One caption per row: per image, or num_return_sequences per image (best first) when several are asked."""
    tokens: torch.Tensor  # (B, L) long: words, <end>, then <pad>
    scores: torch.Tensor  # (B,) total log-probability of the chosen caption (before length penalty)
    alphas: torch.Tensor  # (B, L, N) attention over the N regions for each emitted token
    lengths: torch.Tensor  # (B,) tokens up to and including <end>


def repeated_ngram_words(history: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor | None:
    """history (R, t) words so far -> (R, V) bool: the words that would repeat one of the row's n-grams
    (n=3: no trigram twice in a caption; n=1: no word twice). None when nothing is banned yet."""
    if n <= 0 or history.shape[1] < n:
        return None
    windows = history.unfold(1, n, 1)  # (R, t-n+1, n): every n-gram so far
    if n == 1:
        seen = torch.ones_like(windows[..., 0], dtype=torch.float)
    else:  # n-grams whose first n-1 words are the caption's last n-1 words: their last word may not follow
        seen = (windows[..., :-1] == history[:, history.shape[1] - n + 1:].unsqueeze(1)).all(dim=2).float()
    banned = torch.zeros(history.shape[0], vocab_size, device=history.device).scatter_add_(1, windows[..., -1], seen)
    return banned > 0


def _step_log_probs(steps, tokens, state, t: int, max_len: int, banned: torch.Tensor | None = None,
                    suppress_unk: bool = False):
    logp, state, alpha = steps.step(tokens, state)  # (B', V) float32
    if banned is not None:  # decode.block_ngram; <end> is never part of an unfinished caption's n-grams
        logp = logp.masked_fill(banned, float("-inf"))
    never = [Vocabulary.pad_id, Vocabulary.start_id] + ([Vocabulary.unk_id] if suppress_unk else [])
    logp[:, never] = float("-inf")  # never words of a caption (<unk> too with decode.suppress_unk)
    if t == 0:
        logp[:, Vocabulary.end_id] = float("-inf")  # at least one word
    if t == max_len:  # the word budget is spent: only <end> may follow
        forced = torch.full_like(logp, float("-inf"))
        forced[:, Vocabulary.end_id] = logp[:, Vocabulary.end_id]
        logp = forced
    return logp, state, alpha


def _lengths(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens != Vocabulary.pad_id).sum(dim=1)


def _in_eval_mode(decoder):
    """Decoding always runs in eval mode (dropout off), whatever mode the caller left the model in, and gives
    the caller's mode back afterwards, also when decoding raises (out of memory, Ctrl-C)."""
    @functools.wraps(decoder)
    def run(model_or_steps, *args, **kwargs):
        steps = as_steps(model_or_steps)
        with steps.evaluating():
            return decoder(steps, *args, **kwargs)
    return run


@torch.no_grad()
@_in_eval_mode
def greedy_decode(steps, raw: torch.Tensor, options: SearchOptions = SearchOptions()) -> Decoded:
    """steps (a CaptionModel or DecoderSteps), raw (B, C, H, W) encoder activations -> Decoded with the most
    likely word at each step (options.block_ngram > 0: never one that repeats an n-gram of the caption).
    Reads options.max_len, block_ngram and suppress_unk; the beam and sampling options are decode()'s to pick."""
    max_len, block_ngram, suppress_unk = options.max_len, options.block_ngram, options.suppress_unk
    state = steps.start(raw)
    B = raw.shape[0]
    tokens = torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=raw.device)
    finished = torch.zeros(B, dtype=torch.bool, device=raw.device)
    scores = torch.zeros(B, device=raw.device)
    out_tokens, out_alphas = [], []
    V = steps.vocab_size
    for t in range(max_len + 1):
        banned = repeated_ngram_words(torch.stack(out_tokens, 1), block_ngram, V) if out_tokens else None
        logp, state, alpha = _step_log_probs(steps, tokens, state, t, max_len, banned, suppress_unk)
        # argmax then gather, not max(dim=1): torch's max-with-indices enters its thread pool for any size
        # (20x slower per step when other processes hold the cores); both give the first maximal index.
        best = logp.argmax(dim=1)  # (B,)
        best_logp = logp.gather(1, best.unsqueeze(1)).squeeze(1)
        scores += torch.where(finished, torch.zeros_like(best_logp), best_logp)
        tokens = torch.where(finished, torch.full_like(best, Vocabulary.pad_id), best)
        out_tokens.append(tokens)
        out_alphas.append(alpha)
        finished |= tokens == Vocabulary.end_id
        if bool(finished.all()):  # the one host sync per step: needed to stop early
            break
    tokens = torch.stack(out_tokens, dim=1)
    return Decoded(tokens, scores, torch.stack(out_alphas, dim=1), _lengths(tokens))


@torch.no_grad()
@_in_eval_mode
def beam_search(steps, raw: torch.Tensor, options: SearchOptions) -> Decoded:
    """raw (B, C, H, W) -> Decoded best of options.beam_size hypotheses per image, all images in one batch.

    Hypotheses are ranked by log-probability / ((5 + length) / 6) ** length_penalty (GNMT); 0 ranks by
    total log-probability. block_ngram > 0: no hypothesis repeats one of its n-grams. groups > 1: diverse beam
    search (Vijayakumar et al. 2018): the beams form `groups` groups of beam_size / groups, searched one after
    the other at each step, each group's candidates scored `diversity` lower per earlier group that chose the
    same word at that step; the caption returned is still the most probable of all beams. num_return_sequences
    n > 1: the n highest-ranked beams per image (rows b*n .. b*n+n-1), the first being the n=1 caption. Reads
    every option but the sampling ones (sample, temperature, top_k, top_p).
    """
    if options.beam_size % options.groups:  # beam_size 1 passes SearchOptions with any groups: greedy ignores them
        raise ValueError(f"beam_size {options.beam_size} must be a multiple of groups {options.groups}")
    beam_size, max_len, length_penalty = options.beam_size, options.max_len, options.length_penalty
    block_ngram, groups, diversity = options.block_ngram, options.groups, options.diversity
    suppress_unk = options.suppress_unk
    B, device = raw.shape[0], raw.device
    V = steps.vocab_size
    width = min(beam_size // groups, V)  # beams per group
    k = width * groups
    # Every image's k beams sit next to each other: row b*k + j is beam j of image b; group g is beams
    # g*width .. (g+1)*width-1.
    state = steps.start(raw).repeat(k)  # (B*k, ...)
    tokens = torch.full((B * k,), Vocabulary.start_id, dtype=torch.long, device=device)
    scores = torch.full((B, k), float("-inf"), device=device)  # what beams are ranked by while searching
    scores[:, ::width] = 0.0  # all beams start identical: expand only the first of each group at step 0
    log_probs = scores.clone()  # the beams' log-probabilities (scores minus diversity penalties)
    finished = torch.zeros(B, k, dtype=torch.bool, device=device)
    history = torch.empty(B, k, 0, dtype=torch.long, device=device)
    alpha_history = None  # (B, k, t, N) once the first step says N
    # A finished beam may only continue with <pad> at no cost, so it keeps its score.
    pad_row = torch.full((V,), float("-inf"), device=device)
    pad_row[Vocabulary.pad_id] = 0.0
    offsets = (torch.arange(B, device=device) * k).unsqueeze(1)  # (B, 1)
    n = min(options.num_return_sequences, k)  # captions returned per image
    # Ranked by log-probability alone (no length penalty, no diversity penalty), a beam's score only falls as it
    # grows: once an image's n best finished beams beat all its open ones, nothing can change its result.
    exact_stop = length_penalty == 0 and groups == 1
    for t in range(max_len + 1):
        banned = repeated_ngram_words(history.reshape(B * k, t), block_ngram, V)
        logp, state, alpha = _step_log_probs(steps, tokens, state, t, max_len, banned, suppress_unk)
        N = alpha.shape[1]
        if alpha_history is None:
            alpha_history = torch.empty(B, k, 0, N, device=device)
        logp = torch.where(finished.view(-1, 1), pad_row, logp).view(B, k, V)
        chosen = torch.zeros(B, V, device=device)  # how many earlier groups chose each word at this step
        picks = []
        for g in range(groups):
            part = slice(g * width, (g + 1) * width)
            step_logp = logp[:, part]  # (B, width, V)
            penalty = diversity * chosen.unsqueeze(1) if g else 0.0
            candidates = (scores[:, part].unsqueeze(2) + step_logp - penalty).view(B, width * V)
            group_scores, index = candidates.topk(width, dim=1)  # (B, width)
            beam, word = index // V + g * width, index % V  # which parent beam, which next word
            parent_logp = log_probs.gather(1, beam) + step_logp.reshape(B, width * V).gather(1, index)
            picks.append((group_scores, parent_logp, beam, word))
            if groups > 1:  # words of unfinished beams (a finished one only repeats <pad>)
                chosen.scatter_add_(1, word, (word != Vocabulary.pad_id).float())
        scores, log_probs, beam, word = (torch.cat(parts, dim=1) for parts in zip(*picks))  # (B, k) each
        rows = (beam + offsets).view(-1)  # (B*k,) rows of the parents
        state = state.follow(rows)
        history = torch.cat([history.gather(1, beam.unsqueeze(2).expand_as(history)), word.unsqueeze(2)], dim=2)
        parent_alphas = alpha.view(B, k, N).gather(1, beam.unsqueeze(2).expand(B, k, N))
        alpha_history = torch.cat([
            alpha_history.gather(1, beam.view(B, k, 1, 1).expand_as(alpha_history)),
            parent_alphas.unsqueeze(2)], dim=2)  # (B, k, t+1, N)
        finished = finished.gather(1, beam) | (word == Vocabulary.end_id)
        tokens = word.view(-1)
        if bool(_decided(log_probs, finished, n, exact_stop).all()):  # the one host sync per step
            break
    lengths = (history != Vocabulary.pad_id).sum(dim=2)  # (B, k)
    ranked = log_probs / ((5.0 + lengths.float()) / 6.0) ** length_penalty if length_penalty else log_probs
    if n == 1:
        best = ranked.argmax(dim=1, keepdim=True)  # (B, 1)
    else:  # stable: ties keep argmax's order, so the first of the n is the one caption n=1 returns
        best = ranked.argsort(dim=1, descending=True, stable=True)[:, :n]  # (B, n)
    pick = torch.arange(B, device=device).unsqueeze(1)  # (B, 1)
    tokens = history[pick, best].flatten(0, 1)  # (B, n, L) -> (B*n, L)
    return Decoded(tokens, log_probs[pick, best].flatten(), alpha_history[pick, best].flatten(0, 1),
                   _lengths(tokens))


def _decided(log_probs: torch.Tensor, finished: torch.Tensor, n: int, exact_stop: bool) -> torch.Tensor:
    """(B,) which images' results are final: all their beams finished, or (exact_stop: scores only fall) their
    n-th best finished beam scores strictly above every open beam, which can then only fall further. Without
    it, a batch ran to max_len whenever one of its images kept one wandering beam open (29 of 31 steps on
    average for 8 real photos at max_len 30)."""
    done = finished.all(dim=1)
    if not exact_stop:
        return done
    minus_inf = torch.tensor(float("-inf"), device=log_probs.device)
    nth_finished = torch.where(finished, log_probs, minus_inf).topk(n, dim=1).values[:, -1]
    best_open = torch.where(finished, minus_inf, log_probs).amax(dim=1)  # amax: see greedy_decode
    return done | (nth_finished > best_open)


@torch.no_grad()
@_in_eval_mode
def sampled_decode(steps, raw: torch.Tensor, options: SearchOptions = SearchOptions(),
                   generator: torch.Generator | None = None) -> Decoded:
    """raw (B, C, H, W) -> Decoded with every word drawn from the model's distribution at options.temperature,
    truncated to options.top_k words and the options.top_p nucleus (eval mode; scores: the total log-probability
    under that tempered, truncated distribution). Reads options.max_len, temperature, top_k, top_p, suppress_unk
    and num_return_sequences (n: n samples per image, rows b*n .. b*n+n-1, highest score first); draws from
    `generator`, else torch's global generator."""
    n = options.num_return_sequences
    rows = raw.repeat_interleave(n, dim=0) if n > 1 else raw  # (B*n, C, H, W): image b's n draws side by side
    out = sample_captions(steps, rows, options.max_len, options.temperature, generator, at_least_one_word=True,
                          suppress_unk=options.suppress_unk, top_k=options.top_k, top_p=options.top_p)
    decoded = Decoded(out.tokens, out.log_probs.sum(dim=1), out.alphas, out.lengths)
    return _best_first(decoded, n) if n > 1 else decoded


def _best_first(decoded: Decoded, n: int) -> Decoded:
    """Each image's n rows reordered by score, highest first (stable: equal scores keep their draw order)."""
    order = decoded.scores.view(-1, n).argsort(dim=1, descending=True, stable=True)  # (B, n)
    rows = (order + torch.arange(0, order.numel(), n, device=order.device).unsqueeze(1)).flatten()  # (B*n,)
    return Decoded(decoded.tokens[rows], decoded.scores[rows], decoded.alphas[rows], decoded.lengths[rows])


def decode(model, raw: torch.Tensor, options: SearchOptions = SearchOptions()) -> Decoded:
    """raw (B, C, H, W) -> Decoded by greedy (beam_size 1), beam search, or sampling (options.sample: beam_size
    and the beam options are then ignored); block_ngram applies to greedy and beam search, suppress_unk to all
    three, length_penalty, groups and diversity to beam search, temperature, top_k and top_p to sampling,
    num_return_sequences to beam search and sampling (Decoded then holds n rows per image, best first).
    model: a CaptionModel or any DecoderSteps (model/steps.py)."""
    if options.sample:
        return sampled_decode(model, raw, options)
    if options.beam_size == 1:
        return greedy_decode(model, raw, options)
    return beam_search(model, raw, options)
