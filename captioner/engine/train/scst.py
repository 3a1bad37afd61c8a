"""Self-critical sequence training (Rennie et al. 2017): train on CIDEr-D itself instead of cross-entropy.

    captioner train --config configs/coco_resnet152_scst.yaml --run-dir runs/scst --init-from runs/xe/best.pt

For every training image, train.scst_samples captions are drawn from the model (training mode, the policy
being updated), each is rewarded with its CIDEr-D against the image's references (document frequencies from
all training references, computed once: `Rewarder`), and the loss pushes up the log-probability of the
samples that beat a baseline:
  mean   (default; Luo 2020, "a better variant of SCST", ruotianluo/self-critical.pytorch's "new self-critical"):
         the mean reward of the image's other samples; the advantages of an image then sum to zero.
  greedy (Rennie et al.): the reward of the greedy caption, decoded in eval mode without gradients.
loss = -sum(advantage * log p(token) over tokens up to <end>) / number of those tokens
       - train.scst_entropy * mean entropy of the word distributions (an optional guard against collapse).
train.scst_diversity > 0 lowers each sample's reward by that weight times its similarity to the most similar
sample of another image in the batch (`similarity_to_other_images`): a caption that would fit other photos as
well gains less, which counters SCST's drift towards one generic caption for many photos.
train.scst_xe_weight > 0 adds that weight times cross-entropy on one of each image's reference captions (drawn at
random every step): the mixed objective of Paulus et al. 2018, which anchors the policy to human captions. At 0.1
it did not help on the real-photo benchmark's 545 photos (docs/quality.md); it is off by default.
train.scst_temperature < 1 samples from the sharpened distribution softmax(logits / T), and its log-probabilities
are the ones trained: a label-smoothed model at T=1 puts a rare word in most 10-word samples, so its rewards
mostly rank those slips rather than what beam search would write.
decode.suppress_unk (suppress_unk) keeps <unk> out of the samples and the greedy baseline: the policy trained is
the one decoding runs, and its gradient goes to real words rather than to avoiding <unk>.

`SelfCriticalLoss` is a loss module of the one training step (engine/train/step.py): (inputs, image indices) ->
(loss, None, None), so autocast, backward, clipping, the NaN guard and DDP are cross-entropy's; the step's
statistics for the logs are left in its `stats`.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from captioner.config import SCST_BASELINES
from captioner.metrics.cider import CiderD
from captioner.model.decoder import caption_loss
from captioner.model.decoding import SearchOptions, greedy_decode
from captioner.model.sample import sample_captions
from captioner.text import Vocabulary


class Rewarder:
    """CIDEr-D of token ids against training images' references (records[i] is image i).

    A reference word outside the vocabulary becomes the id len(vocab), which no sample can hold: a sampled
    <unk> then matches nothing, as in evaluation, where "<unk>" never equals the reference's real word. Matching
    <unk> with <unk> paid the policy for writing <unk> (with min_freq 5 on Flickr8k-705 most captions hold one)."""

    def __init__(self, records, vocab: Vocabulary, max_len: int):
        unseen = len(vocab)
        references = [[[unseen if t == Vocabulary.unk_id else t for t in vocab.encode(c, max_len)[1:-1]]
                       for c in r.captions] for r in records]  # words only
        self.cider = CiderD(references, vocab_size=len(vocab) + 1)

    def __call__(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """tokens (M, L) words then <end> then <pad>, images (M,) record indices -> (M,) float32 rewards
        (computed on the CPU, returned on tokens' device)."""
        host = tokens.detach().cpu().numpy()
        ended = host == Vocabulary.end_id
        # Words before the first <end> (all of them when there is none).
        lengths = np.where(ended.any(axis=1), ended.argmax(axis=1), host.shape[1])
        rewards = self.cider.score(host, lengths, images.detach().cpu().numpy())
        return torch.from_numpy(rewards).float().to(tokens.device)


class ReferenceCaptions:
    """Every training image's reference captions as token ids, to draw one per image for the cross-entropy term.

    records[i] is image i; its captions become rows offsets[i] .. offsets[i] + counts[i] - 1 of `tokens`."""

    def __init__(self, records, vocab: Vocabulary, max_len: int):
        encoded = [vocab.encode(c, max_len) for r in records for c in r.captions]  # <start> words <end>
        if not encoded or any(not r.captions for r in records):
            raise ValueError("train.scst_xe_weight needs at least one reference caption for every training image")
        self.lengths = torch.tensor([len(e) for e in encoded])  # (M,) counting <start> and <end>
        self.tokens = torch.full((len(encoded), int(self.lengths.max())), Vocabulary.pad_id, dtype=torch.long)
        for row, ids in enumerate(encoded):
            self.tokens[row, : len(ids)] = torch.tensor(ids)
        self.counts = torch.tensor([len(r.captions) for r in records])
        self.offsets = self.counts.cumsum(0) - self.counts

    def draw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B,) record indices -> (captions (B, T+2), lengths (B,)) on images' device: one reference of
        each, drawn with torch's global generator (deterministic given the run's seed)."""
        device, images = images.device, images.cpu()
        rows = self.offsets[images] + (torch.rand(len(images)) * self.counts[images]).long()
        lengths = self.lengths[rows]
        return self.tokens[rows, : int(lengths.max())].to(device), lengths.to(device)


def similarity_to_other_images(tokens: torch.Tensor, images: torch.Tensor, buckets: int = 4096) -> torch.Tensor:
    """tokens (M, L) words then <end> then <pad>, images (M,) -> (M,) each caption's highest cosine similarity
    (bags of its words and word pairs, hashed into `buckets`) to a caption of another image; 0 when the batch
    holds one image."""
    M, L = tokens.shape
    words = (tokens != Vocabulary.pad_id) & ((tokens == Vocabulary.end_id).long().cumsum(dim=1) == 0)  # (M, L)
    pairs = (tokens[:, :-1] * 7919 + tokens[:, 1:] + 1) % buckets  # (M, L-1) hashed word pairs
    index = torch.cat([tokens % buckets, pairs], dim=1)  # (M, 2L-1)
    counts = torch.cat([words, words[:, :-1] & words[:, 1:]], dim=1).float()
    bags = torch.zeros(M, buckets, device=tokens.device).scatter_add_(1, index, counts)
    bags = torch.nn.functional.normalize(bags, dim=1)
    similarity = bags @ bags.T  # (M, M)
    same = images.unsqueeze(0) == images.unsqueeze(1)
    return similarity.masked_fill(same, 0.0).amax(dim=1).clamp_min(0.0)


def advantages(rewards: torch.Tensor, baseline: str, greedy_rewards: torch.Tensor | None = None):
    """rewards (B, K) of K samples per image -> (advantages (B, K), baselines (B, K)).

    mean: each sample's baseline is the mean reward of the image's K-1 other samples (K >= 2), so an
    image's advantages sum to zero. greedy: greedy_rewards (B,) of the image's greedy caption."""
    if baseline == "mean":
        K = rewards.shape[1]
        base = (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)
    elif baseline == "greedy":
        base = greedy_rewards.unsqueeze(1).expand_as(rewards)
    else:
        raise ValueError(f"unknown SCST baseline {baseline!r}; use one of {SCST_BASELINES}")
    return rewards - base, base


class SelfCriticalLoss(nn.Module):
    """The SCST forward of one training step: encoder (for image inputs), K samples per image, rewards,
    baseline and policy-gradient loss, as one module so DistributedDataParallel sees the whole pass."""

    def __init__(self, model, rewarder: Rewarder, samples: int = 5, baseline: str = "mean", max_len: int = 16,
                 entropy: float = 0.0, diversity: float = 0.0, suppress_unk: bool = False,
                 references: ReferenceCaptions | None = None, xe_weight: float = 0.0, label_smoothing: float = 0.0,
                 temperature: float = 1.0):
        super().__init__()
        if baseline not in SCST_BASELINES:
            raise ValueError(f"unknown SCST baseline {baseline!r}; use one of {SCST_BASELINES}")
        if baseline == "mean" and samples < 2:
            raise ValueError("the mean baseline needs at least 2 samples per image")
        self.model, self.rewarder = model, rewarder
        self.samples, self.baseline, self.max_len, self.entropy = samples, baseline, max_len, entropy
        self.diversity, self.suppress_unk = diversity, suppress_unk
        if xe_weight and references is None:
            raise ValueError("the cross-entropy term (xe_weight) needs the reference captions")
        self.references, self.xe_weight, self.label_smoothing = references, xe_weight, label_smoothing
        self.temperature = temperature  # sample_captions refuses one <= 0
        self.stats: dict[str, float] = {}  # the last step's mean reward, baseline, sample length, entropy, time

    def forward(self, inputs: torch.Tensor, images: torch.Tensor):
        """inputs (B, 3, S, S) uint8 images or (B, C, H, W) float features, images (B,) record indices
        -> (loss, None, None): the step weighs it as a mean over the same units in every process. The logs'
        floats go to self.stats: {"reward", "baseline", "sample_words", "entropy", "reward_s"}, with "xe" (the
        cross-entropy term before its weight) and "similarity" when those are on."""
        raw = inputs if inputs.is_floating_point() else self.model.encode(inputs)  # (B, C, H, W)
        B, K = raw.shape[0], self.samples
        greedy_rewards = None
        reward_s = 0.0
        if self.baseline == "greedy":  # eval mode, no gradients: greedy_decode restores the training mode
            options = SearchOptions(max_len=self.max_len, suppress_unk=self.suppress_unk)
            greedy = greedy_decode(self.model, raw.detach(), options).tokens
            tick = time.perf_counter()
            greedy_rewards = self.rewarder(greedy, images)  # (B,)
            reward_s += time.perf_counter() - tick
        out = sample_captions(self.model, raw.repeat_interleave(K, dim=0), self.max_len,  # B*K rows, image-major
                              temperature=self.temperature, suppress_unk=self.suppress_unk)
        tick = time.perf_counter()
        cider = self.rewarder(out.tokens, images.repeat_interleave(K)).view(B, K)
        rewards, similar = cider, None
        if self.diversity:
            similar = similarity_to_other_images(out.tokens, images.repeat_interleave(K)).view(B, K)
            rewards = cider - self.diversity * similar
            if greedy_rewards is not None:  # the baseline pays the same price for its own genericness
                greedy_rewards = greedy_rewards - self.diversity * similarity_to_other_images(greedy, images)
        reward_s += time.perf_counter() - tick
        advantage, base = advantages(rewards, self.baseline, greedy_rewards)  # (B, K)
        mask = out.mask.float()  # (B*K, L) tokens up to and including <end>
        tokens = mask.sum()
        loss = -(advantage.reshape(-1, 1) * out.log_probs * mask).sum() / tokens
        entropy = (out.entropy * mask).sum() / tokens
        if self.entropy:
            loss = loss - self.entropy * entropy
        xe = None
        if self.xe_weight:  # teacher-forced on one reference per image, in the training mode the samples used
            captions, lengths = self.references.draw(images)
            logits, alphas = self.model(raw, captions, lengths)
            anchor, xe = caption_loss(logits, alphas, captions, lengths, self.model.alpha_c, self.label_smoothing)
            loss = loss + self.xe_weight * anchor
        self.stats = {"reward": float(cider.mean()), "baseline": float(base.mean()),
                      "sample_words": float(out.lengths.float().mean() - 1), "entropy": float(entropy.detach()),
                      "reward_s": reward_s, **({"xe": float(xe.detach())} if xe is not None else {}),
                      **({"similarity": float(similar.mean())} if similar is not None else {})}
        return loss, None, None
