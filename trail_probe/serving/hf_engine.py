"""TRAIL inside Hugging Face transformers' continuous-batching engine: the engine wrapper and client.

    from trail_probe.serving.hf_engine import ServeEngine
    from trail_probe.serving.trail_state import TrailState

    runtime = TrailState(policy="trail", predictor=LengthPredictor.from_pretrained(...),
                           text_predictor=BertLengthPredictor.from_pretrained(...), max_new_tokens=512)
    with ServeEngine(model, "trail", runtime=runtime, max_batch=8, max_new_tokens=512,
                     eos_token_id=eos) as engine:
        engine.submit("r1", input_ids, text="Give three tips for staying healthy.")
        out = engine.result()          # one finished request (tokens and times)

The engine is transformers' own (`model.init_continuous_batching`): its paged KV cache, packed
batches, chunked prefill and generation loop are untouched. Our scheduler
(`trail_probe.serving.hf_scheduler.TrailScheduler`, or the recording FIFO for `policy="fifo"`) goes
in through the scheduler interface, chosen by `ContinuousBatchingConfig(scheduler_type=...)`
through `SCHEDULER_MAPPING`.

Where the public interface stops (and the smallest upstream change that would remove the workaround):
- the engine builds the scheduler from (cache, safety_margin, max_requests_per_batch) alone, so the
  predictors reach it through a factory registered in the global `SCHEDULER_MAPPING` under a name of
  its own (upstream: accept a scheduler instance or scheduler kwargs in the config);
- there is no callback after a forward pass, so hidden states come from a forward hook and are
  matched to requests by the order of the batch `schedule_batch` returned, which is the order
  `prepare_batch_tensors` packs them in (upstream: pass the processed batch and its
  `cumulative_seqlens_q` to a scheduler hook);
- a request carries token ids only, so prompt texts for BERT travel beside it by request id
  (`TrailState.prompt_texts`; upstream: free-form request metadata);
- pausing is leaving a request out of the batch; when the cache runs short the engine offloads the
  last starved candidates (our worst-ranked running requests), never a paused one (upstream: let the
  scheduler name offload victims);
- the batch is built with the base class's `_process_candidates` / `_cleanup_waiting_queue`, as the
  built-in schedulers do; they are private, hence the pinned version range;
- with prefix sharing (the engine's default) a prompt whose prefix is cached is only partly
  prefilled, so `initial="prompt_probe"` averages the new tokens only; BERT's estimate is unaffected.

Supported transformers: `SUPPORTED_TRANSFORMERS` (the continuous-batching internals change
between releases); other versions are refused with one line. Async batching (CUDA only) is turned
off: it schedules batch N+1 before batch N's tokens are known, which the refinement needs.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from trail_probe.choices import EnginePolicy, check_choice
from trail_probe.errors import UserError
from trail_probe.serving.hf_scheduler import (
    SUPPORTED_TRANSFORMERS,
    attach,
    check_transformers,
    engine_modules,
    generated_count,
    scheduler_classes,
)
from trail_probe.serving.policies import base_name
from trail_probe.serving.trail_state import TrailState


# --------------------------------------------------------------------------------------------
# Running the engine
# --------------------------------------------------------------------------------------------
@dataclass
class ServedRequest:
    request_id: str
    arrival: float  # seconds, perf_counter
    first_token: float
    finish: float
    prompt_tokens: int
    tokens: list[int]  # generated, EOS included when there was one
    error: str | None = None
    extra: dict = field(default_factory=dict)


class _Factory:
    """What `SCHEDULER_MAPPING` holds for one engine: builds the scheduler and keeps it."""

    def __init__(self, cls, **kwargs):
        self.cls, self.kwargs, self.instance = cls, kwargs, None

    def __call__(self, cache, safety_margin, max_requests_per_batch):
        self.instance = self.cls(cache, safety_margin, max_requests_per_batch, **self.kwargs)
        return self.instance


_names = itertools.count()


class ServeEngine:
    """transformers' continuous-batching manager with our scheduler plugged in; a context manager
    that starts and stops its generation thread. `submit` is thread-safe (the engine's queue)."""

    def __init__(self, model, policy: str = "fifo", *, runtime: TrailState | None = None, max_batch: int = 8,
                 max_new_tokens: int = 512, eos_token_id: int | Sequence[int] | None = None,
                 page_size: int = 32, num_blocks: int | None = None, max_batch_tokens: int = 256,
                 safety_margin: float | None = None):
        scheduler_mod, _ = engine_modules()
        from transformers import ContinuousBatchingConfig, GenerationConfig

        check_choice(base_name(policy), EnginePolicy, "serving policy")
        if policy != "fifo" and runtime is None:
            raise UserError(f"policy '{policy}' needs a TrailState with the exported predictor")
        if runtime is not None and policy != "fifo" and base_name(runtime.policy.name) != base_name(policy):
            raise UserError(f"the runtime was made for policy '{runtime.policy.name}', not '{policy}'")
        if max_batch < 1 or max_batch_tokens < max_batch:
            raise UserError(f"max_batch = {max_batch} must be >= 1 and max_batch_tokens = {max_batch_tokens} at least that")
        fifo_cls, trail_cls = scheduler_classes()
        self.model, self.policy, self.runtime = model, policy, runtime
        self.max_new_tokens = max_new_tokens
        self.factory = _Factory(fifo_cls) if policy == "fifo" else _Factory(trail_cls, runtime=runtime, capture=None)
        self.scheduler_name = f"trail_probe_{policy}_{next(_names)}"
        scheduler_mod.SCHEDULER_MAPPING[self.scheduler_name] = self.factory
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                                  eos_token_id=eos or None, pad_token_id=eos[0] if eos else None)
        self.cb_config = ContinuousBatchingConfig(
            scheduler_type=self.scheduler_name, max_requests_per_batch=max_batch, page_size=page_size,
            num_blocks=num_blocks, max_batch_tokens=max_batch_tokens, use_async_batching=False,
            use_cuda_graph=False, safety_margin=safety_margin, seed=0)
        self.manager = None
        self._capture = None
        self._pending: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    @property
    def scheduler(self):
        return self.factory.instance

    def __enter__(self) -> "ServeEngine":
        if self.policy != "fifo":
            self._capture = self.factory.kwargs["capture"] = attach(self.model, self.runtime)
        self.manager = self.model.init_continuous_batching(generation_config=self.generation_config,
                                                           continuous_batching_config=self.cb_config)
        self.manager.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.manager is not None:
                self.manager.stop(block=True, timeout=600, hard_stop=exc[0] is not None)
        finally:
            if self._capture is not None:
                self._capture.remove()
            self._scheduler_mod().SCHEDULER_MAPPING.pop(self.scheduler_name, None)

    @staticmethod
    def _scheduler_mod():
        return engine_modules()[0]

    def warmup(self, input_ids: list[int], requests: int = 2, tokens: int = 8) -> None:
        """Run a few short requests through the engine, then clear its logs and counters: the first
        forward passes of a process are slow and would be charged to whichever policy runs first."""
        for i in range(requests):
            self.submit(f"__warmup_{i}__", input_ids, max_new_tokens=tokens)
        for _ in range(requests):
            while self.result(timeout=1.0) is None:
                pass
        self.scheduler.steps.clear()
        if self.runtime is not None:
            self.runtime.reset_stats()

    def submit(self, request_id: str, input_ids: list[int], text: str | None = None,
               max_new_tokens: int | None = None) -> float:
        """Hand a request to the engine now; returns its arrival time (perf_counter)."""
        if self.runtime is not None and text is not None:
            self.runtime.prompt_texts[request_id] = text
        arrival = time.perf_counter()
        with self._lock:
            self._pending[request_id] = (arrival, len(input_ids))
        rid = self.manager.add_request(list(input_ids), request_id=request_id,
                                       max_new_tokens=max_new_tokens or self.max_new_tokens,
                                       record_timestamps=True)
        if rid is None:
            raise UserError(f"the engine refused request {request_id} (it is stopping or failed); see the log above")
        return arrival

    def result(self, timeout: float | None = None) -> ServedRequest | None:
        """The next finished request, or None after `timeout` seconds."""
        out = self.manager.get_result(timeout=timeout)
        if out is None:
            error = self.manager.background_thread_status.fatal_error
            if error is not None:
                raise RuntimeError(f"the continuous-batching engine failed: {error}") from error
            return None
        with self._lock:
            arrival, prompt_tokens = self._pending.pop(out.request_id, (out.created_time, len(out.prompt_ids)))
        stamps = out.timestamps or []
        return ServedRequest(out.request_id, arrival, stamps[0] if stamps else float("nan"), out.lifespan[1],
                             prompt_tokens, list(out.generated_tokens), out.error)


def serve(engine: ServeEngine, requests: Sequence[tuple[str, list[int], str | None]], arrivals: Sequence[float],
          progress=None, stop: threading.Event | None = None, clock=time.perf_counter,
          wait=None) -> tuple[list[ServedRequest], float]:
    """Replay requests into a started engine at their arrival times (seconds from now), from a client
    thread, and collect every result. Returns (results in finishing order, t0 as `clock` read it).
    `clock` and `wait(seconds) -> stopped` (default: `stop.wait`) are the client's time (tests pass
    their own, so the replay is checked without waiting for it)."""
    if len(requests) != len(arrivals):
        raise UserError(f"{len(requests)} requests but {len(arrivals)} arrival times")
    stop = stop or threading.Event()
    wait = wait or stop.wait
    t0 = clock()
    errors: queue.Queue = queue.Queue()

    def client():
        try:
            for (rid, ids, text), at in zip(requests, arrivals):
                delay = t0 + at - clock()
                if delay > 0 and wait(delay):
                    return
                engine.submit(rid, ids, text)
        except BaseException as e:  # surfaced in the main thread
            errors.put(e)

    thread = threading.Thread(target=client, name="serve-bench-client", daemon=True)
    thread.start()
    results: list[ServedRequest] = []
    try:
        while len(results) < len(requests):
            if not errors.empty():
                raise errors.get()
            got = engine.result(timeout=0.5)
            if got is None:
                continue
            if got.error:
                raise RuntimeError(f"request {got.request_id} failed in the engine: {got.error}")
            results.append(got)
            if progress is not None:
                progress.update(1)
    finally:
        stop.set()
        thread.join(timeout=5)
    return results, t0


__all__ = ["ServeEngine", "TrailState", "ServedRequest", "serve", "check_transformers", "generated_count",
           "SUPPORTED_TRANSFORMERS"]
