#!/usr/bin/env python
"""Thin wrapper: `python scripts/prepare.py ARGS` is `captioner prepare ARGS`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from captioner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
