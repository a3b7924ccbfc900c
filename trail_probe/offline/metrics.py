"""Error measures of length predictions, used by `eval`.

MAE is in tokens; accuracy is the argmax bin against the true length's bin. The point estimates they
score come from `trail_probe.runtime.estimates` (`estimate`, `count_down`), the rules serving uses.

    from trail_probe.runtime.estimates import estimate
    from trail_probe.offline.metrics import mae
    print(mae(estimate(probs, bins, cap=512 - generated), remaining))
"""

from __future__ import annotations

import math

import torch

from trail_probe.runtime.bins import Bins


def mae(est: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean absolute error in tokens; NaN when there is nothing to average."""
    if est.numel() == 0:
        return math.nan
    return float((est.double() - truth.double()).abs().mean())


def accuracy(probs: torch.Tensor, truth: torch.Tensor, bins: Bins) -> float:
    """Fraction of distributions whose most likely bin holds the true length; NaN when empty."""
    if probs.shape[0] == 0:
        return math.nan
    return float((probs.argmax(-1) == bins.label(truth)).double().mean())


def confusion(probs: torch.Tensor, truth: torch.Tensor, bins: Bins) -> torch.Tensor:
    """[K, K] counts: row = true bin, column = most likely predicted bin."""
    k = bins.num_bins
    flat = bins.label(truth) * k + probs.argmax(-1)
    return torch.bincount(flat, minlength=k * k).reshape(k, k)


def summary(est: torch.Tensor, truth: torch.Tensor, probs: torch.Tensor | None = None,
            bins: Bins | None = None) -> dict:
    """{"mae", "acc", "n"} of one method on one target (acc only when its distributions are given)."""
    out = {"mae": mae(est, truth), "n": int(truth.numel())}
    if probs is not None:
        out["acc"] = accuracy(probs, truth, bins)
    return out
