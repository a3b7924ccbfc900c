"""How many requests TRAIL should decode at once on this engine, from the engine's own step times.

Shortest-first only helps when fewer requests run than are waiting, and running fewer costs
throughput wherever a step has a fixed cost: a step that decodes k requests takes about a + b * k
seconds, so k requests produce k / (a + b k) tokens per second. `StepCost` fits a and b online
(least squares over the latest steps, tokens against seconds) and `running_limit` picks the smallest
k whose throughput is within `max_loss` of the largest batch's:

    k / (a + b k) >= (1 - max_loss) * K / (a + b K)   <=>   k >= (1 - max_loss) K a / (a + max_loss b K)

On a GPU, where a step is mostly its fixed cost (reading the weights), k comes out near K and TRAIL
changes only the order; on a CPU, where each token costs about the same, a smaller batch loses
little and shortest-first gains much. Until the fit has seen enough steps of different sizes the
limit is K (vLLM's own).
"""

from __future__ import annotations

import math
from collections import deque


class StepCost:
    """A sliding-window least-squares fit of step seconds on step tokens, kept as running sums."""

    def __init__(self, window: int = 2000, min_steps: int = 50, min_spread: float = 4.0):
        self._steps: deque = deque()
        self.window, self.min_steps, self.min_spread = window, min_steps, min_spread
        self._sums = [0.0, 0.0, 0.0, 0.0]  # x, y, xx, xy

    def add(self, tokens: int, seconds: float) -> None:
        if not (tokens > 0 and math.isfinite(seconds) and seconds > 0):
            return
        self._steps.append((float(tokens), float(seconds)))
        self._update(float(tokens), float(seconds), 1.0)
        if len(self._steps) > self.window:
            self._update(*self._steps.popleft(), -1.0)

    def _update(self, x: float, y: float, sign: float) -> None:
        s = self._sums
        s[0] += sign * x
        s[1] += sign * y
        s[2] += sign * x * x
        s[3] += sign * x * y

    def fit(self) -> tuple[float, float] | None:
        """(a, b) in seconds and seconds per token, or None while the steps cannot tell them apart."""
        n = len(self._steps)
        if n < self.min_steps:
            return None
        sx, sy, sxx, sxy = self._sums
        var = sxx / n - (sx / n) ** 2
        if var < self.min_spread ** 2:  # (nearly) every step the same size: no slope to fit
            return None
        b = (sxy / n - sx * sy / n ** 2) / var
        a = sy / n - b * sx / n
        return (a, b) if a >= 0 and b > 0 else None

    def running_limit(self, largest: int, max_loss: float) -> int:
        fitted = self.fit()
        if fitted is None or max_loss <= 0:
            return largest
        a, b = fitted
        k = (1 - max_loss) * largest * a / (a + max_loss * b * largest)
        return max(1, min(largest, math.ceil(k)))
