"""Show, Attend and Tell soft-attention LSTM decoder (Xu et al., 2015), read top-down.

Shapes: B batch, N = H*W regions, D feature size (after the projector), T caption steps, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Additive (Bahdanau) attention of the LSTM state over the image regions."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int, activation: str = "tanh"):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)
        self.activation = torch.relu if activation == "relu" else torch.tanh

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.feature_proj(features)  # (B, N, D) -> (B, N, A), computed once per image

    def forward(self, features, projected, hidden):
        """features (B, N, D), projected (B, N, A), hidden (B, H) -> context (B, D), alpha (B, N)."""
        energy = self.activation(projected + self.hidden_proj(hidden).unsqueeze(1))  # (B, N, A)
        alpha = F.softmax(self.score(energy).squeeze(2), dim=1)  # (B, N)
        context = (features * alpha.unsqueeze(2)).sum(dim=1)  # (B, N, D) * (B, N, 1) -> (B, D)
        return context, alpha


class AttentionDecoder(nn.Module):
    """init_state "tanh": h, c = tanh(Linear(mean region)); "linear": no tanh (the reference tutorial).
    gate: the context is scaled by sigmoid(Linear(h)) per channel before it enters the LSTM."""

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int, attention_dim: int,
                 decoder_dim: int, dropout: float = 0.5, attention: str = "tanh", init_state: str = "tanh",
                 gate: bool = True):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.attention = Attention(feature_dim, decoder_dim, attention_dim, attention)
        self.init_h = nn.Linear(feature_dim, decoder_dim)
        self.init_c = nn.Linear(feature_dim, decoder_dim)
        self.squash_init = init_state == "tanh"
        # "beta" in the paper: how much the context is used
        self.gate = nn.Linear(decoder_dim, feature_dim) if gate else None
        self.lstm = nn.LSTMCell(embed_dim + feature_dim, decoder_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(decoder_dim, vocab_size)

    def init_state(self, features: torch.Tensor):
        """features (B, N, D) -> state (h, c, features, projected) with h, c (B, H) from the mean region."""
        mean = features.mean(dim=1)  # (B, N, D) -> (B, D)
        h, c = self.init_h(mean), self.init_c(mean)
        if self.squash_init:
            h, c = torch.tanh(h), torch.tanh(c)
        return h, c, features, self.attention.project_features(features)

    def step(self, tokens: torch.Tensor, state):
        """One word: tokens (B,) and state -> logits (B, V), new state, alpha (B, N)."""
        h, c, features, projected = state
        context, alpha = self.attention(features, projected, h)  # (B, D), (B, N)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(h)) * context  # (B, D)
        h, c = self.lstm(torch.cat([self.embed(tokens), context], dim=1), (h, c))  # (B, E + D) -> (B, H)
        logits = self.out(self.dropout(h))  # (B, V)
        return logits, (h, c, features, projected), alpha

    def forward(self, features: torch.Tensor, captions: torch.Tensor):
        """Teacher forcing. features (B, N, D), captions (B, T+1) starting with <start>
        -> logits (B, T, V) predicting captions[:, 1:], alphas (B, T, N)."""
        state = self.init_state(features)
        logits, alphas = [], []
        for t in range(captions.shape[1] - 1):
            step_logits, state, alpha = self.step(captions[:, t], state)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)


def caption_loss(logits, alphas, captions, lengths, alpha_c: float):
    """Masked cross-entropy plus the doubly stochastic attention penalty.

    logits (B, T, V), alphas (B, T, N), captions (B, T+1), lengths (B,) counting <start> and <end>.
    Each region's attention, summed over the words of the caption, is pushed towards 1 (paper eq. 14).
    """
    logits, alphas = logits.float(), alphas.float()  # float32 loss and penalty even from bf16 autocast
    targets = captions[:, 1:]  # (B, T)
    mask = (torch.arange(targets.shape[1], device=targets.device)[None, :] < (lengths[:, None] - 1))  # (B, T)
    ce = F.cross_entropy(logits[mask], targets[mask])
    attention_sum = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, T, N) -> (B, N)
    penalty = ((1.0 - attention_sum) ** 2).mean()
    return ce + alpha_c * penalty, ce
