#!/usr/bin/env python
"""The real-photo quality benchmark (captioner/jobs/quality.py): prints its results as one JSON object.

    python scripts/bench_quality.py                                  # 3 seeds on ../shared/data/flickr8k-705
    python scripts/bench_quality.py --seeds 1 model.alpha_c=0.5      # config key=value overrides on top
    python scripts/bench_quality.py encoder.weights=IMAGENET1K_V2    # torchvision's MobileNetV2 weights instead
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from captioner.errors import CaptionerError  # noqa: E402
from captioner.files import write_text  # noqa: E402
from captioner.jobs import quality  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides as section.key=value")
    p.add_argument("--data", default=str(quality.DEFAULT_DATA), help="folder with captions.txt and images/")
    p.add_argument("--cache", default="~/.cache/captioner/quality",
                   help="weights, features, split lists and runs (default ~/.cache/captioner/quality)")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--tag", default="", help="name of this variant's run folder under CACHE/runs/")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint", default="last", choices=("last", "best"),
                   help="score each run's last.pt (default) or best.pt (train.select_metric on the val photos)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        results = quality.main(args.data, args.cache, args.seeds, args.overrides, args.device, args.tag, args.threads,
                                 args.checkpoint, args.first_seed)
    except CaptionerError as e:
        print(f"bench_quality: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=1)
    if args.json:
        write_text(args.json, text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
