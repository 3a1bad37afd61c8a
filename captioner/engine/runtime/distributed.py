"""Several processes (GPUs) with torchrun: which process this is, the few collectives jobs need, and how
work is split between processes.

    torchrun --nproc_per_node=2 -m captioner train --config configs/tiny.yaml --run-dir runs/ddp
    torchrun --nproc_per_node=8 -m captioner caption --checkpoint best.pt photos/ --out captions.jsonl

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them there is one process and every helper here
is a no-op. The backend is NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK) and gloo on CPU.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


from captioner.errors import CaptionerError
from captioner.progress import bar as make_bar
from captioner.engine.runtime.device import resolve_device

log = logging.getLogger("captioner")


@dataclass
class Process:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # setup() created the process group, so cleanup() destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# How long extract and caption let the other processes wait in a collective while rank 0 alone lists millions of
# files, or merges part files (NCCL's default, 10 minutes, would abort such a run; training keeps the default).
LONG_WAIT = timedelta(hours=4)


def setup(device_name: str | None = "auto", timeout: timedelta | None = None) -> Process:
    """This process, with the process group initialised when launched by torchrun with several processes;
    timeout bounds every collective (None: the backend's default)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return Process(0, 1, 0, device)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        raise CaptionerError("WORLD_SIZE is set but RANK or LOCAL_RANK is not: launch with torchrun") from None
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CaptionerError(f"process {rank} wants cuda:{local_rank} but only {torch.cuda.device_count()} "
                                 f"GPUs are visible: use --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=timeout)
    if rank != 0:  # one voice: only errors from the other ranks
        logging.getLogger("captioner").setLevel(logging.ERROR)
    return Process(rank, world_size, local_rank, device, owns_group)


def cleanup(process: Process) -> None:
    if process.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, process: Process) -> torch.Tensor:
    """Sum a tensor over processes (in place; returned for convenience)."""
    if process.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_to_main(obj, process: Process) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (small Python objects only)."""
    if not process.distributed:
        return [obj]
    gathered = [None] * process.world_size if process.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def name_on_main(unreadable, process: Process, limit: int = 1000) -> None:
    """Every process calls it: rank 0 adds the other processes' unreadable images (the first `limit` of each)
    to its own `unreadable` (data/pipeline.py Unreadable), which warns about each, since their warnings are
    silenced (setup); its count then covers every process."""
    everyone = gather_to_main(list(unreadable.messages)[:limit], process)
    if process.distributed and process.is_main:
        for theirs in everyone[1:]:
            for message in theirs:
                unreadable.add(message)


def broadcast_from_main(obj, process: Process):
    """Rank 0's obj, on every rank."""
    if not process.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(process: Process) -> None:
    if process.distributed:
        dist.barrier()


@contextmanager
def main_process_first(process: Process):
    """Rank 0 runs the block first (e.g. generating a dataset or a cache), the others after it has finished."""
    if not process.is_main:
        barrier(process)
    yield
    if process.is_main:
        barrier(process)


def _count_failed(failed: bool, process: Process) -> int:
    return int(all_reduce_sum(torch.tensor([int(failed)], device=process.device), process).item())


@contextmanager
def node_main_first(process: Process, what: str, enabled: bool = True):
    """The first process of each node (LOCAL_RANK 0) runs the block first, the others once every node's first
    process has finished it: e.g. building the encoder, whose pretrained weights the first process downloads
    into the node's cache and the others then read from it. When the block fails in a first process, every
    process stops (the others with one line pointing to its error) instead of waiting in a collective.
    enabled=False (the same in every process) runs the block everywhere at once."""
    if not (process.distributed and enabled):
        yield
        return
    if process.local_rank == 0:
        try:
            yield
        except BaseException:
            _count_failed(True, process)
            raise
        if _count_failed(False, process):
            raise CaptionerError(f"stopped: {what} failed in another node's first process (its error says why)")
    else:
        if _count_failed(False, process):
            raise CaptionerError(f"stopped: {what} failed in this node's first process (its error says why)")
        yield


def shard(items: list, process: Process) -> list:
    """This process's share of items: every world_size-th item from its rank on.

    Every process must pass the same list in the same order (rank 0 broadcasts it); the shards then cover
    it exactly once, differ in size by at most one, and neighbours (often alike in size and cost) are spread
    over all processes.
    """
    return list(items[process.rank::process.world_size])


class GlobalProgress:
    """One progress bar for the work of all processes, shown by rank 0: its rate is the global images/s.

    Each process adds what it finished to a counter in the process group's key-value store (the one torchrun's
    rendezvous set up), which never waits for the other processes, unlike a collective; rank 0 reads the sum
    back each time it adds its own. Without torchrun it is a plain progress bar (captioner.progress).
    """

    _instances = 0  # every process creates its bars in the same order, so the n-th bar has the same key everywhere

    def __init__(self, total: int, process: Process, desc: str, enabled: bool = True):
        GlobalProgress._instances += 1
        self.key = f"captioner/progress/{GlobalProgress._instances}"
        self.store = dist.distributed_c10d._get_default_store() if process.distributed else None
        self.bar = make_bar(total=total, unit="img", desc=desc, disable=not (enabled and process.is_main))

    def update(self, n: int) -> None:
        done = self.store.add(self.key, n) if self.store is not None else self.bar.n + n
        self.bar.update(done - self.bar.n)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values, refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
