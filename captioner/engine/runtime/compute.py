"""The one compute switch: which precision and memory format every command runs with, and why.

    compute = setup_compute(cfg.compute, device)   # resolves `auto`, logs once what it chose and why
    compute.prepare_encoder(model.encoder)          # channels_last, optional torch.compile, in place
    with compute.autocast():
        raw = model.encode(images)                  # bf16 activations when compute.bf16 is on

compute.bf16 and compute.channels_last are auto | true | false. auto turns them on on CUDA, and on a CPU
with native bf16 units (AVX-512 BF16, or AMX on Xeons since Sapphire Rapids: oneDNN runs bf16 convolutions
and matmuls 2-3x faster than float32 there); on other CPUs bf16 is emulated and slower, so auto leaves both
off. Only activations change: weights, optimizer state, the loss and checkpoints stay float32. bfloat16
keeps float32's exponent range, so random-weight ResNet-152 activations (~1e8) stay finite where float16
would overflow.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from captioner.config import ComputeConfig

log = logging.getLogger("captioner")


@dataclass(frozen=True)
class CpuCapability:
    isa: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, AVX512_BF16, AMX, ...
    avx512_bf16: bool
    amx: bool

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx

    def describe(self) -> str:
        units = [name for name, has in (("AVX512-BF16", self.avx512_bf16), ("AMX", self.amx)) if has]
        return f"{self.isa} kernels, {'native bf16: ' + ', '.join(units) if units else 'no native bf16'}"


def _cpuinfo_flags() -> set[str]:
    """The flags line of /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _torch_check(name: str) -> bool | None:
    """torch.cpu._is_avx512_bf16_supported() and friends: private, so absent in some versions (None)."""
    check = getattr(torch.cpu, name, None) or getattr(getattr(torch._C, "_cpu", None), name, None)
    try:
        return bool(check()) if check is not None else None
    except RuntimeError:
        return None


@functools.lru_cache(maxsize=1)
def cpu_capability() -> CpuCapability:
    """What this CPU can do for bf16, from torch's own checks, /proc/cpuinfo where torch has none."""
    isa = torch.backends.cpu.get_cpu_capability()
    flags = None
    found = {}
    for key, check, flag in (("avx512_bf16", "_is_avx512_bf16_supported", "avx512_bf16"),
                             ("amx", "_is_amx_tile_supported", "amx_bf16")):
        value = _torch_check(check)
        if value is None:
            flags = _cpuinfo_flags() if flags is None else flags
            value = flag in flags
        found[key] = value
    return CpuCapability(isa, found["avx512_bf16"], found["amx"])


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on device when bf16 (a resolved switch, see setup_compute); else a context doing nothing."""
    if not isinstance(bf16, bool):  # "auto" / "false" strings are truthy: resolve them first
        raise TypeError(f"autocast takes a resolved bool, got {bf16!r}: use setup_compute(cfg.compute, device)")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type in ("cuda", "cpu"))


def setup_cuda() -> None:
    """Let cuDNN pick the fastest convolution for our fixed image size, and allow TF32 for float32 matmuls."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def use_gpu_decode(cfg: ComputeConfig, device: torch.device) -> bool:
    """compute.gpu_decode applies on CUDA only, and needs torchvision's nvjpeg decoder."""
    if not cfg.gpu_decode or device.type != "cuda":
        return False
    import torchvision
    if not hasattr(torchvision.io, "decode_jpeg"):
        log.warning("compute.gpu_decode: this torchvision has no io.decode_jpeg; decoding with PIL instead")
        return False
    return True


@dataclass(frozen=True)
class Compute:
    """The resolved switches of one command on one device; `why` says where each came from."""
    device: torch.device
    bf16: bool
    channels_last: bool
    compile: bool
    gpu_decode: bool
    why: str

    def autocast(self):
        return autocast(self.device, self.bf16)

    def prepare_encoder(self, encoder: nn.Module) -> nn.Module:
        """Move the frozen encoder to the device; channels_last and torch.compile as resolved, in place.

        Module.compile() compiles in place, so state_dict keys stay plain (no `_orig_mod.` prefix in checkpoints).
        """
        encoder.to(self.device)
        if self.device.type == "cuda":
            setup_cuda()
        if self.channels_last:
            # cuDNN and oneDNN pick their NHWC kernels when the weights are channels_last; activations follow.
            encoder.to(memory_format=torch.channels_last)
        if self.compile:
            log.info("compiling the encoder (the first batch is slow)")
            encoder.compile()
        return encoder

    def describe(self) -> str:
        precision = "bf16 autocast (float32 weights)" if self.bf16 else "float32"
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{precision}, {layout}{', torch.compile' if self.compile else ''} on {self.device}: {self.why}"


_announced: set[str] = set()


def _resolve(value: str, name: str, device: torch.device, reasons: list[str]) -> bool:
    if value != "auto":
        reasons.append(f"compute.{name}={value}")
        return value == "true"
    if device.type == "cuda":
        return True
    if device.type == "cpu" and cpu_capability().native_bf16:
        return True
    return False


def _announce(message: str) -> None:
    if message not in _announced:
        _announced.add(message)
        log.info(message)


def fixed_compute(cfg: ComputeConfig, device: torch.device, what: str) -> Compute:
    """The compute of a runtime whose precision was fixed when its graphs were made (ONNX Runtime): none of
    PyTorch's switches (bf16 autocast, channels_last, compile) applies; logged once as what runs."""
    compute = Compute(device, False, False, False, use_gpu_decode(cfg, device), what)
    _announce(f"compute: {what}")
    return compute


def setup_compute(cfg: ComputeConfig, device: torch.device) -> Compute:
    """THE switch every PyTorch run goes through (ONNX Runtime's graphs: fixed_compute): resolve compute.bf16 /
    channels_last (auto | true | false) for device, and log once per process which precision and memory format
    it uses and why."""
    reasons: list[str] = []
    bf16 = _resolve(cfg.bf16, "bf16", device, reasons)
    channels_last = _resolve(cfg.channels_last, "channels_last", device, reasons)
    if "auto" in (cfg.bf16, cfg.channels_last):
        if device.type == "cuda":
            reasons.append("auto on CUDA")
        elif device.type == "cpu":
            cap = cpu_capability()
            reasons.append(f"auto on a CPU with {cap.describe()}")
        else:
            reasons.append(f"auto: off on {device.type}")
    compute = Compute(device, bf16, channels_last, cfg.compile, use_gpu_decode(cfg, device), "; ".join(reasons))
    _announce(f"compute: {compute.describe()}")
    return compute
