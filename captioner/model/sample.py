"""Decoding by sampling: each word drawn from the model's (temperature-scaled) distribution.

    out = sample_captions(model, raw, max_len=16, temperature=1.0)   # raw: (B, C, H, W) encoder activations
    out.tokens (B, L) words, <end>, then <pad>; out.log_probs (B, L) log-probability of each drawn token (0
    after <end>), differentiable: self-critical training backpropagates through it; out.mask (B, L) the
    tokens up to and including <end>.

Unlike greedy_decode and beam_search this runs in whatever mode the caller left the model (SCST samples
in training mode, with dropout, from the policy it updates) and keeps the autograd graph; `decode(model, raw,
SearchOptions(sample=True))` in decoding.py is the inference entry point (eval mode, no gradients). Random
draws come from `generator`, else torch's global generator (saved in checkpoints, so a resumed run draws the
same words).
`model` is a CaptionModel or any DecoderSteps (model/steps.py), as for greedy and beam decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from captioner.model.steps import as_steps
from captioner.text import Vocabulary


@dataclass
class Sampled:
    tokens: torch.Tensor  # (B, L) long: words, <end>, then <pad>
    log_probs: torch.Tensor  # (B, L) float32 log-probability of each drawn token; 0 after <end> and for a forced <end>
    mask: torch.Tensor  # (B, L) bool: tokens up to and including <end>
    entropy: torch.Tensor  # (B, L) entropy of each step's word distribution (differentiable; 0 after <end>)
    alphas: torch.Tensor  # (B, L, N) attention for each token (detached)
    lengths: torch.Tensor  # (B,) tokens up to and including <end>


def keep_likeliest(logp: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logp (R, V) log-probabilities -> the same with every word outside the k likeliest (top_k > 0) and outside
    the nucleus (top_p < 1: the fewest likeliest words whose probabilities sum to at least top_p; Holtzman et al.
    2020) set to -inf, as transformers' TopKLogitsWarper then TopPLogitsWarper. The likeliest word is always kept,
    so top_k=1 or a tiny top_p leaves only the greedy choice. Not renormalised."""
    if top_k > 0 and top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[..., -1:]  # (R, 1): the k-th largest
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logp.sort(dim=-1, descending=True)  # (R, V) likeliest first
        probs = ordered.softmax(dim=-1)
        likelier_mass = probs.cumsum(dim=-1) - probs  # what the likelier words already hold
        drop_sorted = likelier_mass >= top_p  # the first word never: nothing is likelier
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def sample_captions(model, raw: torch.Tensor, max_len: int = 30, temperature: float = 1.0,
                    generator: torch.Generator | None = None, at_least_one_word: bool = False,
                    suppress_unk: bool = False, top_k: int = 0, top_p: float = 1.0) -> Sampled:
    """raw (B, C, H, W) encoder activations -> one sampled caption per row (repeat rows for several).

    at_least_one_word (inference): draw as greedy and beam decoding do, never <pad> or <start> and never
    <end> first, from the distribution renormalised without them. Off for self-critical training, whose
    log-probabilities must be the model's own.
    suppress_unk: never draw <unk> (decode.suppress_unk), from the distribution renormalised without it: self-
    critical training then samples the policy that greedy and beam decoding with suppress_unk run.
    top_k, top_p (inference; 0 and 1.0: off): draw from the truncated, renormalised distribution (keep_likeliest,
    after the temperature); log_probs are then under that distribution."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    steps = as_steps(model)
    state = steps.start(raw)
    B, device = raw.shape[0], raw.device
    tokens = torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out_tokens, out_logp, out_mask, out_alphas, out_entropy = [], [], [], [], []
    never = torch.zeros(steps.vocab_size, dtype=torch.bool, device=device)
    never[[Vocabulary.pad_id, Vocabulary.start_id]] = True
    never_first = never.clone()
    never_first[Vocabulary.end_id] = True
    unk = torch.zeros_like(never)
    unk[Vocabulary.unk_id] = suppress_unk
    never |= unk
    never_first |= unk
    for t in range(max_len + 1):
        logp, state, alpha = steps.step(tokens, state)  # (B, V) float32, normalised
        if at_least_one_word:
            logp = logp.masked_fill(never_first if t == 0 else never, float("-inf"))
        elif suppress_unk:
            logp = logp.masked_fill(unk, float("-inf"))
        if at_least_one_word or suppress_unk or temperature != 1.0:  # renormalise (log_softmax ignores logp's shift)
            logp = F.log_softmax(logp / temperature, dim=-1)  # (B, V)
        if top_k > 0 or top_p < 1.0:
            logp = F.log_softmax(keep_likeliest(logp, top_k, top_p), dim=-1)  # (B, V) renormalised
        active = ~finished
        if t == max_len:  # the word budget is spent: <end> is forced, not drawn, so it carries no log-probability
            word = torch.full((B,), Vocabulary.end_id, dtype=torch.long, device=device)
            drawn = torch.zeros_like(active)
        else:
            word = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)  # (B,)
            drawn = active
        tokens = torch.where(active, word, torch.full_like(word, Vocabulary.pad_id))
        out_tokens.append(tokens)
        # (B,) 0 after <end> and for a forced <end> (which top_k / top_p may have cut: -inf, never -inf * 0 = NaN)
        out_logp.append(torch.where(drawn, logp.gather(1, word.unsqueeze(1)).squeeze(1), 0.0))
        out_mask.append(active)
        p_logp = logp.exp() * logp  # (B, V)
        out_entropy.append(-torch.where(torch.isfinite(logp), p_logp, 0.0).sum(dim=1) * drawn)
        out_alphas.append(alpha.detach())
        finished = finished | (tokens == Vocabulary.end_id)
        if bool(finished.all()):  # the one host sync per step: needed to stop early
            break
    mask = torch.stack(out_mask, dim=1)
    return Sampled(torch.stack(out_tokens, dim=1), torch.stack(out_logp, dim=1), mask,
                   torch.stack(out_entropy, dim=1), torch.stack(out_alphas, dim=1), mask.sum(dim=1))
