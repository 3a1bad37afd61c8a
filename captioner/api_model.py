"""The model-handling half of the Python API, as transformers, timm and open_clip users reach for it: the
precision (dtype), the device (to), the nn.Module and its preprocessing (model, transform), the model folder
(save_pretrained, push_to_hub). api.py's Captioner inherits it.

    cap = Captioner.from_pretrained("model/", device="cuda", dtype=torch.bfloat16)   # or torch_dtype=, "bf16"
    cap.to("cpu").to(torch.float32)                       # returns cap
    x = cap.transform(Image.open("photo.jpg"))            # (3, S, S) uint8: what caption() feeds the model
    raw = cap.model.encode(x[None].to(cap.device))        # the CaptionModel's own entry points: (1, C, H, W)
    cap.save_pretrained("model-copy/")                    # the folder `captioner export` writes
    cap.push_to_hub("alice/my-captioner")                 # the [hub] extra

bf16 is autocast over float32 weights, the one mixed-precision path of every command (compute.bf16): dtype
switches it, it never casts the weights (save_pretrained(dtype="bf16") stores them in bf16, as export --dtype).
"""
from __future__ import annotations

import copy
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

import torch

from captioner.config import ComputeConfig
from captioner.data.images import MAX_PIXELS
from captioner.data.pipeline import image_batches
from captioner.errors import CaptionerError

if TYPE_CHECKING:
    from captioner.engine.infer.predictor import Predictor
    from captioner.model.caption_model import CaptionModel

DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float32": "float32", "fp32": "float32", "float": "float32"}
T = TypeVar("T")
Self = TypeVar("Self", bound="ModelHandling")
_DONE = object()


def dtype_name(dtype) -> str | None:
    """torch.bfloat16 / "bfloat16" / "bf16" -> "bf16"; torch.float32 / "float32" / "fp32" -> "float32"; else None."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    return DTYPE_NAMES.get(name.lower()) if isinstance(name, str) else None


def _checked_dtype(dtype) -> str:
    name = dtype_name(dtype)
    if name is None:
        raise CaptionerError(f"dtype {dtype!r} is not supported: give torch.bfloat16 (or \"bfloat16\", \"bf16\": bf16 "
                             f"autocast over float32 weights) or torch.float32 (or \"float32\")")
    return name


def compute_for_dtype(dtype, compute: ComputeConfig | None) -> ComputeConfig | None:
    """compute with compute.bf16 switched as dtype says; dtype None leaves compute as it is."""
    if dtype is None:
        return compute
    return replace(compute or ComputeConfig(), bf16="true" if _checked_dtype(dtype) == "bf16" else "false")


@dataclass(frozen=True)
class ImageTransform:
    """One image -> the (3, image_size, image_size) uint8 tensor caption() gives the model for it, on the CPU.

    It is caption()'s own path (data/pipeline.py image_batches: EXIF orientation, alpha onto white, the pixel
    limit, the model's resize filter), not a copy of it; the model normalises inside (HookedEncoder.normalize).
    Takes a PIL image or any other input caption() takes; picklable, so a DataLoader's workers can use it."""
    image_size: int
    interpolation: str
    max_pixels: int = MAX_PIXELS

    def __call__(self, image) -> torch.Tensor:
        batches = image_batches([image], self.image_size, 1, 0, torch.device("cpu"), max_pixels=self.max_pixels,
                                names=["image"], interpolation=self.interpolation)
        batch = next(iter(batches))
        if batch.errors[0]:
            raise CaptionerError(batch.errors[0])
        return batch.inputs[0]  # (1, 3, S, S) -> (3, S, S)


class ModelHandling:
    """Captioner's methods about the model itself (api.py holds those about captions)."""
    predictor: "Predictor"
    max_pixels: int
    _lock: threading.Lock  # one batch at a time through the model (Captioner's docstring: thread safety)

    def to(self: Self, device_or_dtype: str | torch.device | torch.dtype) -> Self:
        """Run on another device ("cuda", "cpu", torch.device) or in another precision (torch.bfloat16, "bf16",
        torch.float32); returns self, so calls chain. The PyTorch runtime only."""
        with self._lock:
            if dtype_name(device_or_dtype) is not None or isinstance(device_or_dtype, torch.dtype):
                self.predictor.move(compute=compute_for_dtype(device_or_dtype, self.predictor.cfg.compute))
            else:
                self.predictor.move(device=device_or_dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """torch.bfloat16 when the model runs in bf16 autocast, else torch.float32 (the weights' own type)."""
        return torch.bfloat16 if self.predictor.compute.bf16 else torch.float32

    @property
    def model(self) -> "CaptionModel":
        """The nn.Module (CaptionModel: encode(images), the decoder), in eval mode on self.device."""
        if self.predictor.model is None:
            raise CaptionerError(f"a model run by {self.predictor.runtime} has no PyTorch module: load it with "
                                 f"runtime=\"torch\"")
        return self.predictor.model

    @property
    def transform(self) -> ImageTransform:
        """A callable: PIL image (or any caption() input) -> (3, S, S) uint8 model input, as caption() makes it."""
        return ImageTransform(self.predictor.image_size, self.predictor.encoder.interpolation, self.max_pixels)

    def save_pretrained(self, folder: str | Path, *, dtype="float32", overwrite: bool = False,
                        _push: str | None = None) -> Path:
        """Write the model folder `captioner export` writes (its own writer): model.safetensors, config.json,
        vocab.json and README.md (a model card); from_pretrained(folder) loads it back and captions the same.
        The decode settings recorded are this Captioner's (its beam size included). dtype: the stored weights,
        float32 or bf16 (half the size). Returns the folder."""
        from captioner.io_paths import refuse_overlap
        from captioner.jobs.export import check_out, provenance, write_export  # the export job's writer
        out, source = Path(folder), Path(self.predictor.source)
        refuse_overlap({"save_pretrained folder": out}, {"the model this Captioner was loaded from": source})
        check_out(out, overwrite, ("save_pretrained folder", "overwrite=True"))
        cfg = copy.deepcopy(self.predictor.cfg)
        cfg.decode.beam_size = self.predictor.settings.beam_size
        with self._lock:
            write_export(out, self.model, self.predictor.vocab, cfg, provenance(source), dtype=_checked_dtype(dtype),
                         push=_push, overwrite=overwrite)
        return out

    def push_to_hub(self, repo_id: str, *, private: bool = False, dtype="float32", folder: str | Path | None = None,
                    message: str | None = None) -> str:
        """Upload the model folder (save_pretrained's) to the Hugging Face Hub repo owner/name, created when missing
        (the [hub] extra and a login: `hf auth login` or $HF_TOKEN). folder: where to write it first (default: a
        temporary folder, removed afterwards). Returns the repo's URL."""
        from captioner.engine.infer import hub
        if not hub.looks_like_repo_id(repo_id):
            raise CaptionerError(f"push_to_hub: {repo_id!r} is not a Hub repo id: give owner/name "
                                 f"(e.g. alice/captioner-coco)")
        hub.client()  # the missing extra in one line, before anything is written
        with tempfile.TemporaryDirectory(prefix="captioner-push-") as tmp:
            out = Path(folder) if folder is not None else Path(tmp) / repo_id.split("/")[1]
            self.save_pretrained(out, dtype=dtype, _push=repo_id)
            try:
                return hub.upload(out, repo_id, private, message)
            except CaptionerError as e:
                if folder is not None:
                    raise
                raise CaptionerError(f"{str(e).split('; the folder is written')[0]}; pass folder= to keep the model "
                                     f"folder and push it later") from None

    def _one_at_a_time(self, results: Iterable[T]) -> Iterator[T]:
        """Each step of the decode generator under the Captioner's lock: the hooked encoder keeps its captured
        activation on itself between the hook and forward's return, so two threads in one model would swap
        them. Held per batch, never across a yield: a thread may interleave several streams."""
        iterator = iter(results)
        while True:
            with self._lock:
                item = next(iterator, _DONE)
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
