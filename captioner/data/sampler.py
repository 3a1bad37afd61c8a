"""The training data order: shuffled per epoch, split across processes, resumable at any sample.

    sampler = ResumableSampler(len(pairs), seed=0, rank=0, world_size=2)
    sampler.set_epoch(3, start=1024)   # epoch 3's order, from its 1025th sample on
    DataLoader(pairs, batch_size=8, sampler=sampler)

Epoch e's order is one permutation of the dataset drawn from seed + e, the same in every process. Process r
of w takes every w-th sample of it from position start + r, so the w processes together consume the order
exactly as one process with a w-times larger batch would (torch's DistributedSampler does the same, without
the start). `start` counts samples of that global order already consumed, so a run resumes at the exact
sample where it stopped, even with another number of processes.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        """This epoch's global order (size,), identical in every process."""
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self):
        order = self.order()
        rest = order[self.start:]
        # Every process must get as many samples (DDP steps in lockstep): wrap around to the epoch's first ones.
        pad = -len(rest) % self.world_size
        rest = torch.cat([rest, order[:pad]])
        return iter(rest[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return -(-max(self.size - self.start, 0) // self.world_size)
