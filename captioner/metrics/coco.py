"""Caption metrics, on a 0-1 scale (CIDEr-D on its own 0-10 scale).

    scores = caption_metrics({1: "a dog runs"}, {1: ["A dog is running.", "a brown dog runs"]})
    scores["bleu4"], scores["meteor"], scores["rouge_l"], scores["cider"], scores["nltk_bleu4"]

coco-caption's numbers (bleu1..4, meteor, rouge_l, cider) are computed exactly as pycocoevalcap's
COCOEvalCap.evaluate computes them: its PTBTokenizer (Stanford CoreNLP 3.4.1, lower-cased, punctuation
removed) over the references and over the hypotheses, then its Bleu(4), Meteor, Rouge and Cider (which is
CIDEr-D) scorers on the tokenized text. SPICE is skipped: it needs a Stanford CoreNLP models download.
The tokenizer and METEOR run on java; without java, METEOR is skipped and a Python approximation of the
tokenizer is used, both with a one-line notice and a note in the returned "skipped"/"tokenizer" fields.

Training's per-epoch validation logs the same coco-caption numbers (validation_scores: all but METEOR).
nltk corpus BLEU (corpus_bleu_scores, on captioner's own tokenizer) is reported beside the official numbers
as nltk_bleu1..4; it is close to, but not the same as, coco-caption's BLEU.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version

from captioner.errors import CaptionerError, EnvironmentFailure
from captioner.text import normalize_text, tokenize

log = logging.getLogger("captioner")

COCO_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
SPICE_SKIPPED = "needs a Stanford CoreNLP models download (pycocoevalcap's get_stanford_models)"
_noticed: set[str] = set()


def _notice_once(message: str) -> None:
    """Log an informational line once per process."""
    if message not in _noticed:
        _noticed.add(message)
        log.info(message)


def corpus_bleu_scores(hypotheses: dict, references: dict) -> dict[str, float]:
    """hypotheses {image_id: caption}, references {image_id: [captions]} -> {"bleu1".."bleu4"} on ids in hypotheses."""
    # Imported here: nltk pulls in scipy.stats, seconds at every start of a command that never scores.
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    ids = [i for i in hypotheses if references.get(i)]
    if not ids:
        return {f"bleu{n}": 0.0 for n in range(1, 5)}
    hyps = [tokenize(hypotheses[i]) for i in ids]
    refs = [[tokenize(r) for r in references[i]] for i in ids]
    smooth = SmoothingFunction().method1  # no zero score (and no warning) when an n-gram order has no match
    weights = {1: (1.0,), 2: (0.5, 0.5), 3: (1 / 3,) * 3, 4: (0.25,) * 4}
    return {f"bleu{n}": float(corpus_bleu(refs, hyps, weights=w, smoothing_function=smooth))
            for n, w in weights.items()}


def java_available() -> bool:
    return shutil.which("java") is not None


def ptb_tokenize(captions: dict) -> dict:
    """{id: [caption, ...]} -> {id: [tokenized caption, ...]}, as pycocoevalcap's PTBTokenizer.tokenize does
    (same jar, flags and punctuation removal), but with its temporary file in the system temp folder rather
    than inside site-packages (read-only in many installs) and a check that no line went astray."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    keys = [k for k, caps in captions.items() for _ in caps]
    # One caption per line: a line break inside one (coco-caption replaces only '\n') would shift every later
    # line onto the wrong image, so every separator and control character becomes a space first. Blank
    # captions tokenize to "" without java (it drops a blank last line, which would look like a lost line).
    sentences = [normalize_text(c) for caps in captions.values() for c in caps]
    asked = [j for j, sentence in enumerate(sentences) if sentence.strip()]
    lines = _run_ptb_tokenizer(jar, [sentences[j] for j in asked]) if asked else []
    tokens = [""] * len(sentences)
    for j, line in zip(asked, lines):
        tokens[j] = " ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS)
    tokenized = {k: [] for k in captions}
    for k, line in zip(keys, tokens):
        tokenized[k].append(line)
    return tokenized


def _run_ptb_tokenizer(jar: str, sentences: list[str]) -> list[str]:
    """One output line per sentence (none blank, none holding a line break), checked line for line: a count that
    differs is an error, never a shift of every later caption onto another image's references."""
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write("".join(sentence + "\n" for sentence in sentences).encode("utf-8"))
    try:
        done = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", "-encoding", "utf-8", f.name], capture_output=True)
    finally:
        os.remove(f.name)
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise EnvironmentFailure(f"the PTB tokenizer (java) failed on {len(sentences)} captions: "
                             f"{reason[-1] if reason else f'exit status {done.returncode}'}")
    output = done.stdout.decode("utf-8", errors="replace")
    lines = (output[:-1] if output.endswith("\n") else output).split("\n")
    if len(lines) != len(sentences):
        raise EnvironmentFailure(f"the PTB tokenizer (java) gave {len(lines)} lines for {len(sentences)} captions, so "
                             f"its output cannot be matched to the captions line for line; nothing was scored")
    return lines


# Without java: an approximation of PTBTokenizer -lowerCase followed by coco-caption's punctuation removal
# ("can't" -> "ca n't", "dog's" -> "dog 's", "(" -> "-lrb-", which coco-caption keeps; quotes and . , ; dropped).
_PTB_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|(?:[^\W\d_]\.){2,}|\w+(?:[-./]\w+)*|[^\s\w]")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_DROPPED = {".", ",", "?", "!", ":", ";", "-", "'", "`", '"'}


def fallback_tokenize(captions: dict) -> dict:
    return {k: [" ".join(_BRACKETS.get(w, w) for w in _PTB_TOKEN.findall(normalize_text(c).lower())
                         if w not in _DROPPED) for c in caps] for k, caps in captions.items()}


@functools.lru_cache(maxsize=1)
def _meteor():
    """One METEOR java process per Python process: starting it (and its paraphrase table) takes seconds."""
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def release_meteor() -> None:
    """End the METEOR java process (about 1 GB) until the next score needs it: for a process that scores, then
    trains for a long time (scripts/bench_quality.py between stages)."""
    if _meteor.cache_info().currsize:
        meteor = _meteor()
        _meteor.cache_clear()
        meteor.__del__()  # pycocoevalcap's only close; running it again at garbage collection does nothing


def _meteor_score(gts: dict, res: dict) -> tuple[float | None, str]:
    """(score, "") or (None, why it was skipped)."""
    try:
        return float(_meteor().compute_score(gts, res)[0]), ""
    except BaseException as e:  # java died (no 2 GB heap), answered garbage, or Ctrl-C / SIGTERM arrived
        broken = _meteor()
        _meteor.cache_clear()
        if broken.lock.locked():  # compute_score raised while holding it: Meteor.__del__ would wait forever
            broken.lock.release()
        if not isinstance(e, (OSError, ValueError)):
            broken.meteor_p.kill()  # mid-conversation: its answers can no longer be matched to questions
            raise
        return None, f"METEOR failed ({type(e).__name__}: {str(e)[:120]})"


def coco_caption_scores(hypotheses: dict, references: dict, meteor: bool = True) -> dict:
    """coco-caption's metrics of hypotheses {image_id: caption} against references {image_id: [captions]},
    on the images in hypotheses (each needs at least one reference).

    Returns {"bleu1".."bleu4", "meteor", "rouge_l", "cider", "spice"} (None when skipped), plus "tokenizer" and
    "skipped" ({metric: reason}) saying how they were computed.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not hypotheses:
        raise CaptionerError("no captions to score")
    unreferenced = [i for i in hypotheses if not references.get(i)]
    if unreferenced:
        raise CaptionerError(f"{len(unreferenced)} captioned images have no reference captions "
                             f"(first: {unreferenced[:5]})")
    gts = {i: [normalize_text(r) for r in references[i]] for i in hypotheses}  # one line each, whatever they hold
    res = {i: [normalize_text(hypotheses[i])] for i in hypotheses}
    skipped = {"spice": SPICE_SKIPPED}
    _notice_once(f"SPICE skipped: it {SPICE_SKIPPED}")  # not again at every validation of a training run
    if java_available():
        # Two tokenizer runs, references then hypotheses, as COCOEvalCap.evaluate does.
        gts, res, tokenizer = ptb_tokenize(gts), ptb_tokenize(res), "PTBTokenizer (Stanford CoreNLP 3.4.1)"
    else:
        gts, res = fallback_tokenize(gts), fallback_tokenize(res)
        tokenizer = "python approximation of PTBTokenizer (java not found)"
        log.warning("java not found: METEOR skipped and the PTB tokenizer approximated in Python; "
                    "install java (e.g. apt install default-jre) for the official numbers")
        skipped["meteor"] = "java not found"
    scores = dict(zip(("bleu1", "bleu2", "bleu3", "bleu4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    scores["meteor"] = None
    if meteor and "meteor" not in skipped:
        scores["meteor"], why = _meteor_score(gts, res)
        if why:
            log.warning("%s; the other metrics are unaffected", why)
            skipped["meteor"] = why
    elif not meteor:
        skipped["meteor"] = "not asked for"
    scores["rouge_l"] = Rouge().compute_score(gts, res)[0]
    scores["cider"] = Cider().compute_score(gts, res)[0]
    scores = {k: (float(v) if v is not None else None) for k, v in scores.items()}
    return {**scores, "spice": None, "tokenizer": tokenizer, "skipped": skipped}


VALIDATION_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")


def validation_scores(hypotheses: dict, references: dict) -> dict[str, float]:
    """What training's validation logs: coco-caption's BLEU-1..4, ROUGE-L and CIDEr-D, computed exactly as
    evaluate computes them (coco_caption_scores) but without METEOR, whose java process is too slow per epoch.
    No hypotheses (no val images): every score 0."""
    if not hypotheses:
        return {k: 0.0 for k in VALIDATION_KEYS}
    scores = coco_caption_scores(hypotheses, references, meteor=False)
    return {k: scores[k] for k in VALIDATION_KEYS}


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def caption_metrics(hypotheses: dict, references: dict, meteor: bool = True) -> dict:
    """Everything evaluate and score report: coco-caption's metrics, nltk BLEU beside them (nltk_bleu1..4),
    and how they were computed. hypotheses {image_id: caption}, references {image_id: [captions]}."""
    coco = coco_caption_scores(hypotheses, references, meteor)
    nltk = {f"nltk_{k}": v for k, v in corpus_bleu_scores(hypotheses, references).items()}
    return {**{k: coco[k] for k in (*COCO_KEYS, "spice")}, **nltk, "images": len(hypotheses),
            "scale": "0-1 (CIDEr-D: 0-10)",
            "scorer": f"coco-caption (pycocoevalcap {_package_version('pycocoevalcap')}); "
                      f"nltk_bleu*: nltk {_package_version('nltk')} corpus_bleu on captioner's tokenizer",
            "tokenizer": coco["tokenizer"], "skipped": coco["skipped"]}
