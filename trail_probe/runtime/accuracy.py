"""How far length estimates are from the truth: mean absolute error and Kendall's tau, the two
measures `eval` reports offline and a server reports live (`serving.live_stats`), written once."""

from __future__ import annotations

import math

import torch


def mae(est: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean absolute error in tokens; NaN when there is nothing to average."""
    if est.numel() == 0:
        return math.nan
    return float((est.double() - truth.double()).abs().mean())


def kendall_tau(est: torch.Tensor, truth: torch.Tensor) -> float:
    """Kendall's tau-b between predicted and true lengths (1: the same order); NaN when undefined."""
    from scipy.stats import kendalltau

    if est.numel() < 2:
        return math.nan
    tau = kendalltau(est.double().numpy(), truth.double().numpy()).statistic
    return float(tau)


def same_step_tau(est: torch.Tensor, truth: torch.Tensor, groups: torch.Tensor) -> float:
    """The mean Kendall's tau within each group (e.g. the decode step an estimate was made at),
    weighted by the group's size: how well requests in flight together are ordered. NaN if no group
    has two comparable estimates."""
    total = weight = 0.0
    for g in torch.unique(groups):
        mask = groups == g
        n = int(mask.sum())
        tau = kendall_tau(est[mask], truth[mask]) if n >= 2 else math.nan
        if math.isfinite(tau):
            total, weight = total + n * tau, weight + n
    return total / weight if weight else math.nan
