"""Caption images with a folder from `captioner export --format onnx [--onnx-only]`, using only numpy,
onnxruntime and Pillow: no captioner, no torch.

    python examples/onnx_caption.py deploy/ photo1.jpg photo2.png            # the folder's decode settings
    python examples/onnx_caption.py deploy/ photos/*.jpg --beam-size 1       # greedy
    python examples/onnx_caption.py deploy/ photo.jpg --beam-size 3 --length-penalty 0.5 --json

What it reads from the folder:
  config.json  preprocessing.image_size (S), the decode settings (beam_size, max_len, length_penalty,
               suppress_unk), files (which graph is which)
  onnx.json    encoder.preprocess.interpolation (the resize filter); mean/std are inside encoder.onnx
  vocab.json   {"tokens": [...]}: ids 0..3 are <pad>, <start>, <end>, <unk>

The graphs (their batch axis B is dynamic; S, C, H, W, N are fixed by the export):
  encoder.onnx       images (B, 3, S, S) uint8 -> features (B, C, H, W) float32 (normalisation inside)
  decoder_init.onnx  features -> h (B, D), c (B, D), regions (B, N, E), projected (B, N, A)
  decoder_step.onnx  tokens (B,) int64, h, c, regions, projected -> log_probs (B, V), h_next, c_next, alpha (B, N)

This is captioner's own algorithm (captioner/model/decoding.py) in numpy: the same images give the same
captions as `captioner caption --runtime onnxruntime` with the same beam size and length penalty. Not
implemented here: decode.block_ngram, diverse beam groups and sampling (a warning says when the folder's
config asks for them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

PAD, START, END, UNK = 0, 1, 2, 3
FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def load_image(path: str, size: int, interpolation: str) -> np.ndarray:
    """A file -> (3, S, S) uint8, as captioner prepares it: EXIF orientation, alpha onto white, RGB, squashed
    (not cropped) to S x S with the encoder's filter."""
    with Image.open(path) as img:
        img.draft("RGB", (2 * size, 2 * size))  # JPEG only: decode big photos at a reduced scale, as captioner
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" or "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            white = Image.new("RGB", img.size, (255, 255, 255))
            white.paste(rgba, mask=rgba.getchannel("A"))
            img = white
        img = img.convert("RGB").resize((size, size), FILTERS[interpolation])
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)


class Model:
    """The folder's three sessions and what decoding needs of its config."""

    def __init__(self, folder: str, providers: list[str] | None = None, threads: int = 0):
        folder = Path(folder)
        self.config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        manifest = json.loads((folder / self.config["files"]["onnx"]).read_text(encoding="utf-8"))
        self.tokens = json.loads((folder / self.config["files"]["vocab"]).read_text(encoding="utf-8"))["tokens"]
        self.image_size = self.config["preprocessing"]["image_size"]
        self.interpolation = manifest["encoder"].get("preprocess", {}).get("interpolation", "bicubic")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {name: ort.InferenceSession(str(folder / self.config["files"][f"onnx_{name}"]), options,
                                                    providers=providers)
                         for name in ("encoder", "decoder_init", "decoder_step")}

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.sessions["encoder"].run(None, {"images": images})[0]

    def start(self, features: np.ndarray) -> list[np.ndarray]:
        return self.sessions["decoder_init"].run(None, {"features": features})  # h, c, regions, projected

    def step(self, tokens: np.ndarray, h, c, regions, projected):
        logp, h, c, _alpha = self.sessions["decoder_step"].run(None, {
            "tokens": tokens.astype(np.int64), "h": h, "c": c, "regions": regions, "projected": projected})
        return logp, h, c


def allowed(logp: np.ndarray, t: int, max_len: int, suppress_unk: bool) -> np.ndarray:
    """Mask what may not come next: <pad> and <start> never, <unk> with suppress_unk, <end> not as the first
    word (every caption has one), and only <end> once max_len words are written."""
    logp = logp.copy()
    logp[:, [PAD, START] + ([UNK] if suppress_unk else [])] = -np.inf
    if t == 0:
        logp[:, END] = -np.inf
    if t == max_len:
        end = logp[:, END].copy()
        logp[:] = -np.inf
        logp[:, END] = end
    return logp


def greedy(model: Model, features: np.ndarray, max_len: int, suppress_unk: bool) -> list[list[int]]:
    """features (B, C, H, W) -> B token lists: the likeliest word at each step."""
    h, c, regions, projected = model.start(features)
    batch = features.shape[0]
    tokens = np.full(batch, START, dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    out = []
    for t in range(max_len + 1):
        logp, h, c = model.step(tokens, h, c, regions, projected)
        best = allowed(logp, t, max_len, suppress_unk).argmax(axis=1)
        tokens = np.where(finished, PAD, best)
        out.append(tokens)
        finished |= tokens == END
        if finished.all():
            break
    return np.stack(out, axis=1).tolist()


def beam(model: Model, features: np.ndarray, beam_size: int, max_len: int, length_penalty: float,
         suppress_unk: bool) -> list[list[int]]:
    """features (B, C, H, W) -> B token lists: the best of beam_size hypotheses per image, ranked by
    log-probability / ((5 + length) / 6) ** length_penalty. Row b*k + j is beam j of image b."""
    h, c, regions, projected = model.start(features)
    batch, vocab = features.shape[0], len(model.tokens)
    k = min(beam_size, vocab)
    h, c, regions, projected = (np.repeat(x, k, axis=0) for x in (h, c, regions, projected))
    tokens = np.full(batch * k, START, dtype=np.int64)
    scores = np.full((batch, k), -np.inf, dtype=np.float32)
    scores[:, 0] = 0.0  # the k beams start identical: expand only the first at step 0
    finished = np.zeros((batch, k), dtype=bool)
    history = np.zeros((batch, k, 0), dtype=np.int64)
    pad_row = np.full(vocab, -np.inf, dtype=np.float32)
    pad_row[PAD] = 0.0  # a finished beam continues with <pad> at no cost, keeping its score
    for t in range(max_len + 1):
        logp, h, c = model.step(tokens, h, c, regions, projected)
        logp = allowed(logp, t, max_len, suppress_unk)
        logp = np.where(finished.reshape(-1, 1), pad_row, logp).reshape(batch, k, vocab)
        candidates = (scores[:, :, None] + logp).reshape(batch, k * vocab)
        index = np.argsort(-candidates, axis=1, kind="stable")[:, :k]  # (B, k), best first
        scores = np.take_along_axis(candidates, index, axis=1)
        parent, word = index // vocab, index % vocab
        rows = (parent + np.arange(batch)[:, None] * k).reshape(-1)
        h, c = h[rows], c[rows]  # regions and projected are the same image's: they stay
        history = np.concatenate([np.take_along_axis(history, parent[:, :, None], axis=1), word[:, :, None]],
                                 axis=2)
        finished = np.take_along_axis(finished, parent, axis=1) | (word == END)
        tokens = word.reshape(-1)
        if finished.all():
            break
    lengths = (history != PAD).sum(axis=2).astype(np.float32)
    ranked = scores / ((np.float32(5.0) + lengths) / np.float32(6.0)) ** np.float32(length_penalty) \
        if length_penalty else scores
    best = ranked.argmax(axis=1)
    return [history[b, best[b]].tolist() for b in range(batch)]


def to_text(ids: list[int], tokens: list[str]) -> str:
    """Token ids -> words up to <end>, joined by spaces (captioner glues Chinese/Japanese characters)."""
    words = []
    for i in ids:
        if i == END:
            break
        if i not in (PAD, START):
            words.append(tokens[i])
    return " ".join(words)


def caption(model: Model, paths: list[str], beam_size: int, max_len: int, length_penalty: float,
            suppress_unk: bool) -> list[str]:
    images = np.stack([load_image(p, model.image_size, model.interpolation) for p in paths])  # (B, 3, S, S)
    features = model.encode(images)
    if beam_size == 1:
        ids = greedy(model, features, max_len, suppress_unk)
    else:
        ids = beam(model, features, beam_size, max_len, length_penalty, suppress_unk)
    return [to_text(row, model.tokens) for row in ids]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a model folder written by `captioner export --format onnx`")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--beam-size", type=int, default=None, help="1: greedy (default: the folder's)")
    parser.add_argument("--max-len", type=int, default=None, help="longest caption in words (default: the folder's)")
    parser.add_argument("--length-penalty", type=float, default=None, help="beam ranking (default: the folder's)")
    parser.add_argument("--providers", nargs="+", default=None, help="onnxruntime providers, best first")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's choice)")
    parser.add_argument("--json", action="store_true", help="one JSON line per image")
    args = parser.parse_args(argv)
    model = Model(args.folder, args.providers, args.threads)
    decode = model.config.get("decode", {})
    for key in ("block_ngram", "groups", "sample"):
        if decode.get(key) not in (None, 0, 1, False):
            print(f"note: decode.{key}={decode[key]} in config.json is not implemented here; ignored",
                  file=sys.stderr)
    beam_size = args.beam_size or decode.get("beam_size", 1)
    max_len = args.max_len or decode.get("max_len", 30)
    penalty = decode.get("length_penalty", 0.0) if args.length_penalty is None else args.length_penalty
    texts = caption(model, args.images, beam_size, max_len, penalty, bool(decode.get("suppress_unk", False)))
    for path, text in zip(args.images, texts):
        print(json.dumps({"image": path, "caption": text}) if args.json else f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
