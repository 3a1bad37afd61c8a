"""Config overrides on the command line, one syntax for every command: `KEY=VALUE` words (and `--set KEY=VALUE`)
are taken out of a sub-command's arguments wherever they stand, before argparse sees them; -q and --device are
accepted before and after the sub-command (cli/parser.py builds the parsers themselves)."""
from __future__ import annotations

import argparse
import os
import re
import sys

# A config override on the command line: section.key=value (compute.bf16=false, decode.max_len=5). Any word of this
# form is one, wherever it stands among a command's arguments, unless a file or folder of that name exists.
OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+=")

def _usage_error(parser: argparse.ArgumentParser, message: str, hint: str):
    """A usage error in one line, as every other refusal is: argparse printed the whole usage (16 lines for
    caption) above it, and listed the optional KEY=VALUE words among the missing arguments."""
    if message.startswith("the following arguments are required:"):
        names = [n.strip() for n in message.partition(":")[2].split(",") if n.strip() != "KEY=VALUE"]
        message = f"missing {', '.join(names)}"
    parser.exit(2, f"{parser.prog}: error: {message} ({hint})\n")


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser (cli/parser.py makes them): one-line usage errors."""

    def error(self, message: str):
        _usage_error(self, message, f"`{self.prog} --help` explains every option")


class CaptionerParser(argparse.ArgumentParser):
    """The top-level parser: before argparse sees the words, config overrides (OVERRIDE words and --set KEY=VALUE)
    are taken out of the sub-command's arguments wherever they stand, so that one after an option is no
    "unrecognized argument" and `caption ... decode.max_len=5` is no image path; they come back as args.overrides,
    in the order given. -q and --device are accepted before and after the sub-command."""

    def error(self, message: str):
        _usage_error(self, message, "`captioner --help` lists the commands, `captioner COMMAND --help` their options")

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        command, argv, overrides = split_overrides(self, argv)
        namespace, extras = super().parse_known_args(argv, namespace)
        if command is None:
            return namespace, extras
        sub = subcommands(self)[command]
        if overrides and not takes_overrides(sub):
            self.error(f"{command} reads no config, so {overrides[0]} cannot apply; config overrides go to "
                       f"{', '.join(n for n, p in subcommands(self).items() if takes_overrides(p))}")
        if takes_overrides(sub):
            namespace.overrides = overrides + list(getattr(namespace, "overrides", None) or [])
            namespace.__dict__.pop("set_overrides", None)
            given = {}
            for item in namespace.overrides:  # as a YAML file's key given twice is: the last would win silently
                key = item.partition("=")[0].strip()
                if key in given and given[key] != item:
                    self.error(f"{key} is given twice ({given[key]} and {item}): give it once")
                given[key] = item
        if any(a.dest == "device" for a in sub._actions):
            namespace.device = getattr(namespace, "device", "auto")
        elif hasattr(namespace, "device"):
            self.error(f"--device does not apply to {command}")
        return namespace, extras


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def takes_overrides(sub: argparse.ArgumentParser) -> bool:
    return any(a.dest == "set_overrides" for a in sub._actions)


def _takes_value(parser: argparse.ArgumentParser, word: str) -> bool:
    """Whether option word (--out, not --out=x; or a prefix argparse accepts, --check) consumes the next word."""
    actions = parser._option_string_actions
    action = actions.get(word) or (next((a for o, a in actions.items() if o.startswith(word)), None)
                                   if word.startswith("--") and len(word) > 2 else None)
    return action is not None and action.nargs != 0


def split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(the sub-command, argv without its config overrides, the overrides in order). Option values are left alone
    (--out a.b=c.txt stays the value of --out), as is everything after '--'."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":  # top-level options before the command
        i += 2 if _takes_value(parser, argv[i]) else 1
    commands = subcommands(parser)
    if i >= len(argv) or argv[i] not in commands:
        return None, argv, []
    command, sub = argv[i], commands[argv[i]]
    kept, overrides, j = argv[:i + 1], [], i + 1
    while j < len(argv):
        word = argv[j]
        if word == "--":
            kept += argv[j:]
            break
        if word == "--set" and j + 1 < len(argv) and takes_overrides(sub):
            overrides.append(argv[j + 1])
            j += 2
            continue
        if word.startswith("--set=") and takes_overrides(sub):
            overrides.append(word[len("--set="):])
        elif OVERRIDE.match(word) and not os.path.exists(word):
            overrides.append(word)
        elif word.startswith("-") and "=" not in word and _takes_value(sub, word) and j + 1 < len(argv):
            kept += [word, argv[j + 1]]
            j += 2
            continue
        else:
            kept.append(word)
        j += 1
    return command, kept, overrides
