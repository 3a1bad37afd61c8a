"""The configuration reference, generated from captioner/config: every key's type and default from the
dataclasses (sections.py), its meaning from the field's own comment (or metadata "help"), its range from the
field's metadata "range" (sections.at_least) or the int default INT_RANGE, and the rules validate() checks,
written as a user writes a range ("[0, 1)", "> 0", "one of: tanh, relu"; plain_rule).

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
    """Names of the config's closed sets (DATASET_FORMATS) and ranges (TEMPERATURES, and validate()'s own
    `low, high = TEMPERATURES`) -> their values, and `cfg.section.key` -> `key`, so a rule reads as it is checked."""

    def __init__(self, namespace: dict, local: dict):
        self.namespace, self.local = namespace, local

    def visit_Name(self, node):
        value = self.local[node.id] if node.id in self.local else self.namespace.get(node.id)
        if isinstance(value, (tuple, int, float, str)) and (node.id.isupper() or node.id in self.local):
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


def _unpacked_constants(func: ast.FunctionDef, namespace: dict) -> dict:
    """validate()'s `low, high = TEMPERATURES`: each name unpacked from a constant tuple -> its value."""
    local = {}
    for node in ast.walk(func):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Tuple)
                and isinstance(node.value, ast.Name) and isinstance(namespace.get(node.value.id), tuple)):
            names, values = node.targets[0].elts, namespace[node.value.id]
            if len(names) == len(values) and all(isinstance(n, ast.Name) for n in names):
                local.update({n.id: v for n, v in zip(names, values)})
    return local


def validation_rules() -> dict[str, list[str]]:
    """section.key -> the conditions validate() checks on it, as source (`0.0 <= model.dropout < 1.0`)."""
    from captioner.config import sections, validate as validate_module
    tree = ast.parse(inspect.getsource(validate_module))
    namespace = {**vars(sections), **vars(validate_module)}
    rules: dict[str, list[str]] = {}
    for func in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "validate"):
        local = _unpacked_constants(func, namespace)
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
            text = ast.unparse(_Constants(namespace, local).visit(ast.parse(ast.unparse(condition), mode="eval")))
            for key in keys:
                rules.setdefault(key, []).append(text)
    return rules


# Rules that are no plain comparison, in words (the rule's source as validation_rules gives it -> the range).
# A new such rule shows as its source (or, when long, not at all) until it is worded here: test_docs checks that
# every rule reads as words.
RULE_WORDS = {
    "encoder.std is None or all((v > 0 for v in encoder.std))": "null, or every value > 0",
    "not (dataset.format == 'synthetic' and dataset.annotations)":
        "no dataset.annotations with dataset.format synthetic",
    "_known_encoding(dataset.encoding)": "a text encoding Python knows (utf-8, latin-1, cp1252, ...)",
    "train.scst_samples >= (2 if train.scst_baseline == 'mean' else 1)":
        "train.scst_samples >= 2 with the mean baseline (>= 1 with greedy)",
    "decode.groups < 1 or decode.beam_size % decode.groups == 0": "decode.beam_size a multiple of decode.groups",
    "all((values is None or len(values) == encoder.in_channels for values in (encoder.mean, encoder.std)))":
        "encoder.mean and encoder.std: null, or one value per input channel (encoder.in_channels)",
    "all((name in ('jsonl', 'tensorboard', 'mlflow', 'wandb') for name in train.log_to)) and "
    "len(set(train.log_to)) == len(train.log_to)": "each of: jsonl, tensorboard, mlflow, wandb, at most once",
}

# Unworded rules longer than this (several keys, generator expressions) are left to validate.py and its errors.
RULE_WIDTH = 70

_SYMBOLS = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<="}


def _number(value) -> str:
    return f"{value:g}"  # 0.0 -> 0, 1e-04 -> 0.0001


def _is_number(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
        and not isinstance(node.value, bool)


def plain_rule(rule: str, key: str) -> str | None:
    """A validate() condition on key as a user writes a range: `0.0 <= k < 1.0` -> "[0, 1)", `k > 0` -> "> 0",
    `k in ('tanh', 'relu')` -> "one of: tanh, relu"; then RULE_WORDS; None when it is neither."""
    if rule in RULE_WORDS:
        return RULE_WORDS[rule]
    node = ast.parse(rule, mode="eval").body
    if not isinstance(node, ast.Compare):
        return None
    terms = [node.left, *node.comparators]
    if len(node.ops) == 1 and ast.unparse(node.left) == key:
        op, right = node.ops[0], node.comparators[0]
        if isinstance(op, ast.In) and isinstance(right, ast.Tuple) and all(isinstance(e, ast.Constant)
                                                                          for e in right.elts):
            return "one of: " + ", ".join(str(e.value) if e.value != "" else '""' for e in right.elts)
        if type(op) in _SYMBOLS and _is_number(right):
            return f"{_SYMBOLS[type(op)]} {_number(right.value)}"
    if (len(node.ops) == 2 and ast.unparse(terms[1]) == key and _is_number(terms[0]) and _is_number(terms[2])
            and all(isinstance(op, (ast.Lt, ast.LtE)) for op in node.ops)):
        opening, closing = ("[" if isinstance(node.ops[0], ast.LtE) else "("), \
            ("]" if isinstance(node.ops[1], ast.LtE) else ")")
        return f"{opening}{_number(terms[0].value)}, {_number(terms[2].value)}{closing}"
    return None


def _range(spec: dataclasses.Field, hint, rules: list[str], key: str) -> str:
    from captioner.config.validate import INT_RANGE
    worded = [(rule, plain_rule(rule, key)) for rule in rules]
    # unworded rules longer than RULE_WIDTH read better in validate.py
    rules = [words or f"`{rule}`" for rule, words in worded if words or len(rule) <= RULE_WIDTH]
    declared = spec.metadata.get("range")
    if declared is None and hint is int and not rules:
        declared = INT_RANGE
    parts = [f">= {declared[0]}" if declared[1] == INT_RANGE[1] else f"[{declared[0]}, {declared[1]}]"] \
        if declared else []
    return "; ".join(dict.fromkeys(parts + rules))  # each once, in order


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
                               _range(spec, hints[spec.name], rules.get(key, []), key),
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
