"""trail_probe.runtime.refine against a direct, loop-by-loop implementation of TRAIL_NOTES section 2.

The reference below uses plain Python lists and moves the prior one token at a time, so it shares
no code (and no matrix powers) with the module under test.
"""

import math
import random

import pytest
import torch

from trail_probe.runtime.bins import Bins
from trail_probe.runtime.refine import (
    TransitionPowers,
    bayes_update,
    refine_sequence,
    transition_matrix,
)


def reference_step(q: list[float], w: float) -> list[float]:
    """One generated token: each bin i > 0 keeps 1 - 1/w of its mass and passes 1/w to bin i - 1."""
    out = [0.0] * len(q)
    out[0] = q[0]
    for i in range(1, len(q)):
        out[i] += q[i] * (1 - 1 / w)
        out[i - 1] += q[i] / w
    return out


def reference_refine(ps: list[list[float]], js: list[int], w: float, prior=None, prior_j=0) -> list[list[float]]:
    """q_t ∝ (q_{t-1} T^k) * p_t with k = tokens since the last refinement; the first p stands alone
    when no prior is given."""
    posts, q, last = [], prior, prior_j
    for p, j in zip(ps, js):
        if q is None:
            q = [x / sum(p) for x in p]
        else:
            for _ in range(j - last):
                q = reference_step(q, w)
            q = [a * b for a, b in zip(q, p)]
            q = [x / sum(q) for x in q]
        posts.append(q)
        last = j
    return posts


def random_dist(rng: random.Random, k: int) -> list[float]:
    x = [rng.random() + 1e-3 for _ in range(k)]
    return [v / sum(x) for v in x]


def test_transition_matrix_matches_the_formula():
    k, w = 6, 51.2
    t = transition_matrix(k, w)
    for i in range(k):
        expected_row = reference_step([1.0 if c == i else 0.0 for c in range(k)], w)
        assert t[i].tolist() == pytest.approx(expected_row, abs=1e-15)
    assert torch.allclose(t.sum(1), torch.ones(k, dtype=torch.float64))


def test_powers_equal_repeated_single_token_steps():
    k, w = 10, 51.2
    powers = TransitionPowers(k, w)
    q = random_dist(random.Random(1), k)
    stepped = q
    for _ in range(37):
        stepped = reference_step(stepped, w)
    assert powers.advance(torch.tensor([q], dtype=torch.float64), 37)[0].tolist() == pytest.approx(stepped, abs=1e-12)
    mixed = powers.advance(torch.tensor([q, q], dtype=torch.float64), [0, 37])
    assert mixed[0].tolist() == pytest.approx(q, abs=1e-15)
    assert mixed[1].tolist() == pytest.approx(stepped, abs=1e-12)


@pytest.mark.parametrize("with_prior", [False, True])
def test_refine_sequence_matches_reference(with_prior):
    rng = random.Random(7)
    k, w = 10, 51.2
    js = [1, 9, 17, 41, 42, 130]  # uneven gaps, including a gap of one token
    ps = [random_dist(rng, k) for _ in js]
    prior = random_dist(rng, k) if with_prior else None
    got = refine_sequence(torch.tensor(ps), js, TransitionPowers(k, w),
                          initial=torch.tensor(prior) if prior else None, initial_generated=0)
    expected = reference_refine(ps, js, w, prior=prior, prior_j=0)
    assert got.dtype == torch.float64
    for s in range(len(js)):
        assert got[s].tolist() == pytest.approx(expected[s], rel=1e-5, abs=1e-9)


def test_bayes_update_is_normalised_product_and_falls_back_without_overlap():
    prior = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    like = torch.tensor([[0.2, 0.6, 0.2]], dtype=torch.float64)
    assert bayes_update(prior, like)[0].tolist() == pytest.approx([0.25, 0.75, 0.0])
    disjoint = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    assert bayes_update(prior, disjoint)[0].tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_perfect_predictor_drives_the_error_to_zero_even_from_a_wrong_prior():
    """A per-step predictor that is one-hot on the true remaining bin: after the first refinement the
    posterior is exactly that bin (bin error 0), so the estimate error is only the midpoint
    quantisation, the smallest any 10-bin predictor can have."""
    bins = Bins(10, 512)
    powers = TransitionPowers(bins.num_bins, bins.width)
    total = 300
    js = list(range(1, total + 1, 8))
    truth = torch.tensor([total - j for j in js])
    perfect = torch.nn.functional.one_hot(bins.label(truth), bins.num_bins).double()
    wrong_prior = torch.full((bins.num_bins,), 0.01, dtype=torch.float64)
    wrong_prior[0] = 0.91  # confidently (and wrongly) short
    post = refine_sequence(perfect, js, powers, initial=wrong_prior)
    assert torch.equal(post.argmax(-1), bins.label(truth))
    assert torch.allclose(post, perfect, atol=1e-12)
    quantisation = (bins.expectation(perfect) - truth).abs()
    assert ((bins.expectation(post) - truth).abs() - quantisation).abs().max() < 1e-9
    # And with lengths at bin midpoints, where quantisation vanishes, the error itself is zero.
    mid_js = [1, 1 + 102, 1 + 102 + 204]
    remaining = torch.tensor([486.4, 384.0, 179.2], dtype=torch.float64)
    assert torch.allclose(bins.midpoints.double()[[9, 7, 3]], remaining)
    onehot = torch.nn.functional.one_hot(bins.label(remaining), bins.num_bins).double()
    post = refine_sequence(onehot, mid_js, powers, initial=wrong_prior)
    assert (bins.expectation(post) - remaining).abs().max() < 1e-4  # midpoints are float32


def test_uninformative_predictor_keeps_the_counted_down_prior():
    """Uniform per-step predictions carry no information: the posterior is the prior moved down by
    T^j, whose expectation falls by one token per token while no mass sits in bin 0."""
    bins = Bins(10, 512)
    powers = TransitionPowers(bins.num_bins, bins.width)
    prior = torch.zeros(bins.num_bins, dtype=torch.float64)
    prior[7], prior[8] = 0.6, 0.4  # far from bin 0, so almost nothing reaches it in 64 tokens
    js = [1, 9, 17, 25, 33, 41, 49, 57, 65]
    uniform = torch.full((len(js), bins.num_bins), 1 / bins.num_bins)
    post = refine_sequence(uniform, js, powers, initial=prior)
    for s, j in enumerate(js):
        moved = prior.tolist()
        for _ in range(j):
            moved = reference_step(moved, bins.width)
        assert post[s].tolist() == pytest.approx(moved, abs=1e-12)
    counted_down = bins.expectation(prior[None]).item() - torch.tensor(js, dtype=torch.float64)
    assert (bins.expectation(post) - counted_down).abs().max() < 0.01  # tokens; the mass reaching bin 0 is tiny
    # Mass in the absorbing bin 0 stops counting down: per token the expectation falls by the mass
    # still in bin 1 (which loses 1/w of itself each token), not by one.
    low = torch.tensor([0.5, 0.5] + [0.0] * 8, dtype=torch.float64)
    post = refine_sequence(uniform[:2], [1, 9], powers, initial=low)
    fall = bins.expectation(low[None]).item() - bins.expectation(post[-1:]).item()
    assert math.isclose(fall, sum(0.5 * (1 - 1 / bins.width) ** t for t in range(9)), rel_tol=1e-6)


def test_prior_corrected_likelihood_removes_the_label_prior():
    """A probe that outputs exactly the training label frequencies carries no evidence: with the
    prior divided out, refinement keeps the (moved) initial prior; TRAIL's raw update does not."""
    from trail_probe.runtime.refine import step_likelihood

    label_prior = [0.5, 0.2, 0.1, 0.1, 0.1]
    powers = TransitionPowers(5, 10.0)
    initial = [0.0, 0.0, 0.0, 0.0, 1.0]
    steps = torch.tensor([label_prior] * 4, dtype=torch.float64)
    generated = [1, 9, 17, 25]
    corrected = refine_sequence(step_likelihood(steps, torch.tensor(label_prior, dtype=torch.float64)), generated,
                                powers, initial=torch.tensor(initial, dtype=torch.float64))
    # the reference divides each step's distribution by the label prior, then refines loop by loop
    flat = [[p / q for p, q in zip(row, label_prior)] for row in steps.tolist()]
    expected = reference_refine(flat, generated, 10.0, prior=initial, prior_j=0)
    moved = initial
    for _ in range(25):
        moved = reference_step(moved, 10.0)
    assert expected[-1] == pytest.approx(moved, abs=1e-12)  # flat evidence: the prior, moved 25 tokens
    for s in range(len(generated)):
        assert corrected[s].tolist() == pytest.approx(expected[s], abs=1e-9)
    raw = refine_sequence(steps, generated, powers, initial=torch.tensor(initial, dtype=torch.float64))
    assert raw[-1].tolist() == pytest.approx(reference_refine(steps.tolist(), generated, 10.0, prior=initial)[-1], abs=1e-9)
    assert raw[-1].tolist() != pytest.approx(moved, abs=1e-3)
    assert torch.equal(step_likelihood(steps), steps)  # no prior: TRAIL's rule unchanged


def test_refine_sequence_with_fixed_steps_advances_by_them_whatever_was_generated():
    rng = random.Random(0)
    k, w = 10, 51.2
    powers = TransitionPowers(k, w)
    p = [random_dist(rng, k) for _ in range(3)]
    prior = random_dist(rng, k)
    post = refine_sequence(torch.tensor(p, dtype=torch.float64), [3, 11, 19], powers,
                           initial=torch.tensor(prior, dtype=torch.float64), initial_generated=0, steps=8)
    # the reference: 8 single-token moves before each update, whatever the generated counts say
    expected = reference_refine(p, [8, 16, 24], w, prior=prior, prior_j=0)
    for s in range(3):
        assert post[s].tolist() == pytest.approx(expected[s], rel=1e-9, abs=1e-12)
    own = refine_sequence(torch.tensor(p, dtype=torch.float64), [3, 11, 19], powers,
                          initial=torch.tensor(prior, dtype=torch.float64), initial_generated=0)
    assert own[0].tolist() == pytest.approx(reference_refine(p, [3], w, prior=prior)[0], rel=1e-9, abs=1e-12)
    assert own[0].tolist() != pytest.approx(post[0].tolist(), abs=1e-6)  # its own first advance is 3 tokens, not 8
