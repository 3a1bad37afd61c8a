"""Caption images with a folder from `captioner export --format onnx [--onnx-only]`, using only numpy,
onnxruntime and Pillow: no captioner, no torch.

    python examples/onnx_caption.py deploy/ photo1.jpg photo2.png            # the folder's decode settings
    python examples/onnx_caption.py deploy/ photos/ --beam-size 1            # greedy, every image in photos/
    python examples/onnx_caption.py deploy/ photo.jpg --beam-size 3 --length-penalty 0.5 --json

Images: files, or folders (their image files, sorted; hidden files and sub-folders left out), captioned
--batch-size at a time. One that cannot be read is named in one line on stderr and skipped. Exit status, as
`captioner caption`'s: 0 (also with images skipped; 1 with --strict), 2 bad arguments or model folder (one line).

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
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps, UnidentifiedImageError

PAD, START, END, UNK = 0, 1, 2, 3
FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif",
                    ".tiff", ".avif", ".heic", ".heif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}  # as captioner's
EXPORT = "export it with `captioner export --format onnx`"
AGAIN = "export the folder again with `captioner export --format onnx`"
GRAPHS = {"encoder": (["images"], ["features"]),  # name: (its inputs, its outputs)
          "decoder_init": (["features"], ["h", "c", "regions", "projected"]),
          "decoder_step": (["tokens", "h", "c", "regions", "projected"], ["log_probs", "h_next", "c_next", "alpha"])}


class Refused(Exception):
    """Bad arguments or a bad model folder: main prints the message in one line and exits with status 2."""


def find_images(paths: list[str]) -> list[str]:
    """Image arguments -> image files: a folder gives its image files (as `captioner caption` without
    --recursive), a file is taken whatever its extension, a path that does not exist is a typo."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError as e:
                raise Refused(f"{path}: cannot list the folder ({e.strerror})") from None
            found += [os.path.join(path, name) for name in names if not name.startswith(".")  # "._IMG_1.jpg"
                      and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                      and not os.path.isdir(os.path.join(path, name))]
        elif os.path.lexists(path):
            found.append(path)  # if it cannot be read, it is skipped later, in one line
        else:
            raise Refused(f"{path}: no such file or folder")
    if not found:
        raise Refused(f"no images in {' '.join(paths)}")
    return found


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


def read_json(folder: Path, name: str, hint: str = EXPORT):
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Refused(f"{folder} has no {name}: {hint}") from None
    except (OSError, ValueError) as e:
        raise Refused(f"{folder / name}: cannot read it ({e})") from None


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Model:
    """The folder's three sessions and what decoding needs of its config."""

    def __init__(self, folder: str, providers: list[str] | None = None, threads: int = 0):
        self.folder = folder = Path(folder)
        if not folder.is_dir():
            raise Refused(f"{folder}: no such model folder" if not folder.exists() else f"{folder} is not a folder")
        self.config = read_json(folder, "config.json", f"not a model folder; {EXPORT}")
        files = self.config.get("files", {})
        if "onnx" not in files:  # e.g. a folder from a plain `captioner export` (model.safetensors)
            raise Refused(f"{folder} has no onnx.json: {EXPORT}")
        manifest = read_json(folder, files["onnx"])
        self.tokens = read_json(folder, files.get("vocab", "vocab.json"))["tokens"]
        self.image_size = self.config["preprocessing"]["image_size"]
        self.interpolation = manifest["encoder"].get("preprocess", {}).get("interpolation", "bicubic")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.sessions = {}
        for name in GRAPHS:
            path = folder / files.get(f"onnx_{name}", f"{name}.onnx")
            if not path.is_file():
                raise Refused(f"{folder} has no {path.name}: {EXPORT}")
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options,
                                                           providers=providers or ["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime's errors are plain Exceptions
                raise Refused(f"{path}: onnxruntime cannot load it ({first_line(e)})") from None
        self.check()

    def check(self):
        """Catch at load a graph from another export (swapped or copied over): the graphs' input and output
        names, and their fixed dims (all but the batch axis), must fit each other, config.json and vocab.json."""
        dims = {}  # (graph, "in" or "out", name) -> dims, None where dynamic
        for graph, (inputs, outputs) in GRAPHS.items():
            session = self.sessions[graph]
            for io, args, want in (("in", session.get_inputs(), inputs), ("out", session.get_outputs(), outputs)):
                if [a.name for a in args] != want:
                    raise Refused(f"{self.folder}: {graph}.onnx's {io}puts are {', '.join(a.name for a in args)}, "
                                  f"not {', '.join(want)}: a wrong or swapped graph; {AGAIN}")
                dims.update({(graph, io, a.name): [d if isinstance(d, int) else None for d in a.shape] for a in args})
        size, vocab = self.image_size, len(self.tokens)
        pairs = [(("encoder", "in", "images"), [None, 3, size, size], f"config.json's image size {size}"),
                 (("decoder_init", "in", "features"), dims["encoder", "out", "features"], "encoder.onnx's"),
                 (("decoder_step", "out", "log_probs"), [None, vocab], f"vocab.json's {vocab} words")]
        pairs += [(("decoder_step", "in", k), dims["decoder_init", "out", k], "decoder_init.onnx's")
                  for k in ("h", "c", "regions", "projected")]
        for key, want, source in pairs:
            got = dims[key]
            if len(got) != len(want) or any(None not in (g, w) and g != w for g, w in zip(got, want)):
                raise Refused(f"{self.folder}: {key[0]}.onnx's {key[2]} has dims {got}, not {want} as {source}: "
                              f"the files come from different exports; {AGAIN}")

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


def caption(model: Model, images: np.ndarray, beam_size: int, max_len: int, length_penalty: float,
            suppress_unk: bool) -> list[str]:
    """images (B, 3, S, S) uint8, from load_image -> B captions."""
    features = model.encode(images)
    if beam_size == 1:
        ids = greedy(model, features, max_len, suppress_unk)
    else:
        ids = beam(model, features, beam_size, max_len, length_penalty, suppress_unk)
    return [to_text(row, model.tokens) for row in ids]


def batches(model: Model, paths: list[str], batch_size: int):
    """Yield (paths, images (B, 3, S, S)) of up to batch_size images that open; each that does not is named on
    stderr and skipped. Only one batch is in memory at a time."""
    for first in range(0, len(paths), batch_size):
        good, images = [], []
        for path in paths[first:first + batch_size]:
            try:
                images.append(load_image(path, model.image_size, model.interpolation))
                good.append(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                why = getattr(e, "strerror", None) or first_line(e)  # e.g. "Is a directory", "Permission denied"
                if isinstance(e, UnidentifiedImageError):
                    why = "not an image Pillow can read (corrupt, or another kind of file)"
                print(f"skipped {path}: {why}", file=sys.stderr, flush=True)
        if good:
            yield good, np.stack(images)


def run(args: argparse.Namespace) -> int:
    paths = find_images(args.images)
    model = Model(args.folder, args.providers, args.threads)
    decode = model.config.get("decode", {})
    for key in ("block_ngram", "groups", "sample"):
        if decode.get(key) not in (None, 0, 1, False):
            print(f"note: decode.{key}={decode[key]} in config.json is not implemented here; ignored",
                  file=sys.stderr)
    beam_size = args.beam_size or decode.get("beam_size", 1)
    max_len = args.max_len or decode.get("max_len", 30)
    penalty = decode.get("length_penalty", 0.0) if args.length_penalty is None else args.length_penalty
    done = 0
    for good, images in batches(model, paths, args.batch_size):
        try:
            texts = caption(model, images, beam_size, max_len, penalty, bool(decode.get("suppress_unk", False)))
        except Exception as e:  # a graph that slipped past Model.check; onnxruntime's errors are plain Exceptions
            raise Refused(f"{args.folder}: the graphs fail at run time ({first_line(e)}); {AGAIN}") from None
        for path, text in zip(good, texts):
            print(json.dumps({"image": path, "caption": text}) if args.json else f"{path}\t{text}")
        sys.stdout.flush()  # each batch is written as it is done
        done += len(good)
    return 1 if args.strict and done < len(paths) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a model folder written by `captioner export --format onnx`")
    parser.add_argument("images", nargs="+", help="image files, or folders of images")
    parser.add_argument("--beam-size", type=int, default=None, help="1: greedy (default: the folder's)")
    parser.add_argument("--max-len", type=int, default=None, help="longest caption in words (default: the folder's)")
    parser.add_argument("--length-penalty", type=float, default=None, help="beam ranking (default: the folder's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default: 16)")
    parser.add_argument("--providers", nargs="+", default=None, help="onnxruntime providers, best first")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's choice)")
    parser.add_argument("--json", action="store_true", help="one JSON line per image")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when some image was skipped")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        return run(args)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # config.json, onnx.json or vocab.json lacks an entry this script reads
        print(f"error: {args.folder}: an entry {e} is missing from its JSON files; {EXPORT}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
