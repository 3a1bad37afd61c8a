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


def sample_captions(model, raw: torch.Tensor, max_len: int = 30, temperature: float = 1.0,
                    generator: torch.Generator | None = None, at_least_one_word: bool = False,
                    suppress_unk: bool = False) -> Sampled:
    """raw (B, C, H, W) encoder activations -> one sampled caption per row (repeat rows for several).

    at_least_one_word (inference): draw as greedy and beam decoding do, never <pad> or <start> and never
    <end> first, from the distribution renormalised without them. Off for self-critical training, whose
    log-probabilities must be the model's own.
    suppress_unk: never draw <unk> (decode.suppress_unk), from the distribution renormalised without it: self-
    critical training then samples the policy that greedy and beam decoding with suppress_unk run."""
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
        active = ~finished
        if t == max_len:  # the word budget is spent: <end> is forced, not drawn, so it carries no log-probability
            word = torch.full((B,), Vocabulary.end_id, dtype=torch.long, device=device)
            drawn = torch.zeros_like(active)
        else:
            word = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)  # (B,)
            drawn = active
        tokens = torch.where(active, word, torch.full_like(word, Vocabulary.pad_id))
        out_tokens.append(tokens)
        out_logp.append(logp.gather(1, word.unsqueeze(1)).squeeze(1) * drawn)  # (B,) 0 after <end>
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
