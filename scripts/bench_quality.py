#!/usr/bin/env python
"""The real-photo quality benchmark: the whole recipe (cross-entropy, then self-critical training from the
checkpoint cross-entropy selected) on Flickr8k-705 with pretrained MobileNetV2 features, K folds x N seeds;
prints JSON.

    python scripts/bench_quality.py --folds 5                        # 5 folds x 3 seeds, both stages
    python scripts/bench_quality.py --folds 5 --only-folds 0,1,2 --threads 1 &   # spread folds over processes,
    python scripts/bench_quality.py --folds 5 --only-folds 3,4 --threads 1       # then summarise them all:
    python scripts/bench_quality.py --folds 5 --reuse                # (rescoring only, no training)
    python scripts/bench_quality.py --seeds 1 --stages xe model.dropout=0.5   # key=value: both stages' configs
    python scripts/bench_quality.py --seeds 1 --scst train.scst_samples=10    # the SCST stage only
    python scripts/bench_quality.py --tag t --reuse decode.beam_size=5  # rescore tag t's runs, no training
    python scripts/bench_quality.py --folds 0                        # the earlier fixed split (last 100 test)

Protocol (--folds K, default 5): the 705 photos in a fixed shuffled order are dealt into K folds; in fold k the
k-th fold's photos (141) are test, 60 photos drawn from the others val, the rest (504) train; every photo is a
test photo exactly once. Stage xe trains configs/bench_quality.yaml; stage scst trains
configs/bench_quality_scst.yaml (the same model, data and decoding) from xe's best.pt (--init-from). Each stage's
best.pt is the epoch with the highest val CIDEr-D (train.select_metric) of the captions the stage is scored with
(train.val_beam_size); SCST's start counts as its epoch 0 (train.validate_init). That checkpoint is scored on its
fold's val and test photos: coco-caption's BLEU-1/4, METEOR, ROUGE-L and CIDEr-D, distinct captions per 100
photos, words used and mean length, and each photo's own CIDEr-D, BLEU-4 and METEOR (RUN/photos_SPLIT.json).
"kfold" in the JSON pools the folds' test photos: per stage the mean and a 95% bootstrap interval over photos of
each score and of distinct captions per 100 (with the lowest run's), val means (what variants are chosen on),
each run's numbers, and SCST's CIDEr-D gain over its start, paired by photo and seed, with the runs that lose.
Choose variants on val; test is for reporting.

Weights and splits: scripts/quality_data.py; intervals: scripts/quality_stats.py. Features are extracted once
into CACHE/features-*/ and every run trains from them (start parallel processes after the first has extracted
them: they would race on the one feature index).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))  # run from a checkout without installing
sys.path.insert(0, str(SCRIPTS))

import torch  # noqa: E402
import yaml  # noqa: E402

from captioner.config import (Config, from_saved_dict, inherit_preprocess, load_config,  # noqa: E402
                              require_min, to_dict)
from captioner.engine.train.rundir import config_differences  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.data.datasets import load_records  # noqa: E402
from captioner.data.records import by_split  # noqa: E402
from captioner.files import write_json, write_text  # noqa: E402
from captioner.jobs import evaluate, extract, train  # noqa: E402
from captioner.metrics.coco import release_meteor  # noqa: E402
import quality_data  # noqa: E402
import quality_stats  # noqa: E402

log = logging.getLogger("captioner")

REPO = SCRIPTS.parent
CONFIGS = {"xe": REPO / "configs" / "bench_quality.yaml", "scst": REPO / "configs" / "bench_quality_scst.yaml"}
STAGES = ("xe", "scst")
REPORTED = ("bleu1", "bleu4", "meteor", "rouge_l", "cider", "distinct_per_100", "vocab_used", "mean_length")
# Keys that change only how a trained best.pt is scored (beam search), never what training did: --reuse ignores them.
SCORING_ONLY = ("decode.beam_size", "decode.length_penalty", "decode.block_ngram", "decode.groups",
                "decode.diversity", "decode.batch_size", "decode.sample", "decode.temperature", "decode.suppress_unk")


def default_data() -> Path:
    """../shared/data/flickr8k-705 beside the checkout (or beside the folder of a git worktree's checkout)."""
    for base in (REPO.parent, REPO.parent.parent):
        if (base / "shared" / "data" / "flickr8k-705" / "captions.txt").is_file():
            return base / "shared" / "data" / "flickr8k-705"
    return REPO.parent / "shared" / "data" / "flickr8k-705"


def summary(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def selected_epoch(run_dir: Path) -> int | None:
    """The epoch best.pt holds: the last validation that improved (metrics.jsonl)."""
    best = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("improved"):
            best = record["epoch"]
    return best


def scores(metrics: dict) -> dict:
    """evaluate's metrics -> the benchmark's reported numbers (distinct captions per 100 photos)."""
    out = {k: metrics[k] for k in REPORTED if metrics.get(k) is not None}
    out["distinct_per_100"] = round(100 * metrics["distinct_fraction"], 1)
    return out


def finished_run(run_dir: Path, cfg: Config) -> float | None:
    """Training seconds of the finished run in run_dir when it trained exactly cfg (SCORING_ONLY and compute.*
    keys aside), else None."""
    try:
        saved = to_dict(from_saved_dict(yaml.safe_load((run_dir / "config.yaml").read_text())))
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError, yaml.YAMLError, CaptionerError):
        return None
    epochs = [e for e in epochs if "epoch_s" in e]
    # a stage trained from a checkpoint records the preprocessing it resolved: unset here matches it
    differences = [d for d in config_differences(saved, inherit_preprocess(to_dict(cfg), saved))
                   if not d.startswith(("compute.", *(f"{k}:" for k in SCORING_ONLY)))]
    if differences or not (run_dir / "best.pt").is_file() or not epochs or epochs[-1]["epoch"] < cfg.train.epochs:
        return None
    return sum(e["epoch_s"] for e in epochs)


class StoppedBenchmark(CaptionerError):
    """A signal ended a stage's training early: its best.pt is not the stage's, so nothing after it runs."""


def run_stage(cfg: Config, run_dir: Path, device: str | None, init_from: str | None, splits: list[str],
              reuse: bool = False) -> dict:
    """Train one stage into run_dir (reuse: keep a finished run of the same config there), score its best.pt on
    splits with cfg's decode.* -> {"checkpoint", "epoch", "train_s", "score_s", "reused", split: scores}; each
    split's captions and per-photo scores go to run_dir/photos_SPLIT.json ({photo: {"caption", metric...}})."""
    reused = finished_run(run_dir, cfg) if reuse else None
    if reused is None:
        tick = time.perf_counter()
        trained = train.main(train.TrainJob(cfg, run_dir, device, overwrite=True, init_from=init_from))
        train_s = time.perf_counter() - tick
        if trained["stopped"] not in (None, "early stopping"):  # Ctrl-C or kill stops the benchmark, not one stage
            raise StoppedBenchmark(f"{trained['stopped']} stopped training in {run_dir}; rerun with --reuse to "
                                   f"keep the stages already done")
    best = str(run_dir / "best.pt")
    result = {"checkpoint": best, "epoch": selected_epoch(run_dir), "reused": reused is not None,
              "train_s": round(reused if reused is not None else train_s, 1)}  # reused: its epochs' seconds
    tick = time.perf_counter()
    decoding = [f"decode.{k}={v}" for k, v in to_dict(cfg)["decode"].items()]  # this config's, even when reused
    records = load_records(cfg.dataset)
    for split in splits:
        metrics = evaluate.main(evaluate.EvaluateJob(best, split, out_dir=str(run_dir), overrides=decoding,
                                                     device=device))
        result[split] = scores(metrics)
        photos = {r.image_id: r for r in by_split(records, split)}
        captions = {Path(photos[row["image_id"]].path).name: row["caption"]
                    for row in json.loads(Path(metrics["results_file"]).read_text())}
        references = {Path(r.path).name: r.captions for r in photos.values()}
        per_photo = quality_stats.photo_scores(captions, references)
        write_json(run_dir / f"photos_{split}.json",
                   {name: {"caption": caption, **{m: per_photo[m][name] for m in per_photo}}
                    for name, caption in sorted(captions.items())}, "per-photo scores", indent=None)
    release_meteor()  # its java process would hold ~1 GB through the next stage's training
    result["score_s"] = round(time.perf_counter() - tick, 1)
    return result


def stage_config(stage: str, base: list[str], overrides: list[str], stage_overrides: list[str]) -> Config:
    try:
        return load_config(CONFIGS[stage], [*base, *overrides, *stage_overrides])
    except CaptionerError as e:
        raise CaptionerError(f"stage {stage}: {e}") from None


def aggregate(runs: list[dict], stages: list[str], splits: list[str]) -> dict:
    """Mean and std over seeds of each stage's scores and seconds; SCST's CIDEr-D gain over its start."""
    out = {}
    for stage in stages:
        done = [r[stage] for r in runs]
        out[stage] = {split: {k: summary([d[split][k] for d in done])
                              for k in REPORTED if all(k in d[split] for d in done)} for split in splits}
        out[stage].update({k: summary([d[k] for d in done]) for k in ("train_s", "score_s")})
        out[stage]["epochs_selected"] = [d["epoch"] for d in done]
    if "xe" in stages and "scst" in stages:
        for split in splits:
            gains = [r["scst"][split]["cider"] / r["xe"][split]["cider"] - 1 for r in runs if r["xe"][split]["cider"]]
            out["scst"][split]["cider_gain_over_xe"] = summary(gains) if gains else None  # None: xe scored 0
    return out


def fold_plan(data: Path, cache: Path, folds: int, only: list[int] | None, test_images: int, val_images: int,
              min_train: int) -> list[tuple[str, dict[str, Path]]]:
    """[(name, {split: list file})]: k folds (folds >= 2; `only` picks some), or the earlier fixed split (0)."""
    if folds == 0:
        return [("fixed", quality_data.write_split_lists(data, cache, test_images, val_images, min_train))]
    require_min(("--folds", folds, 2))
    picked = only if only is not None else list(range(folds))
    bad = [f for f in picked if not 0 <= f < folds]
    if bad:
        raise CaptionerError(f"--only-folds: folds are 0..{folds - 1}, got {bad}")
    return [(f"fold{f}", quality_data.write_fold_lists(data, cache / f"folds{folds}" / f"fold{f}", folds, f,
                                                        val_images, min_train)) for f in picked]


def main(data: str | Path | None = None, cache: str | Path = "~/.cache/captioner/quality", seeds: int = 3,
         overrides: list[str] = (), scst_overrides: list[str] = (), stages: list[str] = STAGES,
         device: str | None = "cpu", tag: str = "", threads: int = 0, first_seed: int = 0,
         test_images: int = quality_data.TEST_IMAGES, val_images: int = quality_data.VAL_IMAGES,
         min_train: int = quality_data.MIN_TRAIN_IMAGES, reuse: bool = False, folds: int = 5,
         only_folds: list[int] | None = None) -> dict:
    """Returns the results JSON (see the module docstring)."""
    start = time.perf_counter()
    if threads:  # on a shared, loaded CPU one thread per process is often faster than oversubscribed cores
        torch.set_num_threads(threads)
    if list(stages) not in (["xe"], ["xe", "scst"]):  # SCST starts from the cross-entropy run's best.pt
        raise CaptionerError(f"--stages must be xe or xe,scst, got {','.join(stages)}")
    require_min(("--seeds", seeds, 1), ("--first-seed", first_seed, 0), ("--folds", folds, 0))
    data, cache = Path(data or default_data()).expanduser().resolve(), Path(cache).expanduser().resolve()
    if not (data / "captions.txt").is_file():
        raise CaptionerError(f"{data} holds no captions.txt (Kaggle Flickr8k layout: captions.txt + images/); "
                             f"pass --data")
    paths = [f"dataset.annotations={data / 'captions.txt'}", f"dataset.images={data / 'images'}",
             f"dataset.root={data}"]
    xe_cfg = load_config(CONFIGS["xe"], [*paths, *overrides])  # bad keys and values fail before any work
    for s in stages:
        stage_config(s, paths, list(overrides), list(scst_overrides) if s == "scst" else [])
    cache.mkdir(parents=True, exist_ok=True)
    plan = fold_plan(data, cache, folds, only_folds, test_images, val_images, min_train)
    weights = xe_cfg.encoder.weights or str(quality_data.mobilenet_v2_weights(cache, xe_cfg.encoder.arch))
    weights_tag = Path(weights).stem if weights.endswith(".pth") else weights
    arch = xe_cfg.encoder.arch.replace("/", "_")  # timm/NAME: one folder, not two
    cache_dir = str(cache / f"features-{arch}-{xe_cfg.encoder.layer}-{xe_cfg.encoder.image_size}-"
                            f"{weights_tag}")
    splits, runs, extracted = ["val", "test"], [], None
    for fold, lists in plan:
        base = [*paths, *(f"dataset.{s}_list={p}" for s, p in lists.items())]
        configs = {s: stage_config(s, base, list(overrides), list(scst_overrides) if s == "scst" else [])
                   for s in stages}
        if "scst" in configs and to_dict(configs["scst"])["model"] != to_dict(configs["xe"])["model"]:
            raise CaptionerError(f"{CONFIGS['scst'].name} and {CONFIGS['xe'].name} must describe the same model: "
                                 f"set model.* keys on both (as positional key=value), not with --scst")
        for cfg in configs.values():
            cfg.encoder.weights, cfg.cache.dir = cfg.encoder.weights or weights, cache_dir
        if extracted is None:  # every fold's train + val + test is every photo: one extraction serves all folds
            extracted = extract_features(configs["xe"], device)
        for seed in range(first_seed, first_seed + seeds):
            run = {"fold": fold, "seed": seed}
            folder = cache / "runs" / (tag or "default") / ("" if fold == "fixed" else f"folds{folds}") / fold / \
                f"seed{seed}"
            for stage in stages:
                configs[stage].train.seed = seed
                init = run["xe"]["checkpoint"] if stage == "scst" else None
                # a stage trained again gives the next one another start: that one is trained again too
                again = reuse and all(run[s]["reused"] for s in stages[:stages.index(stage)])
                run[stage] = run_stage(configs[stage], folder / stage, device, init, splits, again)
                log.info("%s seed %d %s: %s", fold, seed, stage, run[stage])
            runs.append(run)
    results = {"benchmark": "flickr8k-705 quality", "data": str(data),
               "protocol": f"{folds}-fold: each photo a test photo once; {val_images} val photos from the other "
                           f"folds, the rest train" if folds else
                           f"fixed split: the last {test_images} photos (file-name order) test, {val_images} val",
               "folds": [f for f, _ in plan],
               "split": {s: len(p.read_text().split()) for s, p in plan[0][1].items()},
               "features": f"{xe_cfg.encoder.arch} {xe_cfg.encoder.layer} {xe_cfg.encoder.image_size}px, "
                           f"weights {weights}",
               "overrides": list(overrides), "scst_overrides": list(scst_overrides), "stages": list(stages),
               "reused": [f"{r['fold']} seed{r['seed']} {s}" for r in runs for s in stages if r[s]["reused"]],
               "checkpoint": "each stage's best.pt: the epoch with the highest val "
                             f"{xe_cfg.train.select_metric} (train.select_metric) of captions decoded with beam "
                             f"{xe_cfg.train.val_beam_size} (train.val_beam_size); SCST's start is its epoch 0, "
                             "kept when no SCST epoch beats it (train.validate_init)",
               "decoding": {s: {"beam_size": c.decode.beam_size, "max_len": c.decode.max_len,
                                "suppress_unk": c.decode.suppress_unk} for s, c in configs.items()},
               "seeds": seeds, **aggregate(runs, list(stages), splits)}
    if folds and only_folds is None:
        results["kfold"] = quality_stats.kfold_summary(runs, list(stages))
    results.update({"runs": runs, "extract_s": extracted["seconds"],
                    "total_s": round(time.perf_counter() - start, 1)})
    return results


def extract_features(cfg: Config, device: str | None) -> dict:
    try:
        return extract.main(extract.ExtractJob(cfg, ["train", "val", "test"], device))
    except CaptionerError as e:  # the benchmark's own cache, made by other weights or an older captioner: redo it
        if "--rebuild" not in str(e):
            raise
        log.warning("%s: rebuilding it", e)
        return extract.main(extract.ExtractJob(cfg, ["train", "val", "test"], device, rebuild=True))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides for both stages, as section.key=value")
    p.add_argument("--scst", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the SCST stage only (repeatable), e.g. --scst train.lr=2e-5")
    p.add_argument("--stages", default="xe,scst", help="xe,scst (default) or xe")
    p.add_argument("--data", default=None, help="folder with captions.txt and images/ (default "
                                                "../shared/data/flickr8k-705)")
    p.add_argument("--cache", default="~/.cache/captioner/quality",
                   help="weights, features, split lists and runs (default ~/.cache/captioner/quality)")
    p.add_argument("--folds", type=int, default=5,
                   help="K folds (default 5): every photo is a test photo in exactly one fold; 0: the earlier "
                        "fixed split (the last 100 photos test)")
    p.add_argument("--only-folds", default=None, metavar="I,J",
                   help="run only these folds (0-based; to spread folds over processes), no k-fold summary: rerun "
                        "with --reuse and no --only-folds to summarise")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="no training or scoring: the k-fold summary of the runs in these --json files of earlier "
                        "--only-folds processes (together every fold once per seed; the stages all of them ran)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per fold (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--tag", default="", help="name of this variant's run folder under CACHE/runs/")
    p.add_argument("--reuse", action="store_true",
                   help="keep a stage already trained in the tag's folder with the same config (decoding keys "
                        "aside) and only score it: rescoring with other decode.* keys, SCST on earlier XE runs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    return p.parse_args(argv)


def merge(files: list[str]) -> dict:
    """The k-fold summary of the runs of several --only-folds results files (one per process)."""
    try:
        parts = [json.loads(Path(f).read_text()) for f in files]
    except (OSError, ValueError) as e:
        raise CaptionerError(f"--merge: {e}") from None
    runs = [run for part in parts for run in part["runs"]]
    stages = [s for s in STAGES if all(s in p["stages"] for p in parts)]  # xe only when one file ran only xe
    seen = [(r["fold"], r["seed"]) for r in runs]
    if len(set(seen)) != len(seen):
        raise CaptionerError("--merge: the files repeat a fold and seed")
    folds = {r["fold"] for r in runs}
    if any({r["fold"] for r in runs if r["seed"] == seed} != folds for seed in {r["seed"] for r in runs}):
        raise CaptionerError("--merge: every seed needs every fold (each photo a test photo once per seed)")
    keep = ("benchmark", "data", "features", "overrides", "scst_overrides", "stages", "checkpoint", "split")
    return {**{k: parts[0][k] for k in keep if k in parts[0]}, "merged": list(files),
            "protocol": f"{len(folds)}-fold (merged from {len(files)} processes)",
            **aggregate(runs, stages, ["val", "test"]), "kfold": quality_stats.kfold_summary(runs, stages),
            "runs": runs}


def parse_folds(text: str) -> list[int]:
    try:
        return [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise CaptionerError(f"--only-folds takes fold numbers like 0,2, got {text!r}") from None


def cli(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.merge:
            results = merge(args.merge)
        else:
            results = main(args.data, args.cache, args.seeds, args.overrides, args.scst,
                           [s for s in args.stages.split(",") if s], args.device, args.tag, args.threads,
                           args.first_seed, reuse=args.reuse, folds=args.folds,
                           only_folds=None if args.only_folds is None else parse_folds(args.only_folds))
    except CaptionerError as e:
        print(f"bench_quality: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=1)
    if args.json:
        write_text(args.json, text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
