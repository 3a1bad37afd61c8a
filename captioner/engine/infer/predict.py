"""The one decode path: images or features -> captions, with scores and per-word attention.

    settings = DecodeSettings.of(cfg, beam_size=3, compute=setup_compute(cfg.compute, device))
    records = caption_batch(model, vocab, images, settings)          # images (B, 3, S, S) uint8 on device
    for batch, records in caption_batches(model, vocab, image_batches(...), settings): ...
    captions = predict(model, vocab, dataset_records, settings, batch_size=64, device=device)

`evaluate`, `caption`, validation during `train` and `bench` all go through caption_batch, so a caption is
the same whichever command produced it, and the benchmark times the product's own code. `model` is a
CaptionModel or a backend (backend.py: PyTorch modules or ONNX Runtime sessions); the decoding is the same.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import torch
from captioner.progress import bar as make_bar

from captioner.config import Config, return_sequences_problem
from captioner.data.pipeline import Unreadable, feature_batches, image_batches
from captioner.engine.infer.backend import as_backend
from captioner.engine.runtime.compute import Compute
from captioner.engine.runtime.signals import StopRequest
from captioner.errors import CaptionerError
from captioner.model.decoding import SearchOptions, decode
from captioner.text import Vocabulary, join_words

log = logging.getLogger("captioner")


@dataclass
class DecodeSettings:
    """The decode.* options in a precision: search_options gives the model layer what it searches with."""
    beam_size: int = 1  # 1 is greedy
    max_len: int = 30  # longest caption, in words
    length_penalty: float = 0.0  # 0 ranks beams by total log-probability; 1 by mean per word
    bf16: bool = False  # bf16 autocast: the resolved compute.bf16 (Compute.bf16), never the config's string
    sample: bool = False  # draw each word from the model's distribution (beam_size is then ignored)
    temperature: float = 1.0  # sampling only
    block_ngram: int = 0  # > 0: no caption repeats one of its n-grams (greedy and beam)
    groups: int = 1  # diverse beam search: beam groups (beam_size must be a multiple)
    diversity: float = 0.0  # diverse beam search: penalty per earlier group that chose the same word
    suppress_unk: bool = False  # greedy, beam and sampling never write <unk>
    top_k: int = 0  # sampling only: the k likeliest words (0: off)
    top_p: float = 1.0  # sampling only: the nucleus of probability top_p (1.0: off)
    num_return_sequences: int = 1  # captions per image, best first (Captioned.sequences)

    @property
    def search_options(self) -> SearchOptions:
        """The options decode() searches with: every field here but bf16 (how the model runs, not what it
        searches), checked by SearchOptions. A new search option is a field of SearchOptions and of this class."""
        return SearchOptions(**{f.name: getattr(self, f.name) for f in fields(SearchOptions)})

    @classmethod
    def of(cls, cfg: Config, beam_size: int | None = None, *, compute: Compute) -> "DecodeSettings":
        """cfg.decode's settings in compute's precision; beam_size overrides decode.beam_size (a beam size
        that is not a multiple of decode.groups searches without groups; greedy has none; one smaller than
        decode.num_return_sequences is refused as the config would refuse it)."""
        beam_size = beam_size or cfg.decode.beam_size
        groups = cfg.decode.groups if beam_size % cfg.decode.groups == 0 else 1
        if groups != cfg.decode.groups and beam_size > 1:
            log.warning("beam size %d is not a multiple of decode.groups=%d: searching without groups", beam_size,
                        cfg.decode.groups)
        problem = return_sequences_problem(cfg.decode.num_return_sequences, beam_size, cfg.decode.sample)
        if problem:
            raise CaptionerError(problem)
        d = cfg.decode
        return cls(beam_size, d.max_len, d.length_penalty, compute.bf16, d.sample, d.temperature, d.block_ngram,
                   groups, d.diversity, d.suppress_unk, d.top_k, d.top_p, d.num_return_sequences)


@dataclass
class Captioned:
    """One image's caption, or why the image could not be read."""
    index: int  # position in the batch's source (paths or records)
    caption: str = ""
    score: float = 0.0  # the caption's total log-probability
    words: list[str] = field(default_factory=list)
    alphas: torch.Tensor | None = None  # (len(words), N) float32 attention over the N regions (attention=True)
    error: str = ""  # "" or why the image could not be read
    # every caption returned for the image, best first, (caption, score): [(caption, score)] unless
    # decode.num_return_sequences asked for more
    sequences: list[tuple[str, float]] = field(default_factory=list)


def words_and_alphas(tokens: torch.Tensor, alphas: torch.Tensor, vocab: Vocabulary) -> tuple[list[str], torch.Tensor]:
    """tokens (L,), alphas (L, N) -> the caption's words and their (len(words), N) attention weights."""
    keep = []
    for t, token in enumerate(tokens.tolist()):
        if token == Vocabulary.end_id:
            break
        if token not in (Vocabulary.pad_id, Vocabulary.start_id):
            keep.append(t)
    return [vocab.tokens[int(tokens[t])] for t in keep], alphas[keep]


@torch.inference_mode()
def caption_batch(model, vocab: Vocabulary, inputs: torch.Tensor, settings: DecodeSettings,
                  attention: bool = False) -> list[Captioned]:
    """inputs (B, 3, S, S) uint8 images or (B, C, H, W) float encoder features on the model's device
    -> B Captioned (index = row), each with its settings.num_return_sequences captions in .sequences (the first
    is .caption). A PyTorch model runs in eval mode and goes back to its mode afterwards."""
    backend = as_backend(model)
    with backend.running(inputs.device, settings.bf16):  # eval mode; bf16 where compute.bf16 resolved on
        raw = inputs if inputs.is_floating_point() else backend.encode(inputs)  # -> (B, C, H, W)
        out = decode(backend.steps, raw, settings.search_options)
    # One copy to the host per batch: (B*n, L) tokens, (B*n,) scores and, when asked for, (B*n, L, N) attention
    # (n captions per image, best first; n is below num_return_sequences only where a tiny vocabulary has fewer
    # beams).
    tokens, scores = out.tokens.cpu(), out.scores.float().cpu()
    alphas = out.alphas.float().cpu() if attention else torch.empty(tokens.shape[0], tokens.shape[1], 0)
    n = tokens.shape[0] // inputs.shape[0]
    records = []
    for image in range(inputs.shape[0]):
        best = image * n
        words, word_alphas = words_and_alphas(tokens[best], alphas[best], vocab)
        sequences = [(join_words(words), float(scores[best]))]
        for row in range(best + 1, best + n):
            if torch.isfinite(scores[row]):  # a tiny vocabulary can leave beams that never found a caption
                sequences.append((join_words(words_and_alphas(tokens[row], alphas[row], vocab)[0]),
                                  float(scores[row])))
        records.append(Captioned(image, sequences[0][0], sequences[0][1], words, word_alphas if attention else None,
                                 sequences=sequences))
    return records


def caption_batches(model, vocab: Vocabulary, batches, settings: DecodeSettings, attention: bool = False):
    """For each pipeline Batch -> (batch, one Captioned per row, index = batch.index[row]).

    Only the readable rows are decoded, so an image's caption never depends on the other files of its batch;
    an unreadable one gets Captioned(error=why), the message starting with the file's path."""
    for batch in batches:
        good = batch.readable()
        decoded = iter(caption_batch(model, vocab, batch.inputs[good] if len(good) < len(batch.errors)
                                     else batch.inputs, settings, attention) if good else [])
        index = batch.index.tolist()
        records = []
        for row, error in enumerate(batch.errors):
            if error:
                records.append(Captioned(index[row], error=error))
            else:
                record = next(decoded)
                record.index = index[row]
                records.append(record)
        yield batch, records


def predict(model, vocab: Vocabulary, records, settings: DecodeSettings, batch_size: int, device: torch.device,
            features=None, num_workers: int = 0, gpu_decode: bool = False,
            unreadable: Unreadable | None = None, progress_bar: bool = True, stop: StopRequest | None = None) -> dict:
    """Caption every dataset record -> {image_id: caption}; unreadable images are reported (unreadable) and
    left out. stop: a StopRequest whose recorded signal ends the loop at the next batch (raises Stopped), for
    callers that defer signals (training's validation).

    features skips the encoder when given: an (N, C, H, W) tensor or a feature-cache source (features[i:j]
    -> (j-i, C, H, W)) for records. gpu_decode: JPEGs decoded on the GPU (CUDA only)."""
    unreadable = unreadable if unreadable is not None else Unreadable()
    if features is not None:
        batches = feature_batches(features, len(records), batch_size, device)
    else:
        encoder = as_backend(model).encoder
        batches = image_batches([r.path for r in records], encoder.image_size, batch_size, num_workers, device,
                                gpu_decode, interpolation=encoder.interpolation)
    results = {}
    bar = make_bar(total=len(records), desc="captioning", unit="img", leave=False, disable=not progress_bar)
    for _, captioned in caption_batches(model, vocab, batches, settings):
        if stop is not None:
            stop.check()
        for c in captioned:
            if c.error:
                unreadable.add(c.error)
            else:
                results[records[c.index].image_id] = c.caption
        bar.update(len(captioned))
    bar.close()
    return results
