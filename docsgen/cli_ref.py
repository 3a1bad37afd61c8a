"""The command-line reference, generated from the argparse parser (captioner/cli/parser.py): every command's
description, usage and options with their help, default and choices."""
from __future__ import annotations

import argparse


def commands(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """"" (the top-level parser) and every command name -> its parser, in the order --help lists them."""
    if parser is None:
        from captioner.cli.parser import build_parser
        parser = build_parser()
    found = {"": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _documented(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or bool(
        action.help and action.help.strip() and action.help != argparse.SUPPRESS)


def _command_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {choice.dest: choice.help or "" for action in parser._actions
            if isinstance(action, argparse._SubParsersAction) for choice in action._choices_actions}


def undocumented_options(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """`captioner CMD --opt` for every option or positional without help, and every command without a line."""
    missing = []
    found = commands(parser)
    summaries = _command_help(found[""])
    for name, sub in found.items():
        if name and not (summaries.get(name) and sub.description):
            missing.append(f"captioner {name}")
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction) and not _documented(action):
                missing.append(f"captioner {name} {_flags(action)}".replace("  ", " "))
    return missing


def _flags(action: argparse.Action) -> str:
    return ", ".join(action.option_strings) or (action.metavar or action.dest)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    if action.option_strings and action.nargs == 0:  # a switch: its default says nothing
        return ""
    if action.default in (None, argparse.SUPPRESS, []) or action.required:
        return ""
    return f"`{action.default}`"


def render() -> str:
    """The reference as Markdown: a section per command with its usage and an options table."""
    found = commands()
    summaries = _command_help(found[""])
    out = []
    for name, sub in found.items():
        title = f"captioner {name}".strip()
        out += ["", f"### `{title}`", ""]
        if name:
            out += [summaries.get(name, ""), ""]
        usage = sub.format_usage().replace("usage: ", "").strip()
        out += ["```text", usage, "```", ""]
        if sub.description:
            out += ["```text", sub.description.strip(), "```", ""]
        rows = [a for a in sub._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if rows:
            out += ["| option | default | choices | meaning |", "|---|---|---|---|"]
            for action in rows:
                flags = ", ".join(f"`{f}`" for f in action.option_strings) or f"`{action.metavar or action.dest}`"
                if action.option_strings and action.metavar:
                    flags += f" `{action.metavar}`"
                choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
                meaning = (action.help or "") + (" (required)" if action.required and action.option_strings else "")
                out.append(f"| {flags} | {_default(action)} | {choices} | {_cell(meaning)} |")
        else:
            out += ["Commands: " + ", ".join(f"[`{n}`](#captioner-{n})" for n in found if n), ""]
    return "\n".join(out) + "\n"
