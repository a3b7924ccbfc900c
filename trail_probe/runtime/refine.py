"""Bayesian refinement of length predictions during decoding (TRAIL section 2). Pure torch.

Bins here are over the *remaining* length. Between two refinements k tokens are generated, so the
posterior drifts down: prior = q @ T^k with T[i, i] = 1 - 1/w, T[i, i-1] = 1/w (w = bin width in
tokens, bin 0 absorbing). The new per-step prediction p is combined by Bayes' rule:
q_new ∝ prior * p. The estimate is the expectation over bin midpoints, clamped to what is left of
`max_new_tokens`. The evaluator, the simulator and the serving runtime all use these functions.
"""

from __future__ import annotations

import torch

from trail_probe.choices import Likelihood, check_choice


def transition_matrix(num_bins: int, bin_width: float, dtype=torch.float64) -> torch.Tensor:
    """Row-stochastic [K, K] matrix moving 1/w of each bin's mass one bin down per token."""
    t = torch.zeros(num_bins, num_bins, dtype=dtype)
    t[0, 0] = 1.0
    for i in range(1, num_bins):
        t[i, i] = 1.0 - 1.0 / bin_width
        t[i, i - 1] = 1.0 / bin_width
    return t


class TransitionPowers:
    """Caches T^k for the step counts k that occur (a handful: the refinement interval and a few
    others), on each device and dtype they are used with."""

    def __init__(self, num_bins: int, bin_width: float):
        self.t = transition_matrix(num_bins, bin_width)
        self._cache: dict[int, torch.Tensor] = {0: torch.eye(num_bins, dtype=torch.float64)}
        self._moved: dict[tuple, torch.Tensor] = {}

    def power(self, k: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """T^k in float64 on the CPU, or on the device and in the dtype of `like`."""
        if k < 0:
            raise ValueError(f"cannot advance by {k} < 0 tokens")
        if k not in self._cache:
            self._cache[k] = torch.linalg.matrix_power(self.t, k)
        if like is None:
            return self._cache[k]
        key = (k, like.device, like.dtype)
        if key not in self._moved:
            self._moved[key] = self._cache[k].to(like)
        return self._moved[key]

    def advance(self, q: torch.Tensor, steps: torch.Tensor | list[int] | int) -> torch.Tensor:
        """q [B, K] advanced by `steps` tokens (one count per row, or one for all): one matmul when
        every row has the same k (refining every k steps), else one batched matmul."""
        if isinstance(steps, int):
            return q @ self.power(steps, q)
        steps = torch.as_tensor(steps, device=q.device)
        if steps.numel() == 0:
            return q.clone()
        lo, hi = torch.aminmax(steps)
        if lo == hi:
            return q @ self.power(int(lo), q)
        ks = torch.unique(steps).tolist()
        mats = torch.stack([self.power(k, q) for k in ks])
        which = torch.searchsorted(torch.tensor(ks, device=q.device), steps)
        return torch.bmm(q.unsqueeze(1), mats[which]).squeeze(1)


def bayes_update(prior: torch.Tensor, likelihood: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Posterior ∝ prior * likelihood, normalised over the last dim (falls back to the likelihood
    where the two have no overlap, rather than dividing by zero)."""
    post = prior * likelihood
    total = post.sum(-1, keepdim=True)
    fallback = likelihood / likelihood.sum(-1, keepdim=True).clamp_min(eps)
    return torch.where(total > eps, post / total.clamp_min(eps), fallback)


def check_likelihood(likelihood: str) -> str:
    """How a refinement weighs the probe's output: as TRAIL does (`posterior`), or with the training
    labels' bin frequencies divided out (`prior_corrected`); see step_likelihood."""
    return check_choice(likelihood, Likelihood, "likelihood")


def step_likelihood(step_probs: torch.Tensor, label_prior: torch.Tensor | None = None) -> torch.Tensor:
    """The per-step factor that Bayes' rule multiplies into the posterior.

    TRAIL multiplies in the probe's output p(bin | h) as it is. That output already holds the
    training labels' bin frequencies, so every refinement counts that prior once more and the
    posterior drifts to the frequent bins. With `label_prior` (those frequencies) it is divided out,
    leaving p(h | bin) up to a constant: the likelihood the update is meant to use.
    """
    if label_prior is None:
        return step_probs
    lik = step_probs / label_prior.to(step_probs).clamp_min(1e-6)
    return lik / lik.sum(-1, keepdim=True)


def refine_sequence(step_probs: torch.Tensor, generated: list[int] | torch.Tensor,
                    powers: TransitionPowers, initial: torch.Tensor | None = None,
                    initial_generated: int = 0, steps: int | None = None) -> torch.Tensor:
    """Posteriors [S, K] of one request refined over its decode samples.

    step_probs[s] is the probe's distribution at the s-th sample, taken after generated[s] tokens.
    `initial` (optional) is the prior before the first sample, made after `initial_generated`
    tokens (e.g. the prompt-time prediction at 0); without it the first sample is taken as is.
    `steps`: advance the prior by this many tokens at every sample, whatever was generated in between
    (TRAIL's release, refine.cadence=global); by default by the tokens generated since the last one.
    """
    generated = torch.as_tensor(generated).tolist()
    post = torch.empty_like(step_probs, dtype=torch.float64)
    q, last = (initial.double(), initial_generated) if initial is not None else (None, None)
    for s, j in enumerate(generated):
        p = step_probs[s].double()
        q = p / p.sum() if q is None else bayes_update(powers.advance(q[None], j - last if steps is None else steps)[0], p)
        post[s], last = q, j
    return post
