"""Strict parsing: YAML that refuses duplicate keys and anything but a mapping; empty configs; NaN and infinity;
int ranges; text never made from numbers; the same checks on job options and bench overrides, derived from the
field types so that keys added later are covered too."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import typing

import pytest

from captioner.cli import COMMANDS, build_job, build_parser, main
from captioner.config import INT_RANGE, Config, apply_overrides, coerce, load_config, parse_yaml
from captioner.errors import CaptionerError
from captioner.jobs.bench.sizes import BenchSizes, apply_overrides as bench_overrides

from helpers import TINY


def _config_file(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, says", [
    ("train:\n  epochs: 1\ntrain:\n  lr: 0.1\n", "duplicate key 'train' (also on line 1)"),
    ("train:\n  epochs: 1\n  epochs: 2\n", "duplicate key 'epochs' (also on line 2)"),
    ("{train: {epochs: 1}, train: {lr: 1}}\n", "duplicate key 'train'"),
    ("dataset:\n  root: a\n  format: csv\n  root: b\n", "duplicate key 'root'"),
])
def test_a_key_given_twice_is_refused_at_any_depth(tmp_path, text, says):
    with pytest.raises(CaptionerError, match="duplicate key") as refused:
        load_config(_config_file(tmp_path, text))
    assert says in str(refused.value)


def test_nested_duplicates_are_found_in_any_yaml_the_project_reads():
    with pytest.raises(CaptionerError, match="duplicate key 'b'"):
        parse_yaml("a:\n  x: [1, {b: 1, b: 2}]\n", "test")
    assert parse_yaml("base: &b {x: 1}\nuse:\n  <<: *b\n  y: 2\n", "test")["use"] == {"x": 1, "y": 2}  # merges


@pytest.mark.parametrize("text, says", [
    ("", "is empty"), ("# only a comment\n", "is empty"), ("false\n", "got false"), ("0\n", "got int"),
    ("- train\n", "got a list"), ("just text\n", "got the text"), ("train:\n", "got nothing"),
    ("train: 3\n", "must be a mapping of keys"), ("3: {epochs: 1}\n", "unknown config key '3'"),
    ("train: {3: 1}\n", "unknown config key 'train.3'"),
])
def test_a_config_that_is_not_a_mapping_of_sections_is_refused(tmp_path, text, says):
    with pytest.raises(CaptionerError) as refused:
        load_config(_config_file(tmp_path, text))
    assert says in str(refused.value)


@pytest.mark.parametrize("key, says", [
    ("encoder.imagesize", "did you mean encoder.image_size? encoder keys: arch, layer,"),
    ("trian.lr", "did you mean train.lr? sections: encoder, model, dataset, train,"),
    ("train.lrr", "did you mean train.lr? train has"),  # a long section is named, not listed
    ("model.nope", "(model keys: embed_dim,"),  # no loose guess
])
def test_an_unknown_key_says_what_is_valid_in_a_short_line(key, says):
    with pytest.raises(CaptionerError) as refused:
        apply_overrides(Config(), [f"{key}=1"])
    assert says in str(refused.value) and len(str(refused.value)) < 200


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=.nan", "train.lr=inf", "train.lr=-.inf",
                                      "train.lr=1e400", "model.dropout=NaN", "decode.length_penalty=inf",
                                      "decode.temperature=.inf", "train.grad_clip=nan", "train.lr=" + "9" * 400])
def test_nan_and_infinity_are_refused(override):
    with pytest.raises(CaptionerError, match="finite"):
        load_config(TINY, [override])


def test_every_float_key_refuses_nan_and_infinity():
    # Derived from the dataclasses: a float key added later is covered without a line in this test.
    for section in dataclasses.fields(Config):
        for spec in dataclasses.fields(section.type if isinstance(section.type, type) else
                                       typing.get_type_hints(Config)[section.name]):
            hint = typing.get_type_hints(typing.get_type_hints(Config)[section.name])[spec.name]
            if float in (hint, *typing.get_args(hint)):
                for bad in (math.nan, math.inf, -math.inf):
                    with pytest.raises(CaptionerError, match="finite"):
                        coerce(f"{section.name}.{spec.name}", bad, hint, spec)


def test_every_int_key_has_a_range():
    low, high = INT_RANGE
    for section_name, section_type in typing.get_type_hints(Config).items():
        for spec in dataclasses.fields(section_type):
            hint = typing.get_type_hints(section_type)[spec.name]
            if int in (hint, *typing.get_args(hint)):
                key = f"{section_name}.{spec.name}"
                for bad in (low - 1, high + 1, 10**30):
                    with pytest.raises(CaptionerError, match="must be (between|>= )"):
                        coerce(key, bad, hint, spec)


@pytest.mark.parametrize("override, says", [
    ("train.seed=99999999999", "must be between 0 and 2147483647"),
    ("train.seed=-1", "must be >= 0, got -1"),
    ("encoder.seed=4294967296", "must be between"),
    ("dataset.synthetic_seed=2**40", "expects int"),
    ("train.epochs=3.0", "expects int"),
    ("train.epochs=true", "expects int"),
    ("train.precompute_features=1", "expects bool"),
    ("compute.bf16=maybe", "must be one of auto, true, false"),
])
def test_ints_bools_and_switches_are_exact(override, says):
    with pytest.raises(CaptionerError) as refused:
        load_config(TINY, [override])
    assert says in str(refused.value)


def test_text_keys_never_come_silently_from_numbers_in_a_file(tmp_path):
    for value in ("123", "1.5", "2024-01-01", "0x10", "-7"):
        with pytest.raises(CaptionerError, match="expects str") as refused:
            load_config(_config_file(tmp_path, f"dataset:\n  root: {value}\n"))
        assert "quote it" in str(refused.value)
    cfg = load_config(_config_file(tmp_path, "dataset:\n  root: '123'\n"))
    assert cfg.dataset.root.endswith("123")


def test_text_keys_on_the_command_line_keep_what_was_typed():
    cfg = apply_overrides(Config(), ["dataset.root=2024", "encoder.layer=1", "dataset.encoding=utf-8",
                                     "encoder.weights=null", "dataset.annotations='0123'"])
    assert (cfg.dataset.root, cfg.encoder.layer, cfg.encoder.weights) == ("2024", "1", None)
    assert cfg.dataset.annotations == "0123"
    with pytest.raises(CaptionerError, match="NUL"):
        apply_overrides(Config(), ["dataset.root=a\x00b"])


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize("argv, says", [
    (["caption", "--checkpoint", "x.pt", "p", "--temperature", "nan"], "--temperature must be in [0.0001, 10000]"),
    (["caption", "--checkpoint", "x.pt", "p", "--temperature", "1e-300"], "--temperature must be in"),
    (["caption", "--checkpoint", "x.pt", "p", "--sample", "--temperature", "inf"], "--temperature"),
    (["caption", "--checkpoint", "x.pt", "p", "--batch-size", "99999999999"], "--batch-size must be between"),
    (["serve", "--checkpoint", "x.pt", "--timeout", "nan"], "--timeout must be a finite number"),
    (["serve", "--checkpoint", "x.pt", "--max-wait-ms=-inf"], "--max-wait-ms must be a finite number"),
    (["layers", "resnet18", "--image-size", "4294967296"], "--image-size must be between"),
    (["bench", "--smoke", "--threads", "-2"], "--threads must be >= 1"),
    (["bench", "--smoke", "--threads", "4294967296"], "--threads must be between"),
    (["bench", "--smoke", "image_size=1e3"], "bench override image_size expects int"),
    (["bench", "--smoke", "arch=18"], None),  # text as typed: an arch torchvision lacks is refused later, not here
    (["bench", "--smoke", "image_size=[1"], "bench override image_size expects int"),
    (["bench", "--smoke", "encoder_batch=99999999999"], "must be between"),
])
def test_job_options_get_the_same_checks(argv, says):
    parser = build_parser()
    args = parser.parse_args(argv)
    if says is None:
        _, job = build_job(args)
        assert job.sizes.arch == "18"
        return
    with pytest.raises(CaptionerError) as refused:
        build_job(args)
    assert says in str(refused.value)
    code, err = _run(argv)
    assert code == 2 and says in err and "Traceback" not in err


def test_every_commands_numeric_options_are_checked_by_type():
    # For every command in the table (commands added later included): NaN into each float option and an
    # out-of-range number into each int option is refused before the job is built.
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    checked = 0
    for command, (module_name, job_name, _, _) in COMMANDS.items():
        import importlib
        job_class = getattr(importlib.import_module(f"captioner.jobs.{module_name}"), job_name)
        hints = typing.get_type_hints(job_class)
        for action in sub[command]._actions:
            hint = hints.get(action.dest)
            kinds = set(typing.get_args(hint) or (hint,))
            if not action.option_strings or not (kinds & {int, float}) or action.type not in (int, float):
                continue
            bad = "nan" if action.type is float else str(2**40)
            required = {"caption": ["--checkpoint", "x.pt", "p"], "serve": ["--checkpoint", "x.pt"],
                        "evaluate": ["--checkpoint", "x.pt"], "extract": ["--config", "c.yaml"],
                        "prepare": ["--config", "c.yaml"], "layers": ["resnet18"], "plot": ["run"],
                        "score": ["--results", "r.json", "--annotations", "a.json"],
                        "export": ["--checkpoint", "x.pt", "--out", "m"]}.get(command, [])
            args = parser.parse_args([command, *required, action.option_strings[-1], bad])
            with pytest.raises(CaptionerError):
                build_job(args)
            checked += 1
    assert checked >= 10


def test_bench_overrides_use_the_config_coercion():
    sizes = bench_overrides(BenchSizes(), ["image_size=64", "bf16=false", "compile=true", "arch=resnet50"])
    assert (sizes.image_size, sizes.bf16, sizes.compile, sizes.arch) == (64, "false", True, "resnet50")
    for bad in ("image_size=64.0", "compile=1", "bf16=perhaps", "image_size=-1", "nope=1"):
        with pytest.raises(CaptionerError):
            bench_overrides(BenchSizes(), [bad])


def test_list_keys_take_a_yaml_list_or_commas_and_only_text():
    for override in ("train.log_to=[jsonl,tensorboard]", "train.log_to=jsonl,tensorboard"):
        assert apply_overrides(Config(), [override]).train.log_to == ["jsonl", "tensorboard"]
    for bad in ("train.log_to=[1,2]", "train.log_to=[jsonl,jsonl]", "train.log_to=[jsonl, x\x00]"):
        with pytest.raises(CaptionerError):
            apply_overrides(Config(), [bad])
