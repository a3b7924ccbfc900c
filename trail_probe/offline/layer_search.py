"""Which layer to read, found by training a few: `train.layers=search`.

    result = search_layers(list(range(30)), points=6, radius=2, train_round=fit_these_layers)
    result.best, result.rounds      # e.g. 19, [[0, 6, 12, 17, 23, 29], [15, 16, 18, 19], [20, 21]]

A full sweep trains one probe per layer (30 for SmolLM2, 32 for Llama-3-8B). The validation MAE over
layers falls to one broad minimum in the middle layers and rises again (paper Figure 2; our sweeps),
so a search trains a coarse grid of `points` layers spread evenly from the first to the last
candidate, then the untrained layers within `radius` of the best layer so far, again and again,
until every layer within `radius` of the best is trained and none of them is better. A radius of 2
steps over one layer whose probe trained worse than both its neighbours (the decode sweep of the
fp32 run has 17: 79.0, 18: 81.6, 19: 78.6). `scripts/compare_layer_search.py --replay` runs this
search on the numbers of a committed full sweep.

With `first` (`train.ridge_screen`: the layers `offline/layer_screen.py` scores best) the
first round trains those layers instead of the grid; the rounds after it are the same.

Each round is one call of `train_round`, which trains its layers (in stacks when the recipe stacks)
and returns their validation MAE; a round that was already trained comes back from disk, so a run
makes the same rounds in the same order every time, which is what lets `--resume` keep them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

METHOD = "coarse grid, then the layers near the best until none of them is better"
SCREENED_METHOD = "the best-screened layers, then the layers near the best until none of them is better"


def coarse_grid(candidates: list[int], points: int) -> list[int]:
    """`points` layers spread evenly over `candidates` (sorted), both ends included; all of them when few."""
    if points >= len(candidates):
        return list(candidates)
    if points < 2:
        raise ValueError("a coarse grid needs at least 2 points")
    step = (len(candidates) - 1) / (points - 1)
    return sorted({candidates[round(i * step)] for i in range(points)})


def expected_probes(candidates: list[int], points: int, radius: int) -> int:
    """About how many probes a search over `candidates` trains: its coarse grid and one neighbourhood."""
    return min(len(candidates), len(coarse_grid(candidates, points)) + 2 * radius)


def best_of(scores: dict[int, float]) -> int:
    """The layer with the lowest score; the lower layer on a tie."""
    return min(scores, key=lambda layer: (scores[layer], layer))


def neighbours_to_train(candidates: list[int], scores: dict[int, float], radius: int) -> list[int]:
    """The candidates within `radius` places of the best scored layer that have no score yet."""
    i = candidates.index(best_of(scores))
    near = candidates[max(0, i - radius):i + radius + 1]
    return [layer for layer in near if layer not in scores]


@dataclass
class SearchResult:
    candidates: list[int]
    rounds: list[list[int]] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)
    screened: bool = False

    @property
    def best(self) -> int | None:
        return best_of(self.scores) if self.scores else None

    def summary(self, points: int, radius: int) -> dict:
        """What the sweep's JSON records about a task's search."""
        return {"method": SCREENED_METHOD if self.screened else METHOD, "points": points, "radius": radius, "candidates": self.candidates,
                "rounds": self.rounds, "trained": sorted(self.scores), "best_layer": self.best}


def search_layers(candidates: list[int], points: int, radius: int,
                  train_round: Callable[[list[int]], dict[int, float]], first: list[int] | None = None) -> SearchResult:
    """Train the coarse grid (or `first`), then the layers near the best until all within `radius` of it
    are trained. `train_round(layers)` trains those layers and returns {layer: validation MAE}; an empty
    answer (a fast_dev_run writes no probes) ends the search."""
    result = SearchResult(sorted(candidates), screened=first is not None)
    todo = sorted(first) if first is not None else coarse_grid(result.candidates, points)
    while todo:
        scores = train_round(todo)
        result.rounds.append(todo)
        if not scores:
            break
        result.scores.update(scores)
        todo = neighbours_to_train(result.candidates, result.scores, radius)
    return result
