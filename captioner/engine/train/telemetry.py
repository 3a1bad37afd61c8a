"""What training logs about itself besides the loss: a window of sums between metrics lines, and peak memory."""
from __future__ import annotations

import sys
import time

import torch


class Window:
    """Sums over the steps since the last metrics line (throughput, data vs compute time)."""

    def __init__(self):
        self.steps, self.loss, self.captions, self.data_s, self.compute_s = 0, 0.0, 0, 0.0, 0.0
        self.stats: dict[str, float] = {}  # SCST: summed reward, baseline, sample length, entropy, reward time
        self.start = time.perf_counter()

def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    try:
        import resource  # POSIX only
    except ImportError:
        return {}
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"peak_rss_mb": round(kilobytes / 1024, 1)}
