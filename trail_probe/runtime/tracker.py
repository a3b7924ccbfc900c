"""`LengthTracker`: the batched posterior over remaining-length bins that a scheduler keeps.

    tracker = LengthTracker(predictor, max_new_tokens=512)
    tracker.add(["a", "b"], prompt_embeddings=prompt_means)        # [2, d]: initial estimate
    tracker.observe(["a", "b"], hidden_states, generated=[9, 9])   # [2, d]: every step or every k
    tracker.estimates(["a", "b"], generated=[11, 11])              # remaining tokens, counted down
    tracker.remove(["a"])

Each request's posterior lives in one tensor and a whole batch is refined per call: one matmul for
the probe, one (batched) matmul for the drift T^k and one elementwise Bayes update (the math is
`trail_probe.runtime.refine`'s, the count-down `trail_probe.runtime.estimates`'). Python work per
request is a dict lookup.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from trail_probe.errors import UserError
from trail_probe.runtime.estimates import count_down
from trail_probe.runtime.predictor import BertLengthPredictor, LengthPredictor
from trail_probe.runtime.refine import (
    TransitionPowers,
    bayes_update,
    check_likelihood,
    step_likelihood,
)


class LengthTracker:
    """Posteriors over remaining-length bins for a changing set of requests.

    A request joins with `add` (optionally with an initial distribution), is refined by `observe`
    with its probe-layer hidden state (every step or every k steps; each request's own k = tokens
    since its last refinement), and leaves with `remove`. A request with no prediction yet is
    estimated at its token budget (`max_new_tokens - generated`), i.e. scheduled as if long.
    """

    def __init__(self, predictor: LengthPredictor, max_new_tokens: int = 512,
                 prompt_predictor: LengthPredictor | None = None,
                 text_predictor: BertLengthPredictor | None = None, capacity: int = 64,
                 likelihood: str = "posterior"):
        for other, what in ((prompt_predictor, "prompt predictor"), (text_predictor, "text predictor")):
            if other is not None:
                predictor.bins.check_matches(other.bins.to_dict(), f"the {what}")
        check_likelihood(likelihood)
        self._label_prior = None
        if likelihood == "prior_corrected":
            if predictor.label_prior is None:
                raise UserError("likelihood='prior_corrected' needs the training bin frequencies, which this predictor lacks; "
                                "export it again with the extraction present, or use likelihood='posterior'")
            self._label_prior = predictor.label_prior.to(predictor.device)
        self.likelihood = likelihood
        self.predictor = predictor
        self.prompt_predictor = prompt_predictor or predictor
        self.text_predictor = text_predictor
        self.max_new_tokens = max_new_tokens
        self.device = predictor.device
        self._powers = TransitionPowers(predictor.bins.num_bins, predictor.bins.width)
        self._midpoints = predictor.bins.midpoints.to(self.device, torch.float64)
        self._slot: dict[Hashable, int] = {}
        self._free: list[int] = []
        self._allocate(capacity)

    # -- storage: one row per slot; a removed request's slot is reused by the next one to join --
    def _allocate(self, capacity: int) -> None:
        old = getattr(self, "_post", None)
        k, dev = self.predictor.bins.num_bins, self.device
        grown = {
            "_post": torch.zeros(capacity, k, dtype=torch.float64, device=dev),  # zero row = no prediction yet
            "_initial": torch.zeros(capacity, dtype=torch.float64, device=dev),  # first estimate (limited preemption)
            "_refined_at": torch.zeros(capacity, dtype=torch.long, device=dev),  # generated at last refinement
            "_budget": torch.zeros(capacity, dtype=torch.long, device=dev),  # max_new_tokens per request
            "_has": torch.zeros(capacity, dtype=torch.bool, device=dev),
        }
        used = 0 if old is None else old.shape[0]
        for name, tensor in grown.items():
            if used:
                tensor[:used] = getattr(self, name)
            setattr(self, name, tensor)
        self._free.extend(range(capacity - 1, used - 1, -1))

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._slot

    @property
    def request_ids(self) -> list:
        return list(self._slot)

    def _slots(self, ids: Sequence[Hashable]) -> torch.Tensor:
        try:
            slots = [self._slot[i] for i in ids]
        except KeyError as e:
            raise UserError(f"request {e.args[0]!r} is not tracked; add() it first (or it was removed)") from None
        if len(set(slots)) != len(slots):
            raise UserError("the same request id appears twice in one call; pass each request once")
        return torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)

    def _per_request(self, values, n: int, what: str) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.long).to(self.device)
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise UserError(f"{what} has {tuple(t.shape)} entries for {n} requests; pass one per request")
        if (t < 0).any():
            raise UserError(f"{what} must be >= 0")
        return t

    # -- the scheduler's API --
    def add(self, ids: Sequence[Hashable], *, prompt_embeddings: torch.Tensor | None = None,
            prompt_texts: Sequence[str] | None = None, initial_probs: torch.Tensor | None = None,
            max_new_tokens: int | Sequence[int] | None = None,
            initial_estimates: torch.Tensor | None = None) -> None:
        """Start tracking requests, with at most one source of an initial prediction: mean prompt
        hidden states [B, d] (the prompt predictor, else the main one), prompt texts (the BERT
        predictor) or ready-made distributions [B, K]. `initial_estimates` [B], when given, is the
        initial length instead of the distribution's expectation (TRAIL's release: BERT's number
        beside the decode probe's distribution; NaN entries: the expectation), capped at the budget."""
        ids = list(ids)
        if sum(x is not None for x in (prompt_embeddings, prompt_texts, initial_probs)) > 1:
            raise UserError("give at most one of prompt_embeddings, prompt_texts, initial_probs")
        if len(set(ids)) != len(ids) or any(i in self._slot for i in ids):
            raise UserError("a request id being added is already tracked or repeated; ids must be unique")
        if prompt_texts is not None:
            if self.text_predictor is None:
                raise UserError("prompt_texts need a text predictor; create the tracker with text_predictor=BertLengthPredictor.from_pretrained(...)")
            initial_probs = self.text_predictor.probs(prompt_texts)
        elif prompt_embeddings is not None:
            initial_probs = self.prompt_predictor.probs(prompt_embeddings)
        if initial_probs is not None and tuple(initial_probs.shape) != (len(ids), self.predictor.bins.num_bins):
            raise UserError(f"initial distributions have shape {tuple(initial_probs.shape)} but {len(ids)} requests over {self.predictor.bins.num_bins} bins need ({len(ids)}, {self.predictor.bins.num_bins})")
        budget = self._per_request(self.max_new_tokens if max_new_tokens is None else max_new_tokens, len(ids), "max_new_tokens")
        while len(self._free) < len(ids):
            self._allocate(2 * self._post.shape[0])
        for i in ids:
            self._slot[i] = self._free.pop()
        slots = self._slots(ids)
        self._budget[slots] = budget
        self._refined_at[slots] = 0
        if initial_probs is None:
            self._post[slots] = 0.0
            self._has[slots] = False
            self._initial[slots] = budget.double()
        else:
            q = initial_probs.to(self.device, torch.float64)
            q = q / q.sum(-1, keepdim=True)
            self._post[slots] = q
            self._has[slots] = True
            self._initial[slots] = torch.minimum(q @ self._midpoints, budget.double())
        if initial_estimates is not None:  # NaN entries keep the distribution's expectation
            given = torch.as_tensor(initial_estimates, dtype=torch.float64).to(self.device).reshape(len(ids))
            self._initial[slots] = torch.where(torch.isnan(given), self._initial[slots], given.minimum(budget.double()))

    def observe(self, ids: Sequence[Hashable], hidden_states: torch.Tensor,
                generated: int | Sequence[int] | torch.Tensor, steps: int | None = None) -> None:
        """Refine requests with their probe-layer states [B, d], taken from the forward pass that
        produced token `generated` (tokens generated so far, one per request). The prior drifts by
        each request's tokens since its last refinement, or by `steps` for all (TRAIL's release
        advances every request by its global interval, whatever it generated)."""
        slots = self._slots(ids)
        if hidden_states.dim() != 2 or hidden_states.shape[0] != len(slots):
            raise UserError(f"hidden_states has shape {tuple(hidden_states.shape)} for {len(slots)} requests; pass [batch, hidden_size]")
        gen = self._per_request(generated, len(slots), "generated")
        own = gen - self._refined_at[slots]
        if (own < 0).any():
            raise UserError("generated went down for a request since its last refinement; pass tokens generated so far")
        likelihood = step_likelihood(self.predictor.probs(hidden_states).double(), self._label_prior)
        prior = self._powers.advance(self._post[slots], own if steps is None else int(steps))
        # A request with no prediction has a zero prior, which bayes_update replaces by the likelihood.
        post = bayes_update(prior, likelihood)
        self._post[slots] = post
        self._refined_at[slots] = gen
        first = ~self._has[slots]
        if first.any():  # the first prediction of a request that joined without one
            self._initial[slots[first]] = post[first] @ self._midpoints + gen[first]
            self._has[slots] = True

    def estimates(self, ids: Sequence[Hashable], generated: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Remaining tokens [B] (float64, on the predictor's device). With `generated` (tokens so far),
        the estimate counts down by the tokens since the last refinement, as TRAIL's runtime does;
        it is clamped to [0, max_new_tokens - generated]."""
        slots = self._slots(ids)
        at = self._refined_at[slots]
        gen = at if generated is None else self._per_request(generated, len(slots), "generated")
        if (gen < at).any():
            raise UserError("generated is below the count at a request's last refinement; pass tokens generated so far")
        left = (self._budget[slots] - gen).clamp_min(0).double()
        counted = count_down(self._post[slots] @ self._midpoints, gen - at, left)
        # no distribution yet: the initial number (the budget unless one was given), counted down
        return torch.where(self._has[slots], counted, count_down(self._initial[slots], gen - at, left))

    def initial_estimates(self, ids: Sequence[Hashable]) -> torch.Tensor:
        """Each request's first estimate of its total length (TRAIL's limited preemption allows
        preempting a request only while generated <= C * this)."""
        return self._initial[self._slots(ids)]

    def posteriors(self, ids: Sequence[Hashable]) -> torch.Tensor:
        """Current distributions [B, K] over remaining-length bins (as of the last refinement)."""
        return self._post[self._slots(ids)].clone()

    def remove(self, ids: Sequence[Hashable]) -> None:
        self._slots(ids)  # refuses unknown or repeated ids before anything changes
        for i in ids:
            self._free.append(self._slot.pop(i))
