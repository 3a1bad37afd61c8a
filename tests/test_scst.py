"""Self-critical sequence training: rewards, baselines, the loss, and (below) training runs on synthetic data."""
import copy

import numpy as np
import pytest
import torch

from captioner.config import EncoderConfig, ModelConfig, apply_overrides
from captioner.data.records import ImageRecord
from captioner.errors import CaptionerError
from captioner.jobs import train
from captioner.engine.train.scst import ReferenceCaptions, Rewarder, SelfCriticalLoss, advantages
from captioner.model.decoder import caption_loss
from captioner.model.sample import sample_captions
from captioner.metrics.cider import CiderD
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary

from helpers import metric_lines, sigterm_after_step, small_config, step_losses, weights

CAPTIONS = [["a red circle", "a red circle on the left"], ["a blue square", "one blue square"],
            ["a green triangle above a circle"]]


def _records():
    return [ImageRecord(image_id=i, path=f"{i}.jpg", captions=c, split="train") for i, c in enumerate(CAPTIONS)]


def test_mean_baseline_gives_zero_mean_advantage_per_image():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    adv, base = advantages(rewards, "mean")
    assert torch.allclose(adv.sum(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(base[0], torch.tensor([11 / 3, 10 / 3, 3.0, 2.0]))  # mean of the other three
    adv, base = advantages(rewards, "greedy", torch.tensor([2.0, 1.0]))
    assert torch.equal(adv, rewards - torch.tensor([[2.0], [1.0]]))


def test_rewards_are_cider_d_against_the_training_references():
    vocab = Vocabulary.build([c for caps in CAPTIONS for c in caps])
    rewarder = Rewarder(_records(), vocab, max_len=16)
    ids = lambda text: vocab.encode(text, 16)[1:]  # noqa: E731  words and <end>
    rows = [ids("a red circle"), ids("a blue square"), ids("a red circle"), [Vocabulary.end_id]]
    tokens = torch.zeros(4, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    tokens[1, 4] = vocab.index["red"]  # after <end>: ignored
    rewards = rewarder(tokens, torch.tensor([0, 1, 1, 2]))
    refs = [[vocab.encode(c, 16)[1:-1] for c in caps] for caps in CAPTIONS]
    words = [r[:-1] for r in rows]
    expected = CiderD(refs, len(vocab)).score(
        np.array([w + [0] * (6 - len(w)) for w in words]), np.array([len(w) for w in words]), np.array([0, 1, 1, 2]))
    assert torch.allclose(rewards, torch.from_numpy(expected).float())
    assert rewards[0] > rewards[2] and rewards[3] == 0  # right image beats wrong image; empty caption scores 0


def test_a_sampled_unk_never_matches_a_rare_reference_word():
    # "zebra" and "okapi" are below min_freq: <unk> in the references, but a sampled <unk> is not that word.
    records = [ImageRecord(image_id=0, path="0.jpg", captions=["a zebra", "a okapi"], split="train"),
               ImageRecord(image_id=1, path="1.jpg", captions=["a dog", "a dog"], split="train")]
    vocab = Vocabulary.build(["a a", "dog dog"], min_freq=2)
    rewarder = Rewarder(records, vocab, max_len=16)
    unk, a = Vocabulary.unk_id, vocab.index["a"]
    tokens = torch.tensor([[a, unk, Vocabulary.end_id], [a, a, Vocabulary.end_id]])
    both = rewarder(tokens, torch.tensor([0, 0]))
    assert both[0] == both[1]  # "a <unk>" earns only what "a a" earns: its "a", no <unk> n-gram
    assert rewarder(torch.tensor([[unk, unk, Vocabulary.end_id]]), torch.tensor([0]))[0] == 0


def test_scst_loss_statistics_and_gradient():
    torch.manual_seed(0)
    vocab = Vocabulary.build([c for caps in CAPTIONS for c in caps])
    model = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(32, 32, 32, dropout=0.0),
                         len(vocab))
    loss_fn = SelfCriticalLoss(model, Rewarder(_records(), vocab, 16), samples=4, baseline="mean", max_len=6)
    raw = torch.randn(3, 512, 2, 2)
    loss, part, count = loss_fn(raw, torch.tensor([0, 1, 2]))
    stats = loss_fn.stats
    assert part is None and count is None  # a mean over the same units in every process, for the step
    assert loss.requires_grad and torch.isfinite(loss)
    assert set(stats) == {"reward", "baseline", "sample_words", "entropy", "reward_s"}
    assert stats["reward"] == pytest.approx(stats["baseline"], abs=1e-5)  # mean baseline: same mean as rewards
    assert 0 <= stats["sample_words"] <= 6
    loss.backward()
    assert model.decoder.out.weight.grad is not None and model.decoder.out.weight.grad.abs().sum() > 0


def test_reference_draws_come_from_each_image_and_cover_its_captions():
    vocab = Vocabulary.build([c for caps in CAPTIONS for c in caps])
    refs = ReferenceCaptions(_records(), vocab, max_len=16)
    torch.manual_seed(0)
    seen = {0: set(), 1: set(), 2: set()}
    for _ in range(20):
        captions, lengths = refs.draw(torch.tensor([2, 0, 1, 0]))
        assert captions.shape == (4, int(lengths.max())) and captions[:, 0].eq(Vocabulary.start_id).all()
        for image, row, n in zip([2, 0, 1, 0], captions.tolist(), lengths.tolist()):
            assert row[n - 1] == Vocabulary.end_id and all(t == Vocabulary.pad_id for t in row[n:])
            seen[image].add(vocab.decode(row[:n]))
    assert seen == {i: set(caps) for i, caps in enumerate(CAPTIONS)}  # every reference drawn, only the image's own
    torch.manual_seed(1)
    first = refs.draw(torch.tensor([0, 1]))
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(first, refs.draw(torch.tensor([0, 1]))))  # seeded: repeatable


def test_scst_cross_entropy_term_adds_its_weight_times_the_references_loss():
    vocab = Vocabulary.build([c for caps in CAPTIONS for c in caps])
    model = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(32, 32, 32, dropout=0.0),
                         len(vocab))
    refs, raw, images = ReferenceCaptions(_records(), vocab, 16), torch.randn(3, 512, 2, 2), torch.tensor([0, 1, 2])
    plain = SelfCriticalLoss(model, Rewarder(_records(), vocab, 16), samples=2, max_len=6)
    mixed = SelfCriticalLoss(model, Rewarder(_records(), vocab, 16), samples=2, max_len=6, references=refs,
                             xe_weight=0.5, label_smoothing=0.1)
    torch.manual_seed(3)
    base, _, _ = plain(raw, images)
    torch.manual_seed(3)
    total, _, _ = mixed(raw, images)
    torch.manual_seed(3)
    plain(raw, images)  # the same samples leave the generator where the mixed loss drew its references
    captions, lengths = refs.draw(images)
    logits, alphas = model(raw, captions, lengths)
    anchor, ce = caption_loss(logits, alphas, captions, lengths, model.alpha_c, 0.1)
    assert torch.allclose(total, base + 0.5 * anchor, atol=1e-5)
    assert mixed.stats["xe"] == pytest.approx(float(ce.detach()), rel=1e-5) and "xe" not in plain.stats
    with pytest.raises(ValueError, match="reference captions"):
        SelfCriticalLoss(model, Rewarder(_records(), vocab, 16), xe_weight=0.5)


def test_scst_samples_and_trains_the_tempered_distribution():
    vocab = Vocabulary.build([c for caps in CAPTIONS for c in caps])
    model = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(32, 32, 32, dropout=0.0),
                         len(vocab))
    raw, images = torch.randn(3, 512, 2, 2), torch.tensor([0, 1, 2])
    entropies = {}
    for temperature in (1.0, 0.5):
        loss_fn = SelfCriticalLoss(model, Rewarder(_records(), vocab, 16), samples=4, max_len=6,
                                   temperature=temperature)
        torch.manual_seed(2)
        loss_fn(raw, images)
        torch.manual_seed(2)  # the same draws from sample_captions at that temperature: the same entropy
        expected = sample_captions(model, raw.repeat_interleave(4, dim=0), 6, temperature=temperature)
        mask = expected.mask.float()
        entropies[temperature] = loss_fn.stats["entropy"]
        assert entropies[temperature] == pytest.approx(float((expected.entropy.detach() * mask).sum() / mask.sum()), rel=1e-5)
    assert entropies[0.5] < entropies[1.0]  # sharper samples: what the policy gradient now trains
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SelfCriticalLoss(model, Rewarder(_records(), vocab, 16), temperature=0.0)(raw, images)


# ---------------------------------------------------------------------------------------------- training runs

SCST = ["train.objective=scst", "train.batch_size=8", "train.scst_samples=3", "train.lr=0.0005",
        "train.checkpoint_every=2"]  # 48 train images: 6 steps of 8 images x 3 samples per epoch


@pytest.fixture(scope="module")
def xe_checkpoint(tmp_path_factory, small_root):
    run_dir = tmp_path_factory.mktemp("xe")
    train.main(train.TrainJob(small_config(small_root, "train.epochs=1"), run_dir, "cpu"))
    return run_dir / "best.pt"


@pytest.mark.slow
def test_scst_resume_in_the_middle_is_exact(xe_checkpoint, small_root, tmp_path, monkeypatch):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    summary = train.main(train.TrainJob(small_config(small_root, *SCST), whole, "cpu", init_from=xe_checkpoint))
    assert summary["steps"] == 12 and summary["stopped"] is None
    restore_log = sigterm_after_step(monkeypatch, 3)  # during step 4 of 6 in epoch 1: handled after it
    job = train.TrainJob(small_config(small_root, *SCST), stopped, "cpu", init_from=xe_checkpoint)
    assert train.main(job)["stopped"] == "SIGTERM"
    restore_log()
    state = torch.load(stopped / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["progress"]["epoch"] == 0 and state["init_from"] == str(xe_checkpoint)
    assert train.main(train.TrainJob(small_config(small_root, *SCST), stopped, "cpu", resume=True))["steps"] == 12
    assert step_losses(whole) == step_losses(stopped)  # exact floats, every step
    rewards = lambda d: [(x["step"], x["reward"], x["sample_words"]) for x in metric_lines(d) if "reward" in x]  # noqa: E731
    assert rewards(whole) == rewards(stopped) and len(rewards(whole)) == 12
    wa, wb = weights(whole / "last.pt"), weights(stopped / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    epoch = [x for x in metric_lines(whole) if "train_reward" in x]
    assert len(epoch) == 2 and all(k in epoch[0] for k in ("val_cider", "val_bleu4"))
    assert metric_lines(whole)[0] == {"event": "init_from", "checkpoint": str(xe_checkpoint), "objective": "scst"}
    # The run keeps the initial checkpoint's vocabulary and starts from its weights.
    assert torch.load(whole / "last.pt", weights_only=True)["vocab"] == torch.load(xe_checkpoint)["vocab"]


@pytest.mark.slow
def test_scst_after_cross_entropy_raises_held_out_greedy_cider(trained, tmp_path):
    """The session's tiny model, trained with cross-entropy on synthetic shapes, then SCST at an 8x lower lr."""
    summary, cfg = trained
    xe = torch.load(summary["best_checkpoint"], weights_only=True)["val_scores"]
    scst_cfg = apply_overrides(copy.deepcopy(cfg), ["train.objective=scst", "train.epochs=2", "train.lr=0.00025"])
    out = train.main(train.TrainJob(scst_cfg, tmp_path, "cpu", init_from=summary["best_checkpoint"]))
    start, *epochs = [x for x in metric_lines(tmp_path) if "val_cider" in x]
    assert len(epochs) == 2 and out["select_metric"] == "cider"
    # train.validate_init: the starting weights are validated first (epoch 0), as cross-entropy's best.pt was
    assert start["epoch"] == 0 and start["val_cider"] == pytest.approx(xe["cider"], abs=1e-6)
    # greedy CIDEr-D on the held-out val images (the same images and scorer for both)
    assert epochs[-1]["val_images"] == xe["images"] and epochs[-1]["val_cider"] > xe["cider"], (xe, epochs)
    assert epochs[-1]["train_reward"] > 0 and all(x["sample_words"] > 3 for x in metric_lines(tmp_path)
                                                  if "sample_words" in x)


@pytest.mark.slow
def test_init_from_refuses_another_architecture_and_resume(xe_checkpoint, small_root, tmp_path):
    with pytest.raises(CaptionerError, match="model.decoder_dim"):
        train.main(train.TrainJob(small_config(small_root, "model.decoder_dim=48"), tmp_path / "a", "cpu",
                                  init_from=xe_checkpoint))
    with pytest.raises(CaptionerError, match="--init-from starts a new run"):
        train.main(train.TrainJob(small_config(small_root), tmp_path / "b", "cpu", resume=True,
                                  init_from=xe_checkpoint))
    with pytest.raises(CaptionerError, match="train.scst_samples must be >= 2"):
        small_config(small_root, "train.objective=scst", "train.scst_samples=1")
