"""The layer search's rounds (`offline/layer_search.py`) on known validation curves, without training, and the
ridge screen that can choose its first round (`offline/layer_screen.py`)."""

import pytest
import torch

from trail_probe.offline.layer_screen import ridge_mae, screened
from trail_probe.offline.layer_search import coarse_grid, expected_probes, search_layers

# The decode sweep of the committed fp32 run (reports/smollm2_alpaca/sweep_layer_sweep.json), rounded:
# a broad minimum at 15-19 with a worse layer 18 between 17 and 19.
FP32_DECODE = [110.1, 106.1, 104.4, 104.8, 101.6, 102.7, 101.4, 100.6, 101.4, 104.2, 100.8, 99.0, 93.8, 90.2, 86.0,
               83.5, 81.6, 79.0, 81.6, 78.6, 88.5, 89.3, 91.4, 96.8, 99.9, 100.7, 100.5, 107.2, 100.8, 111.1]


def replay(curve, points=6, radius=2):
    return search_layers(list(range(len(curve))), points, radius, lambda todo: {layer: curve[layer] for layer in todo})


def test_the_coarse_grid_spans_the_candidates_evenly():
    assert coarse_grid(list(range(30)), 6) == [0, 6, 12, 17, 23, 29]
    assert coarse_grid([2, 4, 6, 8], 6) == [2, 4, 6, 8]  # fewer candidates than points: all of them
    assert coarse_grid(list(range(32)), 5) == [0, 8, 16, 23, 31]
    with pytest.raises(ValueError):
        coarse_grid(list(range(10)), 1)


def test_the_search_steps_over_a_worse_layer_next_to_the_best():
    found = replay(FP32_DECODE)
    assert found.best == 19 and found.rounds == [[0, 6, 12, 17, 23, 29], [15, 16, 18, 19], [20, 21]]
    assert len(found.scores) == 12 == expected_probes(list(range(30)), 6, 2) + 2
    assert replay(FP32_DECODE, radius=1).best == 17  # one layer at a time stops at the local minimum


def test_the_search_ends_where_the_best_layers_neighbours_are_all_trained():
    curve = [abs(layer - 6) for layer in range(12)]  # one minimum, at a grid point
    found = replay(curve, points=5)
    assert found.best == 6 and found.rounds == [[0, 3, 6, 8, 11], [4, 5, 7]]
    edge = replay([float(layer) for layer in range(12)])  # best at the first layer: only one side to try
    assert edge.best == 0 and edge.rounds == [[0, 2, 4, 7, 9, 11], [1]]


def test_a_round_that_trains_nothing_ends_the_search():
    calls = []
    found = search_layers(list(range(30)), 6, 2, lambda todo: calls.append(todo) or {})
    assert calls == [[0, 6, 12, 17, 23, 29]] and found.best is None and found.summary(6, 2)["trained"] == []


def test_a_screened_first_round_replaces_the_grid_and_the_rounds_after_it_are_the_same():
    curve = [9, 8, 7, 6, 5, 4, 3, 2, 3, 4]
    found = search_layers(list(range(10)), 3, 1, lambda todo: {layer: curve[layer] for layer in todo}, first=[8, 6, 2])
    assert found.rounds[0] == [2, 6, 8] and found.best == 7 and found.screened
    assert found.summary(3, 1)["method"].startswith("the best-screened layers")


def test_the_ridge_screen_ranks_the_layer_whose_states_carry_the_length_first():
    g = torch.Generator().manual_seed(0)
    n, d = 600, 16
    length = torch.randint(1, 512, (n,), generator=g).float()
    noise = torch.randn(n, d, generator=g)
    layers = {gain: noise + length[:, None] / 512 * gain * torch.randn(d, generator=g) for gain in (0.0, 0.5, 4.0)}
    scores = {gain: ridge_mae(x[:450], length[:450], x[450:], length[450:], cap=512.0) for gain, x in layers.items()}
    assert scores[4.0] < 0.3 * scores[0.0] and scores[4.0] < scores[0.5] < scores[0.0]
    assert 100 < scores[0.0] < 160  # no signal: about the MAE of the mean (uniform lengths: 128)
    assert screened({3: 50.0, 1: 20.0, 7: 20.0, 0: 90.0}, 2) == [1, 7]
