"""TRAIL as vLLM's scheduler: SPRPT with limited preemption on the probe's estimates, in `vllm serve`.

    vllm serve MODEL --scheduler-cls trail_probe.serving.vllm_scheduler.TrailVLLMScheduler \\
        --additional-config '{"trail_probe": {"predictor": "checkpoints/smollm2_alpaca/predictor"}}'

(`trail-probe serve RECIPE` builds exactly this.) The class is vLLM's own `Scheduler` - or its
`AsyncScheduler` when async scheduling is on, vLLM's default on GPUs: `TrailVLLMScheduler` picks
the base when vLLM creates it - with TRAIL's decisions around each of vLLM's steps
(`vllm_queue.TrailQueues`): who runs, who is paused (keeps its KV blocks, held out of the batch),
who is admitted, and which states the worker must send back (`vllm_worker`). With async scheduling
the states of a step arrive after the next step was scheduled; TRAIL refines every k tokens, so
using them one step late changes nothing it decides.

What a client sends is never trusted: `trail_*` keys in `vllm_xargs` are ignored with a warning
unless the operator set `client_estimates`, and then checked (a distribution of the predictor's
length, finite, non-negative, not all zero; a whole non-negative length; text) before use. TRAIL's
part of a step never takes the engine down: if it fails (a bug, not a request's data, which is
checked), the step runs as vLLM's own FCFS step, the failure is logged with its traceback and
counted, and the next step tries again. Per-request state is dropped when the request ends or is
aborted; the step log (for benchmarks) is kept only with `record`, bounded. Every
`stats_interval_s` the engine's log gets one line of live accuracy (`live_stats`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import asdict

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from trail_probe.errors import UserError
from trail_probe.serving import vllm_internals as vi
from trail_probe.serving.cost_model import iteration_features
from trail_probe.serving.live_stats import LiveStats
from trail_probe.serving.step_log import StepRecord
from trail_probe.serving.trail_settings import TrailSettings

LOG_UTILITY = "trail_probe_scheduler_log"  # an EngineCore utility method: the client asks for the log
PROMPT_TEXT_KEY = "trail_prompt_text"  # in vllm_xargs (SamplingParams.extra_args), with client_estimates
EXACT_LENGTH_KEY = "trail_exact_length"  # the oracle policy's input (benchmarks)
INITIAL_PROBS_KEY = "trail_initial_probs"  # a distribution computed before the engine (e.g. BERT in the client)
CLIENT_KEYS = (PROMPT_TEXT_KEY, EXACT_LENGTH_KEY, INITIAL_PROBS_KEY)
STEP_LOG_LIMIT = 200_000  # steps a recording scheduler keeps
MAX_PROMPT_TEXT = 100_000  # characters of a client's prompt text kept for BERT

logger = logging.getLogger("vllm.trail_probe")  # a child of vLLM's logger: its handlers, its format


def _scheduler_log(engine_core) -> dict:
    return engine_core.scheduler.log()


def install_log_utility() -> None:
    """Give vLLM's EngineCore a utility method that returns the scheduler's log, so a client asks for it
    while the engine is up (`call_utility`) instead of at shutdown, which vLLM cuts short after 5 s."""
    from vllm.v1.engine.core import EngineCore

    if not hasattr(EngineCore, LOG_UTILITY):
        setattr(EngineCore, LOG_UTILITY, _scheduler_log)


class AsyncAware:
    """A scheduler class that becomes its async variant (the same class on `AsyncScheduler`) when
    vLLM's async scheduling is on, so one `--scheduler-cls` name serves both."""

    _async_variants: dict = {}

    def __new__(cls, *args, **kwargs):
        config = kwargs.get("vllm_config", args[0] if args else None)
        if config is not None and config.scheduler_config.async_scheduling and not issubclass(cls, AsyncScheduler):
            cls = AsyncAware._async_variants.setdefault(cls, type(f"Async{cls.__name__}", (cls, AsyncScheduler), {}))
        return super().__new__(cls)


class RecordingScheduler(AsyncAware, Scheduler):
    """vLLM's scheduler unchanged, plus (with `record` in the settings, or when used as serve-bench's
    FCFS) a bounded step log: start, end, requests, the cost model's features, TRAIL's time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = TrailSettings.from_vllm_config(self.vllm_config)
        self.recording = self.settings is None or self.settings.record
        self.step_log: deque = deque(maxlen=STEP_LOG_LIMIT)
        install_log_utility()
        from trail_probe.serving.vllm_engine import pin_outside_the_worker

        if in_engine_core_process():  # every policy alike: the engine core off the worker's cores
            pin_outside_the_worker(self.vllm_config)

    def _log_step(self, t0: float, out, trail_s: float, initial_s: float = 0.0) -> None:
        if not self.recording:
            return
        batch = [(n, self.requests[rid].num_computed_tokens - n) for rid, n in out.num_scheduled_tokens.items()]
        f = iteration_features(batch)
        blocks = self.kv_cache_manager.block_pool
        self.step_log.append(asdict(StepRecord(
            t0, len(batch), f["tokens"], f["decode_context"], f["prefill_pairs"], trail_s, initial_s,
            time.perf_counter() - t0, len(self.running), blocks.get_num_free_blocks() / max(blocks.num_gpu_blocks, 1),
            end=None)))

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
        return {"steps": list(self.step_log), "clock": "perf_counter of the engine-core process"}


class TrailVLLMScheduler(RecordingScheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.settings is None:
            raise UserError("TrailVLLMScheduler needs --additional-config '{\"trail_probe\": {\"predictor\": ...}}' "
                            "(trail-probe serve RECIPE writes it)")
        from trail_probe.serving.prompt_sums import PromptSums
        from trail_probe.serving.trail_state import build_state
        from trail_probe.serving.vllm_checks import check_engine, check_predictors
        from trail_probe.serving.vllm_queue import TrailQueues

        vi.check_scheduler(self)
        check_engine(self.settings, self.vllm_config)
        self.runtime = build_state(self.settings, max_new_tokens=self.vllm_config.model_config.max_model_len)
        model = self.vllm_config.model_config
        loaded = [p for p in (self.runtime.predictor, self.runtime.prompt_predictor) if p is not None]
        check_predictors(self.settings, model.model, str(model.dtype).removeprefix("torch."), loaded)
        self.stats = LiveStats()
        sums = None if self.runtime.prompt_input != "mean" else PromptSums(self.block_size, self.runtime.prompt_predictor.hidden_size)
        self.trail = TrailQueues(self, self.runtime, self.settings, self.stats, sums)
        self.async_mode = isinstance(self, AsyncScheduler)
        self.observed: deque = deque(maxlen=100_000)  # with record_states: the states refinements used
        self._scheduled_at: deque = deque(maxlen=8)  # schedule() times of the steps in flight
        self._last_update: float | None = None
        self._scored_at_log = 0
        self._next_stats = time.monotonic() + (self.settings.stats_interval_s or math.inf)
        one_thread_outside_the_worker()
        limit = self.settings.max_running or (f"auto (within {self.settings.max_throughput_loss:.0%} of the throughput of "
                                              f"{self.max_num_running_reqs})")
        logger.info("TRAIL scheduler active: policy %s, initial estimate %s, probe layer %s, refine every %d tokens, "
                    "C = %s, at most %s decoding, %s scheduling, vLLM %s", self.runtime.policy.name, self.runtime.initial,
                    self.runtime.layer, self.runtime.refine_interval, self.runtime.policy.preemption_c,
                    limit, "async" if self.async_mode else "sync", vi.vllm_version())

    # -- requests come and go --
    def add_request(self, request) -> None:
        known = request.request_id in self.requests
        super().add_request(request)
        if not known:
            self._client_inputs(request)
            self.trail.track(request)

    def _client_inputs(self, request) -> None:
        """A client's trail_* inputs, if the operator allows them and they are well formed; else ignored with a warning."""
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        given = {k: extra[k] for k in CLIENT_KEYS if k in extra}
        if not given:
            return
        rid, bad = request.request_id, None
        if not self.settings.client_estimates:
            bad = "client_estimates is off"
        else:
            try:
                self._take_client_inputs(rid, given)
            except (TypeError, ValueError) as e:
                bad = str(e)
        if bad is not None:
            self.stats.count("ignored_client_inputs")
            logger.warning("TRAIL: ignored %s of request %s (%s)", ", ".join(sorted(given)), rid, bad)

    def _take_client_inputs(self, rid: str, given: dict) -> None:
        num_bins = self.runtime.tracker.predictor.bins.num_bins if self.runtime.predictor is not None else None
        if INITIAL_PROBS_KEY in given:
            probs = given[INITIAL_PROBS_KEY]
            if not isinstance(probs, list) or len(probs) != num_bins or any(isinstance(p, bool) for p in probs):
                raise ValueError(f"{INITIAL_PROBS_KEY} must be a list of {num_bins} numbers")
            probs = [float(p) for p in probs]
            if not all(math.isfinite(p) and p >= 0 for p in probs) or sum(probs) <= 0:
                raise ValueError(f"{INITIAL_PROBS_KEY} must be finite, non-negative and not all zero")
        if EXACT_LENGTH_KEY in given:
            length = given[EXACT_LENGTH_KEY]
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise ValueError(f"{EXACT_LENGTH_KEY} must be a whole number >= 0")
        if PROMPT_TEXT_KEY in given and not isinstance(given[PROMPT_TEXT_KEY], str):
            raise ValueError(f"{PROMPT_TEXT_KEY} must be text")
        if INITIAL_PROBS_KEY in given:
            self.runtime.initial_probs[rid] = probs
        if EXACT_LENGTH_KEY in given:
            self.runtime.exact_lengths[rid] = length
        if PROMPT_TEXT_KEY in given:
            self.runtime.prompt_texts[rid] = given[PROMPT_TEXT_KEY][:MAX_PROMPT_TEXT]

    def _free_request(self, request, *args, **kwargs):
        from vllm.v1.request import RequestStatus

        record = self.trail.forget(request.request_id)
        bins_max = self.runtime.tracker.predictor.bins.max_len if self.runtime.predictor is not None else math.inf
        ended = request.status == RequestStatus.FINISHED_STOPPED or (
            request.status == RequestStatus.FINISHED_LENGTH_CAPPED and request.max_tokens >= bins_max)
        if ended:
            self.stats.finished(record, min(request.num_output_tokens, bins_max))
        return super()._free_request(request, *args, **kwargs)

    # -- every step --
    def schedule(self, *args, **kwargs):
        t0 = time.perf_counter()
        self._scheduled_at.append(t0)
        plan = self._guarded("rank", self.trail.before_step)
        trail_s = time.perf_counter() - t0
        try:
            out = Scheduler.schedule(self, *args, **kwargs)
        finally:
            self._guarded("restore", self.trail.restore, plan)
        t1 = time.perf_counter()
        self._guarded("reconcile", self.trail.after_step, out, plan, self.async_mode)
        self._log_step(t0, out, trail_s + time.perf_counter() - t1)
        self._maybe_log_stats(late_by=self.settings.stats_interval_s)  # only if get_grammar_bitmask never came
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        from trail_probe.serving.vllm_worker import PAYLOAD_ATTR

        t0 = time.perf_counter()
        self._time_step(scheduler_output, t0)
        payload = getattr(model_runner_output, PAYLOAD_ATTR, None)
        self._guarded("refine", self.trail.absorb, payload)
        if self.settings.record_states and payload is not None:
            self.observed.extend(zip(payload.state_ids, [self.requests[r].num_output_tokens if r in self.requests else -1
                                                         for r in payload.state_ids], payload.states.tolist()))
        if self.step_log and self.recording:  # the deferred refinements count as this step's probe time
            initial_s, self.trail.initial_s = self.trail.initial_s, 0.0
            refine_s, self.trail.refine_s = self.trail.refine_s, 0.0
            self.step_log[-1]["probe_s"] += time.perf_counter() - t0 - initial_s + refine_s
            self.step_log[-1]["initial_s"] += initial_s
        result = super().update_from_output(scheduler_output, model_runner_output)
        if not self.requests and self.stats.scored != self._scored_at_log:  # the engine goes idle: one more line
            self._maybe_log_stats(force=True)
        return result

    def get_grammar_bitmask(self, scheduler_output):
        """vLLM's step asks for this right after handing the pass to the worker, so the refinements
        from the previous pass are made here, while the pass runs (`TrailQueues.refine_deferred`), and
        so is the live-accuracy line."""
        self._guarded("refine", self.trail.refine_deferred)
        self._maybe_log_stats()  # the live-accuracy line's taus (~25 ms) also while the pass runs
        return super().get_grammar_bitmask(scheduler_output)

    def _time_step(self, scheduler_output, now: float) -> None:
        """The step just run, for the running limit: from its scheduling (or the previous step's end,
        whichever is later: async scheduling overlaps them) to now, against the requests it decoded."""
        started = self._scheduled_at.popleft() if self._scheduled_at else now
        counts = scheduler_output.num_scheduled_tokens.values()
        # decode-only steps: the running limit trades decode throughput, and prefill tokens cost otherwise
        if self._last_update is not None and counts and all(n == 1 for n in counts):
            self.trail.step_cost.add(len(counts), now - max(started, self._last_update))
        self._last_update = now

    def _guarded(self, what: str, fn, *args):
        """TRAIL's part of a step: a failure is logged and counted, and vLLM's own step goes on."""
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - the server must survive its plugin
            self.stats.count("fallback_steps")
            logger.exception("TRAIL: %s failed; this step runs as vLLM's FCFS step", what)
            return None

    def _maybe_log_stats(self, force: bool = False, late_by: float = 0.0) -> None:
        now = time.monotonic()
        if not self.settings.stats_interval_s or (now < self._next_stats + late_by and not force):
            return
        self._next_stats = now + (self.settings.stats_interval_s or math.inf)
        self._scored_at_log = self.stats.scored
        snap = {**self.stats.snapshot(), "running_limit": self.trail.current_limit}
        logger.info("%s", self.stats.line(snap))
        self.stats.publish(snap)

    def log(self) -> dict:
        rt = self.runtime
        return {**super().log(), "trail": {"policy": rt.policy.name, "preemption_c": rt.policy.preemption_c,
                                           "preemptions": rt.preemptions, "refinements": rt.refinements,
                                           "paused_past_limit": rt.paused_past_limit, "initial_s": rt.initial_s},
                "live": {**self.stats.snapshot(), "running_limit": self.trail.current_limit},
                "initial_estimates": {external_id(r): e for r, e in rt.initial_estimates.items()},
                "trace": {external_id(r): points for r, points in rt.trace.items()},
                "observed": [(external_id(r), g, s) for r, g, s in self.observed]}


def in_engine_core_process() -> bool:
    """Whether this is vLLM's engine-core process (multiprocess mode), not a process that also runs the
    model or a test that builds a scheduler by hand."""
    import multiprocessing

    return multiprocessing.current_process().name.startswith("EngineCore")


def one_thread_outside_the_worker() -> None:
    """The scheduler's tensors are a few hundred rows: in vLLM's engine-core process one torch thread
    does them, and more would only spin on the cores the worker computes on."""
    import torch

    if in_engine_core_process():
        torch.set_num_threads(1)


def external_id(request_id: str) -> str:
    """The id the client gave: vLLM's input processor appends "-" and 8 characters to make it unique."""
    return request_id.rsplit("-", 1)[0]
