"""The probe inputs' definitions (`runtime/probe_inputs.py`), against the formulas written out by hand."""

import math

import pytest
import torch

from trail_probe.errors import UserError
from trail_probe.runtime.probe_inputs import (
    RunningPools,
    check_input,
    decode_input,
    entropy_pool,
    input_width,
    prompt_input,
    token_entropy,
)


def test_token_entropy_in_nats_over_the_whole_vocabulary():
    assert float(token_entropy(torch.zeros(4))) == pytest.approx(math.log(4), abs=1e-6)  # uniform over 4
    assert float(token_entropy(torch.tensor([0.0, -math.inf, -math.inf]))) == pytest.approx(0.0, abs=1e-7)  # certain
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, -math.inf]], dtype=torch.bfloat16)
    p = torch.tensor([1.0, 2.0, 3.0]).softmax(-1)
    out = token_entropy(logits)
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert out.tolist() == pytest.approx([float(-(p * p.log()).sum()), math.log(2)], abs=1e-6)
    big = torch.randn(3, 5, 50)
    torch.testing.assert_close(token_entropy(big, rows=4), token_entropy(big, rows=1000))


def test_pools_from_running_sums_are_the_written_out_formulas():
    g = torch.Generator().manual_seed(0)
    h, H = torch.randn(9, 6, generator=g), torch.rand(9, generator=g) * 3  # states and entropies of 9 tokens
    sums = {"sum_h": h.sum(0), "count": 9, "sum_wh": (H[:, None] * h).sum(0), "sum_w": H.sum()}
    torch.testing.assert_close(prompt_input("mean", sums["sum_h"], 9), h.mean(0))
    torch.testing.assert_close(prompt_input("last", sums["sum_h"], 9, last=h[-1]), h[-1])
    weighted = sum(H[t] * h[t] for t in range(9)) / sum(H)
    torch.testing.assert_close(prompt_input("entropy", **sums), weighted)
    assert not torch.allclose(weighted, h.mean(0), atol=1e-3)
    cur = torch.randn(6, generator=g)
    torch.testing.assert_close(decode_input("current", cur), cur)
    both = decode_input("current+entropy", cur, **sums)
    assert both.shape == (12,) and input_width("current+entropy", 6) == 12
    torch.testing.assert_close(both, torch.cat([cur, weighted]))
    torch.testing.assert_close(decode_input("current+mean", cur, **sums), torch.cat([cur, h.mean(0)]))
    # every token certain (sum of entropies 0): the entropy pool is the plain mean
    torch.testing.assert_close(entropy_pool(torch.zeros(6), 0.0, sums["sum_h"], 9), h.mean(0))
    with pytest.raises(ValueError, match="running sums"):
        decode_input("mean", cur)
    with pytest.raises(UserError, match="decode input"):
        check_input("decode", "last", "decode input")


def test_running_pools_keep_each_request_apart_through_reset_shrink_and_growth():
    g = torch.Generator().manual_seed(1)
    pools = RunningPools(3, (2, 4), weighted=True)
    seen = {r: [] for r in range(5)}
    for step in range(6):
        rows = torch.tensor([0, 1, 2] if step < 3 else [0, 2])
        states, w = torch.randn(len(rows), 2, 4, generator=g), torch.rand(len(rows), generator=g)
        pools.add(rows, states, w)
        for k, r in enumerate(rows.tolist()):
            seen[r].append((states[k], w[k]))
        if step == 1:
            pools.reset(torch.tensor([1]))
            seen[1] = []
    for r in range(3):
        h = torch.stack([s for s, _ in seen[r]])
        w = torch.stack([x for _, x in seen[r]])
        torch.testing.assert_close(pools.pooled("mean", torch.tensor([r]))[0], h.mean(0))
        torch.testing.assert_close(pools.pooled("entropy", torch.tensor([r]))[0], (w[:, None, None] * h).sum(0) / w.sum())
    expected = pools.pooled("entropy", torch.tensor([2, 0]))
    pools.keep(torch.tensor([2, 0]))
    pools.grow(4)
    assert len(pools) == 4 and float(pools.count[3]) == 0
    torch.testing.assert_close(pools.pooled("entropy", torch.tensor([0, 1])), expected)
    pools.add(torch.tensor([3, 3]), torch.ones(2, 2, 4), torch.tensor([1.0, 3.0]))  # a row named twice gets both
    assert float(pools.count[3]) == 2 and float(pools.sum_w[3]) == 4.0
    with pytest.raises(ValueError, match="entropy"):
        RunningPools(1, (4,), weighted=False).pooled("entropy", torch.tensor([0]))


def test_request_pools_keep_one_row_per_generated_token_and_reuse_freed_slots():
    """A server's pools (`RequestPools`): the mean of rows g = 1 .. G whatever passes repeat them, NaN for a
    request never seen (ranked at its budget by the runtime), and memory bounded by the requests alive."""
    from trail_probe.runtime.probe_inputs import RequestPools

    torch.manual_seed(0)
    pools = RequestPools("mean", 3)
    rows = torch.randn(40, 3)
    for g in range(20):  # 20 requests, each with its generated rows 1 .. 4 (row 0: the prompt, never pooled)
        pools.add([f"r{g}"] * 5, [0, 1, 2, 3, 4], rows[g:g + 5])
    pools.add(["r0"] * 3, [2, 3, 4], torch.zeros(3, 3))  # recomputed rows are not added again
    got = pools.inputs(["r0", "r7", "new"], torch.zeros(3, 3))
    assert torch.allclose(got[0], rows[1:5].mean(0)) and torch.allclose(got[1], rows[8:12].mean(0))
    assert torch.isnan(got[2]).all()
    capacity = len(pools.pools)
    for _ in range(50):  # requests come and go: the table does not grow
        pools.drop([f"r{g}" for g in range(20)])
        for g in range(20):
            pools.add([f"r{g}"], [1], rows[g:g + 1])
    assert len(pools) == 20 and len(pools.pools) == capacity
    assert torch.allclose(pools.inputs(["r3"], torch.zeros(1, 3))[0], rows[3])  # a reused slot starts empty
    with pytest.raises(ValueError, match="entropy"):
        RequestPools("current+entropy", 3)
