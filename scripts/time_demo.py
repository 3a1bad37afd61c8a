"""Time `captioner demo` end to end (a fresh process, as a user runs it) and print JSON with the machine named.

    python scripts/time_demo.py                  # demo into a temporary folder, deleted afterwards
    python scripts/time_demo.py --out /tmp/demo  # keep what the demo wrote

The README's demo time comes from this script. Prints {"seconds", "demo_seconds" (the demo's own figure),
"bleu4", "machine": {"cpu", "cores", "torch", "python", "platform"}, "date", "load_before", "load_after"}:
the load average (os.getloadavg, 1/5/15 min) says how busy the machine was, since other jobs on the same cores
slow the demo down as much as a slower CPU does.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on Windows
        return None


def time_demo(out: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    before = load()
    start = time.perf_counter()
    try:  # on timeout the demo process is killed, not left running
        result = subprocess.run([sys.executable, "-m", "captioner", "demo", "--out", str(out)], env=env,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"captioner demo took more than {timeout:g} s (load average {load()}): stopped")
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"captioner demo failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])  # the demo's last line is its JSON summary
    return {"seconds": round(seconds, 1), "demo_seconds": summary.get("seconds"), "bleu4": summary.get("bleu4"),
            "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_before": before, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="demo folder to keep (default: a temporary one, deleted)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the demo is stopped")
    args = parser.parse_args()
    if args.out:
        report = time_demo(Path(args.out), args.timeout)
    else:
        with tempfile.TemporaryDirectory(prefix="captioner-time-demo-") as tmp:
            report = time_demo(Path(tmp) / "demo", args.timeout)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
