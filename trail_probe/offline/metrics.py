"""Error measures of length predictions, used by `eval`.

MAE is in tokens; accuracy is the argmax bin against the true length's bin; Kendall's tau (scipy)
measures the order a scheduler would run requests in, overall and among estimates made at the same
decode step; the confusion matrix is scikit-learn's. The point estimates they
score come from `trail_probe.runtime.estimates` (`estimate`, `count_down`), the rules serving uses.

    from trail_probe.runtime.estimates import estimate
    from trail_probe.offline.metrics import mae
    print(mae(estimate(probs, bins, cap=512 - generated), remaining))
"""

from __future__ import annotations

import math

import torch

from trail_probe.runtime.accuracy import kendall_tau, mae, same_step_tau
from trail_probe.runtime.bins import Bins


def accuracy(probs: torch.Tensor, truth: torch.Tensor, bins: Bins) -> float:
    """Fraction of distributions whose most likely bin holds the true length; NaN when empty."""
    if probs.shape[0] == 0:
        return math.nan
    return float((probs.argmax(-1) == bins.label(truth)).double().mean())


def confusion(probs: torch.Tensor, truth: torch.Tensor, bins: Bins) -> torch.Tensor:
    """[K, K] counts: row = true bin, column = most likely predicted bin (scikit-learn's)."""
    from sklearn.metrics import confusion_matrix

    labels = list(range(bins.num_bins))
    return torch.from_numpy(confusion_matrix(bins.label(truth).numpy(), probs.argmax(-1).numpy(), labels=labels))


def rank_agreement(est: torch.Tensor, truth: torch.Tensor, groups: torch.Tensor | None = None) -> dict:
    """What a scheduler needs of a predictor: the order. Kendall's tau over all pairs, and, with
    `groups` (e.g. the decode step each estimate was made at), the mean tau within a group weighted by
    its size: how well requests that are in flight together are ordered."""
    out = {"kendall_tau": kendall_tau(est, truth)}
    if groups is not None:
        out["kendall_tau_same_step"] = same_step_tau(est, truth, groups)
    return out


def summary(est: torch.Tensor, truth: torch.Tensor, probs: torch.Tensor | None = None,
            bins: Bins | None = None, groups: torch.Tensor | None = None) -> dict:
    """{"mae", "acc", "n", "kendall_tau"[, "kendall_tau_same_step"]} of one method on one target (acc
    only when its distributions are given, the same-step tau when `groups` names each row's step)."""
    out = {"mae": mae(est, truth), "n": int(truth.numel()), **rank_agreement(est, truth, groups)}
    if probs is not None:
        out["acc"] = accuracy(probs, truth, bins)
    return out
