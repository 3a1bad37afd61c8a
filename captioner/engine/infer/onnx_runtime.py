"""ONNX Runtime as a backend (backend.py): the exported graphs (onnx_export.py) encode and take decoding steps.

    backend, vocab, cfg = load_onnx_folder("model/", device)   # a folder of `captioner export --format onnx`
    backend = OnnxBackend(graphs, spec, vocab_size=len(vocab), device=torch.device("cpu"))
    raw = backend.encode(images)                      # encoder.onnx: (B, 3, S, S) uint8 -> (B, C, H, W)
    out = decode(backend.steps, raw, SearchOptions(beam_size=3))  # model/decoding.py's loops over its sessions

Only the sessions differ from the PyTorch backend: model/decoding.py's greedy, beam and sampling loops drive
decoder_step.onnx through the same step interface (model/steps.py) as the PyTorch decoder, so there is one
decoding algorithm, with every search option: top-k / top-p sampling and n-best returns (num_return_sequences)
included. Tensors cross into the sessions as NumPy views of CPU tensors (no copy).

Providers: CUDAExecutionProvider first when the device is CUDA and onnxruntime-gpu offers it, else the CPU's;
or the caller's ordered list (--providers, checked against onnxruntime.get_available_providers()).
Threads: torch's count (torch.set_num_threads, OMP_NUM_THREADS), so both runtimes are pinned alike, unless
session_options say otherwise (SESSION_OPTIONS: intra_op_threads, graph_optimization).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from captioner.config import ComputeConfig, Config, from_saved_dict
from captioner.engine.infer.integrity import GraphShapes, check_graphs, check_manifest
from captioner.engine.infer.onnx_export import GRAPHS, ONNX_FORMAT_VERSION, PRECISIONS, require_onnx
from captioner.errors import CaptionerError, first_line
from captioner.model.steps import StepState
from captioner.model.backbones import Preprocess
from captioner.text import Vocabulary

log = logging.getLogger("captioner")


@dataclass(frozen=True)
class EncoderSpec:
    """What the commands need to know of an encoder that is not a module: as HookedEncoder describes itself."""
    arch: str
    layer: str
    image_size: int
    in_channels: int
    channels: int
    grid: tuple[int, int]
    preprocess: Preprocess = Preprocess()  # the graph normalises inside; the host resizes with its interpolation

    @property
    def reduction(self) -> int:
        return self.image_size // self.grid[0]

    @property
    def interpolation(self) -> str:
        return self.preprocess.interpolation

    @classmethod
    def of(cls, encoder) -> "EncoderSpec":
        return cls(encoder.arch, encoder.layer, encoder.image_size, encoder.in_channels, encoder.channels,
                   tuple(encoder.grid), encoder.preprocess)


# ONNX Runtime session options a caller may set (--ort-threads, --ort-optimization; session_options={...}).
OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
SESSION_OPTIONS = {"intra_op_threads": "threads per operator (default: torch's thread count)",
                   "graph_optimization": f"graph optimization level: {', '.join(OPTIMIZATION_LEVELS)} (default: all)"}


def check_session_options(options: dict | None) -> dict:
    """options checked: known keys, intra_op_threads an int >= 1, graph_optimization a level; one line otherwise."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(SESSION_OPTIONS))
    if unknown:
        raise CaptionerError(f"ONNX Runtime session option {unknown[0]!r} is not supported; valid: "
                             f"{', '.join(SESSION_OPTIONS)}")
    threads = options.get("intra_op_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise CaptionerError(f"intra_op_threads (--ort-threads) must be an integer >= 1, got {threads!r}")
    level = options.get("graph_optimization")
    if level is not None and level not in OPTIMIZATION_LEVELS:
        raise CaptionerError(f"graph_optimization (--ort-optimization) must be one of "
                             f"{', '.join(OPTIMIZATION_LEVELS)}, got {level!r}")
    return options


def check_providers(providers) -> list[str]:
    """The caller's ordered providers, each one onnxruntime offers here; one line listing those it offers."""
    _, ort = require_onnx("--runtime onnxruntime")
    available = ort.get_available_providers()
    providers = [providers] if isinstance(providers, str) else list(providers)
    missing = [p for p in providers if p not in available]
    if not providers or missing:
        given = f"{missing[0]!r} is not available here" if missing else "the list is empty"
        raise CaptionerError(f"--providers: {given}; onnxruntime {ort.__version__} offers: {', '.join(available)}")
    return providers


def providers_for(device: torch.device, wanted=None) -> list[str]:
    """ONNX Runtime execution providers for device, best first; the CPU's always last. wanted: the caller's
    ordered list instead (checked against what onnxruntime offers)."""
    if wanted is not None:
        return check_providers(wanted)
    _, ort = require_onnx("--runtime onnxruntime")
    available = ort.get_available_providers()
    wanted = (["CUDAExecutionProvider"] if device.type == "cuda" else []) + ["CPUExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    if device.type == "cuda" and "CUDAExecutionProvider" not in chosen:
        log.warning("onnxruntime offers no CUDAExecutionProvider here (pip install onnxruntime-gpu): "
                    "running on the CPU")
    return chosen


def _session(path: Path, providers: list[str], threads: int, optimization: str = "all"):
    _, ort = require_onnx("--runtime onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle threads sleep instead of spinning: the image decoding workers share these cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its notes on unused initializers are not the user's business
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line naming it
        reason = first_line(e)
        raise CaptionerError(f"{path}: onnxruntime cannot load it ({reason}); export the model again") from None


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU, contiguous NumPy view of t (float32 for floating tensors), copying only when it must."""
    t = t.detach()
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return t.cpu().contiguous().numpy()


class OnnxBackend:
    """encoder.onnx, decoder_init.onnx and decoder_step.onnx as ONNX Runtime sessions behind the backend
    interface; its own steps (self.steps is self)."""
    name = "onnxruntime"

    def __init__(self, graphs: dict[str, Path], encoder: EncoderSpec, vocab_size: int,
                 device: torch.device = torch.device("cpu"), threads: int | None = None, precision: str = "float32",
                 providers: list[str] | None = None, session_options: dict | None = None):
        missing = [name for name in GRAPHS if name not in graphs or not Path(graphs[name]).is_file()]
        if missing:
            raise CaptionerError(f"ONNX graphs missing: {', '.join(f'{m}.onnx' for m in missing)}; export the model "
                                 f"with `captioner export --format onnx`")
        self.encoder, self.vocab_size, self.precision = encoder, vocab_size, precision
        self.encoder_precision = precision  # an int8 folder's encoder may be float32 (quantize_graphs' budget)
        self.graphs = {name: Path(graphs[name]) for name in GRAPHS}  # the files, for the model's id (model_id.py)
        options = check_session_options(session_options)
        self.providers = providers_for(device, providers)
        self.device = device if "CUDAExecutionProvider" in self.providers else torch.device("cpu")
        threads = options.get("intra_op_threads") or threads or torch.get_num_threads()
        optimization = options.get("graph_optimization", "all")
        self.sessions = {name: _session(Path(graphs[name]), self.providers, threads, optimization)
                         for name in GRAPHS}
        self.steps = self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S) uint8 -> (B, C, H, W) float32 on the backend's device."""
        if images.dtype != torch.uint8:
            raise CaptionerError(f"encoder.onnx takes uint8 images, got {images.dtype}")
        (features,) = self.sessions["encoder"].run(None, {"images": _numpy(images)})
        return torch.from_numpy(features).to(self.device)

    def start(self, raw: torch.Tensor) -> StepState:
        h, c, regions, projected = self.sessions["decoder_init"].run(None, {"features": _numpy(raw)})
        return StepState((torch.from_numpy(h), torch.from_numpy(c)),
                         (torch.from_numpy(regions), torch.from_numpy(projected)))

    def step(self, tokens: torch.Tensor, state: StepState):
        h, c = state.carried
        regions, projected = state.memory
        logp, h, c, alpha = self.sessions["decoder_step"].run(None, {
            "tokens": _numpy(tokens), "h": _numpy(h), "c": _numpy(c), "regions": _numpy(regions),
            "projected": _numpy(projected)})
        return (torch.from_numpy(logp), StepState((torch.from_numpy(h), torch.from_numpy(c)), state.memory),
                torch.from_numpy(alpha))

    def evaluating(self):
        return contextlib.nullcontext()  # graphs are exported in eval mode: nothing to switch

    def running(self, device: torch.device, bf16: bool):
        return contextlib.nullcontext()  # the graphs' precision is fixed at export (float32 or int8)


def _manifest(folder: Path, meta: dict) -> dict:
    """The folder's onnx.json, checked: present, readable, of the graph format this captioner runs."""
    name = meta["files"].get("onnx")
    export = f"captioner export --checkpoint CHECKPOINT --format onnx --out {folder}"
    if name is None:
        raise CaptionerError(f"model folder {folder} holds no ONNX graphs (exported as "
                             f"{meta.get('dtype', 'float32')} safetensors only); for --runtime onnxruntime: {export}")
    path = folder / Path(name).name
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CaptionerError(f"model folder {folder} lacks {name} ({e.strerror or e}); copy the whole folder") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionerError(f"{path} is not valid JSON ({e}); export the model again") from None
    if not isinstance(manifest, dict):
        raise CaptionerError(f"{path} must be a JSON object (the ONNX manifest), not a {type(manifest).__name__}; "
                             f"export the model again: {export}")
    version = manifest.get("format_version")
    if isinstance(version, int) and version > ONNX_FORMAT_VERSION:
        raise CaptionerError(f"model folder {folder} holds ONNX graphs of format {version}, newer than the format "
                             f"{ONNX_FORMAT_VERSION} this captioner runs: pip install -U captioner")
    if version != ONNX_FORMAT_VERSION:
        raise CaptionerError(f"model folder {folder} holds ONNX graphs of format {version!r}, older than the format "
                             f"{ONNX_FORMAT_VERSION} this captioner runs: export it again: {export}")
    check_manifest(manifest, path, PRECISIONS, GRAPHS)
    return manifest


def declared_shapes(sessions: dict) -> GraphShapes:
    """Each session's inputs and outputs with their declared shapes (a name or None where an axis is dynamic)."""
    return {name: ({i.name: list(i.shape) for i in session.get_inputs()},
                   {o.name: list(o.shape) for o in session.get_outputs()}) for name, session in sessions.items()}


def load_onnx_folder(folder: str | Path, device: torch.device, threads: int | None = None,
                     providers: list[str] | None = None, session_options: dict | None = None
                     ) -> tuple[OnnxBackend, Vocabulary, Config]:
    """(ONNX Runtime backend, vocabulary, config) of a model folder written by `captioner export --format onnx`;
    no PyTorch weights are read. providers: ordered execution providers (default: from device);
    session_options: SESSION_OPTIONS."""
    from captioner.engine.infer.model_folder import is_model_folder, read_folder_config, read_folder_vocab
    folder = Path(folder)
    if not is_model_folder(folder):
        raise CaptionerError(f"--runtime onnxruntime runs a model folder written by `captioner export --format onnx`, "
                             f"and {folder} is not a folder: captioner export --checkpoint {folder} --format onnx "
                             f"--out model-onnx/, then --checkpoint model-onnx/")
    meta = read_folder_config(folder)
    manifest = _manifest(folder, meta)
    cfg = from_saved_dict(meta["config"])
    cfg.compute = ComputeConfig()  # this machine's, not the exporting one's
    vocab = read_folder_vocab(folder, meta)
    if manifest["vocab_size"] != len(vocab):
        raise CaptionerError(f"{folder / meta['files']['onnx']}: vocab_size is {manifest['vocab_size']}, but "
                             f"{meta['files']['vocab']} holds {len(vocab)} words: the files come from two exports; "
                             f"export the model again")
    enc = manifest["encoder"]
    # folders exported before preprocessing travelled with the model were ImageNet-normalised, bicubic
    preprocess = Preprocess(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in enc.get("preprocess", {}).items()})
    spec = EncoderSpec(enc["arch"], enc["layer"], enc["image_size"], enc["in_channels"], enc["channels"],
                       tuple(enc["grid"]), preprocess)
    graphs = {name: folder / Path(meta["files"].get(f"onnx_{name}", f"{name}.onnx")).name for name in GRAPHS}
    backend = OnnxBackend(graphs, spec, len(vocab), device, threads, manifest["precision"], providers,
                          session_options)
    check_graphs(declared_shapes(backend.sessions), enc, len(vocab), folder, meta["files"]["vocab"])
    quantization = manifest.get("quantization") or {}
    backend.encoder_precision = quantization.get("encoder_precision", backend.precision)  # float32: under budget
    return backend, vocab, cfg
