"""The code blocks of the documentation (docs/**/*.md and README.md), with the marker that says why a block is
not run: `<!-- skip: REASON -->` on the line before the fence (shown to the reader as a note by hooks.py)."""
from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = re.compile(r"^<!-- skip: (.+?) -->\n(?=\s*\n?```)", re.M)
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!-- skip: (.+?) -->\s*$")


@dataclass
class Block:
    file: str  # relative to the checkout
    line: int  # of the opening fence
    lang: str
    code: str
    skip: str  # the reason it is not run, or ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks_of(path: pathlib.Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        found.append(Block(str(path.relative_to(ROOT)), text.count("\n", 0, match.start()) + 1,
                           match.group(1).lower(), match.group(2), marker.group(1).strip() if marker else ""))
    return found


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in blocks_of(path)]
