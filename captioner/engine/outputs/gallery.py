"""An HTML page of captions with, for every word, where the decoder looked: one self-contained file.

    gallery = Gallery("gallery.html", title="runs/tiny/best.pt, beam 3")
    gallery.add("a.jpg", image, (640, 480), ["a", "dog"], alphas, grid=(7, 7), score=-2.1)
    gallery.add_error("b.jpg", "truncated image file")
    gallery.close()
    strip = attention_strip(image, (640, 480), ["a", "dog"], alphas, grid=(7, 7))   # the same, as one picture

image is the (S, S, 3) uint8 picture the encoder saw and alphas the (L, H*W) attention weights of its L
words. Each image is embedded once, as a JPEG thumbnail in its original aspect ratio; each word gets a
panel where its attention over the H x W grid of image regions, a tiny PNG, is upsampled by the browser
and laid over the image, dimming what the decoder did not look at (as the Show, Attend and Tell figures
do). No script, no other file: the page opens from anywhere, and a thumbnail links to its original.

The page resumes like the captions file: one entry per line, appended and flushed per batch; reopening
drops a half-written last line and the footer, and `has(file)` tells whether a file is already in it.
Under torchrun each process writes a part page (gallery.html.part-00003) and rank 0 moves its entries into
the one gallery (absorb), as for the captions file (engine/outputs/captions_file.py).
"""
from __future__ import annotations

import base64
import html
import io
import os
import re
import time
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import numpy as np
from PIL import Image

from captioner.errors import CaptionerError
from captioner.engine.outputs.captions_file import AppendLog, file_key
from captioner.text import join_words

THUMBNAIL = 224  # longest side of the embedded JPEG, in pixels
PANEL = 112  # longest side of a word's panel on the page, in CSS pixels (the image panel is twice that)
MIN_SIDE = 12  # a 50:1 panorama still gets a visible strip
DIMMING = 0.75  # opacity of the shade over regions that got no attention

GENERATOR = '<meta name="generator" content="captioner gallery">'
# data-name: the bytes of a file name that is not valid UTF-8, percent-encoded (data-file shows it with U+FFFD)
_ENTRY = re.compile(r'^<(?:figure|div) class="entry[^"]*" data-file="([^"]*)"(?: data-name="([^"]*)")?')
_MADE_BY = re.compile(r'<meta name="captioner-made-by" content="([^"]*)">')

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; background: #f4f4f1; color: #222; }
header p { color: #555; max-width: 70em; }
.entry { display: flex; gap: 16px; align-items: flex-start; background: #fff; border-radius: 8px;
         box-shadow: 0 1px 3px #0002; padding: 12px; margin: 0 0 14px; }
.pic { display: block; flex: none; position: relative; width: var(--w); height: var(--h); border-radius: 3px;
       overflow: hidden; background: var(--img) center / 100% 100% no-repeat; }
.pic.main { width: calc(2 * var(--w)); height: calc(2 * var(--h)); }
.pic img { position: absolute; inset: 0; width: 100%; height: 100%; }
figcaption { margin-bottom: 8px; }
.caption { font-size: 17px; font-weight: 600; }
.meta { color: #777; font-size: 12px; margin-left: 8px; }
.file { font-family: ui-monospace, monospace; color: #555; font-size: 12px; word-break: break-all; }
.words { display: flex; flex-wrap: wrap; gap: 8px; }
.word { display: flex; flex-direction: column; align-items: center; font-size: 13px; }
.entry.error { display: block; background: #fff4f2; color: #8a1c0c; padding: 8px 12px; }
footer { color: #555; margin-top: 20px; }
""".strip()


class Gallery:
    def __init__(self, path: str | Path, title: str = "captions", overwrite: bool = False,
                 made_by: dict | None = None, also_made_by=None):
        """also_made_by: None, or a function giving made_by as an older captioner spelled it (CaptionsFile's)."""
        self.log = AppendLog(path, overwrite)
        self.path, self.folder = self.log.path, self.log.path.resolve().parent
        lines = self.log.lines
        if not self.log.is_ours("<!DOCTYPE html>") or (lines and not any(GENERATOR in line for line in lines[:8])):
            self.log.close()
            raise CaptionerError(f"{self.path} exists and is not a captioner gallery; choose another --html "
                                 f"or pass --overwrite")
        stamp = _made_by(made_by)
        theirs = next((m.group(1) for line in lines[:8] if (m := _MADE_BY.search(line))), "")
        if (lines and stamp and html.unescape(theirs) != stamp
                and not (also_made_by and html.unescape(theirs) == _made_by({**made_by, **also_made_by()}))):
            self.log.close()
            raise CaptionerError(f"{self.path} shows captions made otherwise ({html.unescape(theirs) or 'not recorded'}; "
                                 f"now {stamp}): pass --overwrite to replace it, or choose another --html")
        self.log.drop_partial_line()
        if lines and lines[-1].startswith("<footer"):  # resuming: new entries go before a new footer
            self.log.rewrite(lines[:-1])
        if not self.log.lines:
            self.log.append(_header(title, stamp))
        entries = [(m.group(1), "entry error" in line) for line in self.log.lines if (m := _ENTRY.match(line))]
        self.done = {_entry_key(match) for line in self.log.lines if (match := _ENTRY.match(line))}
        self.errors = sum(is_error for _, is_error in entries)
        self.images = len(entries) - self.errors
        self._pending: list[str] = []

    def add(self, file: str, image: np.ndarray, size: tuple[int, int], words: list[str], alphas: np.ndarray,
            grid: tuple[int, int], score: float | None = None) -> None:
        """One entry: image (S, S, 3) uint8, size the original (width, height), alphas (L, H*W) for L words."""
        self._append(file, entry_html(file, image, size, words, alphas, grid, score, _link(file, self.folder)))
        self.images += 1

    def add_error(self, file: str, message: str) -> None:
        self._append(file, error_html(file, message))
        self.errors += 1

    def has(self, file: str) -> bool:
        return file_key(file) in self.done

    def flush(self) -> None:
        """Write the entries added since the last flush (the caller flushes once per batch)."""
        self.log.append(self._pending)
        self._pending = []

    def _append(self, file: str, line: str) -> None:
        self._pending.append(line)
        self.done.add(file_key(file))

    def absorb(self, parts: list[Path], order: dict[str, int] | None = None) -> int:
        """Move the entries of part pages that are not on this page yet here, in input order, then delete the
        parts (after the entries are written: a kill in between loses nothing). Returns the entries added."""
        new = {}
        for path in parts:
            part = AppendLog(path)
            part.close()
            for line in part.lines:
                match = _ENTRY.match(line)
                key = match and _entry_key(match)
                if key and key not in self.done:
                    new.setdefault(key, line)
        last = len(order or ())
        for key in sorted(new, key=lambda k: (order or {}).get(k, last)):
            self._pending.append(new[key])
            self.done.add(key)
            if "entry error" in new[key]:
                self.errors += 1
            else:
                self.images += 1
        self.flush()
        for path in parts:
            path.unlink(missing_ok=True)
        return len(new)

    def close(self) -> None:
        self.flush()
        self.log.append([f"<footer>{self.images} images captioned, {self.errors} could not be read; "
                         f"last written {time.strftime('%Y-%m-%d %H:%M')}</footer></main></body></html>"])
        self.log.close()


def entry_html(file: str, image: np.ndarray, size: tuple[int, int], words: list[str], alphas: np.ndarray,
               grid: tuple[int, int], score: float | None = None, link: str | None = None) -> str:
    """One image's entry on one line (the gallery's, and the server page's): caption, thumbnail, word panels.

    image (S, S, 3) uint8, size the original (width, height), alphas (L, H*W) for L words; link: an escaped
    address for the thumbnail to open (None: the thumbnail links nowhere, as on the server's page).
    """
    width, height = _fit(size, PANEL, MIN_SIDE)
    thumbnail = _jpeg_base64(image, _fit(size, THUMBNAIL, MIN_SIDE))
    panels = []
    for word, alpha in zip(words, alphas):
        weights = np.asarray(alpha, dtype=np.float64).reshape(grid)  # (H*W,) -> (H, W)
        row, col = np.unravel_index(int(weights.argmax()), grid)
        title = (f"{word}: peak attention {weights.max():.2f} at row {row + 1}, column {col + 1} "
                 f"of {grid[0]}x{grid[1]}")
        panels.append(f'<div class="word" title="{_attr(title)}"><div class="pic"><img src="data:image/png;'
                      f'base64,{_attention_png(weights)}" alt="attention for {_attr(word)}"></div>'
                      f'<span>{_attr(word)}</span></div>')
    meta = f"log-probability {score:.2f}" if score is not None else ""
    picture = (f'<a class="pic main" href="{link}" title="open the original"></a>' if link is not None
               else '<div class="pic main"></div>')
    return (f'<figure class="entry" {_file_attributes(file)} style="--img:url(data:image/jpeg;base64,'
            f'{thumbnail});--w:{width}px;--h:{height}px">{picture}<div><figcaption><span class="caption">'
            f'{_attr(join_words(words))}</span><span class="meta">{meta}</span><div class="file">{_attr(file)}</div>'
            f'</figcaption><div class="words">{"".join(panels)}</div></div></figure>')


def error_html(file: str, message: str) -> str:
    return (f'<div class="entry error" {_file_attributes(file)}><span class="file">{_attr(file)}</span>: '
            f'{_attr(message)}</div>')


def _made_by(made_by: dict | None) -> str:
    return "; ".join(f"{k} {v}" for k, v in sorted((made_by or {}).items()))


def _header(title: str, stamp: str = "") -> list[str]:
    made_by = f'<meta name="captioner-made-by" content="{_attr(stamp)}">' if stamp else ""
    return ['<!DOCTYPE html>',
            f'<html lang="en"><head><meta charset="utf-8">{GENERATOR}{made_by}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_attr(title)}</title>',
            f'<style>{" ".join(STYLE.split())}</style></head><body>',
            f'<header><h1>{_attr(title)}</h1><p>Each word of a caption comes with where the decoder looked '
            f'when it chose that word: its attention weights over the grid of image regions, upsampled and laid '
            f'over the image, the most attended regions bright and the others shaded. Hover over a word for its '
            f'peak weight; click an image to open the original file.</p></header><main>']


def _fit(size: tuple[int, int], longest: int, shortest: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is `longest`, neither below `shortest`; unknown -> square."""
    width, height = size
    if width <= 0 or height <= 0:
        return longest, longest
    scale = longest / max(width, height)
    return max(shortest, round(width * scale)), max(shortest, round(height * scale))


def _jpeg_base64(image: np.ndarray, size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).resize(size, Image.BICUBIC).save(buffer, "JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def attention_shade(weights: np.ndarray) -> np.ndarray:
    """(H, W) weights -> (H, W) uint8 opacity of the black shade laid over the image: 0 over the word's most
    attended region, 255 * DIMMING over regions it did not attend to."""
    relative = weights / (weights.max() or 1.0)  # the most attended region of each word is fully lit
    return np.round(255 * DIMMING * (1.0 - relative)).astype(np.uint8)


def attention_strip(image: np.ndarray, size: tuple[int, int], words: list[str], alphas: np.ndarray,
                    grid: tuple[int, int], per_row: int = 8) -> np.ndarray:
    """A gallery entry as one picture (TensorBoard's sample images, notebooks): the image, then one panel per
    word with the word's attention shade over it, as the page draws it, the word below; rows of per_row panels.

    image (S, S, 3) uint8, size the original (width, height), alphas (L, H*W) -> (height, width, 3) uint8."""
    from PIL import ImageDraw, ImageFont
    width, height = _fit(size, PANEL, MIN_SIDE)
    picture = Image.fromarray(image).resize((width, height), Image.BICUBIC)
    panels = [(picture, "")]
    for word, alpha in zip(words, alphas):
        shade = attention_shade(np.asarray(alpha, dtype=np.float64).reshape(grid))  # (H*W,) -> (H, W)
        # upsampled smoothly, as the browser upsamples the page's tiny PNG, then laid over the image
        opacity = np.asarray(Image.fromarray(shade).resize((width, height), Image.BILINEAR), dtype=np.float32)
        shaded = np.asarray(picture, dtype=np.float32) * (1.0 - opacity[..., None] / 255.0)  # (h, w, 3)
        panels.append((Image.fromarray(np.round(shaded).astype(np.uint8)), word))
    font = ImageFont.load_default(size=13)
    gap, label = 6, 18
    columns = min(per_row, len(panels))
    rows = -(-len(panels) // columns)
    strip = Image.new("RGB", (columns * (width + gap) + gap, rows * (height + label + gap) + gap), "white")
    draw = ImageDraw.Draw(strip)
    for i, (panel, word) in enumerate(panels):
        x, y = gap + (i % columns) * (width + gap), gap + (i // columns) * (height + label + gap)
        strip.paste(panel, (x, y))
        draw.text((x + width / 2, y + height + 2), word, fill="black", font=font, anchor="ma")
    return np.asarray(strip)


def _attention_png(weights: np.ndarray) -> str:
    """(H, W) weights -> a black H x W PNG whose opacity shades regions by how little they were attended."""
    shade = attention_shade(weights)  # (H, W) alpha
    pixels = np.stack([np.zeros_like(shade), shade], axis=-1)  # (H, W, 2) LA: black, shade as alpha
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")  # (H, W, 2) uint8 loads as mode LA
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _link(file: str, folder: Path) -> str:
    """The original file's address relative to the gallery, so the page and the photos can move together."""
    target = Path(os.path.abspath(file))
    try:
        return _attr(quote(os.fsencode(os.path.relpath(target, folder))))
    except ValueError:  # another drive on Windows: no relative path exists
        return _attr(target.as_uri())


def _shown(text: str) -> str:
    """A file name that is not valid UTF-8 (surrogate escapes) shows U+FFFD, so the page stays valid UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _file_attributes(file: str) -> str:
    """data-file, the name as shown; a name that is not valid UTF-8 also gets data-name, its exact bytes, so that
    two such names (caf\xe9.jpg, caf\xe8.jpg: both caf\ufffd.jpg when shown) stay two entries, in input order."""
    shown = f'data-file="{_attr(file)}"'
    return shown if _shown(file) == file else f'{shown} data-name="{quote(os.fsencode(file))}"'


def _entry_key(match: re.Match) -> str:
    """The file_key of the file an entry line (matched by _ENTRY) is about."""
    name = os.fsdecode(unquote_to_bytes(match.group(2))) if match.group(2) else html.unescape(match.group(1))
    return file_key(name)


def _attr(text: str) -> str:
    """Escaped for text or a double-quoted attribute, on one line (entries are one line each)."""
    return html.escape(_shown(text), quote=True).replace("\n", "&#10;").replace("\r", "&#13;")
