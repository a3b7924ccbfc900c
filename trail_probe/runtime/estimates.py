"""The rules every consumer of a length prediction shares, written once.

- A point estimate is the expectation over the bin midpoints, clamped to what the request can still
  generate, [0, max_new_tokens - generated] (`estimate`).
- Between two predictions the estimate counts down by one per generated token, never below
  `ESTIMATE_FLOOR` and never above the tokens left (`count_down`). The tracker, both serving engines,
  the simulator, eval and the probe's validation MAE all use this one function.
- A request is refined at generated = 1, 1 + k, 1 + 2k, ... (`refines_at`): the forward pass that
  produces token j reads the state of token j - 1, and j = 1 is the first decode step. Extraction
  stores decode states on the same cadence, with k = extract.decode_stride.
"""

from __future__ import annotations

import math

import torch

from trail_probe.errors import UserError

ESTIMATE_FLOOR = 0.0  # tokens: an estimate a request has outlived says "about to finish"


def estimate(probs: torch.Tensor, bins, cap: float | torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Expected length of each distribution in `probs` [..., K] over `bins`, clamped to [0, cap],
    computed in `dtype` (float64 unless a training loop keeps its own precision)."""
    cap = torch.as_tensor(cap, dtype=dtype, device=probs.device)
    return bins.expectation(probs.to(dtype)).clamp_min(ESTIMATE_FLOOR).minimum(cap)


def count_down(est, tokens, cap=math.inf):
    """An estimate made `tokens` generated tokens ago, as a scheduler uses it now: est - tokens,
    clamped to [ESTIMATE_FLOOR, cap]. Tensors in, float64 tensor out; plain numbers in, a float out."""
    if isinstance(est, torch.Tensor):
        tokens = torch.as_tensor(tokens, dtype=torch.float64, device=est.device)
        cap = torch.as_tensor(cap, dtype=torch.float64, device=est.device)
        return (est.double() - tokens).clamp_min(ESTIMATE_FLOOR).minimum(cap)
    return min(max(est - tokens, ESTIMATE_FLOOR), cap)


def refines_at(generated, interval: int):
    """Whether the forward pass producing token `generated` refines (j = 1, 1 + k, ...); int or tensor."""
    return (generated >= 1) & ((generated - 1) % interval == 0)


def check_interval(interval: int, what: str = "refine.interval") -> int:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise UserError(f"{what} = {interval!r} must be a whole number of tokens >= 1 (TRAIL's launcher uses 8)")
    return interval
