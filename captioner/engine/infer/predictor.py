"""A checkpoint ready to caption: the model on a device, in eval mode, with this machine's compute and the
decode settings. `caption`, `evaluate`, `serve` and `bench` set a model up through it, so none of them can
drift from the others (transformers' pipeline and CLIP's `load` return the model with its preprocessing the same way).

    predictor = Predictor.load("runs/tiny/best.pt", device="auto", beam_size=3)   # or a model folder, "model/",
    predictor = Predictor.load("owner/model")          # or a Hugging Face Hub repo id (the [hub] extra)
    captioned = predictor.caption_batch(images)                 # (B, 3, S, S) uint8 on predictor.device
    batches = predictor.image_batches(paths, batch_size=32, num_workers=2)
    for batch, captioned in predictor.caption_batches(batches, attention=True): ...

The decoding itself is engine/infer/predict.py's (the one decode path); this class only holds what it needs.
What computes it is the backend (backend.py): the PyTorch model, or ONNX Runtime sessions of an exported model
(onnx_runtime.py), which then has no PyTorch model (model is None).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass

import torch

from captioner.config import ComputeConfig, Config, apply_overrides
from captioner.data.images import MAX_PIXELS
from captioner.data.pipeline import Batches, image_batches
from captioner.engine.infer.backend import Backend, TorchBackend
from captioner.engine.infer.generation import generation_settings
from captioner.engine.infer.model_folder import load_model_source, model_hash, resolve_model
from captioner.engine.infer.model_id import graphs_id, model_id
from captioner.engine.infer.predict import Captioned, DecodeSettings, caption_batch, caption_batches
from captioner.engine.runtime.compute import Compute, fixed_compute, setup_compute
from captioner.engine.runtime.device import resolve_device
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary


# How a model runs: "torch" (its nn.Modules) or "onnxruntime" (the ONNX graphs of a model folder written by
# `captioner export --format onnx`, engine/infer/onnx_runtime.py).
RUNTIMES = ("torch", "onnxruntime")


def ort_session_options(threads: int | None, optimization: str | None) -> dict:
    """--ort-threads and --ort-optimization as Predictor.load's session_options (only those given)."""
    given = {"intra_op_threads": threads, "graph_optimization": optimization}
    return {key: value for key, value in given.items() if value is not None}


def load_for_job(job, device) -> "Predictor":
    """Predictor.load with a caption or evaluate job's options: its checkpoint, --beam, compute, --sample,
    --temperature, --runtime, the KEY=VALUE overrides and the ONNX Runtime options (compute describes this
    machine, not the checkpoint: auto unless the job says otherwise)."""
    return Predictor.load(job.checkpoint, device, beam_size=job.beam_size, compute=job.compute, sample=job.sample,
                          temperature=job.temperature, runtime=job.runtime, overrides=job.overrides,
                          providers=job.providers,
                          session_options=ort_session_options(job.ort_threads, job.ort_optimization))


def _onnx_compute(cfg: ComputeConfig, device: torch.device, backend) -> Compute:
    """ONNX Runtime's compute: the graphs' precision was fixed at export, so PyTorch's bf16 autocast,
    channels_last and compile do not apply (auto leaves them off; asking for one is an error)."""
    asked = [f"compute.{key}=true" for key in ("bf16", "channels_last", "compile")
             if getattr(cfg, key) in ("true", True)]
    if asked:
        raise CaptionerError(f"{', '.join(asked)} (or dtype=bfloat16) applies to the PyTorch runtime (runtime torch): "
                             f"ONNX Runtime runs this folder's {backend.precision} graphs at the precision they were "
                             f"exported in")
    encoder = backend.encoder_precision  # an int8 folder's may be float32
    kept = f" (the encoder {encoder}: its int8 features missed the export's budget)" if encoder != backend.precision \
        else ""
    return fixed_compute(cfg, device, f"ONNX Runtime runs the {backend.precision} graphs{kept} on "
                                      f"{', '.join(backend.providers)}")


@dataclass
class Predictor:
    model: CaptionModel | None  # in eval mode, on device, encoder prepared (channels_last / compile) as compute
    # says; None when another backend runs an exported model
    vocab: Vocabulary
    cfg: Config  # the checkpoint's config, with this machine's compute and the caller's overrides
    compute: Compute  # the resolved precision and memory format
    settings: DecodeSettings
    source: str  # the local checkpoint file or model folder it came from (a Hub repo's folder in the Hub cache)
    backend: Backend | None = None  # what encodes and decodes; None: the model's own modules (TorchBackend)

    def __post_init__(self):
        if self.backend is None:
            self.backend = TorchBackend(self.model)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str | torch.device | None = "auto", *,
             beam_size: int | None = None, compute: ComputeConfig | None = None, overrides=(),
             sample: bool = False, temperature: float | None = None, runtime: str = "torch",
             revision: str | None = None, providers: list[str] | None = None,
             session_options: dict | None = None) -> "Predictor":
        """Load a checkpoint file, a model folder (`captioner export`) or a Hugging Face Hub repo id ("owner/model",
        at revision) onto device ('auto': CUDA when present) and resolve how it decodes.

        compute: this machine's switches (default: the checkpoint's compute section, which loading resets to auto,
        since it described the training machine); overrides: `section.key=value` applied to the checkpoint's
        config before anything is resolved (evaluate passes dataset.*, decode.*, compute.*, cache.*);
        beam_size, sample, temperature: override decode.beam_size / decode.sample / decode.temperature;
        runtime: what runs the model (RUNTIMES); with onnxruntime, providers: its execution providers in order
        (default: from device) and session_options: {"intra_op_threads": n, "graph_optimization": "all"}
        (onnx_runtime.SESSION_OPTIONS)."""
        if runtime not in RUNTIMES:
            raise CaptionerError(f"runtime {runtime!r} is not available; valid: {', '.join(RUNTIMES)}")
        device = resolve_device(str(device) if isinstance(device, torch.device) else device or "auto")  # one rule
        source = resolve_model(checkpoint, revision)
        if runtime != "onnxruntime" and (providers is not None or session_options):
            raise CaptionerError("--providers and the ONNX Runtime session options (--ort-threads, "
                                 "--ort-optimization) apply to --runtime onnxruntime")
        if runtime == "onnxruntime":
            from captioner.engine.infer.onnx_runtime import load_onnx_folder  # the [onnx] extra, on use
            backend, vocab, cfg = load_onnx_folder(source, device, providers=providers,
                                                   session_options=session_options)
            model = None
        else:
            model, vocab, cfg = load_model_source(source, device)
            backend = None
        cfg.compute = compute or cfg.compute
        apply_overrides(cfg, list(overrides))
        cfg.decode.sample = sample or cfg.decode.sample
        if temperature is not None:
            cfg.decode.temperature = temperature
        if backend is not None:
            resolved = _onnx_compute(cfg.compute, device, backend)
        else:
            resolved = setup_compute(cfg.compute, device)
            resolved.prepare_encoder(model.encoder)
        return cls(model, vocab, cfg, resolved, DecodeSettings.of(cfg, beam_size, compute=resolved), str(source),
                   backend)

    def move(self, device: str | torch.device | None = None, compute: ComputeConfig | None = None) -> None:
        """Run on another device and/or with other compute switches (bf16), resolved as load() resolves them: the
        model moves, the decode settings take the new precision. The PyTorch runtime only (an ONNX Runtime
        session is made for its device: load the folder again)."""
        if self.model is None:
            raise CaptionerError(f"a model run by {self.runtime} stays on the device it was loaded for: load it again "
                                 f"with the device wanted")
        device = self.device if device is None else resolve_device(str(device))
        self.cfg.compute = compute or self.cfg.compute
        resolved = setup_compute(self.cfg.compute, device)
        self.model.to(device)
        resolved.prepare_encoder(self.model.encoder)
        self.compute, self.settings = resolved, dataclasses.replace(self.settings, bf16=resolved.bf16)

    def model_hash(self) -> str:
        """16 hex digits identifying the model and what runs it (what outputs record as the model that made
        them), computed from the tensors, vocabulary and config (model_id.py): a re-export keeps it; one folder's
        int8 ONNX graphs and its PyTorch weights, which do not write the same captions, differ."""
        if self.model is not None and self.backend.name == "torch":
            return model_id(self.model, self.vocab, self.cfg)
        graphs = getattr(self.backend, "graphs", None)
        if graphs:
            return graphs_id([graphs[name] for name in sorted(graphs)], self.backend.precision, self.vocab, self.cfg)
        return self.legacy_model_hash()

    def legacy_model_hash(self) -> str:
        """The id before it was computed from the tensors: the hash of the source's files (a checkpoint's bytes,
        a folder's config.json and weights), which outputs written by older captioners carry."""
        digest = model_hash(self.source)
        if self.backend.name == "torch":
            return digest
        return hashlib.sha256(f"{digest} {self.backend.name}".encode()).hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return self.compute.device

    @property
    def runtime(self) -> str:
        """What runs the model, as outputs record it: "torch", "onnxruntime float32" or "onnxruntime int8"."""
        precision = getattr(self.backend, "precision", None)
        return self.backend.name + (f" {precision}" if precision else "")

    @property
    def encoder(self):
        """The encoder's description (arch, layer, image_size, channels, grid), whichever backend runs it."""
        return self.backend.encoder

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    def caption_batch(self, inputs: torch.Tensor, attention: bool = False,
                      settings: DecodeSettings | None = None) -> list[Captioned]:
        """(B, 3, S, S) uint8 images or (B, C, H, W) features on self.device -> B Captioned, in order.
        settings: this call's (settings_for), else self.settings."""
        return caption_batch(self.backend, self.vocab, inputs, settings or self.settings, attention)

    def caption_batches(self, batches, attention: bool = False, settings: DecodeSettings | None = None):
        """For each pipeline Batch -> (batch, [Captioned]); only readable rows are decoded (predict.py)."""
        return caption_batches(self.backend, self.vocab, batches, settings or self.settings, attention)

    def settings_for(self, options: dict, as_text: bool = False) -> DecodeSettings:
        """self.settings with one call's generation options (beam_size=5, top_p=0.9, ...; generation.py), checked
        by the config's rules; self.settings itself when options is empty."""
        return generation_settings(self.cfg, self.settings, self.compute, options, as_text)

    def image_batches(self, paths: list, batch_size: int | None = None, num_workers: int = 0,
                      max_pixels: int = MAX_PIXELS, names: list[str] | None = None) -> Batches:
        """The pipeline's batches of these files (or in-memory images, called names in errors) at the model's
        input size and resize filter, decoded as compute says."""
        return image_batches(paths, self.image_size, batch_size or self.cfg.decode.batch_size, num_workers,
                             self.device, self.compute.gpu_decode, max_pixels, names, self.encoder.interpolation)

    def decoding(self) -> str:
        """How captions are chosen, in words: 'greedy decoding', 'beam search (beam 3)' or 'sampling (...)'."""
        s = self.settings
        n_best = f", {s.num_return_sequences} returned" if s.num_return_sequences > 1 else ""
        if s.sample:
            truncated = (f", top-k {s.top_k}" if s.top_k else "") + (f", top-p {s.top_p:g}" if s.top_p < 1 else "")
            return f"sampling (temperature {s.temperature:g}{truncated}{n_best})"
        return "greedy decoding" if s.beam_size == 1 else f"beam search (beam {s.beam_size}{n_best})"

    def description(self) -> str:
        """One line on what decodes and what it attends over, for titles and /v1/model."""
        enc = self.encoder
        runs = "" if self.backend.name == "torch" else f" ({self.runtime})"
        return (f"{self.decoding()}, attention over the {enc.grid[0]}x{enc.grid[1]} {enc.layer} grid of "
                f"{enc.arch}{runs}")
