# `python -m captioner ...` (and `torchrun -m captioner ...`) runs the CLI.
from captioner.cli import main

raise SystemExit(main())
