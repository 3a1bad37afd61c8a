"""Show, Attend and Tell soft-attention LSTM decoder (Xu et al., 2015), read top-down.

Shapes: B batch, N = H*W regions, D feature size (after the projector), T caption steps, V vocabulary,
A attention size, H LSTM size (from context: H is also the LSTM size in AttentionDecoder).

`step` is one word, as decoding runs it; `forward` (teacher forcing, training) computes the same numbers for
a whole batch of captions faster: words of all steps embedded and projected in one product, the LSTM's three
products with the previous state fused into one, the weight gradients of the two per-step products taken once
over all steps (model/deferred_grad.py), captions that have ended dropped from the batch, and the output layer
run once over every step (tests/test_decoder_speed.py checks it equals looping `step`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.model.deferred_grad import StepProduct


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

    def weights(self, projected: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """projected (B, N, A), query (B, A) = hidden_proj(h) -> alpha (B, N), summing to 1 over the regions."""
        energy = self.activation(projected + query.unsqueeze(1))  # (B, N, A)
        # float32 even under bf16 autocast: the weights sum to 1 (to 1e-7, not 1e-3), for the context and the maps
        return F.softmax(self.score(energy).squeeze(2).float(), dim=1)  # (B, N, A) -> (B, N)

    def forward(self, features, projected, hidden):
        """features (B, N, D), projected (B, N, A), hidden (B, H) -> context (B, D), alpha (B, N)."""
        alpha = self.weights(projected, self.hidden_proj(hidden))
        return attend(alpha, features), alpha


def attend(alpha: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """alpha (B, N), features (B, N, D) -> context (B, D): one batched product, no (B, N, D) temporary."""
    return torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, 1, N) @ (B, N, D) -> (B, D)


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
        h, c = self._initial_hc(features.mean(dim=1))  # (B, N, D) -> (B, D)
        return h, c, features, self.attention.project_features(features)

    def _initial_hc(self, mean: torch.Tensor):
        h, c = self.init_h(mean), self.init_c(mean)
        return (torch.tanh(h), torch.tanh(c)) if self.squash_init else (h, c)

    def _init_from_parts(self, values: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
        """init_state's h, c and projected for features = values * scale + shift, never building features:
        the mean and the attention's feature projection go through the affine part instead, so the one
        (B, N, D) product is values @ (W * scale)^T and no (B, N, D) gradient is computed."""
        h, c = self._initial_hc(values.mean(dim=1) * scale + shift)
        proj = self.attention.feature_proj
        projected = F.linear(values, proj.weight * scale, proj.bias + F.linear(shift, proj.weight))  # (B, N, A)
        return h, c, projected

    def step(self, tokens: torch.Tensor, state):
        """One word: tokens (B,) and state -> logits (B, V), new state, alpha (B, N)."""
        h, c, features, projected = state
        context, alpha = self.attention(features, projected, h)  # (B, D), (B, N)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(h)) * context  # (B, D)
        h, c = self.lstm(torch.cat([self.embed(tokens), context], dim=1), (h, c))  # (B, E + D) -> (B, H)
        logits = self.out(self.dropout(h))  # (B, V)
        return logits, (h, c, features, projected), alpha

    def forward_stepwise(self, features: torch.Tensor, captions: torch.Tensor):
        """Teacher forcing one `step` at a time, as decoding runs: the reference `forward` is tested against.
        features (B, N, D), captions (B, T+1) -> logits (B, T, V), alphas (B, T, N)."""
        state = self.init_state(features)
        logits, alphas = [], []
        for t in range(captions.shape[1] - 1):
            step_logits, state, alpha = self.step(captions[:, t], state)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor | None = None,
                context_parts: tuple | None = None):
        """Teacher forcing. features (B, N, D), captions (B, T+1) starting with <start>, lengths (B,) counting
        <start> and <end> (None: every caption is T+1 long) -> logits (B, T, V) predicting captions[:, 1:],
        alphas (B, T, N); positions after a caption's <end> are 0 (the loss masks them).

        The same numbers as forward_stepwise up to float rounding, dropout masks included (drawn in its order).
        context_parts (values (B, N, D), scale (D,), shift (D,)), when given, says features == values * scale +
        shift with values needing no gradient (model.features=norm: LayerNorm of frozen activations); features
        is then not used (None will do): the context is scale * attend(alpha, values) + shift (alpha sums to
        1) and the attention's projection (W * scale) @ values + W @ shift, so nothing computes a (B, N, D)
        gradient."""
        B, T = captions.shape[0], captions.shape[1] - 1
        steps = torch.full((B,), T, device=captions.device) if lengths is None else (lengths - 1).clamp(1, T)
        # Longest captions first: the rows still running at step t are the first active[t], a view.
        steps, order = steps.sort(descending=True, stable=True)
        active = [int(n) for n in (steps.unsqueeze(0) > torch.arange(T, device=steps.device).unsqueeze(1)).sum(1)]
        if lengths is not None and bool((order.diff() < 0).any()):  # not sorted yet: one copy of each
            captions = captions[order]
            if context_parts is None:
                features = features[order]
            else:
                context_parts = (context_parts[0][order], *context_parts[1:])
        if context_parts is None:
            h, c, _, projected = self.init_state(features)
        else:
            values, scale, shift = context_parts
            h, c, projected = self._init_from_parts(values, scale, shift)
        # Under autocast every step's attend() would cast its (n, N, D) slice again: cast the whole once.
        device = captions.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            if context_parts is None:
                features = features.to(dtype)
            else:
                values = values.to(dtype)
        H, A, lstm = h.shape[1], projected.shape[2], self.lstm
        E = self.embed.embedding_dim
        # Each step's words, in the packed order of the rows still running: (sum(active),) token ids.
        packed = torch.cat([captions[:n, t] for t, n in enumerate(active)])
        words = F.linear(self.embed(packed), lstm.weight_ih[:, :E], lstm.bias_ih + lstm.bias_hh)  # (P, 4H)
        # The three products of the previous h (LSTM, attention query, gate) as one: (4H + A [+ D], H).
        w_h = [lstm.weight_hh, self.attention.hidden_proj.weight] + ([self.gate.weight] if self.gate else [])
        b_h = [torch.zeros_like(lstm.bias_hh), self.attention.hidden_proj.bias] + (
            [self.gate.bias] if self.gate else [])
        w_h, b_h, w_context = torch.cat(w_h), torch.cat(b_h), lstm.weight_ih[:, E:]  # w_context (4H, D)
        # Their weight gradients: one product over all steps each (and one cast under autocast), not one per step.
        from_h, from_context = StepProduct(w_h), StepProduct(w_context)
        hs, alphas = [], []
        sizes = [4 * H, A] + ([w_context.shape[1]] if self.gate is not None else [])
        # split, not slices: a slice's gradient is a zero-filled copy of the whole tensor at every step
        for t, (n, words_t) in enumerate(zip(active, words.split(active))):
            h, c = h[:n], c[:n]
            # (n, H) -> (n, 4H), (n, A), (n, D)
            from_lstm, query, *gate = (from_h(h, first=t == 0) + b_h).split(sizes, dim=1)
            alpha = self.attention.weights(projected[:n], query)  # (n, N)
            if context_parts is None:
                context = attend(alpha, features[:n])  # (n, D)
            else:
                context = attend(alpha, values[:n]) * scale + shift
            if gate:
                context = torch.sigmoid(gate[0]) * context
            gates = words_t + from_lstm + from_context(context, first=t == 0)  # (n, 4H)
            i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTMCell's order
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
            alphas.append(alpha)
        hidden = torch.cat(hs)  # (P, H), packed
        if self.training and self.dropout.p > 0:  # forward_stepwise's masks: one (B, H) draw per step, in row order
            masks = torch.stack([self.dropout(h.new_ones(B, H)) for _ in range(T)], dim=1)[order]  # (B, T, H)
            hidden = hidden * torch.cat([masks[:n, t] for t, n in enumerate(active)])
        logits = self.out(hidden)  # (P, H) -> (P, V): one product for every step
        # Back to (B, T, .) in the callers' row order: packed row p is (order[r], t).
        rows = torch.cat([order[:n] * T + t for t, n in enumerate(active)])  # (P,)
        full_logits = logits.new_zeros(B * T, logits.shape[1]).index_copy(0, rows, logits)
        full_alphas = alpha.new_zeros(B * T, alpha.shape[1]).index_copy(0, rows, torch.cat(alphas))
        return full_logits.view(B, T, -1), full_alphas.view(B, T, -1)


def caption_loss(logits, alphas, captions, lengths, alpha_c: float, label_smoothing: float = 0.0):
    """Masked cross-entropy plus the doubly stochastic attention penalty.

    logits (B, T, V), alphas (B, T, N), captions (B, T+1), lengths (B,) counting <start> and <end>.
    Each region's attention, summed over the words of the caption, is pushed towards 1 (paper eq. 14).
    label_smoothing: the target puts this much probability on the other words, spread evenly (Szegedy 2016).
    """
    logits, alphas = logits.float(), alphas.float()  # float32 loss and penalty even from bf16 autocast
    targets = captions[:, 1:]  # (B, T)
    mask = (torch.arange(targets.shape[1], device=targets.device)[None, :] < (lengths[:, None] - 1))  # (B, T)
    ce = F.cross_entropy(logits[mask], targets[mask], label_smoothing=label_smoothing)
    attention_sum = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, T, N) -> (B, N)
    penalty = ((1.0 - attention_sum) ** 2).mean()
    return ce + alpha_c * penalty, ce
