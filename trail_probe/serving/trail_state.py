"""What a TRAIL scheduler knows besides its engine, for any engine: the policy, the predictors, each
request's estimate, and the counters a benchmark reports.

    runtime = TrailState("trail", predictor=LengthPredictor.from_pretrained(...),
                           text_predictor=BertLengthPredictor.from_pretrained(...), max_new_tokens=512)
    runtime.admit(["r1"])                                  # BERT on the prompt text: initial estimate
    runtime.observe(["r1"], states, generated=[9])         # probe-layer states of a forward pass
    runtime.estimate(views)                                # fill each view's estimates for `policies`

Before `admit` an engine may hand over, per request, the prompt text (`prompt_texts`: BERT runs
here), BERT's distribution computed elsewhere (`initial_probs`: the API server ran it), or, for the
`oracle` policy, the exact output length (`exact_lengths`).

An engine integration (`trail_probe.serving.hf_scheduler` for transformers) maps its own batch to
request ids, hidden-state rows and generated counts, and calls `observe` after every forward pass;
the runtime keeps only the rows on TRAIL's cadence (`runtime.estimates.refines_at`). Estimates come
from `trail_probe.runtime.LengthTracker` (counted down between refinements by the one rule of
`runtime.estimates`), and ranking from `trail_probe.serving.policies`, the simulator's code.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trail_probe.choices import (
    EnginePolicy,
    InitialSource,
    RefineCadence,
    check_choice,
    options,
)
from trail_probe.errors import UserError
from trail_probe.runtime.estimates import check_interval, count_down, refines_at
from trail_probe.runtime.probe_inputs import RequestPools, pools_needed
from trail_probe.runtime.tracker import LengthTracker
from trail_probe.serving.policies import Policy, make_policy

logger = logging.getLogger(__name__)


TRACE_LIMIT = 4096  # refinements kept per request (a 512-token answer refined every 8 tokens has 64)
SERVED_INPUTS = {"decode": ("current", "mean", "current+mean"), "prompt": ("mean", "last")}  # what the engines compute online
RECORD_LIMIT = 100_000  # finished requests whose estimates a recording runtime keeps


@dataclass(eq=False)
class RequestView:
    """What `policies` reads of a request (`policies.SchedRequest`)."""

    request_id: str
    rid: int
    arrival: float
    generated: int = 0
    initial_estimate: float = 0.0
    remaining_estimate: float = 0.0


class TrailState:
    """Policy, predictors, per-request estimates and counters of one engine run (`reset` clears them)."""

    def __init__(self, policy: str | Policy = "trail", *, predictor=None, text_predictor=None,
                 prompt_predictor=None, initial: str = "bert", max_new_tokens: int = 512,
                 refine_interval: int = 8, preemption_c: float = 0.8, likelihood: str = "posterior",
                 aging: float = 0.0, cadence: str = "per_request", record: bool = False):
        self.policy = policy if isinstance(policy, Policy) else make_policy(policy, preemption_c, aging)
        self.exact = self.policy.predictor == "exact"  # oracle: the engine hands over each request's length
        if self.exact:
            predictor, text_predictor, prompt_predictor, initial = None, None, None, "none"
        if self.policy.order == "arrival":
            raise UserError(f"policy '{self.policy.name}' is not run through the TRAIL scheduler; use one of "
                            f"{', '.join(options(EnginePolicy))} ('fifo' is the engine's own scheduler)")
        check_choice(initial, InitialSource, "initial estimate")
        self.cadence = check_choice(cadence, RefineCadence, "refine cadence")
        check_interval(refine_interval, "refine_interval")
        if predictor is None and not self.exact:
            raise UserError("the TRAIL scheduler needs a length predictor (the exported probe); pass predictor=LengthPredictor.from_pretrained(...)")
        if initial == "bert" and text_predictor is None:
            raise UserError("initial='bert' needs the BERT predictor; pass text_predictor=BertLengthPredictor.from_pretrained(...) or use initial='prompt_probe'")
        if initial == "prompt_probe" and prompt_predictor is None:
            raise UserError("initial='prompt_probe' needs the exported prompt probe; pass prompt_predictor=LengthPredictor.from_pretrained(...)")
        if self.policy.predictor == "bert" and initial in ("none", "last_token"):
            raise UserError(f"policy '{self.policy.name}' ranks by the initial estimate alone; use initial='bert' or 'prompt_probe'")
        self.predictor = predictor
        self.text_predictor = text_predictor
        self.prompt_predictor = prompt_predictor
        self.initial = initial
        self.refine = self.policy.predictor == "refined"
        self.refine_interval = refine_interval
        self.exact_lengths: dict[str, int] = {}  # oracle: set by the engine before `admit`
        self.tracker = ExactLengths(self.exact_lengths, max_new_tokens) if self.exact else LengthTracker(
            predictor, max_new_tokens=max_new_tokens, prompt_predictor=prompt_predictor,
            text_predictor=text_predictor if initial == "bert" else None, likelihood=likelihood)
        self.prompt_texts: dict[str, str] = {}
        self.initial_probs: dict[str, list[float]] = {}  # BERT's distribution, computed before the engine (set before `admit`)
        self.layer = None if predictor is None else predictor.layer
        uses_prompt = initial == "prompt_probe" and prompt_predictor is not None
        self.prompt_layer = prompt_predictor.layer if uses_prompt else None  # the prompt probe's layer
        self.prompt_input = prompt_predictor.input_for("prompt") if uses_prompt else None  # "mean" or "last"
        self.decode_input = "current" if predictor is None else predictor.input_for("decode")
        if initial == "last_token" and pools_needed(self.decode_input):
            raise UserError(f"initial='last_token' feeds the decode probe the last prompt token's state, but this probe reads "
                            f"'{self.decode_input}' (a pool of generated tokens); use initial='prompt_probe' or 'bert'")
        # the generated tokens' running pools, for engines that hand over raw states (transformers, predict);
        # vLLM's worker pools them itself and hands over the probe's inputs (`observe(pooled=True)`)
        self.pools = RequestPools(self.decode_input, predictor.state_width) if pools_needed(self.decode_input) else None
        self.max_new_tokens = max_new_tokens
        self.record = record  # keep finished requests' estimates (benchmarks; bounded by RECORD_LIMIT)
        self._budget: dict[str, int] = {}
        self.reset()

    @property
    def needs_states(self) -> bool:
        """Whether the engine must hand over hidden states at all (refinement or prompt-probe estimates)."""
        return self.refine or self.initial in ("prompt_probe", "last_token")

    @property
    def state_layers(self) -> list[int]:
        """The layers an engine must capture: the decode probe's and, when it differs, the prompt probe's."""
        return sorted({layer for layer in (self.layer, self.prompt_layer) if layer is not None})

    def reset(self) -> None:
        for rid in self.tracker.request_ids:
            self.tracker.remove([rid])
        self._prompt_sums: dict[str, tuple[torch.Tensor, int]] = {}
        self._bert_number: dict[str, float] = {}  # last_token: BERT's initial length, until the prefill ends
        self._passes = 0  # forward passes with decode rows (the global cadence's counter)
        if self.pools is not None:
            self.pools.clear()
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the counters and traces (after a warm-up), keeping the requests being tracked."""
        self.initial_s = 0.0  # time in the BERT / prompt-probe initial estimates
        self.preemptions = 0  # running requests left out of a batch (they keep their cache)
        self.refinements = 0
        self.unestimable = 0  # estimates that came out NaN or infinite: ranked at the request's budget
        self.paused_past_limit = 0  # must stay 0: a request past C * initial is never paused
        # request -> (generated, remaining estimate) per refinement, and its initial estimate: kept while
        # the request lives (live accuracy), after it only with `record`
        self.trace: OrderedDict[str, list[tuple[int, float]]] = OrderedDict()
        self.initial_estimates: OrderedDict[str, float] = OrderedDict()

    def check_model(self, num_layers: int, hidden_size: int | None) -> None:
        """Refuse a serving model the predictor was not made for (layer outside it, other width)."""
        if not 0 <= self.layer < num_layers:
            raise UserError(f"the predictor reads layer {self.layer} but the model has layers 0..{num_layers - 1}; export a predictor for this model")
        self.predictor.check_serving_model(num_layers, hidden_size)
        if self.prompt_layer is not None:
            self.prompt_predictor.check_serving_model(num_layers, hidden_size)

    def tracks(self, request_id: str) -> bool:
        return request_id in self.tracker

    def _add(self, ids: list[str], **sources) -> None:
        self.tracker.add(ids, max_new_tokens=[self._budget.get(i, self.max_new_tokens) for i in ids], **sources)

    # -- called by an engine's scheduler --
    def admit(self, ids: list[str], budgets: Sequence[int] | None = None) -> None:
        """New requests join the tracker with their initial distribution (BERT on the prompt text, when
        that is the source) and their own token budgets (each request's max_tokens; default the
        runtime's max_new_tokens)."""
        t0 = time.perf_counter()
        for i, b in zip(ids, budgets if budgets is not None else [self.max_new_tokens] * len(ids)):
            self._budget[i] = int(b)
        if self.initial == "last_token":  # BERT gives the number only; the distribution comes at prefill
            self._admit_bert_number(ids)  # ranks the request until its prefill gives the distribution
            self._add(ids, initial_estimates=torch.tensor([self._bert_number.get(i, math.nan) for i in ids],
                                                          dtype=torch.float64))
            for i, e in zip(ids, self.tracker.initial_estimates(ids).tolist()):
                self.initial_estimates[i] = self._bert_number.get(i, e)
            self.initial_s += time.perf_counter() - t0
            return
        given = [i for i in ids if i in self.initial_probs] if self.initial == "bert" else []
        if given:  # BERT ran where the request arrived (the client or API server): its distribution rides along
            self._add(given, initial_probs=torch.tensor([self.initial_probs.pop(i) for i in given], dtype=torch.float32))
        estimated = set(given)
        with_text = [i for i in ids if i not in estimated and self.prompt_texts.get(i) is not None] if self.initial == "bert" else []
        if with_text:
            self._add(with_text, prompt_texts=[self.prompt_texts[i] for i in with_text])
        estimated |= set(with_text)
        without = [i for i in ids if i not in estimated]
        if without:  # estimated at the token budget until a prediction exists
            self._add(without)
        for i, e in zip(ids, self.tracker.initial_estimates(ids).tolist()):
            self.initial_estimates[i] = e
        self.initial_s += time.perf_counter() - t0

    def _admit_bert_number(self, ids: list[str]) -> None:
        """TRAIL's release: BERT's expected length, floored at 1, is a request's initial number."""
        given = [i for i in ids if i in self.initial_probs]
        probs = [torch.tensor(self.initial_probs.pop(i), dtype=torch.float32) for i in given]
        texts = [i for i in ids if i not in self.initial_probs and i not in given and self.prompt_texts.get(i) is not None]
        if texts and self.text_predictor is not None:
            probs += list(self.text_predictor.probs([self.prompt_texts[i] for i in texts]))
            given += texts
        if given:
            numbers = self.predictor.bins.expectation(torch.stack(probs).double()).clamp_min(1.0)
            self._bert_number.update(zip(given, numbers.tolist()))

    def _initial_from_last_token(self, ids: list[str], states: torch.Tensor) -> None:
        """TRAIL's release at prefill: the decode probe on the last prompt token's state [B, d] is the
        first distribution; BERT's number (when it ran) stays the initial length."""
        probs = self.predictor.probs(states.to(self.predictor.device))
        numbers = torch.tensor([self._bert_number.pop(i, math.nan) for i in ids], dtype=torch.float64)
        self.tracker.remove(ids)
        self._add(ids, initial_probs=probs, initial_estimates=numbers)
        for i, e in zip(ids, self.tracker.initial_estimates(ids).tolist()):
            self.initial_estimates[i] = e

    def add_prompt_states(self, request_id: str, states: torch.Tensor, done: bool,
                          decode_states: torch.Tensor | None = None) -> None:
        """Prompt-probe initial estimates from a prefill chunk's states [T, d] at the prompt probe's layer:
        on the chunk that completes the prompt (`done`), the prompt probe on its input (the mean of all
        chunks' states, or the last state) replaces the initial estimate. With initial='last_token', the
        last state of that chunk at the decode probe's layer (`decode_states`, default `states`) feeds
        the decode probe instead."""
        if self.initial == "last_token":
            if done:
                self._initial_from_last_token([request_id], (states if decode_states is None else decode_states)[-1:])
            return
        if self.prompt_input == "last":
            if done:
                self.add_prompt_last(request_id, states[-1])
            return
        self.add_prompt_sum(request_id, states.float().sum(0), states.shape[0], done)

    def add_prompt_last(self, request_id: str, state: torch.Tensor) -> None:
        """`add_prompt_states` for a prompt probe reading the last prompt token (`prompt_input` 'last'):
        that token's state [d] at the prompt probe's layer, from the pass that completed the prompt."""
        if self.initial != "prompt_probe" or not self.tracks(request_id):
            return
        self._set_prompt_estimate(request_id, self.prompt_predictor.probs(state.float().reshape(1, -1)))

    def add_prompt_sum(self, request_id: str, total: torch.Tensor, count: int, done: bool) -> None:
        """`add_prompt_states` for an engine that sums a chunk's states itself (vLLM's worker): the sum
        [d] of `count` prompt tokens' states."""
        if self.initial != "prompt_probe":
            return
        so_far, seen = self._prompt_sums.get(request_id, (0.0, 0))
        self._prompt_sums[request_id] = (total.float() + so_far, seen + int(count))
        if done:
            total, count = self._prompt_sums.pop(request_id)
            self._set_prompt_estimate(request_id, self.prompt_predictor.probs((total / count)[None]))

    def _set_prompt_estimate(self, request_id: str, probs: torch.Tensor) -> None:
        self.tracker.remove([request_id])
        self._add([request_id], initial_probs=probs)
        self.initial_estimates[request_id] = float(self.tracker.initial_estimates([request_id])[0])

    def observe(self, ids: Sequence[str], states: torch.Tensor, generated: Sequence[int], pooled: bool = False) -> None:
        """The probe-layer states [B, d] of the forward passes that produced token `generated[i]` of
        request `ids[i]`; those on the refinement cadence refine their request. Rows with generated
        = 0 (the pass that ended a prefill) give initial='last_token' its first distribution. For a
        decode probe reading a pool of the generated tokens, every decode row must come here (each is
        added to its request's pool), unless the engine pooled them itself: `pooled`, the rows are
        then the probe's inputs (vLLM's worker)."""
        if self.initial == "last_token":
            first = [i for i, g in enumerate(generated) if g == 0 and ids[i] in self.tracker]
            if first:
                rows = torch.tensor(first, dtype=torch.long, device=states.device)
                self._initial_from_last_token([ids[i] for i in first], states.index_select(0, rows))
        if not self.refine:
            return
        pooling = self.pools is not None and not pooled
        if pooling:
            self.pools.add(ids, generated, states)
        steps = None
        if self.cadence == "global":  # every k passes of the batch, everyone in it, T^k for all
            if not any(g >= 1 for g in generated):
                return
            self._passes += 1
            if self._passes % self.refine_interval:
                return
            keep, steps = [i for i, g in enumerate(generated) if g >= 1], self.refine_interval
        else:
            keep = [i for i, g in enumerate(generated) if refines_at(g, self.refine_interval)]
        if not keep:
            return
        ids = [ids[i] for i in keep]
        gens = [generated[i] for i in keep]
        rows = torch.tensor(keep, dtype=torch.long, device=states.device)
        inputs = states.index_select(0, rows)
        if pooling:
            inputs = self.pools.inputs(ids, inputs)
        self.tracker.observe(ids, inputs.to(self.predictor.device), gens, steps=steps)
        self.refinements += len(ids)
        for r, g, e in zip(ids, gens, self.tracker.estimates(ids, gens).tolist()):
            points = self.trace.setdefault(r, [])
            if len(points) < TRACE_LIMIT:
                points.append((g, e))

    def estimate(self, views: list[RequestView]) -> None:
        """Fill each view's remaining and initial estimate for the policy (with no refinement, as for
        trail_bert and sjf_bert, the initial estimate counted down)."""
        if not views:
            return
        ids = [v.request_id for v in views]
        remaining = self.tracker.estimates(ids, [v.generated for v in views]).cpu()
        initial = self.tracker.initial_estimates(ids).cpu()
        for v, r, i in zip(views, remaining.tolist(), initial.tolist()):
            budget = self._budget.get(v.request_id, self.max_new_tokens)
            # never NaN or infinite: a request whose estimate is broken ranks at its own budget
            if not (math.isfinite(r) and math.isfinite(i)):
                self.unestimable += 1
                logger.warning("TRAIL: request %s has no finite length estimate; ranked at its token budget",
                               v.request_id)
            v.remaining_estimate = r if math.isfinite(r) else float(max(budget - v.generated, 0))
            v.initial_estimate = i if math.isfinite(i) else float(budget)

    def remove(self, request_id: str) -> dict | None:
        """Forget a request (finished or aborted); returns its initial estimate and refinement trace
        (None if it was never admitted). With `record`, both stay readable in `initial_estimates`
        and `trace`, the oldest dropped past RECORD_LIMIT requests."""
        if request_id in self.tracker:
            self.tracker.remove([request_id])
        self._prompt_sums.pop(request_id, None)
        if self.pools is not None:
            self.pools.drop([request_id])
        self._bert_number.pop(request_id, None)
        self.prompt_texts.pop(request_id, None)  # a request aborted before it was admitted
        self.exact_lengths.pop(request_id, None)
        self.initial_probs.pop(request_id, None)
        self._budget.pop(request_id, None)
        if request_id not in self.initial_estimates:
            return None
        done = {"initial": self.initial_estimates[request_id], "trace": self.trace.get(request_id, [])}
        if not self.record:
            self.initial_estimates.pop(request_id, None)
            self.trace.pop(request_id, None)
        else:
            while len(self.initial_estimates) > RECORD_LIMIT:
                old, _ = self.initial_estimates.popitem(last=False)
                self.trace.pop(old, None)
        return done


class ExactLengths:
    """The oracle's stand-in for `LengthTracker`: each request's true output length (from a run of
    the same workload), counted down by the one rule of `runtime.estimates`."""

    def __init__(self, lengths: dict[str, int], max_new_tokens: int):
        self.lengths, self.max_new_tokens = lengths, max_new_tokens
        self._known: dict[str, float] = {}

    @property
    def request_ids(self) -> list[str]:
        return list(self._known)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._known

    def add(self, ids: list[str], max_new_tokens=None, **_) -> None:
        missing = [i for i in ids if i not in self.lengths]
        if missing:
            raise UserError(f"the oracle policy needs each request's exact output length; none was given for "
                            f"{', '.join(missing[:3])} (serve-bench takes them from the fifo run: list fifo first)")
        caps = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [self.max_new_tokens] * len(ids)
        for i, cap in zip(ids, caps):
            self._known[i] = float(min(self.lengths[i], cap))

    def remove(self, ids: list[str]) -> None:
        for i in ids:
            self._known.pop(i, None)

    def initial_estimates(self, ids: list[str]) -> torch.Tensor:
        return torch.tensor([self._known[i] for i in ids], dtype=torch.float64)

    def estimates(self, ids: list[str], generated: Sequence[int]) -> torch.Tensor:
        return count_down(self.initial_estimates(ids), list(generated))


def build_state(settings, *, device: str = "cpu", max_new_tokens: int = 512) -> TrailState:
    """The runtime a `TrailSettings` describes, its predictors loaded: the one place serving loads them
    (the vLLM scheduler, serve-bench's engines, predict and `trail-probe serve` all come here).
    `max_new_tokens` is the budget of a request that brings none of its own."""
    from trail_probe.runtime import BertLengthPredictor, LengthPredictor

    common = {"max_new_tokens": max_new_tokens, "preemption_c": settings.preemption_c, "aging": settings.aging,
              "record": settings.record}
    if settings.is_oracle:
        return TrailState(settings.policy, **common)
    predictor = LengthPredictor.from_pretrained(settings.predictor, device=device)
    prompt_path, bert_path = settings.prompt_predictor_path(), settings.bert_path()
    prompt = None if prompt_path is None else LengthPredictor.from_pretrained(prompt_path, device=device)
    bert = None if bert_path is None else BertLengthPredictor.from_pretrained(bert_path, device=device)
    for p, path, task in ((predictor, settings.predictor, "decode"), (prompt, prompt_path, "prompt")):
        if p is not None and p.input_for(task) not in SERVED_INPUTS[task]:
            raise UserError(f"the {task} probe in '{path}' reads '{p.input_for(task)}', which the serving engines do not compute "
                            f"online (they feed {', '.join(SERVED_INPUTS[task])}; entropy weights would need every token's "
                            f"full-vocabulary softmax); export a probe trained with train.{task}_input={SERVED_INPUTS[task][0]}")
    return TrailState(settings.policy, predictor=predictor, text_predictor=bert, prompt_predictor=prompt,
                        initial=settings.initial, refine_interval=settings.refine_interval,
                        likelihood=settings.likelihood, cadence=settings.cadence, **common)
