"""The documentation is generated and tested (issue 37): every config key, command option and public name has
a line, and the checkers say so when one lacks it; every code block of docs/ and README.md runs here, or says on
the line before its fence (`<!-- skip: REASON -->`) what it needs that the tests lack. Every `captioner` line,
skipped or not, must parse with the real argument parser."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # docsgen/ sits beside captioner/, outside the package; plain `pytest` may not see it
    sys.path.insert(0, str(ROOT))

from captioner.cli import parser as cli_parser  # noqa: E402
from docsgen import blocks, cli_ref, config_ref  # noqa: E402
# What an unmarked shell block may hold: commands the sandbox below can run (pip lines are not run: CI has
# installed the [test] extra, which holds every optional dependency).
SANDBOX_COMMANDS = ("captioner", "find", "pip", "ls", "cat", "head")


# ---------------------------------------------------------------- generated references: nothing undocumented

def test_every_config_key_has_a_meaning():
    assert config_ref.undocumented_keys() == []


def test_config_checker_names_a_key_without_a_comment(tmp_path, monkeypatch):
    """A field added without a comment (or metadata help) is reported; the comment forms sections.py uses count."""
    (tmp_path / "extra_sections.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass, field

        @dataclass
        class ExtraConfig:
            documented: int = 1  # a trailing comment
            # a comment block above
            above: str = ""
            wrapped: int = 2  # a long trailing comment that
            # continues on the next line
            next_one: int = 3  # its own comment

            bare: float = 0.5
            helped: bool = field(default=True, metadata={"help": "help in the field's metadata"})

        @dataclass
        class Root:
            extra: ExtraConfig = field(default_factory=ExtraConfig)
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("extra_sections")
    assert config_ref.undocumented_keys(module.Root) == ["extra.bare"]
    meanings = {doc.key: doc.meaning for doc in config_ref.key_docs(module.Root)}
    assert meanings["extra.wrapped"] == "a long trailing comment that continues on the next line"
    assert meanings["extra.helped"] == "help in the field's metadata"


def test_config_reference_lists_every_key_with_type_default_and_rules():
    from captioner.config import Config, to_dict
    text = config_ref.render()
    for section, values in to_dict(Config()).items():
        for key in values:
            assert f"| `{section}.{key}` |" in text
    assert "| `decode.top_p` | float | `1.0` | (0, 1] |" in text
    assert "| one of: project, norm, raw |" in text  # closed sets written out
    assert "| `decode.temperature` | float | `1.0` | [0.0001, 10000] |" in text  # validate()'s low, high


def test_every_range_reads_as_a_user_writes_it():
    """Each of validate()'s rules is a plain range ("[0, 1)", "> 0", "one of: ...") or worded in RULE_WORDS:
    no Python source in the reference's range column."""
    unworded = [(key, rule) for key, rules in config_ref.validation_rules().items() for rule in rules
                if config_ref.plain_rule(rule, key) is None]
    assert unworded == [], "word these rules in docsgen/config_ref.py RULE_WORDS"
    assert [doc.key for doc in config_ref.key_docs() if "`" in doc.range or "cfg" in doc.range] == []
    ranges = {doc.key: doc.range for doc in config_ref.key_docs()}
    assert (ranges["model.dropout"], ranges["dataset.val_fraction"], ranges["train.lr_gamma"]) == (
        "[0, 1)", "[0, 0.5)", "(0, 1]")
    assert (ranges["train.lr"], ranges["model.alpha_c"], ranges["train.epochs"]) == ("> 0", ">= 0", ">= 1")
    assert ranges["encoder.interpolation"] == 'one of: "", bicubic, bilinear'
    assert config_ref.plain_rule("a.b in ('x', 'y')", "a.b") == "one of: x, y"
    assert config_ref.plain_rule("0.5 < a.b < 2", "a.b") == "(0.5, 2)"
    assert config_ref.plain_rule("a.b > c.d", "a.b") is None  # another key: no plain range


def test_every_command_and_option_has_help():
    assert cli_ref.undocumented_options() == []


def test_cli_checker_names_an_option_without_help(monkeypatch):
    build = cli_parser.build_parser

    def with_bare_option():
        parser = build()
        cli_ref.commands(parser)["train"].add_argument("--new-knob", type=int)
        cli_ref.commands(parser)["layers"].add_argument("--quiet-flag", action="store_true", help="")
        return parser

    monkeypatch.setattr(cli_parser, "build_parser", with_bare_option)
    assert cli_ref.undocumented_options() == ["captioner train --new-knob", "captioner layers --quiet-flag"]


def test_cli_reference_lists_every_command_and_option():
    text = cli_ref.render()
    for name, sub in cli_ref.commands().items():
        assert f"### `{f'captioner {name}'.strip()}`" in text
        for action in sub._actions:
            for flag in [] if isinstance(action, argparse._HelpAction) else action.option_strings:
                assert f"`{flag}`" in text, (name, flag)


def test_every_public_name_is_in_the_api_reference():
    import captioner
    page = (ROOT / "docs/reference/python-api.md").read_text()
    for name in captioner.__all__:
        if name != "__version__":
            assert f"::: captioner.{name}" in page, f"docs/reference/python-api.md lacks ::: captioner.{name}"
    from captioner.api import Caption, Captioner
    for cls in (Captioner, Caption):
        assert cls.__doc__, cls
        for name, member in vars(cls).items():
            member = getattr(member, "__func__", member)  # classmethods
            if not name.startswith("_") and (callable(member) or isinstance(member, property)):
                assert member.__doc__, f"{cls.__name__}.{name} has no docstring"


# ---------------------------------------------------------------- prose: keys and options named in the text

# Dotted names in the prose that are not config keys: JSON paths inside quantization.json / onnx.json, and a Python
# attribute (`cap.model.encode`). File names (compute.py, model.safetensors, encoder.onnx) are told by their suffix.
NOT_CONFIG_KEYS = {"encoder.transforms", "encoder.weight_rounding", "encoder.linear_layers", "encoder.preprocess",
                   "model.encode"}
_FILE_SUFFIXES = ("py", "onnx", "safetensors", "json", "yaml", "pt", "bin", "jsonl", "png", "md")


def _prose(path: Path) -> str:
    """The page without its fenced blocks (those are parsed and run by the tests below)."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_every_config_key_named_in_the_docs_exists():
    """A key renamed or removed in captioner/config leaves no page naming the old one (`train.max_bad_step`)."""
    from captioner.config import Config, to_dict
    sections = to_dict(Config())
    keys = {f"{section}.{key}" for section, values in sections.items() for key in values}
    pattern = re.compile(r"(?<![\w/.])(" + "|".join(sections) + r")\.([a-z_][a-z0-9_]*)\b(?!\.\w|/)")
    unknown = []
    for path in blocks.doc_files():
        text = path.read_text(encoding="utf-8")
        for match in pattern.finditer(text):
            name = match.group(0)
            if name not in keys and name not in NOT_CONFIG_KEYS and match.group(2) not in _FILE_SUFFIXES:
                unknown.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}: {name}")
    assert unknown == [], "not config keys (a typo, or a key renamed in captioner/config/sections.py)"


def test_every_option_named_in_a_captioner_line_of_the_prose_exists():
    """`captioner CMD ... --opt` written inline in the text: --opt is an option of CMD (code blocks are parsed
    whole by test_captioner_lines_parse)."""
    found = cli_ref.commands()
    top = {flag for action in found[""]._actions for flag in action.option_strings}
    wrong, spans = [], 0
    for path in blocks.doc_files():
        for match in re.finditer(r"`(captioner [^`]+)`", _prose(path).replace("\n", " ")):
            words = match.group(1).split()
            command = words[1] if words[1] in found else ""
            options = top | {flag for action in found[command]._actions for flag in action.option_strings}
            spans += 1
            for word in (w.strip("[]()").split("=")[0] for w in words):
                if word.startswith("--") and word != "--" and word not in options:
                    wrong.append(f"{path.relative_to(ROOT)}: `{match.group(1)}`: {word}")
    assert spans >= 30
    assert wrong == []


def test_every_file_named_in_the_docs_exists():
    """`captioner/engine/runtime/exit.py`, `tests/test_resume.py`, `configs/tiny.yaml`, `quantize/ranking.py`: a
    file moved or renamed leaves no page pointing at the old place. Short forms are relative to the package
    (`model/decoding.py`) or to engine/infer (`quantize/...`), as the pages write them."""
    folders = (ROOT, ROOT / "captioner", ROOT / "captioner/engine/infer")
    pattern = re.compile(r"(?<![\w/.-])((?:captioner|scripts|tests|configs|examples|docsgen|engine|model|data|jobs"
                         r"|quantize|docs)/[\w/.-]+\.(?:py|yaml|md))")
    missing = [f"{path.relative_to(ROOT)}: {match.group(1)}" for path in blocks.doc_files()
               for match in pattern.finditer(path.read_text(encoding="utf-8"))
               if not any((folder / match.group(1)).exists() for folder in folders)]
    assert missing == []


# ---------------------------------------------------------------- code blocks

BLOCKS = blocks.all_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in ("bash", "sh", "python") and not b.skip]


def _logical_lines(code: str) -> list[str]:
    return [line.strip() for line in code.replace("\\\n", " ").splitlines() if line.strip()
            and not line.strip().startswith("#")]


def _captioner_argvs(line: str) -> list[list[str]]:
    """The argument lists given to captioner on a shell line (plain, python -m or torchrun -m)."""
    words = shlex.split(line, comments=True)
    commands, current = [], []
    redirect = False  # the word after `>`, `>>`, `<`, `2>` is a file, not an argument
    for word in words + ["|"]:
        if redirect:
            redirect = False
        elif word in (">", ">>", "<", "2>"):
            redirect = True
        elif word in ("|", "&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    argvs = []
    for command in commands:
        if command[:1] == ["captioner"]:
            argvs.append(command[1:])
        elif "-m" in command and command[command.index("-m") + 1:][:1] == ["captioner"]:
            argvs.append(command[command.index("-m") + 2:])
    return argvs


def test_every_code_block_runs_or_says_why_not():
    """Blocks in a language the tests do not run are output or file layouts (text, yaml, none); an unmarked shell
    block holds only what the sandbox can run."""
    assert len(RUNNABLE) >= 3
    for block in (b for b in BLOCKS if b.lang in ("bash", "sh") and not b.skip):
        for line in _logical_lines(block.code):
            first = shlex.split(line, comments=True)[0]
            assert first in SANDBOX_COMMANDS, f"{block.where}: `{line}` cannot run in the docs sandbox: mark " \
                                              f"the block <!-- skip: WHAT IT NEEDS -->"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("bash", "sh")], ids=lambda b: b.where)
def test_captioner_lines_parse(block):
    parser_for = cli_parser.build_parser
    for line in _logical_lines(block.code):
        for argv in _captioner_argvs(line):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    parser_for().parse_args(argv)
            except SystemExit as stop:
                assert stop.code == 0, f"{block.where}: `captioner {' '.join(argv)}`: {err.getvalue().strip()}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_checkpoint) -> Path:
    """A folder holding what the examples name: checkpoints (an untrained tiny model), photos, a path list."""
    root = tmp_path_factory.mktemp("docs-sandbox")
    for place in ("demo/run/best.pt", "runs/tiny/best.pt", "best.pt"):
        (root / place).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_checkpoint, root / place)
    (root / "photos/more").mkdir(parents=True)
    for i, place in enumerate(["photos/a.jpg", "photos/b.jpg", "photos/more/c.jpg", "a.jpg", "photo.jpg"]):
        Image.new("RGB", (96 + 16 * i, 80), (40 * i, 120, 200 - 30 * i)).save(root / place)
    Image.new("RGBA", (64, 64), (10, 200, 30, 128)).save(root / "b.png")
    (root / "list.txt").write_text("photos/a.jpg\nphotos/b.jpg\n")
    return root


@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.lang == "python"], ids=lambda b: b.where)
def test_python_blocks_run(block, sandbox, monkeypatch):
    monkeypatch.chdir(sandbox)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, block.where, "exec"), {"__name__": "__docs__"})
    assert out.getvalue() or "print(" not in block.code


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.lang in ("bash", "sh")], ids=lambda b: b.where)
def test_shell_blocks_run(block, sandbox, tmp_path):
    """The block's lines, pip lines left out, as bash runs them in a copy of the sandbox of its own (`captioner`
    is this checkout's)."""
    folder = tmp_path / "sandbox"
    shutil.copytree(sandbox, folder)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "captioner").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m captioner "$@"\n')
    (bindir / "captioner").chmod(0o755)
    script = "\n".join(line for line in block.code.replace("\\\n", " ").splitlines()
                       if not line.strip().startswith("pip "))
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{block.where}:\n{script}\n{done.stderr[-2000:]}"


def test_build_hook_fills_generated_sections_and_shows_skip_reasons():
    from docsgen import hooks
    page = "<!-- generated: config-reference -->\n\n<!-- skip: needs COCO -->\n```bash\ncaptioner train\n```\n"
    built = hooks.on_page_markdown(page)
    assert "| `train.epochs` |" in built and "<!-- generated" not in built
    assert '!!! note "Not run by the docs tests: needs COCO"\n\n```bash' in built
    assert "### `captioner caption`" in hooks.on_page_markdown("<!-- generated: cli-reference -->")
    with pytest.raises(ValueError, match="no such generated section"):
        hooks.on_page_markdown("<!-- generated: nothing -->")
