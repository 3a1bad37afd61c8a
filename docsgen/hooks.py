"""MkDocs hooks (mkdocs.yml `hooks:`): the generated references are written into their pages at build time,
where a page holds `<!-- generated: NAME -->`, and a `<!-- skip: REASON -->` marker before a code block is shown
to the reader as a note saying what the example needs that the docs tests lack. Nothing generated is committed."""
from __future__ import annotations

import os
import re
import sys

# mkdocs loads this file by path and restores sys.path afterwards: the checkout (captioner, docsgen) is put
# first while this file loads, and captioner imported then, so the references describe this checkout's code,
# never another installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import captioner.cli.parser  # noqa: E402,F401
import captioner.config.validate  # noqa: E402,F401
from docsgen import blocks, cli_ref, config_ref  # noqa: E402

if not os.path.abspath(captioner.__file__).startswith(os.path.join(ROOT, "")):
    raise ImportError(f"docsgen/hooks.py: captioner was imported from {captioner.__file__}, not from {ROOT}")

GENERATED = {"config-reference": config_ref.render, "cli-reference": cli_ref.render}
_GENERATED = re.compile(r"<!-- generated: ([\w-]+) -->")


def _generated(match: re.Match) -> str:
    name = match.group(1)
    if name not in GENERATED:
        raise ValueError(f"<!-- generated: {name} -->: no such generated section; known: {', '.join(GENERATED)}")
    return GENERATED[name]()


def _skip_note(match: re.Match) -> str:
    return f'!!! note "Not run by the docs tests: {match.group(1).strip()}"\n\n'


def on_page_markdown(markdown: str, page=None, config=None, files=None) -> str:
    markdown = _GENERATED.sub(_generated, markdown)
    return blocks.SKIP.sub(_skip_note, markdown)
