"""Sample captions at each validation: a few fixed validation images, what the model writes for them now, their
references and where it looked (for the loggers: metrics.jsonl text, TensorBoard text and attention strips).

    samples = SampleImages(inputs, references, count=8)    # rank 0, once per run: the images are read here
    run.metrics.samples(step, epoch, samples.caption(run))

The images are the first `count` of rank 0's validation share, the same ones at every validation. Their captions
come from what validation decodes (the cached or precomputed features when there are some, else the image files)
through the one decode path (engine/infer/predict.py) with validation's own settings (validation_settings: its
beam, suppress_unk, ...), so a sample's caption is the one validation scored; the attention shown is that
caption's (beam search keeps each beam's attention). The pictures shown are read from the image files once, here,
whatever validation reads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from captioner.data.images import read_image
from captioner.data.pipeline import feature_batches, image_batches
from captioner.engine.infer.predict import DecodeSettings, caption_batches
from captioner.engine.outputs.gallery import THUMBNAIL
from captioner.engine.train.inputs import TrainingInputs
from captioner.engine.train.validation import validation_settings
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

SAMPLE_IMAGES = 8


@dataclass
class Sample:
    """One sample image's caption at one validation."""
    file: str
    caption: str
    references: list[str]
    words: list[str]
    alphas: np.ndarray  # (len(words), H*W) attention of each word over the grid's regions
    grid: tuple[int, int]  # (H, W)
    image: np.ndarray | None  # (S, S, 3) uint8 picture to show; None when the file can no longer be read
    size: tuple[int, int]  # the file's (width, height), for its aspect ratio
    decoding: str = "greedy"  # how the caption was decoded: "greedy" or "beam N" (validation's)


class SampleImages:
    def __init__(self, inputs: TrainingInputs, references: dict, count: int = SAMPLE_IMAGES):
        self.records = inputs.val_records[:count]
        features = inputs.val_features
        self.features = features[0:len(self.records)] if features is not None and self.records else None
        self.references = [list(references.get(r.image_id, [])) for r in self.records]
        self.pictures = [_picture(r.path) for r in self.records]

    def caption(self, run) -> list[Sample]:
        """The samples' captions by run.model now (run: the TrainingRun), decoded as validation decodes, with
        their attention."""
        if not self.records:
            return []
        device, count = run.process.device, len(self.records)
        settings = validation_settings(run)
        if self.features is not None:
            batches = feature_batches(self.features, count, count, device)
        else:
            batches = image_batches([r.path for r in self.records], run.model.encoder.image_size, count, 0, device,
                                    interpolation=run.model.encoder.interpolation)
        samples = []
        for _, captioned in caption_batches(run.model, run.vocab, batches, settings, attention=True):
            for c in captioned:
                if c.error:  # the file went away since training started
                    continue
                image, size = self.pictures[c.index]
                samples.append(Sample(self.records[c.index].path, c.caption, self.references[c.index], c.words,
                                      c.alphas.numpy(), run.model.grid, image, size, _decoding(settings)))
        return samples


def _decoding(settings: DecodeSettings) -> str:
    """How the samples were decoded, in words: "greedy" or "beam N"."""
    return f"beam {settings.beam_size}" if settings.beam_size > 1 else "greedy"


def _picture(path: str) -> tuple[np.ndarray | None, tuple[int, int]]:
    """(the image as an (S, S, 3) uint8 array, its (width, height)); (None, (0, 0)) when it cannot be read."""
    try:
        image, size = read_image(path, THUMBNAIL)
    except CaptionerError as e:
        log.warning("sample image %s", e)
        return None, (0, 0)
    return image.permute(1, 2, 0).numpy(), size  # (3, S, S) -> (S, S, 3)
