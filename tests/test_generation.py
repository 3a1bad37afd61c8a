"""Per-call generation: Captioner.caption(img, beam_size=5, top_p=0.9, num_return_sequences=3, ...) equals the
config route (decode.* keys), is refused with the config's messages, and top-k / top-p sampling and n-best
returns run in the one decode path; the caption command's options and output records, and serve's settings."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from captioner import Captioner, CaptionerError
from captioner.cli import build_job
from captioner.cli.parser import build_parser
from captioner.config import ModelConfig, apply_overrides
from captioner.engine.infer.predictor import Predictor
from captioner.engine.serve.limits import Limits
from captioner.jobs import caption
from captioner.jobs.serve import ServedModel
from captioner.model.caption_model import CaptionModel
from captioner.model.decoding import SearchOptions, decode
from captioner.model.sample import keep_likeliest

from helpers import GridStub, varied_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return varied_checkpoint(tmp_path_factory.mktemp("generation") / "best.pt")  # decode: beam 2, max_len 12


@pytest.fixture(scope="module")
def cap(checkpoint):
    return Captioner.from_pretrained(checkpoint, "cpu", batch_size=4)


@pytest.fixture(scope="module")
def images():
    """Solid colours and dimmed noise: the varied model captions some of them differently."""
    solid = [np.full((64, 64, 3), c, dtype=np.uint8) for c in [(255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 0)]]
    noise = [np.random.RandomState(i).randint(0, 255, (64, 64, 3), dtype=np.uint8) // (i + 1) for i in range(4)]
    return solid + noise


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CaptionModel(None, ModelConfig(16, 16, 24, dropout=0.0), 12, encoder=GridStub()).eval()


# ---------------------------------------------------------------- the decode path

def test_keep_likeliest_cuts_to_the_top_k_and_the_nucleus():
    logp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(keep_likeliest(logp, top_k=2)) == [0, 1]
    assert kept(keep_likeliest(logp, top_p=0.5)) == [0]  # the first word alone holds 0.5
    assert kept(keep_likeliest(logp, top_p=0.8)) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert kept(keep_likeliest(logp, top_p=0.81)) == [0, 1, 2]
    assert kept(keep_likeliest(logp, top_k=1, top_p=0.99)) == [0]
    assert kept(keep_likeliest(logp[:, [3, 1, 0, 2]], top_p=0.8)) == [1, 2]  # in vocabulary order, not sorted
    assert torch.equal(keep_likeliest(logp), logp)  # off


def test_top_k_1_and_a_tiny_top_p_sample_what_greedy_decodes(model):
    raw = torch.randn(6, 24, 3, 3) * 4
    greedy = decode(model, raw, SearchOptions(max_len=10))
    for options in (SearchOptions(max_len=10, sample=True, top_k=1), SearchOptions(max_len=10, sample=True, top_p=1e-6),
                    SearchOptions(max_len=10, sample=True, top_k=1, temperature=3.0)):
        torch.manual_seed(5)
        out = decode(model, raw, options)
        assert torch.equal(out.tokens, greedy.tokens), options
        assert torch.equal(out.scores, torch.zeros(6))  # one word left to draw: log-probability 0


def test_top_p_sampling_is_seeded_and_stays_in_the_nucleus(model):
    raw = torch.randn(4, 24, 3, 3) * 4
    options = SearchOptions(max_len=10, sample=True, top_p=0.6, num_return_sequences=3)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(decode(model, raw, options))
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].scores, runs[1].scores)
    assert not torch.equal(runs[0].tokens, runs[2].tokens)
    # Every drawn word is in its step's nucleus: teacher-force the drawn captions and cut as sampling does.
    out, rows = runs[0], raw.repeat_interleave(3, dim=0)
    captions = torch.cat([torch.ones(len(out.tokens), 1, dtype=torch.long), out.tokens], dim=1)  # <start> first
    with torch.no_grad():
        logits, _ = model.decoder.forward_stepwise(model.project(rows), captions)  # (B*n, L, V)
    for t in range(out.tokens.shape[1] - 1):  # the last step is a forced <end>
        logp = F.log_softmax(logits[:, t], dim=-1)
        logp[:, [0, 1] + ([2] if t == 0 else [])] = float("-inf")  # never <pad>, <start>; <end> not first
        allowed = keep_likeliest(F.log_softmax(logp, dim=-1), top_p=0.6)
        drawn = out.tokens[:, t]
        live = t < out.lengths  # rows still writing at step t
        assert torch.isfinite(allowed.gather(1, drawn[:, None])[:, 0][live]).all(), t


def test_n_best_beams_are_distinct_sorted_and_led_by_the_beam_caption(model):
    raw = torch.randn(5, 24, 3, 3) * 4
    beam = decode(model, raw, SearchOptions(beam_size=4, max_len=10))
    nbest = decode(model, raw, SearchOptions(beam_size=4, max_len=10, num_return_sequences=3))
    assert nbest.tokens.shape[0] == 15 and torch.equal(nbest.tokens[::3], beam.tokens)
    assert torch.equal(nbest.scores[::3], beam.scores)
    for image in range(5):
        rows = nbest.tokens[image * 3:image * 3 + 3]
        assert len({tuple(r.tolist()) for r in rows}) == 3
        scores = nbest.scores[image * 3:image * 3 + 3]
        assert (scores[:-1] >= scores[1:]).all()
    sampled = decode(model, raw, SearchOptions(max_len=10, sample=True, num_return_sequences=4))
    assert sampled.tokens.shape[0] == 20
    assert (sampled.scores.view(5, 4)[:, :-1] >= sampled.scores.view(5, 4)[:, 1:]).all()


def test_search_options_refuse_what_the_config_refuses():
    for bad, words in [(dict(top_k=-1), "top_k must be >= 0"), (dict(top_p=0.0), "top_p must be in (0, 1]"),
                       (dict(top_p=1.5), "top_p"), (dict(num_return_sequences=0), "num_return_sequences must be"),
                       (dict(beam_size=2, num_return_sequences=3), "needs sampling or a beam search")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            SearchOptions(**bad)
    SearchOptions(sample=True, num_return_sequences=5)  # n samples need no beams


# ---------------------------------------------------------------- the Python API

def test_per_call_settings_equal_the_config_route(cap, checkpoint, images):
    per_call = cap.caption(images, beam_size=5, max_len=8)
    loaded = Captioner(Predictor.load(checkpoint, "cpu", overrides=["decode.beam_size=5", "decode.max_len=8"]),
                       batch_size=4).caption(images)
    assert [(c.text, c.score) for c in per_call] == [(c.text, c.score) for c in loaded]
    default = cap.caption(images)
    assert [c.text for c in per_call] != [c.text for c in default]  # the settings changed something
    assert [(c.text, c.score) for c in cap.caption(images)] == [(c.text, c.score) for c in default]  # per call only
    aliases = cap.caption(images, num_beams=5, max_new_tokens=8)  # transformers' names
    assert [c.text for c in aliases] == [c.text for c in per_call]
    assert [(c.text, c.score) for c in cap.caption(images, num_return_sequences=1)] == \
        [(c.text, c.score) for c in default]
    assert all(c.sequences == [(c.text, c.score)] for c in default)
    streamed = list(cap.stream(iter(images), beam_size=5, max_len=8))
    assert [c.text for c in streamed] == [c.text for c in per_call]


@pytest.mark.parametrize("key, value", [("beam_size", 0), ("top_p", 0), ("top_p", 2.0), ("top_k", -1),
                                        ("max_len", 0), ("temperature", 0.0), ("num_return_sequences", 3),
                                        ("beam_size", 1.5), ("block_ngram", -2), ("sample", "maybe")])
def test_bad_values_are_refused_with_the_configs_message(cap, images, key, value):
    with pytest.raises(CaptionerError) as per_call:
        cap.caption(images[0], **{key: value})
    text = value if isinstance(value, str) else json.dumps(value)
    with pytest.raises(CaptionerError) as configured:  # what Predictor.load(overrides=...) applies to the checkpoint
        apply_overrides(copy.deepcopy(cap.predictor.cfg), [f"decode.{key}={text}"])
    assert str(per_call.value) == str(configured.value)
    assert f"decode.{key}" in str(per_call.value)


def test_unknown_and_doubled_settings_are_named(cap, images):
    with pytest.raises(CaptionerError, match="unknown generation setting 'beams'; valid: beam_size"):
        cap.caption(images[0], beams=3)
    with pytest.raises(CaptionerError, match="num_beams and beam_size are the same setting"):
        cap.caption(images[0], num_beams=3, beam_size=3)


def test_n_best_and_top_p_samples_through_the_api(cap, images):
    best = cap.caption(images, beam_size=5)
    nbest = cap.caption(images, beam_size=5, num_return_sequences=3)
    for one, many in zip(best, nbest):
        assert (many.text, many.score) == (one.text, one.score) == many.sequences[0]
        assert len(many.sequences) == 3 and len({t for t, _ in many.sequences}) == 3
        assert [s for _, s in many.sequences] == sorted((s for _, s in many.sequences), reverse=True)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append([c.sequences for c in cap.caption(images, sample=True, top_p=0.9, num_return_sequences=3)])
    assert draws[0] == draws[1] and all(len(s) == 3 for s in draws[0])
    greedy = [c.text for c in cap.caption(images, beam_size=1)]
    assert [c.text for c in cap.caption(images, do_sample=True, top_k=1)] == greedy


# ---------------------------------------------------------------- the commands

def _job(argv):
    return build_job(build_parser().parse_args(argv))[1]


def test_caption_command_writes_n_best_and_resumes_only_the_same_settings(checkpoint, images, tmp_path):
    from PIL import Image
    paths = []
    for i, image in enumerate(images[:4] + images[6:]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    out, csv_out = tmp_path / "c.jsonl", tmp_path / "c.csv"
    options = ["--device", "cpu", "--workers", "0", "--beam", "4", "--max-len", "8", "--num-return-sequences", "3"]
    argv = ["caption", "--checkpoint", str(checkpoint), *paths, "--out", str(out), *options]
    result = caption.main(_job(argv))
    assert result["captioned"] == len(paths)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = Captioner.from_pretrained(checkpoint, "cpu").caption(paths, beam_size=4, max_len=8,
                                                                    num_return_sequences=3)
    for record, c in zip(records, expected):
        assert record["caption"] == c.text and len(record["sequences"]) == 3
        assert [s["caption"] for s in record["sequences"]] == [t for t, _ in c.sequences]
        assert "num_return_sequences 3" in record["decoding"] and "max_len 8" in record["decoding"]
    assert caption.main(_job(argv))["skipped"] == len(paths)  # same settings: resumed
    with pytest.raises(CaptionerError, match="num_return_sequences 3"):  # other settings: refused
        caption.main(_job(argv[:-1] + ["2"]))
    caption.main(_job(["caption", "--checkpoint", str(checkpoint), *paths, "--out", str(csv_out), *options]))
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "file,caption,score,error,model,decoding" and len(lines) == len(paths) + 1  # the best only
    assert lines[1].split(",")[1] == records[0]["caption"]
    sampled = _job(["caption", "--checkpoint", "x", "a.png", "--sample", "--top-k", "5", "--top-p", "0.9"])
    assert (sampled.sample, sampled.top_k, sampled.top_p) == (True, 5, 0.9)
    with pytest.raises(CaptionerError, match=r"decode.top_p must be in \(0, 1\]"):
        caption.main(_job(argv[:-2] + ["--sample", "--top-p", "1.5"]))


def test_evaluate_takes_the_generation_options_but_no_n_best():
    job = _job(["evaluate", "--checkpoint", "x", "--sample", "--top-p", "0.8", "--top-k", "4", "--max-len", "9",
                "--suppress-unk"])
    assert (job.sample, job.top_p, job.top_k, job.max_len, job.suppress_unk) == (True, 0.8, 4, 9, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--checkpoint", "x", "--num-return-sequences", "3"])


# ---------------------------------------------------------------- serve (no HTTP: the model behind it)

def test_serve_request_fields_set_the_batch_settings(checkpoint, images):
    served = ServedModel(str(checkpoint), "cpu")
    limits = Limits()
    settings = served.request_settings({"num_beams": "4", "max_len": "8", "num_return_sequences": "3"}, limits)
    assert (settings.beam_size, settings.max_len, settings.num_return_sequences) == (4, 8, 3)
    for fields, words in [({"top_p": "x"}, "config key 'decode.top_p' expects float"),
                          ({"beam_size": "50"}, "beam_size 50 is above this server's limit of 16"),
                          ({"max_len": "1000"}, "max_len 1000 is above"), ({"colour": "red"}, "unknown generation")]:
        with pytest.raises(CaptionerError, match=re.escape(words)):
            served.request_settings(fields, limits)
    tensors = [torch.from_numpy(i).permute(2, 0, 1).contiguous() for i in images[:4]]
    tensors = [torch.nn.functional.interpolate(t[None].float(), size=served.predictor.image_size)[0].to(torch.uint8)
               for t in tensors]
    mixed = served.predict([(tensors[0], (64, 64)), (tensors[1], (64, 64), settings), (tensors[2], (64, 64))])
    assert [r["batch_size"] for r in mixed] == [2, 1, 2]  # two settings: two batches
    assert len(mixed[1]["sequences"]) == 3 and len(mixed[0]["sequences"]) == 1
    alone = served.predict([(tensors[1], (64, 64), settings)])
    assert alone[0]["sequences"] == mixed[1]["sequences"]
    assert served.info["decoding"]["num_return_sequences"] == 1 and served.info["decoding"]["top_p"] == 1.0



def test_the_decoding_field_names_every_setting_that_changes_a_record():
    """Resuming is refused when a setting would change the records: each sampling option is named when on,
    and what was off before these options existed reads as before (old outputs still resume)."""
    from captioner.engine.infer.predict import DecodeSettings
    name = caption._decoding
    assert name(DecodeSettings(3, 30)) == "beam 3, max_len 30, length_penalty 0"
    assert name(DecodeSettings(3, 30, sample=True)) == "sampled at temperature 1, max_len 30"
    sampled = {name(DecodeSettings(1, 30, sample=True, **extra)) for extra in
               ({}, {"top_k": 5}, {"top_p": 0.9}, {"suppress_unk": True}, {"num_return_sequences": 3})}
    assert len(sampled) == 5
    assert name(DecodeSettings(3, 30, num_return_sequences=3)).endswith("num_return_sequences 3")
