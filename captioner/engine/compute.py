"""How the model runs fast on a GPU: bf16 autocast, channels_last, cuDNN autotuning and optional torch.compile.

    encoder = prepare_encoder(build_encoder(cfg.encoder), device, cfg.compute)
    with autocast(device, cfg.compute.bf16):
        raw = encoder(images)                      # bf16 activations on CUDA, float32 on CPU

Every switch here is a no-op on CPU: bf16 matmuls are slower than float32 on most CPUs, and channels_last
only pays off with cuDNN. bfloat16 keeps float32's exponent range, so random-weight ResNet-152 activations
(~1e8) stay finite where float16 would overflow.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from captioner.config import ComputeConfig

log = logging.getLogger("captioner")


def autocast(device: torch.device, bf16: bool = True):
    """bf16 autocast on CUDA when bf16 is set; a context that does nothing anywhere else."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def setup_cuda() -> None:
    """Let cuDNN pick the fastest convolution for our fixed image size, and allow TF32 for float32 matmuls."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def prepare_encoder(encoder: nn.Module, device: torch.device, cfg: ComputeConfig) -> nn.Module:
    """Move the frozen encoder to device; on CUDA use channels_last and optionally compile it, in place.

    Module.compile() compiles in place, so state_dict keys stay plain (no `_orig_mod.` prefix in checkpoints).
    """
    encoder.to(device)
    if device.type != "cuda":
        return encoder
    setup_cuda()
    if cfg.channels_last:
        # cuDNN picks the NHWC kernels when the weights are channels_last; the hooked output follows.
        encoder.to(memory_format=torch.channels_last)
    if cfg.compile:
        log.info("compiling the encoder (the first batch is slow)")
        encoder.compile()
    return encoder


def use_gpu_decode(cfg: ComputeConfig, device: torch.device) -> bool:
    """compute.gpu_decode applies on CUDA only, and needs torchvision's nvjpeg decoder."""
    if not cfg.gpu_decode or device.type != "cuda":
        return False
    import torchvision
    if not hasattr(torchvision.io, "decode_jpeg"):
        log.warning("compute.gpu_decode: this torchvision has no io.decode_jpeg; decoding with PIL instead")
        return False
    return True
