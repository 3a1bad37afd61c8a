"""Text normalised before scoring, in one function (text.normalize_text): line and paragraph separators and
control characters in a caption or a reference never shift the PTB tokenizer's lines, never change a score,
the vocabulary or an SCST reward; the tokenizer's output is checked line for line."""
from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess

import pytest
import torch

from captioner.cli import main
from captioner.data.records import ImageRecord
from captioner.engine.train.scst import Rewarder
from captioner.errors import CaptionerError
from captioner.metrics import coco
from captioner.metrics.cider import cider_d
from captioner.metrics.coco import caption_metrics, java_available, ptb_tokenize
from captioner.text import Vocabulary, normalize_text, tokenize

SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\r", "\n", "\r\n", "\t", "\x00", "\x1c", "\x1e", "\x7f",
              "\x9b", "\ud800"]


def test_normalize_text_turns_every_separator_and_control_into_a_space():
    for sep in SEPARATORS:
        assert normalize_text(f"a{sep}dog") == "a" + " " * len(sep) + "dog"
        assert len(f"a{normalize_text(sep)}dog".splitlines()) == 1
    text = "A café, 中文 — “quoted” ok"
    assert normalize_text(text) == text  # text is left alone


def test_tokenize_and_the_vocabulary_read_separators_as_spaces():
    for sep in SEPARATORS:
        assert tokenize(f"A red{sep}square.") == ["a", "red", "square"]
        assert tokenize(f"Un carré{sep}rouge") == ["un", "carré", "rouge"]
    assert Vocabulary.build(["a red\u2028square", "a\x0cblue circle"]) == Vocabulary.build(["a red square",
                                                                                           "a blue circle"])


def _captions(n: int = 200, seed: int = 0):
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow", "purple"], ["circle", "square", "triangle", "star"]
    references, hypotheses = {}, {}
    for i in range(n):
        c, s, c2 = rng.choice(colours), rng.choice(shapes), rng.choice(colours)
        references[i] = [f"a {c} {s} on a table", f"there is a {c} {s}", f"a {c} {s} next to a {c2} one"]
        hypotheses[i] = f"a {c} {s} on a {rng.choice(['table', 'floor', 'chair'])}"
    return hypotheses, references


def test_separators_change_no_score(monkeypatch):
    monkeypatch.setattr(coco, "java_available", lambda: False)  # the Python tokenizer: fast; java below
    hypotheses, references = _captions(60)
    clean = caption_metrics(hypotheses, references, meteor=False)
    for k, sep in enumerate(SEPARATORS):  # one in a caption, another in a reference, all through one scoring
        hypotheses[2 * k] = hypotheses[2 * k].replace(" ", sep, 1)
        references[2 * k + 1][0] = references[2 * k + 1][0].replace(" ", sep, 1)
    dirty = caption_metrics(hypotheses, references, meteor=False)
    for key in ("bleu4", "rouge_l", "cider", "nltk_bleu4"):
        assert dirty[key] == pytest.approx(clean[key]), key


def test_cider_d_and_scst_rewards_ignore_separators():
    hypotheses, references = _captions(20)
    clean = cider_d(hypotheses, references)[0]
    hypotheses[3] = hypotheses[3].replace(" ", "\u2028")
    assert cider_d(hypotheses, references)[0] == pytest.approx(clean)
    vocab = Vocabulary.build([c for refs in references.values() for c in refs])
    records = [ImageRecord(i, f"{i}.jpg", refs) for i, refs in references.items()]
    broken = [ImageRecord(i, f"{i}.jpg", [r.replace(" ", "\x0c") for r in refs]) for i, refs in references.items()]
    encoded = [vocab.encode(hypotheses[i], 16)[1:] for i in references]  # words, <end>
    tokens = torch.zeros(len(encoded), 18, dtype=torch.long)
    for row, ids in enumerate(encoded):
        tokens[row, :len(ids)] = torch.tensor(ids)
    images = torch.arange(len(encoded))
    assert torch.equal(Rewarder(records, vocab, 16)(tokens, images), Rewarder(broken, vocab, 16)(tokens, images))


def _fake_java(stdout: bytes):
    def run(*args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout=stdout, stderr=b"")
    return run


def test_a_tokenizer_line_count_that_differs_is_an_error_never_a_shift(monkeypatch):
    captions = {1: ["a dog"], 2: ["a cat"], 3: ["a bus"]}
    monkeypatch.setattr(subprocess, "run", _fake_java(b"a dog\na\ncat\na bus\n"))  # one line too many
    with pytest.raises(CaptionerError, match="gave 4 lines for 3 captions"):
        ptb_tokenize(captions)
    monkeypatch.setattr(subprocess, "run", _fake_java(b"a dog\na cat\n"))  # one too few
    with pytest.raises(CaptionerError, match="gave 2 lines for 3 captions"):
        ptb_tokenize(captions)
    monkeypatch.setattr(subprocess, "run", _fake_java(b"a dog\na cat\na bus\n"))
    assert ptb_tokenize(captions) == {1: ["a dog"], 2: ["a cat"], 3: ["a bus"]}
    monkeypatch.setattr(subprocess, "run", _fake_java(b"a dog\n"))  # blank captions never reach java
    assert ptb_tokenize({1: ["a dog"], 2: ["  "], 3: [""]}) == {1: ["a dog"], 2: [""], 3: [""]}


@pytest.mark.slow
@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs java")
def test_the_issues_example_one_u2028_among_200_captions_through_score(tmp_path):
    """Before: BLEU-4 1.000 -> 0.123 (every caption after the third scored against the next image's references),
    exit 0. Now: the same score with or without the invisible character."""
    hypotheses, references = _captions()
    annotations = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in references],
                   "annotations": [{"id": 3 * i + k, "image_id": i, "caption": c}
                                   for i, refs in references.items() for k, c in enumerate(refs)]}
    (tmp_path / "refs.json").write_text(json.dumps(annotations))
    scores = {}
    for name, sep in (("clean", " "), ("separator", "\u2028")):
        results = [{"image_id": i, "caption": c.replace(" ", sep, 1) if i == 3 else c} for i, c in hypotheses.items()]
        (tmp_path / f"{name}.json").write_text(json.dumps(results, ensure_ascii=False))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["score", "--no-meteor", "--results", str(tmp_path / f"{name}.json"), "--annotations",
                         str(tmp_path / "refs.json")]) == 0
        scores[name] = json.loads(out.getvalue().strip().splitlines()[-1])
    assert scores["clean"]["tokenizer"].startswith("PTBTokenizer")
    for key in ("bleu1", "bleu4", "rouge_l", "cider"):
        assert scores["separator"][key] == pytest.approx(scores["clean"][key]), key
    assert scores["clean"]["bleu4"] > 0.5
