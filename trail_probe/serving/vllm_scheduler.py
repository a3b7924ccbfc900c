"""TRAIL as vLLM's scheduler (V1 engine): SPRPT with limited preemption on the probe's estimates.

    LLM(model=folder, scheduler_cls="trail_probe.serving.vllm_scheduler.TrailVLLMScheduler",
        worker_extension_cls="trail_probe.serving.vllm_worker.TrailWorkerExtension",
        additional_config={"trail_probe": {...}}, enforce_eager=True, async_scheduling=False)

`trail_probe.serving.vllm_engine.engine_kwargs` builds these arguments. The scheduler is vLLM's own
`Scheduler`; before each of its steps TRAIL decides who runs, with `trail_probe.serving.policies.schedule`
(the simulator's and the transformers engine's code) over the running requests and a queue of the
waiting and paused ones, at most `max_num_seqs` running:

- a running request TRAIL preempts is paused: it stays in vLLM's running list with its KV blocks but
  is held out of the list while vLLM builds the batch, so it is not scheduled (as vLLM itself leaves
  out running requests when the token budget runs out); resuming it costs nothing. vLLM's own
  recompute preemption, when KV blocks run out, is unchanged and hits the worst-ranked running
  request (the running list is in TRAIL's order);
- the waiting requests TRAIL starts this step go to the front of vLLM's waiting queue in TRAIL's
  order; vLLM admits from the front until the running list (which TRAIL filled) is full, so it
  starts exactly those;
- estimates are `trail_probe.serving.trail_runtime.TrailRuntime`'s: BERT's on the prompt text when
  a request arrives (the text rides in `SamplingParams.extra_args["trail_prompt_text"]`), then the
  probe every k tokens on the states the worker extension attaches to each `ModelRunnerOutput`.

vLLM internals relied on (0.32; the smallest upstream change that would remove each): `scheduler_cls`
(vLLM warns the interface is not public; upstream: a public scheduling-policy hook that ranks
requests), the `running` list and `waiting` queue being reordered and filtered between steps
(upstream: a per-step "admit and keep these, in this order" callback), `_free_request` for
finished requests (upstream: a request-finished callback), and `additional_config` to reach the
scheduler with settings (upstream: scheduler kwargs).
"""

from __future__ import annotations

import bisect
import itertools
import time

import numpy as np
import torch
from vllm.v1.core.sched.scheduler import Scheduler

from trail_probe.runtime.estimates import refines_at
from trail_probe.serving.cost_model import iteration_features
from trail_probe.serving.policies import RequestQueue, schedule
from trail_probe.serving.trail_runtime import RequestView
from trail_probe.serving.vllm_worker import PROMPT_ATTR, STATES_ATTR

SETTINGS_KEY = "trail_probe"  # in vllm_config.additional_config
LOG_UTILITY = "trail_probe_scheduler_log"  # an EngineCore utility method: the client asks for the log
PROMPT_TEXT_KEY = "trail_prompt_text"  # in SamplingParams.extra_args
EXACT_LENGTH_KEY = "trail_exact_length"  # in SamplingParams.extra_args: the oracle policy's input
INITIAL_PROBS_KEY = "trail_initial_probs"  # in SamplingParams.extra_args: BERT's distribution, if the client ran it


def _scheduler_log(engine_core) -> dict:
    return engine_core.scheduler.log()


def install_log_utility() -> None:
    """Give vLLM's EngineCore (in this, the engine-core process) a utility method that returns the
    scheduler's log, so the client asks for it while the engine is up (`call_utility`) instead of
    relying on shutdown, which vLLM cuts short after 5 s (upstream: a scheduler-stats utility)."""
    from vllm.v1.engine.core import EngineCore

    if not hasattr(EngineCore, LOG_UTILITY):
        setattr(EngineCore, LOG_UTILITY, _scheduler_log)


class RecordingScheduler(Scheduler):
    """vLLM's scheduler (FCFS, or its priority policy), unchanged, plus a step log: per step its start,
    end (outputs processed), requests, the cost model's features and the time spent in TRAIL's code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = self.vllm_config.additional_config.get(SETTINGS_KEY) or {}
        self.step_log: list[dict] = []
        install_log_utility()
        from trail_probe.serving.vllm_engine import pin_outside_the_worker

        pin_outside_the_worker(self.vllm_config)  # every policy alike: the engine core off the worker's cores

    def _log_step(self, t0: float, out, probe_s: float) -> None:
        batch = [(n, self.requests[rid].num_computed_tokens - n) for rid, n in out.num_scheduled_tokens.items()]
        f = iteration_features(batch)
        self.step_log.append({"start": t0, "end": None, "requests": len(batch), "query_tokens": f["tokens"],
                              "decode_context": f["decode_context"], "prefill_pairs": f["prefill_pairs"],
                              "probe_s": probe_s, "schedule_s": time.perf_counter() - t0,
                              "running": len(self.running), "waiting": len(self.waiting)})

    def schedule(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = super().schedule(*args, **kwargs)
        self._log_step(t0, out, 0.0)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        result = super().update_from_output(scheduler_output, model_runner_output)
        if self.step_log and self.step_log[-1]["end"] is None:
            self.step_log[-1]["end"] = time.perf_counter()
        return result

    def log(self) -> dict:
        return {"steps": self.step_log, "clock": "perf_counter of the engine-core process"}


class TrailVLLMScheduler(RecordingScheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from trail_probe.serving.vllm_engine import runtime_from_settings

        self.runtime = runtime_from_settings(self.settings)
        self._init_state()
        one_thread_outside_the_worker()

    def _init_state(self) -> None:
        self._views: dict[str, RequestView] = {}
        self._counter = itertools.count()
        self._new: list[str] = []  # arrived, not yet admitted to the runtime
        # Requests whose policy key is fixed, kept sorted by it: the waiting ones that never ran
        # (`_fresh`) and the paused ones (running in vLLM's sense, held out of batches by TRAIL: no
        # token, no refinement, so no new estimate). At most max_num_seqs requests start in a step,
        # so a step looks at the best max_num_seqs of each, not at the whole queue.
        self._fresh: list[tuple[tuple, str]] = []
        self._fresh_key: dict[str, tuple] = {}
        self._paused_sorted: list[tuple[tuple, str]] = []
        self._paused: dict[str, tuple] = {}
        self._ran: set[str] = set()  # started at least once and not finished
        self._awaiting_prompt: set[str] = set()  # initial='prompt_probe': prefill not complete yet
        self.observed: list[tuple[str, int, list[float]]] = []  # with settings["record_states"]: for parity tests

    # -- requests come and go --
    def add_request(self, request) -> None:
        super().add_request(request)
        self.track(request)

    def track(self, request) -> None:
        """TRAIL's side of a new request: what the client sent along, a view; admitted at the next
        step, with every request that arrived meanwhile."""
        rid = request.request_id
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        if extra and extra.get(PROMPT_TEXT_KEY) is not None:
            self.runtime.prompt_texts[rid] = extra[PROMPT_TEXT_KEY]
        if extra and extra.get(EXACT_LENGTH_KEY) is not None:
            self.runtime.exact_lengths[rid] = int(extra[EXACT_LENGTH_KEY])
        if extra and extra.get(INITIAL_PROBS_KEY) is not None:
            self.runtime.initial_probs[rid] = list(extra[INITIAL_PROBS_KEY])
        self._views[rid] = RequestView(rid, next(self._counter), request.arrival_time)
        self._new.append(rid)
        if self.runtime.initial == "prompt_probe":
            self._awaiting_prompt.add(rid)

    def _admit_new(self) -> float:
        """The initial estimates of the requests that arrived since the last step, in one batch (BERT
        on their prompt texts unless the client sent BERT's distribution); they join the fresh queue
        with their key, fixed until they first run. Returns the seconds it took."""
        ids = [rid for rid in self._new if rid in self._views]
        self._new.clear()
        if not ids:
            return 0.0
        t0 = time.perf_counter()
        self.runtime.admit(ids)
        views = [self._views[rid] for rid in ids]
        self.runtime.estimate(views)
        for rid, v in zip(ids, views):
            self.runtime.prompt_texts.pop(rid, None)
            _insert(self._fresh, self._fresh_key, rid, self.runtime.policy.key(v))
        return time.perf_counter() - t0

    def forget(self, rid: str) -> None:
        self._views.pop(rid, None)
        self._ran.discard(rid)
        self._awaiting_prompt.discard(rid)
        _remove(self._fresh, self._fresh_key, rid)
        _remove(self._paused_sorted, self._paused, rid)
        self.runtime.remove(rid)

    def _free_request(self, request, *args, **kwargs):
        self.forget(request.request_id)
        return super()._free_request(request, *args, **kwargs)

    # -- every step --
    def schedule(self, *args, **kwargs):
        t0 = time.perf_counter()
        initial_s = self._admit_new()
        rt, policy, limit = self.runtime, self.runtime.policy, self.max_num_running_reqs
        in_running = {r.request_id for r in self.running}
        if self._everyone_runs(in_running, limit):
            return self._schedule_unranked(t0, initial_s, args, kwargs)
        active = [r for r in self.running if r.request_id in self._views and r.request_id not in self._paused]
        # started before and back in vLLM's waiting queue (vLLM's own recompute preemption)
        recomputed = [self.requests[rid] for rid in self._ran if rid not in in_running]
        moving = active + recomputed
        views = [self._views[r.request_id] for r in moving]
        for r, v in zip(moving, views):
            v.generated = r.num_output_tokens
        rt.estimate(views)  # the paused and fresh requests keep the estimate their key was made from
        running = views[: len(active)]
        queue = RequestQueue(policy)
        for v in views[len(active):]:
            queue.push(v)
        for ranked in (self._paused_sorted, self._fresh):
            for _, rid in ranked[:limit]:
                queue.push(self._views[rid])
        _, preempted = schedule(policy, queue, running, limit)
        rt.preemptions += len(preempted)
        chosen = {v.request_id: policy.key(v) for v in running}
        for v in preempted:  # paused with the key it was ranked by
            _insert(self._paused_sorted, self._paused, v.request_id, policy.key(v))
            if policy.preemption_c > 0 and not policy.can_preempt(v):
                rt.paused_past_limit += 1
        for rid in chosen:
            _remove(self._paused_sorted, self._paused, rid)
        held_running = [r for r in self.running if r.request_id in self._paused]
        self.running = sorted((r for r in self.running if r.request_id not in self._paused),
                              key=lambda r: chosen.get(r.request_id, (float("inf"),)))
        # The waiting requests TRAIL starts go to the front of vLLM's queue in TRAIL's order; vLLM
        # admits from the front and stops when the running list is full (TRAIL filled it) or the
        # token budget runs out, so it starts exactly these (or the first of them) and no other.
        admit = sorted((self.requests[rid] for rid in chosen if rid not in in_running), key=lambda r: chosen[r.request_id])
        for r in admit:
            _remove(self._fresh, self._fresh_key, r.request_id)
            self._ran.add(r.request_id)
        if admit:
            self.waiting.remove_requests(admit)
            for r in reversed(admit):
                self.waiting.prepend_request(r)
        rank_s = time.perf_counter() - t0 - initial_s
        try:
            out = Scheduler.schedule(self, *args, **kwargs)
        finally:  # paused requests rejoin running (at the end: they rank below every running one)
            running_now = {r.request_id for r in self.running}
            self.running = self.running + [r for r in held_running if r.request_id not in running_now]
        self._log_step(t0, out, rank_s)
        self.step_log[-1].update(paused=len(self._paused), rank_s=rank_s, observe_s=0.0, initial_s=initial_s, ranked=True)
        return out

    def _everyone_runs(self, in_running: set[str], limit: int) -> bool:
        """No queue: nothing paused, nothing vLLM preempted, and every waiting request fits beside the
        running ones. `policies.schedule` would then start them all and preempt no one, so the ranking
        decides nothing and the step skips it (at light load it is most of TRAIL's cost per step; the
        refinements still run, so the estimates are current when a queue forms)."""
        if self._paused or len(in_running) + len(self._fresh) > limit:
            return False
        return all(rid in in_running for rid in self._ran)

    def _schedule_unranked(self, t0: float, initial_s: float, args, kwargs):
        """vLLM's own step over the running list as it stands and the fresh requests in TRAIL's order
        (all of them start, token budget permitting; one left waiting is ranked at the next step)."""
        admit = [self.requests[rid] for _, rid in self._fresh]
        self._fresh.clear()
        self._fresh_key.clear()
        self._ran.update(r.request_id for r in admit)
        if len(admit) > 1:
            self.waiting.remove_requests(admit)
            for r in reversed(admit):
                self.waiting.prepend_request(r)
        rank_s = time.perf_counter() - t0 - initial_s
        out = Scheduler.schedule(self, *args, **kwargs)
        self._log_step(t0, out, rank_s)
        self.step_log[-1].update(paused=0, rank_s=rank_s, observe_s=0.0, initial_s=initial_s, ranked=False)
        return out

    def _prompt_chunks(self, model_runner_output) -> None:
        """initial='prompt_probe': each prefill chunk's state sum at the prompt probe's layer; the
        chunk that completes the prompt gives the request its initial estimate (the prompt probe on
        the mean). With prefix caching, the mean is over the tokens computed, as in the HF engine."""
        payload = getattr(model_runner_output, PROMPT_ATTR, None)
        if payload is None or not self._awaiting_prompt:
            return
        for rid, total, count in zip(*payload):
            if rid in self._awaiting_prompt and self.runtime.tracks(rid) and count > 0:
                request = self.requests[rid]
                done = request.num_computed_tokens >= request.num_prompt_tokens  # vLLM counted this chunk at schedule
                self.runtime.add_prompt_sum(rid, torch.from_numpy(total), int(count), done)
                if done:
                    self._awaiting_prompt.discard(rid)

    def update_from_output(self, scheduler_output, model_runner_output):
        t0 = time.perf_counter()
        self._prompt_chunks(model_runner_output)
        payload = getattr(model_runner_output, STATES_ATTR, None)
        if payload is not None and self.runtime.needs_states:
            req_ids, states = payload
            states = torch.from_numpy(states) if isinstance(states, np.ndarray) else states
            produced = {rid for rid, toks in zip(model_runner_output.req_ids, model_runner_output.sampled_token_ids) if toks}
            keep = [i for i, rid in enumerate(req_ids) if rid in produced and self.runtime.tracks(rid)]
            if keep:
                ids = [req_ids[i] for i in keep]
                # tokens generated when that forward pass ran: the count before this step's token
                generated = [self.requests[rid].num_output_tokens for rid in ids]
                self.runtime.observe(ids, states[keep], generated)
                if self.settings.get("record_states"):  # the states refinements used, for parity tests
                    self.observed += [(r, g, s.tolist()) for r, g, s in zip(ids, generated, states[keep])
                                      if refines_at(g, self.runtime.refine_interval)]
            if self.step_log:  # probe_s: TRAIL's whole cost in the step, ranking and refinement
                observe_s = time.perf_counter() - t0
                self.step_log[-1]["probe_s"] += observe_s
                self.step_log[-1]["observe_s"] = observe_s
        return super().update_from_output(scheduler_output, model_runner_output)

    def log(self) -> dict:
        rt = self.runtime
        return {**super().log(), "trail": {"policy": rt.policy.name, "preemption_c": rt.policy.preemption_c,
                                           "preemptions": rt.preemptions, "refinements": rt.refinements,
                                           "paused_past_limit": rt.paused_past_limit, "initial_s": rt.initial_s},
                "initial_estimates": {external_id(r): e for r, e in rt.initial_estimates.items()},
                "trace": {external_id(r): points for r, points in rt.trace.items()},
                "observed": [(external_id(r), g, s) for r, g, s in self.observed]}


def one_thread_outside_the_worker() -> None:
    """The scheduler's tensors are a few hundred rows: in vLLM's engine-core process (multiprocess
    mode) one torch thread does them, and more would only spin on the cores the worker computes on.
    In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) the model shares the process, so it is left alone."""
    import torch
    import vllm.envs

    if vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING:
        torch.set_num_threads(1)


def _insert(ranked: list, keys: dict, rid: str, key: tuple) -> None:
    keys[rid] = key
    bisect.insort(ranked, (key, rid))


def _remove(ranked: list, keys: dict, rid: str) -> None:
    key = keys.pop(rid, None)
    if key is not None:
        del ranked[bisect.bisect_left(ranked, (key, rid))]


def external_id(request_id: str) -> str:
    """The id the client gave: vLLM's input processor appends "-" and 8 characters to make it unique."""
    return request_id.rsplit("-", 1)[0]
