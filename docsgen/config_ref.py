"""The configuration reference, generated from captioner/config: every key's type and default from the
dataclasses (sections.py), its meaning from the field's own comment (or metadata "help"), its range from the
field's metadata "range" (sections.at_least) or the int default INT_RANGE, and the rules validate() checks.

The comments in sections.py are the single source of each key's meaning: a field's trailing comment, or the
comment block right above it. A comment block above a field that has its own trailing comment continues the
previous field's trailing comment (the wrapped lines of a long one)."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass


@dataclass
class KeyDoc:
    key: str  # section.name
    type: str
    default: str
    range: str
    meaning: str


def field_comments(cls) -> dict[str, str]:
    """Field name -> its comment text, read from the class's source (empty when there is none)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # a class built at run time has no source: nothing is documented
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    body = ast.parse(source).body[0].body
    fields = [node for node in body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
    helps: dict[str, list[str]] = {}
    previous = None
    for node in fields:
        name = node.target.id
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        leading, n = [], node.lineno - 1
        while n in comments and n not in code_lines:
            leading.insert(0, comments[n])
            n -= 1
        touches_previous = previous is not None and n == previous.end_lineno
        if leading and trailing and touches_previous and helps[previous.target.id]:
            helps[previous.target.id] += leading  # the wrapped rest of the previous field's comment
            leading = []
        helps[name] = leading + trailing
        previous = node
    return {name: " ".join(parts) for name, parts in helps.items()}


def _meaning(spec: dataclasses.Field, comment: str) -> str:
    parts = [spec.metadata.get("help") or comment, spec.metadata.get("note", "")]
    return "; ".join(p for p in parts if p)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(typing.get_args(hint))
    name = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return name or str(hint).replace("typing.", "")


def _default(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        return ""
    if isinstance(value, str):
        return value or '""'
    return "null" if value is None else repr(value) if isinstance(value, list) else str(value).lower() \
        if isinstance(value, bool) else str(value)


class _Constants(ast.NodeTransformer):
    """Names of the config's closed sets (DATASET_FORMATS) and ranges (TEMPERATURES) -> their values, and
    `cfg.section.key` -> `key`, so a rule reads as it is checked."""

    def __init__(self, namespace: dict):
        self.namespace = namespace

    def visit_Name(self, node):
        value = self.namespace.get(node.id)
        if isinstance(value, (tuple, int, float, str)) and node.id.isupper():
            return ast.copy_location(ast.Constant(value), node)
        return node

    def visit_Subscript(self, node):  # TEMPERATURES[0] -> 0.0001
        node = self.generic_visit(node)
        if isinstance(node.value, ast.Constant) and isinstance(node.slice, ast.Constant):
            return ast.copy_location(ast.Constant(node.value.value[node.slice.value]), node)
        return node

    def visit_Tuple(self, node):  # ("", *INTERPOLATIONS) -> ("", "bicubic", "bilinear")
        node = self.generic_visit(node)
        values = []
        for elt in node.elts:
            if isinstance(elt, ast.Constant):
                values.append(elt.value)
            elif isinstance(elt, ast.Starred) and isinstance(elt.value, ast.Constant):
                values.extend(elt.value.value)
            else:
                return node
        return ast.copy_location(ast.Constant(tuple(values)), node)

    def visit_Attribute(self, node):
        chain, inner = [], node
        while isinstance(inner, ast.Attribute):
            chain.insert(0, inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id == "cfg" and len(chain) == 2:
            return ast.copy_location(ast.Name(".".join(chain)), node)
        return self.generic_visit(node)


def validation_rules() -> dict[str, list[str]]:
    """section.key -> the conditions validate() checks on it, as source (`0.0 <= model.dropout < 1.0`)."""
    from captioner.config import sections, validate as validate_module
    tree = ast.parse(inspect.getsource(validate_module))
    namespace = {**vars(sections), **vars(validate_module)}
    rules: dict[str, list[str]] = {}
    for func in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "validate"):
        lists = [n.value for n in ast.walk(func) if isinstance(n, ast.Assign) and isinstance(n.value, ast.List)
                 and any(isinstance(t, ast.Name) and t.id == "checks" for t in n.targets)]
        for node in (elt for checks in lists for elt in checks.elts):
            if not (isinstance(node, ast.Tuple) and len(node.elts) == 2):
                continue
            condition = node.elts[0]
            keys = {f"{a.value.attr}.{a.attr}" for a in ast.walk(condition) if isinstance(a, ast.Attribute)
                    and isinstance(a.value, ast.Attribute) and isinstance(a.value.value, ast.Name)
                    and a.value.value.id == "cfg"}
            if not keys:
                continue
            text = ast.unparse(_Constants(namespace).visit(ast.parse(ast.unparse(condition), mode="eval")))
            for key in keys:
                rules.setdefault(key, []).append(text)
    return rules


# Rules longer than this (several keys, generator expressions) are left to validate.py and its error messages.
RULE_WIDTH = 70


def _range(spec: dataclasses.Field, hint, rules: list[str]) -> str:
    from captioner.config.validate import INT_RANGE
    rules = [rule for rule in rules if len(rule) <= RULE_WIDTH]  # longer ones read better in validate.py
    declared = spec.metadata.get("range")
    if declared is None and hint is int and not rules:
        declared = INT_RANGE
    parts = [f">= {declared[0]}" if declared[1] == INT_RANGE[1] else f"{declared[0]} .. {declared[1]}"] \
        if declared else []
    return "; ".join(parts + [f"`{rule}`" for rule in rules])


def key_docs(root=None) -> list[KeyDoc]:
    """One KeyDoc per config key, in the dataclasses' order."""
    from captioner.config.sections import Config
    root = root or Config
    rules = validation_rules() if root is Config else {}
    docs = []
    for section in dataclasses.fields(root):
        cls = typing.get_type_hints(root)[section.name]
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        for spec in dataclasses.fields(cls):
            key = f"{section.name}.{spec.name}"
            docs.append(KeyDoc(key, _type_name(hints[spec.name]), _default(spec),
                               _range(spec, hints[spec.name], rules.get(key, [])),
                               _meaning(spec, comments.get(spec.name, ""))))
    return docs


def undocumented_keys(root=None) -> list[str]:
    return [doc.key for doc in key_docs(root) if not doc.meaning]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The reference as Markdown: one table per section."""
    out, section = [], None
    for doc in key_docs():
        name = doc.key.partition(".")[0]
        if name != section:
            section = name
            out += ["", f"### `{section}`", "", "| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        default = f"`{doc.default}`" if doc.default else ""
        out.append(f"| `{doc.key}` | {_cell(doc.type)} | {_cell(default)} | {_cell(doc.range)} | "
                   f"{_cell(doc.meaning)} |")
    return "\n".join(out) + "\n"
