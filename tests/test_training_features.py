"""NaN guard, LR schedules, early stopping, the resumable sampler and encoder fine-tuning."""
import logging
import math

import pytest
import torch

from captioner.engine.train import step as step_module
from captioner.jobs import train
from captioner.data.sampler import ResumableSampler
from captioner.model.encoder import HookedEncoder
from captioner.errors import CaptionerError
from captioner.engine.train.schedule import LRSchedule

from helpers import metric_lines, small_config, step_losses, weights


def _nan_on_calls(monkeypatch, bad_calls):
    """Make caption_loss return NaN on the given (1-based) calls, as a diverging run would."""
    real, calls = step_module.caption_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        total, ce = real(*args, **kwargs)
        if calls[0] in bad_calls:
            return total * float("nan"), ce
        return total, ce

    monkeypatch.setattr(step_module, "caption_loss", loss)


@pytest.mark.slow
def test_a_non_finite_loss_skips_its_step(small_root, tmp_path, monkeypatch, caplog):
    _nan_on_calls(monkeypatch, {3})
    with caplog.at_level(logging.WARNING, logger="captioner"):
        summary = train.main(train.TrainJob(small_config(small_root, "train.epochs=1", "train.batch_size=24"), tmp_path, "cpu"))
    assert summary["steps"] == 6 and summary["stopped"] is None
    assert "step 3: non-finite loss, step skipped (1 in a row" in caplog.text
    skipped = [x for x in metric_lines(tmp_path) if x.get("skipped")]
    assert skipped == [{"step": 3, "epoch": 1, "loss": None, "skipped": "non-finite loss"}]
    assert all(math.isfinite(loss) for step, loss in step_losses(tmp_path) if step != 3)
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "last.pt").values() if t.is_floating_point())


@pytest.mark.slow
def test_consecutive_non_finite_losses_stop_the_run_keeping_the_last_good_checkpoint(small_root, tmp_path,
                                                                                   monkeypatch):
    _nan_on_calls(monkeypatch, set(range(5, 100)))  # diverges at step 5; checkpoints every 3 steps
    cfg = small_config(small_root, "train.max_bad_steps=3")
    with pytest.raises(CaptionerError, match=r"training stopped at step 7: 3 consecutive steps with a non-finite "
                                             r"loss \(train.max_bad_steps\); the last good checkpoint is .*last.pt"):
        train.main(train.TrainJob(cfg, tmp_path, "cpu"))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 3  # the step-6 checkpoint fell inside the bad streak and was not written
    assert [x["step"] for x in metric_lines(tmp_path) if x.get("skipped")] == [5, 6, 7]


def test_lr_schedules():
    def lrs(kind, steps=10, **kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = LRSchedule(opt, kind, total_steps=steps, steps_per_epoch=4, **kw)
        return [round(schedule.step(s), 6) for s in range(1, steps + 1)]

    assert lrs("none") == [1.0] * 10
    assert lrs("none", warmup_steps=4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = lrs("cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert cosine[:2] == [0.5, 1.0] and cosine[-1] == pytest.approx(0.1) and cosine == sorted(cosine[:2]) + sorted(
        cosine[2:], reverse=True)
    assert lrs("step", gamma=0.5) == [1.0] * 4 + [0.5] * 4 + [0.25] * 2
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    plateau = LRSchedule(opt, "plateau", gamma=0.5, patience=1)
    for score in (0.1, 0.2, 0.2, 0.1):  # best 0.2, then two validations without gain: decays once
        plateau.observe(score)
    assert plateau.step(1) == 0.5
    again = LRSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "plateau", gamma=0.5, patience=1)
    again.load_state_dict(plateau.state_dict())
    assert again.step(1) == 0.5 and again.state_dict() == plateau.state_dict()


@pytest.mark.slow
def test_early_stopping_and_plateau_by_validation_score(small_root, tmp_path, caplog):
    # lr so small the captions never change: the validation score stops improving after epoch 1.
    cfg = small_config(small_root, "train.epochs=4", "train.batch_size=48", "train.lr=1e-9",
                       "train.early_stop_patience=2", "train.lr_schedule=plateau", "train.lr_patience=0",
                       "train.select_metric=cider")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        summary = train.main(train.TrainJob(cfg, tmp_path, "cpu"))
    assert summary["stopped"] == "early stopping" and summary["epochs"] == 3 and summary["steps"] == 9
    assert "not computed by validation" not in caplog.text  # validation computes CIDEr-D: no fallback any more
    epochs = [x for x in metric_lines(tmp_path) if "val_cider" in x]
    assert [x["improved"] for x in epochs] == [True, False, False] and epochs[0]["select_metric"] == "cider"
    assert all(k in epochs[0] for k in ("val_bleu1", "val_bleu4", "val_rouge_l", "val_cider"))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["schedule"]["plateau_scale"] == pytest.approx(0.01)  # decayed after each validation without gain
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 3  # best.pt only when it improved


def test_validation_logs_what_evaluate_computes_and_selection_accepts_only_that():
    """val_bleu4 / val_cider are coco-caption's (as in evaluate's metrics), not nltk's."""
    from captioner.config import SELECT_METRICS, load_config
    from captioner.errors import CaptionerError
    from captioner.metrics.coco import VALIDATION_KEYS, coco_caption_scores, validation_scores
    hyps = {1: "a red circle", 2: "a blue square on the left"}
    refs = {1: ["A red circle.", "a big red circle"], 2: ["a blue square", "the square is blue"]}
    coco = coco_caption_scores(hyps, refs, meteor=False)
    assert validation_scores(hyps, refs) == {k: coco[k] for k in VALIDATION_KEYS}
    assert set(SELECT_METRICS) == set(VALIDATION_KEYS) and load_config(None).train.select_metric == "cider"
    with pytest.raises(CaptionerError, match="select_metric must be one of"):
        load_config(None, ["train.select_metric=meteor"])


def test_resumable_sampler_splits_and_resumes_the_global_order():
    single = ResumableSampler(10, seed=3)
    single.set_epoch(2)
    order = list(single)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    ranks = [ResumableSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    a, b = list(ranks[0]), list(ranks[1])
    assert [x for pair in zip(a, b) for x in pair] == order  # batches of 2 x k == one process's batches of 2k
    single.set_epoch(2, start=4)
    assert list(single) == order[4:] and len(single) == 6
    for s in ranks:
        s.set_epoch(2, start=4)
    assert list(ranks[0]) == order[4::2] and list(ranks[1]) == order[5::2]
    three = ResumableSampler(10, seed=3, rank=2, world_size=3)  # 10 samples over 3: padded from the start
    three.set_epoch(2)
    assert len(three) == 4 and list(three) == (order + order[:2])[2::3]
    single.set_epoch(3)
    assert list(single) != order


def test_encoder_finetuning_trains_only_the_chosen_stages():
    encoder = HookedEncoder("resnet18", "layer4", image_size=64, finetune_from="layer4")
    trainable = {n for n, p in encoder.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("layer4.") for n in trainable)
    assert {n for n, _ in encoder.backbone.named_parameters() if n.startswith("layer4.")} == trainable
    encoder.train()
    assert encoder.backbone.layer4[0].bn1.training and not encoder.backbone.layer3[0].bn1.training
    assert not encoder.backbone.bn1.training
    encoder(torch.rand(2, 3, 64, 64)).sum().backward()
    assert encoder.backbone.layer4[1].conv2.weight.grad is not None and encoder.backbone.layer3[0].conv1.weight.grad is None
    with torch.no_grad():
        assert not encoder(torch.rand(1, 3, 64, 64)).requires_grad
    nested = HookedEncoder("resnet18", "layer3.0.conv2", image_size=64, finetune_from="layer3")
    assert {n for n, p in nested.backbone.named_parameters() if p.requires_grad} == {
        "layer3.0.conv1.weight", "layer3.0.bn1.weight", "layer3.0.bn1.bias", "layer3.0.conv2.weight"}
    with pytest.raises(CaptionerError, match="comes after the hooked layer 'layer3'"):
        HookedEncoder("resnet18", "layer3", image_size=64, finetune_from="layer4")


@pytest.mark.slow
def test_finetuning_run_updates_layer4_at_its_own_lr(small_root, tmp_path, caplog):
    cfg = small_config(small_root, "train.epochs=1", "train.batch_size=48", "encoder.finetune_from=layer4",
                       "train.encoder_lr=0.0005", "train.checkpoint_every=0")
    torch.manual_seed(cfg.encoder.seed)  # as build_encoder does: the same initial backbone
    start = HookedEncoder("resnet18", "layer4", image_size=64)
    with caplog.at_level(logging.INFO, logger="captioner"):
        train.main(train.TrainJob(cfg, tmp_path, "cpu"))
    assert "train.precompute_features ignored" in caplog.text
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.002, 0.0005]
    before = {"encoder.backbone." + k: v for k, v in start.backbone.state_dict().items()}
    changed = {k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, state["model"][k])}
    assert "encoder.backbone.layer4.0.conv1.weight" in changed
    assert "encoder.backbone.layer4.0.bn1.running_mean" in changed  # fine-tuned BatchNorm is in train mode
    assert not any(k.startswith(("encoder.backbone.layer3.", "encoder.backbone.conv1")) for k in changed)


@pytest.mark.slow
def test_a_corrupt_image_in_training_from_images_is_skipped_counted_and_named(tmp_path, caplog):
    from captioner.data.datasets import by_split, load_records
    cfg = small_config(tmp_path / "data", "train.epochs=1", "train.precompute_features=false", "train.val_images=4")
    bad = by_split(load_records(cfg.dataset), "train")[0].path  # generates the synthetic set
    with open(bad, "r+b") as f:
        f.truncate(200)  # a JPEG cut short, as an interrupted copy leaves it
    with caplog.at_level(logging.WARNING, logger="captioner"):
        summary = train.main(train.TrainJob(cfg, tmp_path / "run", "cpu"))
    assert summary["stopped"] is None and summary["epochs"] == 1 and summary["unreadable_images"] == 1
    warnings = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(warnings) == 1 and "cannot decode image" in warnings[0]  # once, with its path, for its 3 captions
    assert all(math.isfinite(loss) for _, loss in step_losses(tmp_path / "run"))
