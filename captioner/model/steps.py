"""The step interface that greedy, beam and sampled decoding run over, whatever computes the steps.

    steps = TorchSteps(model)                 # the PyTorch modules; engine/infer/onnx_runtime.py has ORT's
    state = steps.start(raw)                  # raw (B, C, H, W) encoder activations -> StepState
    logp, state, alpha = steps.step(tokens, state)   # tokens (B,) -> log-probs (B, V) float32, alpha (B, N)

decoding.py and sample.py hold the loops (one copy of each algorithm); a backend only says how to start a
caption from the encoder's activations and how to take one word. PyTorch modules and ONNX Runtime sessions
(engine/infer/onnx_runtime.py) both implement it, so captions cannot differ by backend beyond float rounding.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F


@dataclass
class StepState:
    """What the decoder carries from one word to the next, row by row.

    carried: tensors (B, ...) that every step replaces (the LSTM's h and c); a beam that continues another
    beam takes its rows. memory: tensors (B, ...) fixed for a caption (the regions' features and their
    attention projection); all beams of one image share them, so beam search never reorders them."""
    carried: tuple[torch.Tensor, ...]
    memory: tuple[torch.Tensor, ...]

    def repeat(self, k: int) -> "StepState":
        """Each row k times in a row: row b*k + j is copy j of row b (beam j of image b)."""
        return StepState(tuple(t.repeat_interleave(k, 0) for t in self.carried),
                         tuple(t.repeat_interleave(k, 0) for t in self.memory))

    def follow(self, rows: torch.Tensor) -> "StepState":
        """Row i continues row rows[i] (a beam and its parent, always of the same image): carried rows move,
        memory rows stay (they are the same image's). index_select, not t[rows]: advanced indexing of these
        small tensors enters torch's thread pool, 40x slower when other processes hold the cores."""
        return StepState(tuple(t.index_select(0, rows) for t in self.carried), self.memory)


class DecoderSteps(Protocol):
    """A decoder that decoding.py and sample.py can drive one word at a time."""
    vocab_size: int

    def start(self, raw: torch.Tensor) -> StepState:
        """raw (B, C, H, W) encoder activations -> the state before the first word."""

    def step(self, tokens: torch.Tensor, state: StepState) -> tuple[torch.Tensor, StepState, torch.Tensor]:
        """tokens (B,) previous words -> (log-probabilities (B, V) float32, next state, attention (B, N))."""

    def evaluating(self) -> contextlib.AbstractContextManager:
        """A context in which steps run as at inference (dropout off), the caller's mode given back after."""


class TorchSteps:
    """DecoderSteps over a CaptionModel's PyTorch modules (differentiable: self-critical training samples
    through it in training mode)."""

    def __init__(self, model):
        self.model = model
        self.vocab_size = model.decoder.vocab_size

    def start(self, raw: torch.Tensor) -> StepState:
        h, c, features, projected = self.model.decoder.init_state(self.model.project(raw))
        return StepState((h, c), (features, projected))  # (B, H) x 2; (B, N, D), (B, N, A)

    def step(self, tokens: torch.Tensor, state: StepState):
        logits, (h, c, _, _), alpha = self.model.decoder.step(tokens, (*state.carried, *state.memory))
        return F.log_softmax(logits.float(), dim=-1), StepState((h, c), state.memory), alpha  # (B, V)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode inside, the caller's mode afterwards, also when decoding raises (out of memory, Ctrl-C)."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)


def as_steps(decoder) -> DecoderSteps:
    """A CaptionModel wrapped in TorchSteps; anything that already implements DecoderSteps as it is."""
    if hasattr(decoder, "start") and hasattr(decoder, "step") and hasattr(decoder, "vocab_size"):
        return decoder
    return TorchSteps(decoder)
