"""The whole captioner: hooked encoder -> projector (model.features) -> attention LSTM decoder.

    model = CaptionModel(cfg.encoder, cfg.model, vocab_size=len(vocab))
    raw = model.encode(images)                       # (B, 3, S, S) uint8 -> (B, C, H, W), frozen
    logits, alphas = model(raw, captions)            # teacher forcing on raw encoder features
    out = decode(model, raw, SearchOptions(...))     # greedy, beam or sampled: see decoding.py

Training and decoding take the raw encoder activations, so features cached on disk and features
computed on the fly go through exactly the same projector.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.config import EncoderConfig, ModelConfig
from captioner.model.decoder import AttentionDecoder
from captioner.model.encoder import HookedEncoder


def build_encoder(cfg: EncoderConfig) -> HookedEncoder:
    """The hooked backbone. Random-init weights come from encoder.seed, without touching the global random
    state, so `extract` and `train` build the same random encoder whatever train.seed says."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return HookedEncoder(cfg.arch, cfg.layer or None, cfg.weights, cfg.in_channels, cfg.image_size,
                             cfg.finetune_from, cfg.mean, cfg.std, cfg.interpolation or None)


def recorded_encoder_config(cfg: EncoderConfig, encoder: HookedEncoder) -> EncoderConfig:
    """cfg with the hooked layer and the preprocessing the encoder resolved (the backbone's last stage, the weights'
    own normalisation, where cfg left them unset): what a checkpoint records, so the model it holds is rebuilt
    the same way without its weights' tag, whatever a later library version reports."""
    p = encoder.preprocess
    return dataclasses.replace(cfg, layer=encoder.layer, mean=list(p.mean), std=list(p.std),
                               interpolation=p.interpolation)


def build_projector(kind: str, channels: int, embed_dim: int) -> tuple[nn.Module, int]:
    """(module applied to every region's (C,) feature, the decoder's feature size D).

    project: Linear to embed_dim + LayerNorm; norm: LayerNorm over the C channels, which keeps all of them;
    raw: the activations as they are (the reference tutorial; only for pretrained, unit-scale features).
    Random-init ResNet-152 layer4 activations reach ~1e8: project and norm keep the decoder's inputs at
    unit scale whatever the backbone's weights.
    """
    if kind == "project":
        return nn.Sequential(nn.Linear(channels, embed_dim), nn.LayerNorm(embed_dim)), embed_dim
    if kind == "norm":
        return nn.Sequential(nn.LayerNorm(channels)), channels  # Sequential as project's: [0] is its first layer
    return nn.Sequential(), channels  # an empty Sequential is the identity


class CaptionModel(nn.Module):
    def __init__(self, encoder_cfg: EncoderConfig, model_cfg: ModelConfig, vocab_size: int,
                 encoder: HookedEncoder | None = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else build_encoder(encoder_cfg)
        self.alpha_c = model_cfg.alpha_c
        self.projector, feature_dim = build_projector(model_cfg.features, self.encoder.channels, model_cfg.embed_dim)
        self.decoder = AttentionDecoder(vocab_size, feature_dim, model_cfg.embed_dim, model_cfg.attention_dim,
                                        model_cfg.decoder_dim, model_cfg.dropout, model_cfg.attention,
                                        model_cfg.init_state, model_cfg.gate)

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S) images -> raw frozen activations (B, C, H, W)."""
        return self.encoder(images)

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) raw activations (any float dtype) -> (B, N=H*W, D) decoder features."""
        regions = raw.float().flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        return self.projector(regions)  # (B, N, C) -> (B, N, D)

    def context_parts(self, raw: torch.Tensor) -> tuple | None:
        """model.features=norm: (values, scale, shift) with project(raw) == values * scale + shift, values the
        LayerNorm without its affine part, which needs no gradient while the encoder is frozen: the decoder's
        training forward then attends over values and never computes a (B, N, C) gradient per word.
        None for the other projectors."""
        norm = self.projector[0] if len(self.projector) == 1 else None
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
            return None
        regions = raw.float().flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        return F.layer_norm(regions, norm.normalized_shape, eps=norm.eps), norm.weight, norm.bias

    def forward(self, raw: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor | None = None):
        """raw (B, C, H, W), captions (B, T+1), lengths (B,) counting <start> and <end> (None: all T+1)
        -> logits (B, T, V), alphas (B, T, N), 0 after each caption's <end>."""
        parts = self.context_parts(raw)  # norm: features as values * scale + shift, from one LayerNorm pass
        return self.decoder(self.project(raw) if parts is None else None, captions, lengths, parts)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]
