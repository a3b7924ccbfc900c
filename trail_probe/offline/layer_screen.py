"""Every layer scored by one Gram matrix, so a layer search trains the promising ones first: `train.ridge_screen`.

    mae = ridge_mae(train_x, train_tokens, val_x, val_tokens, cap=val_cap)   # one layer: its best validation MAE
    first = screened(scores, points=3)                                         # the layers the search trains first

A probe trained by the paper's recipe costs 30 epochs; a closed-form ridge regression of the same
target (the answer's length, or the remaining length for the decode task) on the same states costs
one Gram matrix. Its validation MAE is not the probe's, but it ranks layers by how much of the length
their states carry linearly, which is where the probes' broad minimum lies. The search then trains
the `points` best-screened layers instead of an evenly spread grid, and goes on as before (the
untrained layers near the best trained one, until none is better): the probes, and so the layer
finally chosen, are still the paper's, judged by their own validation MAE.

The regression: states standardized on the training side, an intercept, and the ridge strength
chosen per layer from `ALPHAS` (relative to the mean eigenvalue of the standardized Gram matrix,
so one grid fits any hidden size) by the same validation rows that choose a probe's epoch; the
prediction is clipped to [0, cap], as an estimate is.
"""

from __future__ import annotations

import torch

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def ridge_mae(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              cap: torch.Tensor | float) -> float:
    """The lowest validation MAE (tokens) of ridge regressions of y on x over `ALPHAS`."""
    x = train_x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = train_y.double()
    y_mean = y.mean()
    gram = (x.T @ x).double() / len(x)  # float32 products of standardized states, summed once; solved in float64
    rhs = (x.T @ (y - y_mean).float()).double() / len(x)
    eigvals, eigvecs = torch.linalg.eigh(gram)
    projected = eigvecs.T @ rhs
    v = ((val_x.float() - mean) / std).double()
    v_eig = v @ eigvecs
    scale = float(eigvals.clamp_min(0).mean())
    cap = torch.as_tensor(cap, dtype=torch.float64)
    best = float("inf")
    for alpha in ALPHAS:
        pred = v_eig @ (projected / (eigvals.clamp_min(0) + alpha * scale)) + y_mean
        pred = torch.minimum(pred.clamp_min(0), cap)
        best = min(best, float((pred - val_y.double()).abs().mean()))
    return best


def screened(scores: dict[int, float], points: int) -> list[int]:
    """The `points` layers with the lowest screening MAE (the lower layer on a tie), in layer order."""
    return sorted(sorted(scores, key=lambda layer: (scores[layer], layer))[:points])
