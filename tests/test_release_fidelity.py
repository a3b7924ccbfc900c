"""TRAIL's public runtime (its SGLang patch), reproduced as named options of ours.

`Release` below re-implements the release's rules from their description (issue 16), independently
of `TrailState` and of `runtime.refine` (its transition matrix is built here from the rule): one global decode-pass counter that refines every request in the batch every K
passes with T^K whatever it generated; at prefill the decode probe on the last prompt token's state
is the first distribution, and BERT only gives the initial number, floored at 1. `TrailState`
with `cadence="global", initial="last_token"` must agree with it exactly; with the defaults it must
not (so the test can tell the two apart).
"""

from __future__ import annotations

import pytest
import torch
from conftest import trail_weights, write_trail_dir

from trail_probe.runtime import LengthPredictor
from trail_probe.serving.trail_state import TrailState

K, D, BUDGET = 4, 64, 96


def release_transition(num_bins: int, width: float, tokens: int) -> torch.Tensor:
    """T^tokens from the release's rule, built here: per token, each bin i > 0 keeps 1 - 1/width of its
    mass and passes 1/width to bin i - 1; bin 0 keeps all of it."""
    t = torch.zeros(num_bins, num_bins, dtype=torch.float64)
    t[0, 0] = 1.0
    for i in range(1, num_bins):
        t[i, i], t[i, i - 1] = 1 - 1 / width, 1 / width
    out = torch.eye(num_bins, dtype=torch.float64)
    for _ in range(tokens):
        out = out @ t
    return out


class Release:
    def __init__(self, probs, bins, bert_numbers):
        self.probs, self.bins, self.bert = probs, bins, bert_numbers
        self.t_k = release_transition(bins.num_bins, bins.width, K)
        self.post, self.initial, self.passes = {}, {}, 0

    def prefill(self, rid, last_state):
        q = self.probs(last_state[None])[0].double()
        self.post[rid] = q / q.sum()
        self.initial[rid] = max(1.0, self.bert[rid])

    def decode_pass(self, batch):
        if not batch:  # the counter counts decode passes
            return
        self.passes += 1
        if self.passes % K:
            return
        for rid, state in batch:
            q = (self.post[rid] @ self.t_k) * self.probs(state[None])[0].double()
            self.post[rid] = q / q.sum()


class Bert:  # BERT as a fixed distribution per prompt text
    def __init__(self, bins, dists):
        self.bins, self.dists = bins, dists

    def probs(self, texts):
        return torch.stack([self.dists[t] for t in texts])


@pytest.fixture
def predictor(tmp_path):
    return LengthPredictor.from_pretrained(write_trail_dir(tmp_path, trail_weights(d=D), hidden_size=D, probe_layer_idx=1,
                                                           max_len=BUDGET, device="cpu"))


def schedule():
    """Forward passes of a batch: a prefills at pass 0; b joins two passes later (mid-window), so its
    own token count and the global counter disagree; c is left out of one refinement pass."""
    g = torch.Generator().manual_seed(0)
    state = lambda: torch.randn(D, generator=g)  # noqa: E731
    passes, gen = [], {}
    for p in range(14):
        rows = []
        for rid, start in (("a", 0), ("b", 2), ("c", 1)):
            if p < start or (rid == "c" and p == 8):
                continue
            rows.append((rid, state(), gen.setdefault(rid, 0)))
            gen[rid] += 1
        passes.append(rows)
    return passes


def run_ours(predictor, bert, **options):
    rt = TrailState("trail", predictor=predictor, text_predictor=bert, max_new_tokens=BUDGET, refine_interval=K, **options)
    for rid in "abc":
        rt.prompt_texts[rid] = rid
    rt.admit(list("abc"))
    for rows in schedule():
        rt.observe([r for r, _, _ in rows], torch.stack([s for _, s, _ in rows]), [g for _, _, g in rows])
    return rt


def test_global_cadence_and_last_token_initial_reproduce_the_release(predictor):
    g = torch.Generator().manual_seed(1)
    dists = {rid: torch.softmax(3 * torch.randn(10, generator=g), -1) for rid in "abc"}
    bert = Bert(predictor.bins, dists)
    release = Release(predictor.probs, predictor.bins, {rid: float(predictor.bins.expectation(d[None].double())[0]) for rid, d in dists.items()})
    for rows in schedule():
        for rid, state, gen in rows:
            if gen == 0:
                release.prefill(rid, state)
        release.decode_pass([(rid, s) for rid, s, gen in rows if gen >= 1])
    ours = run_ours(predictor, bert, cadence="global", initial="last_token")
    for rid in "abc":
        # (float32 probe outputs differ in the last bits between a batch and a single row: hence not 0)
        torch.testing.assert_close(ours.tracker.posteriors([rid])[0], release.post[rid], rtol=0, atol=1e-6)
        assert ours.tracker.initial_estimates([rid])[0].item() == pytest.approx(min(release.initial[rid], BUDGET))
    decode_passes = [rows for rows in schedule() if any(gen >= 1 for _, _, gen in rows)]
    assert ours.refinements == sum(sum(gen >= 1 for _, _, gen in rows)
                                   for i, rows in enumerate(decode_passes) if (i + 1) % K == 0) > 0
    # our defaults (each request on its own count, BERT as the first distribution) are a different rule
    default = run_ours(predictor, bert)
    assert any(not torch.allclose(default.tracker.posteriors([rid])[0], release.post[rid]) for rid in "abc")


def test_before_its_prefill_a_last_token_request_is_ranked_by_berts_number(predictor):
    bins = predictor.bins
    dists = {"short": torch.eye(10)[0] * 0.9 + 0.01, "long": torch.eye(10)[9] * 0.9 + 0.01}
    rt = TrailState("trail", predictor=predictor, text_predictor=Bert(bins, dists), initial="last_token",
                      max_new_tokens=BUDGET, refine_interval=K)
    rt.prompt_texts.update({"short": "short", "long": "long"})
    rt.admit(["long", "short"])
    numbers = {r: max(1.0, float(bins.expectation(d[None].double())[0])) for r, d in dists.items()}
    est = rt.tracker.estimates(["short", "long"], [0, 0]).tolist()
    assert est == pytest.approx([min(numbers["short"], BUDGET), min(numbers["long"], BUDGET)])
    assert est[0] < est[1]  # the short one ranks first although the long one arrived first
    assert torch.count_nonzero(rt.tracker.posteriors(["short"])) == 0  # BERT is not in the posterior


def test_last_token_without_bert_takes_the_probes_number(predictor):
    rt = TrailState("trail", predictor=predictor, initial="last_token", max_new_tokens=BUDGET, refine_interval=K)
    rt.admit(["a"])
    assert rt.tracker.estimates(["a"], [0])[0].item() == BUDGET  # nothing known before the prefill
    state = torch.randn(1, D)
    rt.add_prompt_states("a", torch.cat([torch.randn(5, D), state]), done=True)  # the transformers engine's path
    expected = predictor.bins.expectation(predictor.probs(state).double())[0].item()
    assert rt.initial_estimates["a"] == pytest.approx(min(expected, BUDGET))
