"""Error measures of length predictions, shared by the baseline, `eval` and the simulator.

A prediction is a distribution over the length bins. Its point estimate is the expectation over the
bin midpoints (as TRAIL's runtime computes it), clamped to what the request can still generate,
[0, max_new_tokens - generated]. Between two predictions a scheduler counts the estimate down by
one per generated token. MAE is in tokens; accuracy is the argmax bin against the true length's bin.

    from trail_probe.metrics import estimate, mae
    est = estimate(probs, bins, cap=512 - generated)
    print(mae(est, remaining))
"""

from __future__ import annotations

import math

import torch

from trail_probe.bins import Bins


def estimate(probs: torch.Tensor, bins: Bins, cap: float | torch.Tensor) -> torch.Tensor:
    """Expected length of each distribution in `probs` [..., K], clamped to [0, cap] (float64)."""
    cap = torch.as_tensor(cap, dtype=torch.float64)
    return bins.expectation(probs.double()).clamp_min(0.0).minimum(cap)


def count_down(est: torch.Tensor, tokens: float | torch.Tensor, cap: float | torch.Tensor) -> torch.Tensor:
    """An estimate made `tokens` generated tokens ago, as a scheduler uses it now: clamped to [0, cap]."""
    cap = torch.as_tensor(cap, dtype=torch.float64)
    return (est.double() - torch.as_tensor(tokens, dtype=torch.float64)).clamp_min(0.0).minimum(cap)


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
