"""Per-photo scores and bootstrap intervals for scripts/bench_quality.py's k-fold protocol.

A caption's CIDEr-D, BLEU-4 and METEOR are coco-caption's per-image scores (the numbers whose mean, or for
BLEU corpus statistic, `captioner evaluate` reports), computed on one fold's test photos at a time (CIDEr-D's
document frequencies come from that fold's references, as coco-caption does for the set it scores). Intervals are
95% percentile bootstraps over photos: every photo is a test photo exactly once, so the pooled photos of all
folds are resampled, and a resample's statistic averages each resampled photo over the seeds.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from captioner.metrics import coco
from captioner.metrics.coco import _meteor, fallback_tokenize, ptb_tokenize
from captioner.text import normalize_text

BOOTSTRAP = 2000  # resamples: the interval's ends move by < 0.002 CIDEr-D between seeds of the resampling
PER_PHOTO = ("cider", "bleu4", "meteor")


def photo_scores(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """{photo: caption}, {photo: [captions]} -> {metric: {photo: score}} for PER_PHOTO (METEOR left out without
    java), tokenized as coco-caption tokenizes."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    names = sorted(hypotheses)
    gts = {n: [normalize_text(r) for r in references[n]] for n in names}
    res = {n: [normalize_text(hypotheses[n])] for n in names}
    java = coco.java_available()  # the one check captioner.metrics.coco makes too: both switch together
    tokenize = ptb_tokenize if java else fallback_tokenize
    gts, res = tokenize(gts), tokenize(res)
    keys = list(gts)  # pycocoevalcap returns per-image scores in the order of gts' keys
    out = {"cider": dict(zip(keys, Cider().compute_score(gts, res)[1].tolist())),
           "bleu4": dict(zip(keys, Bleu(4).compute_score(gts, res, verbose=0)[1][3]))}
    if java:
        out["meteor"] = dict(zip(keys, _meteor().compute_score(gts, res)[1]))
    return {metric: {n: float(s) for n, s in scores.items()} for metric, scores in out.items()}


def _resamples(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, count, size=(BOOTSTRAP, count))


def _interval(values: np.ndarray) -> list[float]:
    return [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)]


def mean_interval(per_seed: list[dict[str, float]]) -> dict:
    """[{photo: score} per seed] (each over all photos) -> {"mean", "ci95"}: the mean over photos and seeds,
    bootstrapped over photos."""
    photos = sorted(per_seed[0])
    table = np.array([[run[p] for p in photos] for run in per_seed]).mean(axis=0)  # (photos,) seed means
    boot = table[_resamples(len(photos))].mean(axis=1)
    return {"mean": round(float(table.mean()), 4), "ci95": _interval(boot)}


def paired_gain(start: list[dict[str, float]], end: list[dict[str, float]]) -> dict:
    """Relative gain of end's mean score over start's, paired by photo and seed: {"mean", "ci95"} (a fraction,
    e.g. 0.05 = +5%), the interval bootstrapped over photos."""
    photos = sorted(start[0])
    a = np.array([[run[p] for p in photos] for run in start]).mean(axis=0)
    b = np.array([[run[p] for p in photos] for run in end]).mean(axis=0)
    index = _resamples(len(photos))
    boot = b[index].sum(axis=1) / np.maximum(a[index].sum(axis=1), 1e-12) - 1
    return {"mean": round(float(b.sum() / max(a.sum(), 1e-12) - 1), 4), "ci95": _interval(boot)}


def distinct_per_100(captions: dict[str, str]) -> float:
    """Distinct captions per 100 photos of one run's test photos (captioner.metrics.diversity's definition)."""
    return round(100 * len({normalize_text(c) for c in captions.values()}) / max(len(captions), 1), 1)


def distinct_shares(captions: dict[str, str]) -> dict[str, float]:
    """{photo: caption} of one run -> {photo: 100 / how many of the run's photos got that caption}: their mean is
    the run's distinct captions per 100 photos exactly, and as a per-photo value it bootstraps like a score (a
    resample that draws a photo twice does not make its caption a repeat)."""
    texts = {p: normalize_text(c) for p, c in captions.items()}
    counts: dict[str, int] = {}
    for text in texts.values():
        counts[text] = counts.get(text, 0) + 1
    return {p: 100.0 / counts[t] for p, t in texts.items()}


def _photos(run: dict, stage: str, split: str) -> dict[str, dict]:
    return json.loads((Path(run[stage]["checkpoint"]).parent / f"photos_{split}.json").read_text())


def kfold_summary(runs: list[dict], stages: list[str]) -> dict:
    """What --folds K reports over all folds' runs ({"fold", "seed", stage: run_stage's result}): per stage the
    pooled test photos' mean and 95% interval of each per-photo score and of distinct captions per 100, the val
    numbers variants are chosen on (mean over runs and the lowest run), each run's own; SCST's paired gain."""
    seeds = sorted({r["seed"] for r in runs})
    folds = {r["fold"] for r in runs}
    out: dict = {"folds": len(folds), "seeds": seeds, "bootstrap": f"{BOOTSTRAP} resamples of the photos, "
                 "percentile interval"}
    per_seed: dict = {}
    for stage in stages:
        tables: dict = {seed: {} for seed in seeds}
        for run in runs:
            photos = _photos(run, stage, "test")
            shares = distinct_shares({n: p["caption"] for n, p in photos.items()})
            tables[run["seed"]].update({n: {**p, "distinct_per_100": shares[n]} for n, p in photos.items()})
        per_seed[stage] = tables
        metrics = [m for m in (*PER_PHOTO, "distinct_per_100")
                   if all(m in p for t in tables.values() for p in t.values())]
        test = {m: mean_interval([{n: p[m] for n, p in tables[s].items()} for s in seeds]) for m in metrics}
        test["distinct_per_100"]["min"] = min(r[stage]["test"]["distinct_per_100"] for r in runs)
        test["photos"] = len(tables[seeds[0]])
        val = {k: {"mean": round(statistics.fmean(r[stage]["val"][k] for r in runs), 4),
                   "min": min(r[stage]["val"][k] for r in runs)} for k in ("cider", "distinct_per_100")}
        out[stage] = {"test": test, "val": val,
                      "runs": [{"fold": r["fold"], "seed": r["seed"], "epoch": r[stage]["epoch"],
                                "train_s": r[stage]["train_s"],
                                **{f"{split}_{k}": r[stage][split][k] for split in ("val", "test")
                                   for k in ("cider", "distinct_per_100")}} for r in runs]}
    if "scst" in stages:
        pairs = {split: [(r["xe"][split]["cider"], r["scst"][split]["cider"]) for r in runs]
                 for split in ("val", "test")}
        # A start that scores 0 (tiny data) has no relative gain: None, but it still counts as losing or not.
        gains = {split: [round(end / start - 1, 4) if start > 0 else None for start, end in pairs[split]]
                 for split in pairs}
        out["scst"]["gain_over_xe"] = {
            "test": paired_gain(*[[{n: p["cider"] for n, p in per_seed[s][seed].items()} for seed in seeds]
                                  for s in ("xe", "scst")]),
            "per_run_test": gains["test"], "per_run_val": gains["val"],
            **{f"runs_losing_{split}": sum(end < start for start, end in pairs[split]) for split in pairs},
            "kept_start": sum(r["scst"]["epoch"] == 0 for r in runs)}
    return out
