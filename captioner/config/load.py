"""YAML files and `section.key=value` overrides into the dataclasses, and back to plain dicts for checkpoints.

Unknown keys (config/keys.py says what is valid) and values of the wrong type are CaptionerErrors naming the key.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import re
import types
import typing
from pathlib import Path

import yaml

from captioner.config.defaults import resolve_defaults
from captioner.config.keys import unknown_key
from captioner.config.sections import LEGACY_DEFAULTS, Config
from captioner.config.validate import check_number, check_text, validate
from captioner.errors import CaptionerError
from captioner.files import read_text


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (at any depth): PyYAML keeps the last one
    silently, so a second `train:` section would drop the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges, it is not a key
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (also on line {seen[key]}): give each key once",
                            key_node.start_mark)
                    seen[key] = line
                except TypeError:  # a list or mapping as a key
                    raise yaml.constructor.ConstructorError(None, None, f"a {type(key).__name__} as a key",
                                                            key_node.start_mark) from None
        return super().construct_mapping(node, deep)


    def compose_document(self):
        node = super().compose_document()
        _check_size(node, {}, set(), 0)  # before any Python object is built from it
        return node


# YAML parser limits. Aliases share one object, so a "billion laughs" file (9 aliases of 9 aliases of ...) parses
# in milliseconds and only explodes when something walks it (a repr in an error message: minutes, then out of
# memory). A config holds a few hundred values a few levels deep; these limits are far above any real one.
MAX_YAML_VALUES = 100_000  # values after alias expansion
MAX_YAML_DEPTH = 64  # nesting levels


class YAMLLimit(yaml.YAMLError):
    """A document over a parser limit: what exceeded it and where."""

    def __init__(self, problem: str, node):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, node.start_mark


def _check_size(node, sizes: dict, open_nodes: set, depth: int) -> tuple[int, int]:
    """(values, nesting height) of a composed node with every alias expanded, counted once per distinct node;
    YAMLLimit as soon as either goes over its limit, or an alias refers to the collection that holds it."""
    key = id(node)
    if key in open_nodes:
        raise YAMLLimit("an alias refers to the collection that holds it (a recursive alias)", node)
    if key not in sizes:
        if depth > MAX_YAML_DEPTH:
            raise YAMLLimit(f"nested deeper than {MAX_YAML_DEPTH} levels (depth limit)", node)
        children = ([] if isinstance(node, yaml.ScalarNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value)
        open_nodes.add(key)
        counted = [_check_size(child, sizes, open_nodes, depth + 1) for child in children]
        open_nodes.discard(key)
        sizes[key] = (1 + sum(c[0] for c in counted), 1 + max((c[1] for c in counted), default=0))
    values, height = sizes[key]
    if values > MAX_YAML_VALUES:
        raise YAMLLimit(f"its aliases expand to more than {MAX_YAML_VALUES:,} values (alias expansion limit; a "
                        f"'billion laughs' file?)", node)
    if depth + height > MAX_YAML_DEPTH + 1:
        raise YAMLLimit(f"nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded (depth limit)", node)
    return values, height


def parse_yaml(text: str, what: str):
    """text parsed by StrictLoader; one line naming `what` and the place when it is not valid YAML or goes over
    a parser limit (MAX_YAML_VALUES after alias expansion, MAX_YAML_DEPTH)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except YAMLLimit as e:
        mark = e.problem_mark
        raise CaptionerError(f"{what} is refused by a YAML parser limit (line {mark.line + 1}, column "
                             f"{mark.column + 1}): {e.problem}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CaptionerError(f"{what} is not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise CaptionerError(f"{what} is nested too deeply to be a config") from None
    except (ValueError, OverflowError) as e:  # a scalar PyYAML cannot convert (an integer of 5000 digits)
        raise CaptionerError(f"{what} holds a value that cannot be read: {str(e).split(';')[0][:120]}") from None


def coerce(key: str, value, annotation, spec: dataclasses.Field | None = None, label: str = ""):
    """Convert a YAML/CLI value to the field's declared type, or raise a one-line error.

    The checks come from the type, so a key added later gets them without a line here: an int must be a whole
    number in its field's range (validate.INT_RANGE, 0..2**31-1, unless the field says otherwise), a float
    finite (unless its field allows infinity), a str text that was given as text (a path given 123 is refused:
    quote it), a bool true/false, a Switch or Literal one of its values. label names the value in errors
    (default: config key 'KEY')."""
    name = label or f"config key '{key}'"
    hint = annotation
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if typing.get_origin(hint) is typing.Literal:  # a Switch: booleans are its "true" / "false"
        value = ("true" if value else "false") if isinstance(value, bool) else value
        if isinstance(value, str) and value in args:
            return value
        raise CaptionerError(f"{name} must be one of {', '.join(args)}, got {_shown(value)}")
    if typing.get_origin(hint) is list:  # a list of strings: YAML [a, b] or "a,b" from the command line
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return [check_text(name, v) for v in items]
        raise CaptionerError(f"{name} expects a list of names such as [a, b], got {_shown(value)}")
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(target) is list:  # list[float]: a YAML list, or [0.5, 0.5, 0.5] on the command line
        item = typing.get_args(target)[0]
        if isinstance(value, (list, tuple)) and value:
            return [coerce(key, v, item, label=name) for v in value]
        raise CaptionerError(f"{name} expects a list of {item.__name__} such as [0.5, 0.5, 0.5], got {_shown(value)}")
    # PyYAML (YAML 1.1) reads 1e-3 and 1.0e3 (no dot, or no exponent sign) as strings, in files and `key=value`
    # overrides alike: those become floats. Any other string where a number is expected ("128") is refused.
    if target is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        value = float(value.strip())
    if target is bool and isinstance(value, bool):
        return value
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return check_number(name, value, spec)
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            raise CaptionerError(f"{name} must be a finite number, got an integer of "
                                 f"{value.bit_length()} bits") from None
        return check_number(name, value, spec)
    if target is str and isinstance(value, str):
        return check_text(name, value)
    if target is str and isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
        raise CaptionerError(f"{name} expects str (text), got {type(value).__name__} {_shown(value)}: quote it "
                             f"('{value}') if it is meant as text")
    expected = {int: "int (a whole number)", float: "float (a number)", str: "str (text)",
                bool: "bool (true or false)"}.get(target, getattr(target, "__name__", str(target)))
    raise CaptionerError(f"{name} expects {expected}, got {_shown(value)}")


_YAML11_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+|[-+]?(inf|infinity)|nan", re.IGNORECASE)


def _shown(value) -> str:
    """A value as an error shows it: its repr, cut short (a 5000-character string is one line too)."""
    text = f"an integer of {value.bit_length()} bits" if isinstance(value, int) and value.bit_length() > 64 \
        else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.cache
def _field_types(section_type: type) -> dict:
    """A section's annotations resolved to types, once per class (resolving them for every key set took seconds)."""
    return typing.get_type_hints(section_type)


def _set(cfg: Config, key: str, value) -> None:
    section_name, _, name = key.partition(".")
    section = getattr(cfg, section_name, None) if section_name in {f.name for f in dataclasses.fields(cfg)} else None
    if section is None or name not in {f.name for f in dataclasses.fields(section)}:
        raise unknown_key(key, cfg)
    annotation = _field_types(type(section))[name]
    spec = next(f for f in dataclasses.fields(section) if f.name == name)
    setattr(section, name, coerce(key, value, annotation, spec))


def from_dict(data: dict, cfg: Config | None = None) -> Config:
    """Apply a nested dict ({"encoder": {"layer": "layer3"}}) on top of cfg (defaults when None)."""
    cfg = cfg or Config()
    if not isinstance(data, dict):
        raise CaptionerError(f"config must be a mapping of sections (encoder:, model:, dataset:, ...), got "
                             f"{_kind(data)}")
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in data.items():
        if not isinstance(section, str) or section not in sections:
            raise unknown_key(str(section), cfg)
        if not isinstance(values, dict):
            raise CaptionerError(f"config section '{section}' must be a mapping of keys (e.g. {section}: "
                                 f"{{key: value}}), got {_kind(values)}")
        for name, value in values.items():
            if not isinstance(name, str):
                raise unknown_key(f"{section}.{name}", cfg)
            _set(cfg, f"{section}.{name}", value)
    validate(cfg)
    return cfg


def from_saved_dict(data: dict) -> Config:
    """A config saved in a checkpoint (or a run's config.yaml): keys it lacks (added since, or written before
    their default changed) take LEGACY_DEFAULTS, not today's defaults; FOLLOWING_KEYS at 0 are resolved."""
    if not isinstance(data, dict):
        return from_dict(data)
    filled = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for section, legacy in LEGACY_DEFAULTS.items():
        if isinstance(filled.get(section, {}), dict):
            filled[section] = {**legacy, **filled.get(section, {})}
    return resolve_defaults(from_dict(filled))


def _kind(value) -> str:
    """How a parsed YAML value reads in an error: "nothing (an empty file or section)", "a list", "the text 'x'"."""
    if value is None:
        return "nothing (it is empty)"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _annotation(cfg: Config, key: str):
    section, _, name = key.partition(".")
    holder = getattr(cfg, section, None) if section in {f.name for f in dataclasses.fields(cfg)} else None
    if holder is None or name not in {f.name for f in dataclasses.fields(holder)}:
        return None  # _set names the unknown key
    return _field_types(type(holder))[name]


def override_value(raw: str, annotation):
    """A `key=value` string's value: a YAML scalar (3, 1e-4, true, null) for numbers, booleans and switches;
    for a text field the text as typed (so dataset.root=2024 or encoder.layer=1 stay text), null giving None
    where the field allows it."""
    if raw == "":
        return ""
    args = typing.get_args(annotation)
    if annotation is str or (typing.get_origin(annotation) in (typing.Union, types.UnionType) and str in args):
        if type(None) in args and raw.strip() in ("null", "~", "None"):
            return None
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        return parse_yaml(raw, f"override value {raw!r}") if quoted else raw
    try:
        value = parse_yaml(raw, f"override value {raw!r}")
    except CaptionerError:  # not YAML: the raw text, which the field's coercion names in its refusal
        return raw
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    listed = next((a for a in args if a is not type(None)), annotation) if union else annotation  # list | None
    if isinstance(value, list) and typing.get_origin(listed) is list:  # train.log_to=[jsonl,tensorboard]
        return value
    return value if not isinstance(value, (dict, list)) else raw


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings; the value is parsed as a YAML scalar (so 3, 1e-4, true, null work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CaptionerError(f"override '{item}' is not of the form section.key=value")
        _set(cfg, key.strip(), override_value(raw, _annotation(cfg, key.strip())))
    validate(cfg)
    return cfg


# Keys holding file or folder paths: relative ones in a config file are relative to that file's folder (as in
# docker-compose or mkdocs), so a config works from any working directory; on the command line they stay
# relative to the working directory, where the shell completed them.
PATH_KEYS = ("dataset.root", "dataset.annotations", "dataset.images", "dataset.splits", "dataset.train_list",
             "dataset.val_list", "dataset.test_list", "cache.dir", "encoder.weights")


_WEIGHTS_FILE = (".pth", ".pt", ".bin", ".safetensors")


def _relative_to(data, folder: Path):
    """data (the parsed YAML) with relative paths made absolute against folder."""
    if not isinstance(data, dict):
        return data
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = data.get(section, {}).get(name) if isinstance(data.get(section), dict) else None
        if not isinstance(value, str) or not value:
            continue
        if key == "encoder.weights" and not value.endswith(_WEIGHTS_FILE) and "/" not in value:
            continue  # a torchvision weights name (IMAGENET1K_V2), not a file
        data[section][name] = os.path.abspath(os.path.join(folder, os.path.expanduser(value)))  # absolute: kept
    return data


def shipped_config(name: str) -> Path | None:
    """A config that ships with captioner (tiny.yaml, ...): captioner/configs/ in an installed package,
    configs/ in a source checkout; None when there is none of that name."""
    return next((folder / name for folder in _shipped_folders() if (folder / name).is_file()), None)


def shipped_config_names() -> list[str]:
    """The names of the configs that ship with captioner (what a bare name may be), sorted."""
    return sorted({p.name for folder in _shipped_folders() for p in folder.glob("*.yaml")})


def _shipped_folders() -> tuple[Path, Path]:
    """captioner/configs/ in an installed package, then configs/ beside the package in a source checkout."""
    package = Path(__file__).resolve().parent.parent  # captioner/
    return package / "configs", package.parent / "configs"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The config in YAML file path (a bare name such as tiny.yaml also finds the shipped one), with overrides."""
    cfg = Config()
    if path is not None:
        path, data, folder = _read_config(path)
        try:
            from_dict(_relative_to(data, folder), cfg)
        except CaptionerError as e:
            raise e.with_context(f"{path}: ") from None
    return resolve_defaults(apply_overrides(cfg, list(overrides)))


def _read_config(path: str | Path) -> tuple[Path, object, Path]:
    """(the config's path, a bare name found among the shipped ones; its YAML; where its relative paths start)."""
    path = Path(path)
    folder = path.parent
    # configs/X.yaml outside a checkout (a wheel): the shipped one, its ../data/... from ./configs as in a checkout
    if not path.is_file() and path.parent in (Path("."), Path("configs")) and shipped_config(path.name):
        path, folder = shipped_config(path.name), Path.cwd() / "configs"
    if not path.is_file():
        shipped = shipped_config_names()
        raise CaptionerError(f"config file {path} not found" + (f" (the shipped configs, by bare name: "
                                                               f"{', '.join(shipped)})" if shipped else ""))
    data = parse_yaml(read_text(path, "config file", setting=""), f"config file {path}")
    if data is None:
        raise CaptionerError(f"config file {path} is empty (or only comments): give at least one section, "
                             f"e.g. start from configs/tiny.yaml")
    return path, data, folder


def stated_keys(path: str | Path | None, overrides=()) -> set[str]:
    """The "section.key" names that the YAML file at path and the overrides give a value to (the rest are
    defaults), for a config that load_config(path, overrides) read without error."""
    keys = {override.partition("=")[0].strip() for override in overrides}
    if path is not None:
        data = _read_config(path)[1]
        keys |= {f"{section}.{name}" for section, values in data.items() if isinstance(values, dict)
                 for name in values}
    return keys


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """cfg as YAML, every key in its section's order: a run's config.yaml, `--print-config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Encoder keys that a config may leave to the weights (None or ""); a checkpoint records the values it trained with.
PREPROCESS_KEYS = ("mean", "std", "interpolation")
# ... and all the encoder keys a config may leave to the backbone: the hooked layer too (its last stage).
RESOLVED_KEYS = ("layer", *PREPROCESS_KEYS)


def inherit_preprocess(new: dict, saved: dict) -> dict:
    """Config dict new with saved's encoder.layer, mean, std and interpolation where new leaves them to the backbone: a
    run that continues a checkpoint (or a run folder) normalises images as it was trained, whatever the weights'
    library says today, and a config that never set them matches one that recorded them."""
    encoder = new.get("encoder") if isinstance(new.get("encoder"), dict) else {}
    old = saved.get("encoder") if isinstance(saved, dict) and isinstance(saved.get("encoder"), dict) else {}
    filled = {k: old[k] for k in RESOLVED_KEYS if encoder.get(k) in (None, "") and old.get(k) not in (None, "")}
    return {**new, "encoder": {**encoder, **filled}} if filled else new
