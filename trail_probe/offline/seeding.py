"""One seeding rule for what a resumed training run must repeat exactly: each epoch's data order (the
probes' `probe_module.EpochRows`, the baseline's `baseline_module.EpochShuffle` and its length-grouped
batches) and the baseline's dropout. Each draws from its own generator seeded by (seed, epoch,
stream) alone, never from a global generator, so a run resumed at an epoch boundary sees exactly what
an uninterrupted one would.

    g = epoch_generator(seed, epoch)            # this epoch's order
    g = epoch_generator(seed, epoch, stream=1)  # another draw of the same epoch
"""

from __future__ import annotations

import torch


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """One seed per (seed, epoch, stream), within torch's 64-bit seed range."""
    return ((seed * 1_000_003 + epoch) * 100_003 + stream) % (1 << 63)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, stream))
