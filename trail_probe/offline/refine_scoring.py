"""The refined estimate of every stored decode step, offline: a request's probe outputs refined by Bayes
at TRAIL's cadence (trail_probe.runtime.refine), counted down in between, as a serving runtime would
hold them. `eval` scores these, and `progress_curve` them and the total-length estimates at each point
of the requests' progress; `phase_of` gives TRAIL's release's global cadence its phases."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trail_probe.errors import UserError
from trail_probe.offline.metrics import mae
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.estimates import count_down, estimate, refines_at
from trail_probe.runtime.refine import (
    TransitionPowers,
    refine_sequence,
    step_likelihood,
)


@dataclass
class DecodeResult:
    """One layer's decode probe on the held-out decode steps, sorted by (request, generated)."""

    request: torch.Tensor  # [M] index into HeldOut
    generated: torch.Tensor  # [M] tokens generated so far (j)
    remaining: torch.Tensor  # [M] true tokens still to come
    step_probs: torch.Tensor  # [M, K] the probe on this step alone
    step_est: torch.Tensor  # [M]
    refined_probs: torch.Tensor  # [M, K] latest posterior, moved forward by T^(tokens since it)
    refined_est: torch.Tensor  # [M] latest refined estimate, counted down since
    is_refinement: torch.Tensor  # [M] bool: a refinement happens at this step


def refine_decode(step_probs: torch.Tensor, request: torch.Tensor, generated: torch.Tensor,
                  remaining: torch.Tensor, bins: Bins, max_new_tokens: int, interval: int,
                  prior: torch.Tensor | None = None, label_prior: torch.Tensor | None = None,
                  phases: torch.Tensor | None = None) -> DecodeResult:
    """Per-step and refined predictions of every decode step. Refinements happen at j = 1, 1+k,
    1+2k, ... (stored steps are j = 1, 1+stride, ...; k is a multiple of the stride); `prior` [n, K]
    is each request's distribution at j = 0 (the prompt probe), or None to start from the first step.
    `phases` [n] (refine.cadence=global, TRAIL's release): request r refines at j = 1 + phase, 1 +
    phase + k, ..., its prior advanced by k tokens at each, and before its first refinement it has
    the prior counted down (`phase_of` gives the phases)."""
    if len(generated):
        order = torch.argsort(request * (int(generated.max()) + 1) + generated)
        request, generated, remaining, step_probs = request[order], generated[order], remaining[order], step_probs[order]
    caps = (max_new_tokens - generated).double()
    if phases is not None and prior is None:
        raise UserError("refine.cadence=global scores TRAIL's release, whose requests keep their prompt-time estimate "
                        "until the first global refinement; give it a prior (refine.prior=auto, prompt_probe or bert)")
    is_refinement = refines_at(generated if phases is None else generated - phases[request], interval)
    powers = TransitionPowers(bins.num_bins, bins.width)
    refined_probs = torch.empty_like(step_probs, dtype=torch.float64)
    refined_est = torch.empty(len(generated), dtype=torch.float64)
    counts = torch.bincount(request)
    starts = torch.cumsum(counts, 0) - counts
    for r in torch.nonzero(counts).flatten().tolist():
        rows = torch.arange(int(starts[r]), int(starts[r] + counts[r]))
        points = rows[is_refinement[rows]]
        if phases is None and (len(points) == 0 or points[0] != rows[0]):
            raise ValueError(f"request {r}: decode steps do not start at j = 1; the extraction is malformed")
        post = refine_sequence(step_likelihood(step_probs[points], label_prior), generated[points], powers,
                               initial=None if prior is None else prior[r], initial_generated=0,
                               steps=None if phases is None else interval)
        at_gen, at_cap = generated[points], caps[points]
        if phases is not None:  # the prior is the estimate until the first refinement: a point at j = 0
            post = torch.cat([prior[r][None].double(), post])
            at_gen = torch.cat([torch.zeros(1, dtype=at_gen.dtype), at_gen])
            at_cap = torch.cat([torch.tensor([float(max_new_tokens)], dtype=at_cap.dtype), at_cap])
        at_point = estimate(post, bins, at_cap)
        latest = torch.searchsorted(at_gen, generated[rows], right=True) - 1
        since = generated[rows] - at_gen[latest]
        refined_est[rows] = count_down(at_point[latest], since, caps[rows])
        refined_probs[rows] = powers.advance(post[latest], since)
    step_est = estimate(step_probs, bins, caps)
    return DecodeResult(request, generated, remaining, step_probs, step_est, refined_probs, refined_est, is_refinement)


def phase_of(ids: list[str], interval: int, stride: int) -> torch.Tensor:
    """refine.cadence=global: each request's refinement phase, the tokens it generates before the first
    global refinement after it joins (TRAIL's release refines every k passes of the batch, so the
    phase depends on when a request arrives). Drawn uniformly, by a hash of the id, from the phases
    the extraction can show: multiples of decode_stride below k (only 0 when decode_stride = k)."""
    import hashlib

    choices = interval // stride
    return torch.tensor([stride * (int(hashlib.sha256(f"phase:{i}".encode()).hexdigest()[:8], 16) % choices) for i in ids],
                        dtype=torch.long)


def progress_curve(output_tokens: torch.Tensor, max_new_tokens: int, step: int, totals: dict[str, torch.Tensor],
                   decode: DecodeResult | None) -> dict:
    """MAE of the remaining-length estimate after t = 0, step, 2*step, ... generated tokens, over the
    requests still generating at t (all of them at t = 0). Total-length estimates (`totals`: method ->
    [n]) are counted down by t; the decode probe's, per step and refined, are those of the latest
    refinement at or before t, counted down since. Those do not exist before the first decode step,
    so they are None at t = 0 (where the refined method's prior is the prompt probe itself)."""
    longest = int(output_tokens.max()) if len(output_tokens) else 0
    points = list(range(0, max(longest, 1), step))
    curve = {"tokens": points, "requests": [], **{m: [] for m in list(totals) + ["per_step", "refined"]}}
    if decode is not None:
        refine_rows = torch.nonzero(decode.is_refinement).flatten()
    for t in points:
        active = (output_tokens > t) if t else torch.ones_like(output_tokens, dtype=torch.bool)
        truth = (output_tokens - t)[active]
        curve["requests"].append(int(active.sum()))
        for method, total in totals.items():
            curve[method].append(mae(count_down(total[active], t, max_new_tokens - t), truth))
        if decode is None or t == 0:
            curve["per_step"].append(None)
            curve["refined"].append(None)
            continue
        usable = refine_rows[decode.generated[refine_rows] <= t]
        latest = torch.full((len(output_tokens),), -1, dtype=torch.long)
        latest.scatter_reduce_(0, decode.request[usable], usable, "amax")
        rows = latest[active]
        has = rows >= 0  # always true for a well-formed extraction (step j = 1 exists for every answer)
        since = t - decode.generated[rows[has]]
        for method, est in (("per_step", decode.step_est), ("refined", decode.refined_est)):
            curve[method].append(mae(count_down(est[rows[has]], since, max_new_tokens - t), truth[has]))
    return curve
