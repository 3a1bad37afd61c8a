"""The `captioner` command: arguments (cli/parser.py) -> a job, its printing and exit code; the work happens in
the job modules.

Exit codes (engine/runtime/exit.py, the one exit path): 0 done, 2 bad input (one line on stderr: what is wrong
and what to try), 1 the machine failed (a full disk, a read-only file system, a closed output; one line),
130 / 143 stopped by SIGINT / SIGTERM (train, demo: with last.pt saved); `caption --strict` exits 1 when some
image could not be read.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shlex
import sys
import warnings

from captioner.cli.parser import build_parser
from captioner.config.validate import check_fields
from captioner.engine.runtime.exit import with_exit_path
from captioner.engine.runtime.signals import exit_status
from captioner.errors import CaptionerError

__all__ = ["COMMANDS", "build_job", "build_parser", "main", "run_command"]


def _print_json(data: dict) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(json.dumps(data), flush=True)


def _train_fields(args: argparse.Namespace) -> dict:
    """--resume RUN_DIR names the run dir and asks to resume it."""
    if args.resume and args.run_dir and args.run_dir != args.resume:
        raise CaptionerError(f"--resume {args.resume} and --run-dir {args.run_dir} name different folders")
    return {"run_dir": args.resume or args.run_dir, "resume": bool(args.resume)}


def _report_train(args: argparse.Namespace, summary: dict) -> int:
    stopped = summary["stopped"] in ("SIGINT", "SIGTERM")
    _print_json(summary)
    if stopped and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(f"captioner train: stopped by {summary['stopped']} at step {summary['steps']}; last.pt saved; "
              f"continue with: captioner train --resume {args.resume or args.run_dir}", file=sys.stderr)
    return exit_status(summary["stopped"]) if stopped else 0


def _report_demo(args: argparse.Namespace, summary: dict) -> int:
    if summary["stopped"] in ("SIGINT", "SIGTERM"):  # training stopped: nothing evaluated, not a finished demo
        _print_json(summary)
        print(f"captioner demo: stopped by {summary['stopped']} at step {summary['steps']}; last.pt saved; rerun "
              f"the same `captioner demo --out {shlex.quote(args.out)}` to resume it", file=sys.stderr)
        return exit_status(summary["stopped"])
    print(f"demo finished in {summary['seconds']}s: test BLEU-4 {summary['bleu4']:.3f} "
          f"(beam {summary['beam_size']}, {summary['test_images']} held-out images)")
    print(f"  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics_file']}\n"
          f"  captions:   {summary['captions_file']}\n  gallery:    {summary['gallery_file']}")
    _print_json(summary)
    return 0


def _report_caption(args: argparse.Namespace, summary: dict) -> int:
    _print_json(summary)
    return 1 if args.strict and summary.get("failed") else 0  # rank 0's summary covers every process


def _report_lines(lines):
    """A reporter printing the job module's human-readable lines, then the result as JSON."""
    def report(args: argparse.Namespace, result: dict) -> int:
        print("\n".join(lines(result)), flush=True)
        _print_json(result)
        return 0
    return report


def _report_json(args: argparse.Namespace, result: dict) -> int:
    _print_json(result)
    return 0


def _report_bench(args: argparse.Namespace, results: dict) -> int:
    from captioner.jobs.bench import format_table
    print(format_table(results))
    return 0


def _report_layers(args: argparse.Namespace, rows: list) -> int:
    from captioner.jobs.layers import format_rows
    print("\n".join(format_rows(rows)))
    return 0


def _prepare_lines(summary: dict) -> list[str]:
    from captioner.jobs.prepare import summary_lines
    return summary_lines(summary)


def _export_lines(result: dict) -> list[str]:
    from captioner.jobs.export import summary_lines
    return summary_lines(result)


def _score_lines(metrics: dict) -> list[str]:
    from captioner.jobs.score import summary_lines
    return summary_lines(metrics)


# command -> (job module under captioner.jobs, its XJob class, how its result is shown and turned into an exit
# status, fields that are not plain copies of the arguments). The job is built by keyword from the arguments of
# the same names; modules are imported on use so that `captioner --help` stays instant.
COMMANDS = {
    "demo": ("demo", "DemoJob", _report_demo, None),
    "train": ("train", "TrainJob", _report_train, _train_fields),
    "evaluate": ("evaluate", "EvaluateJob", _report_json, None),
    "caption": ("caption", "CaptionJob", _report_caption, None),
    "serve": ("serve", "ServeJob", _report_json, None),
    "plot": ("plot", "PlotJob", _report_json, None),
    "extract": ("extract", "ExtractJob", _report_json, None),
    "bench": ("bench", "BenchJob", _report_bench, None),
    "prepare": ("prepare", "PrepareJob", _report_lines(_prepare_lines), None),
    "score": ("score", "ScoreJob", _report_lines(_score_lines), None),
    "layers": ("layers", "LayersJob", _report_layers, None),
    "export": ("export", "ExportJob", _report_lines(_export_lines), None),
}


def _option_names(command: str) -> dict[str, str]:
    """dest -> the option a user types (beam_size -> --beam) for one command's arguments."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.dest: (a.option_strings[-1] if a.option_strings else a.dest) for a in sub._actions}


def build_job(args: argparse.Namespace):
    """(the job module, its XJob built by keyword from args): what run_command() executes; tests build jobs this
    way too.

    The job's own __post_init__ checks what is specific to it (--beam >= 1); then every numeric option is
    checked by its field's type (a finite float, an int in range), so an option added later is checked too."""
    module_name, job_name, _, special = COMMANDS[args.command]
    module = importlib.import_module(f"captioner.jobs.{module_name}")
    job_class = getattr(module, job_name)
    given = {**vars(args), **(special(args) if special else {})}
    job = job_class(**{f.name: given[f.name] for f in dataclasses.fields(job_class) if f.name in given})
    names = _option_names(args.command)
    check_fields(job_class, {f.name: getattr(job, f.name) for f in dataclasses.fields(job)},
                 lambda name: names.get(name, name))
    return module, job


def run_command(args: argparse.Namespace) -> int:
    module, job = build_job(args)
    if getattr(args, "print_config", False):  # the job checked its options; it runs nothing more
        from captioner.cli.print_config import print_config
        return print_config(args.command, job)
    return COMMANDS[args.command][2](args, module.main(job))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("captioner: error: give a command (start with `captioner demo`; `captioner --help` lists them)",
              file=sys.stderr)
        return 2
    if args.command == "completion":  # about the parser itself, no job: see cli/completion.py
        from captioner.cli.completion import completion_script
        return with_exit_path(args.command, lambda: print(completion_script(parser, args.shell)) or 0)
    # Our lines at INFO; other libraries' at WARNING: their INFO is not news to a user (matplotlib's "generated new
    # fontManager" on a first plot, httpx's line per Hub request). Set on our own logger too: basicConfig does
    # nothing where logging is already set up (a notebook, pytest).
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("captioner").setLevel(logging.WARNING if args.quiet else logging.INFO)
    # Pillow's warnings about one odd file (corrupt EXIF, a large image below our --max-pixels) are not news: the
    # file is captioned or refused with one line. Set here, where the command owns the process (and its forked
    # decoding workers inherit it); the library never changes warnings filters, which are process-wide.
    warnings.filterwarnings("ignore", module=r"PIL\.")
    _let_pillow_read_up_to(getattr(args, "max_pixels", None))
    return with_exit_path(args.command, lambda: run_command(args))


def _let_pillow_read_up_to(max_pixels: int | None) -> None:
    """--max-pixels above Pillow's own process-wide limit (twice Image.MAX_IMAGE_PIXELS: 179 megapixels) would
    still be refused by Pillow, with advice to raise it in one's program, which a command-line user has not.
    The command owns the process, so it raises Pillow's limit to the one asked for (the library never does)."""
    if not max_pixels:
        return
    from PIL import Image
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses above twice this; ours refuses above max_pixels


if __name__ == "__main__":
    sys.exit(main())
