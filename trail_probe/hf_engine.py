"""TRAIL inside Hugging Face transformers' continuous-batching engine.

    from trail_probe.hf_engine import ServeEngine, TrailRuntime

    runtime = TrailRuntime(policy="trail", predictor=LengthPredictor.from_pretrained(...),
                           text_predictor=BertLengthPredictor.from_pretrained(...), max_new_tokens=512)
    with ServeEngine(model, "trail", runtime=runtime, max_batch=8, max_new_tokens=512,
                     eos_token_id=eos) as engine:
        engine.submit("r1", input_ids, text="Give three tips for staying healthy.")
        out = engine.result()          # one finished request (tokens and times)

The engine is transformers' own (`model.init_continuous_batching`): its paged KV cache, packed
batches, chunked prefill and generation loop are untouched. What we add goes through the public
scheduler interface, `transformers.generation.continuous_batching.scheduler.Scheduler`, chosen by
`ContinuousBatchingConfig(scheduler_type=...)` through `SCHEDULER_MAPPING`:

- `TrailScheduler` ranks every request by its predicted remaining length with
  `trail_probe.policies` (the simulator's code): each step it calls `policies.schedule` on the
  running set and a queue of the waiting requests (fresh ones and paused ones), at most
  `max_requests_per_batch` running. Preemption = leaving a running request out of the batch: it
  stays in the engine's `active_requests` and keeps its KV blocks (unless the engine itself must
  offload it to make room, as it does under FIFO). Limited preemption: a request may be paused only
  while generated <= C * its initial estimate; past that it is in every batch until it finishes.
- Estimates: `trail_probe.runtime.LengthTracker`. A request's initial distribution comes from the
  exported BERT predictor (its prompt text) or, with `initial="prompt_probe"`, from the prompt probe
  on the mean of the probe layer's states over the prompt once it is prefilled. Every k decode
  steps (generated = 1, 1 + k, ...) the probe layer's state of each running request refines it.
- The state comes from a forward hook on that decoder layer. The engine packs all requests of a
  batch into one row ([1, tokens, d]); the scheduler knows the batch it returned (request order
  and query lengths), so request i's last token sits at cumsum(query lengths)[i] - 1. The hook
  only keeps a reference; the refinement runs at the start of the next `schedule_batch`, after
  `update_batch` has appended the token that forward pass produced.
- `RecordingFIFOScheduler` is the engine's `FIFOScheduler`, unchanged, plus the same step log.

Both schedulers log every step (start time, requests, query tokens, KV context; the time spent
in the probe and in scheduling) so serve-bench can report busy time, fit the cost model of this
engine and measure the probe's overhead.

Where the public interface stops (and the smallest upstream change that would remove the workaround):
- the engine builds the scheduler from (cache, safety_margin, max_requests_per_batch) alone, so the
  predictors reach it through a factory registered in the global `SCHEDULER_MAPPING` under a name of
  its own (upstream: accept a scheduler instance or scheduler kwargs in the config);
- there is no callback after a forward pass, so hidden states come from a forward hook and are
  matched to requests by the order of the batch `schedule_batch` returned, which is the order
  `prepare_batch_tensors` packs them in (upstream: pass the processed batch and its
  `cumulative_seqlens_q` to a scheduler hook);
- a request carries token ids only, so prompt texts for BERT travel beside it by request id
  (`TrailRuntime.prompt_texts`; upstream: free-form request metadata);
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

import torch

from trail_probe.errors import UserError
from trail_probe.models import decoder_layers
from trail_probe.policies import Policy, RequestQueue, make_policy, schedule

SUPPORTED_TRANSFORMERS = ((5, 24), (5, 25))  # [lowest, first unsupported): the range tested
ENGINE_POLICIES = ("fifo", "trail", "trail_bert", "sjf_bert")  # fifo: the engine's own scheduler


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


def _engine():
    """The engine's modules, imported once the version is checked."""
    check_transformers()
    from transformers.generation.continuous_batching import requests, scheduler

    return scheduler, requests


def generated_count(state) -> int:
    """Tokens generated so far, also for a request the engine rebuilt after evicting its cache
    (`create_equivalent_initial_request` moves the generated tokens into the prompt)."""
    moved = len(state.initial_tokens) - state._true_initial_tokens if state._true_initial_tokens else 0
    return moved + len(state.generated_tokens)


# --------------------------------------------------------------------------------------------
# The predictor side: estimates, refinement from the hooked layer, the step log
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _View:
    """What `policies` reads of a request (`policies.SchedRequest`)."""

    request_id: str
    rid: int
    arrival: float
    generated: int = 0
    initial_estimate: float = 0.0
    remaining_estimate: float = 0.0


@dataclass
class StepRecord:
    start: float  # perf_counter when the step was scheduled
    requests: int
    query_tokens: int
    decode_context: int  # KV entries read by decode tokens
    prefill_pairs: int  # (query, key) pairs of prefill attention
    probe_s: float  # refinement and estimates in this step's schedule_batch (initial estimates excluded)
    initial_s: float  # initial estimates of the requests that arrived (BERT on their prompts)
    schedule_s: float  # the whole schedule_batch call
    active: int = 0  # requests holding KV cache (running or paused)
    free_cache: float = 1.0  # share of KV cache pages free
    end: float = float("nan")  # the next step's start, or when the engine went idle


class TrailRuntime:
    """Everything the TRAIL scheduler knows besides the engine: policy, predictors, estimates,
    prompt texts, the hooked layer, counters. One per engine run (`reset` clears it)."""

    def __init__(self, policy: str | Policy = "trail", *, predictor=None, text_predictor=None,
                 prompt_predictor=None, initial: str = "bert", max_new_tokens: int = 512,
                 refine_interval: int = 8, preemption_c: float = 0.8, likelihood: str = "posterior"):
        from trail_probe.runtime import LengthTracker

        self.policy = policy if isinstance(policy, Policy) else make_policy(policy, preemption_c)
        if self.policy.predictor == "exact" or self.policy.name == "fcfs":
            raise UserError(f"policy '{self.policy.name}' is not run through the TRAIL scheduler; use one of "
                            f"{', '.join(ENGINE_POLICIES)} ('fifo' is the engine's own scheduler)")
        if initial not in ("bert", "prompt_probe", "none"):
            raise UserError(f"initial estimate '{initial}' is not one of bert, prompt_probe, none")
        if refine_interval < 1:
            raise UserError(f"refine_interval = {refine_interval} must be >= 1")
        if predictor is None:
            raise UserError("the TRAIL scheduler needs a length predictor (the exported probe); pass predictor=LengthPredictor.from_pretrained(...)")
        if initial == "bert" and text_predictor is None:
            raise UserError("initial='bert' needs the BERT predictor; pass text_predictor=BertLengthPredictor.from_pretrained(...) or use initial='prompt_probe'")
        if initial == "prompt_probe" and prompt_predictor is None:
            raise UserError("initial='prompt_probe' needs the exported prompt probe; pass prompt_predictor=LengthPredictor.from_pretrained(...)")
        if self.policy.predictor == "bert" and initial == "none":
            raise UserError(f"policy '{self.policy.name}' ranks by the initial estimate alone; use initial='bert' or 'prompt_probe'")
        self.predictor = predictor
        self.text_predictor = text_predictor
        self.prompt_predictor = prompt_predictor
        self.initial = initial
        self.refine = self.policy.predictor == "refined"
        self.max_new_tokens = max_new_tokens
        self.refine_interval = refine_interval
        self.tracker = LengthTracker(predictor, max_new_tokens=max_new_tokens, prompt_predictor=prompt_predictor,
                                     text_predictor=text_predictor if initial == "bert" else None,
                                     likelihood=likelihood)
        self.prompt_texts: dict[str, str] = {}
        self.layer = predictor.layer
        self.captured: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        for rid in self.tracker.request_ids:
            self.tracker.remove([rid])
        self.captured = None
        self._prompt_sums: dict[str, tuple[torch.Tensor, int]] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the counters and traces (after a warm-up), keeping the requests being tracked."""
        self.initial_s = 0.0  # time in the BERT / prompt-probe initial estimates
        self.preemptions = 0  # running requests left out of a batch (they keep their cache)
        self.refinements = 0
        self.paused_past_limit = 0  # must stay 0: a request past C * initial is never paused
        self.trace: dict[str, list[tuple[int, float]]] = {}  # request -> (generated, remaining estimate) per refinement
        self.initial_estimates: dict[str, float] = {}

    def hook(self, model) -> torch.utils.hooks.RemovableHandle:
        """Keep a reference to the probe layer's output of every forward pass ([1, tokens, d] here)."""
        layers = decoder_layers(model)
        if not 0 <= self.layer < len(layers):
            raise UserError(f"the predictor reads layer {self.layer} but the model has layers 0..{len(layers) - 1}; export a predictor for this model")
        self.predictor.check_serving_model(len(layers), getattr(model.config, "hidden_size", None))

        def keep(module, inputs, output):
            self.captured = output[0] if isinstance(output, tuple) else output

        return layers[self.layer].register_forward_hook(keep)

    # -- called by the scheduler --
    def admit(self, ids: list[str]) -> None:
        """New requests join the tracker with their initial distribution (BERT on the prompt text)."""
        t0 = time.perf_counter()
        texts = [self.prompt_texts.get(i) for i in ids]
        with_text = [i for i, t in zip(ids, texts) if t is not None]
        without = [i for i, t in zip(ids, texts) if t is None]
        if self.initial == "bert" and with_text:
            self.tracker.add(with_text, prompt_texts=[self.prompt_texts[i] for i in with_text])
        else:
            without = ids
        if without:  # estimated at the token budget until a prediction exists
            self.tracker.add(without)
        for i, e in zip(ids, self.tracker.initial_estimates(ids).tolist()):
            self.initial_estimates[i] = e
        self.initial_s += time.perf_counter() - t0

    def absorb(self, batch) -> None:
        """Refine from the hooked states of the forward pass that ran `batch` (the scheduler's last
        answer). Request i's last token is at cumsum(query lengths)[i] - 1 in the packed row."""
        states, self.captured = self.captured, None
        if batch is None or states is None or not (self.refine or self.initial == "prompt_probe"):
            return
        states = states.reshape(-1, states.shape[-1])
        ids, rows, gens = [], [], []
        prompt_done = []
        end = 0
        for fs in batch:
            start, end = end, end + fs.query_length
            rid = fs.state.request_id
            if rid not in self.tracker:
                continue  # finished or cancelled in update_batch
            gen = generated_count(fs.state) - (1 if fs.has_new_token else 0)  # at the time of that forward
            if self.initial == "prompt_probe" and gen == 0 and not fs.state._true_initial_tokens:
                total, count = self._prompt_sums.get(rid, (0.0, 0))
                self._prompt_sums[rid] = (states[start:end].float().sum(0) + total, count + end - start)
                if fs.has_new_token:
                    prompt_done.append(rid)
            if self.refine and fs.has_new_token and gen >= 1 and (gen - 1) % self.refine_interval == 0:
                ids.append(rid)
                rows.append(end - 1)
                gens.append(gen)
        if prompt_done:
            means = torch.stack([self._prompt_sums[r][0] / self._prompt_sums.pop(r)[1] for r in prompt_done])
            probs = self.prompt_predictor.probs(means)
            self.tracker.remove(prompt_done)
            self.tracker.add(prompt_done, initial_probs=probs)
            for r, e in zip(prompt_done, self.tracker.initial_estimates(prompt_done).tolist()):
                self.initial_estimates[r] = e
        if ids:
            rows_t = torch.tensor(rows, dtype=torch.long, device=states.device)
            self.tracker.observe(ids, states.index_select(0, rows_t).to(self.predictor.device), gens)
            self.refinements += len(ids)
            for r, g, e in zip(ids, gens, self.tracker.estimates(ids, gens).tolist()):
                self.trace.setdefault(r, []).append((g, e))

    def estimate(self, views: list[_View]) -> None:
        """Fill each view's generated count and remaining estimate for the policy."""
        if not views:
            return
        ids = [v.request_id for v in views]
        gens = [v.generated for v in views]
        if self.policy.predictor == "bert":  # BERT's estimate counted down: no refinement used
            left = torch.tensor([self.max_new_tokens - g for g in gens], dtype=torch.float64)
            init = torch.tensor([self.initial_estimates[i] for i in ids], dtype=torch.float64)
            remaining = torch.minimum((init - torch.tensor(gens, dtype=torch.float64)).clamp_min(0), left.clamp_min(0))
        else:
            remaining = self.tracker.estimates(ids, gens).cpu()
        initial = self.tracker.initial_estimates(ids).cpu()
        for v, r, i in zip(views, remaining.tolist(), initial.tolist()):
            v.remaining_estimate = r
            v.initial_estimate = i

    def remove(self, request_id: str) -> None:
        if request_id in self.tracker:
            self.tracker.remove([request_id])
        self._prompt_sums.pop(request_id, None)


class _StepLog:
    """Mixin: one `StepRecord` per scheduled batch; the engine is idle between a step whose end is
    set by `has_pending_requests() == False` and the next step."""

    def _log_reset(self) -> None:
        self.steps: list[StepRecord] = []

    def _log_step(self, t0: float, batch, probe_s: float, initial_s: float = 0.0) -> None:
        from trail_probe.cost_model import iteration_features

        now = time.perf_counter()
        if self.steps and self.steps[-1].end != self.steps[-1].end:  # nan: no idle mark since
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
        if not pending and self.steps and self.steps[-1].end != self.steps[-1].end:
            self.steps[-1].end = time.perf_counter()
        return pending


def _scheduler_classes():
    scheduler_mod, requests_mod = _engine()
    Scheduler, FIFOScheduler = scheduler_mod.Scheduler, scheduler_mod.FIFOScheduler
    DECODING, PENDING = requests_mod.RequestStatus.DECODING, requests_mod.RequestStatus.PENDING

    class RecordingFIFOScheduler(_StepLog, FIFOScheduler):
        """The engine's FIFO scheduler, unchanged, with the step log."""

        def reset(self) -> None:
            super().reset()
            self._log_reset()

        def schedule_batch(self, token_budget: int, cache_budget: int):
            t0 = time.perf_counter()
            out = super().schedule_batch(token_budget, cache_budget)
            self._log_step(t0, out[0], 0.0)
            return out

    class TrailScheduler(_StepLog, Scheduler):
        """SPRPT with limited preemption on the probe's refined estimates (module docstring)."""

        def __init__(self, cache, safety_margin, max_requests_per_batch, *, runtime: TrailRuntime):
            self.runtime = runtime
            super().__init__(cache, 0.15 if safety_margin is None else safety_margin, max_requests_per_batch)

        def reset(self) -> None:
            super().reset()
            self._log_reset()
            self.runtime.reset()
            self._views: dict[str, _View] = {}
            self._running: list[str] = []
            self._last_batch = None
            self._counter = itertools.count()

        def _state(self, request_id: str):
            return self.active_requests.get(request_id) or self.waiting_requests.get(request_id)

        def schedule_batch(self, token_budget: int, cache_budget: int):
            t0 = time.perf_counter()
            rt, policy = self.runtime, self.runtime.policy
            initial_before = rt.initial_s
            # 1. What the last forward pass says, then initial estimates for new arrivals.
            rt.absorb(self._last_batch)
            self._last_batch = None
            new = [s for s in self.waiting_requests.values() if s.request_id not in self._views]
            for s in new:
                self._views[s.request_id] = _View(s.request_id, next(self._counter), s.created_time)
            if new:
                rt.admit([s.request_id for s in new])
            live = [v for v in self._views.values() if self._state(v.request_id) is not None]
            for v in live:
                v.generated = generated_count(self._state(v.request_id))
            rt.estimate(live)
            initial_s = rt.initial_s - initial_before
            probe_s = time.perf_counter() - t0 - initial_s
            # 2. The policy: who runs (policies.schedule, as in the simulator).
            running_ids = set(self._running)
            running = [v for v in live if v.request_id in running_ids]
            waiting = RequestQueue(policy)
            for v in live:
                if v.request_id not in running_ids and not (self.block_new_requests and self._state(v.request_id).status == PENDING):
                    waiting.push(v)
            _, preempted = schedule(policy, waiting, running, self.max_requests_per_batch)
            rt.preemptions += len(preempted)
            self._running = [v.request_id for v in running]
            # 3. The batch: decoding requests first (one token each), then prefill chunks, best first.
            order = sorted(running, key=lambda v: (self._state(v.request_id).status != DECODING, policy.key(v)))
            candidates = [self._state(v.request_id) for v in order]
            removed: set[str] = set()
            scheduled, one_failed, fast_path, q_tokens, kv_read = self._process_candidates(
                candidates, token_budget, cache_budget, removed)
            self._cleanup_waiting_queue(removed)
            # A decoding request left out of the batch is paused; past its limit it never may be.
            in_batch = {fs.state.request_id for fs in scheduled}
            for rid, state in self.active_requests.items():
                if state.status == DECODING and rid not in in_batch and rid in self._views \
                        and not policy.can_preempt(self._views[rid]) and policy.preemption_c > 0:
                    rt.paused_past_limit += 1
            self._last_batch = scheduled
            self._log_step(t0, scheduled, probe_s, initial_s)
            if not scheduled and one_failed:
                return None, fast_path, 0, 0
            return scheduled, fast_path, q_tokens, kv_read

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

    return RecordingFIFOScheduler, TrailScheduler


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

    def __init__(self, model, policy: str = "fifo", *, runtime: TrailRuntime | None = None, max_batch: int = 8,
                 max_new_tokens: int = 512, eos_token_id: int | Sequence[int] | None = None,
                 page_size: int = 32, num_blocks: int | None = None, max_batch_tokens: int = 256,
                 safety_margin: float | None = None):
        scheduler_mod, _ = _engine()
        from transformers import ContinuousBatchingConfig, GenerationConfig

        if policy not in ENGINE_POLICIES:
            raise UserError(f"serving policy '{policy}' is not one of {', '.join(ENGINE_POLICIES)}")
        if policy != "fifo" and runtime is None:
            raise UserError(f"policy '{policy}' needs a TrailRuntime with the exported predictor")
        if runtime is not None and policy != "fifo" and runtime.policy.name.partition("@")[0] != policy:
            raise UserError(f"the runtime was made for policy '{runtime.policy.name}', not '{policy}'")
        if max_batch < 1 or max_batch_tokens < max_batch:
            raise UserError(f"max_batch = {max_batch} must be >= 1 and max_batch_tokens = {max_batch_tokens} at least that")
        fifo_cls, trail_cls = _scheduler_classes()
        self.model, self.policy, self.runtime = model, policy, runtime
        self.max_new_tokens = max_new_tokens
        self.factory = _Factory(fifo_cls) if policy == "fifo" else _Factory(trail_cls, runtime=runtime)
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
        self._hook = None
        self._pending: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    @property
    def scheduler(self):
        return self.factory.instance

    def __enter__(self) -> "ServeEngine":
        if self.policy != "fifo":
            self._hook = self.runtime.hook(self.model)
        self.manager = self.model.init_continuous_batching(generation_config=self.generation_config,
                                                           continuous_batching_config=self.cb_config)
        self.manager.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.manager is not None:
                self.manager.stop(block=True, timeout=600, hard_stop=exc[0] is not None)
        finally:
            if self._hook is not None:
                self._hook.remove()
            self._scheduler_mod().SCHEDULER_MAPPING.pop(self.scheduler_name, None)

    @staticmethod
    def _scheduler_mod():
        return _engine()[0]

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
          progress=None, stop: threading.Event | None = None) -> tuple[list[ServedRequest], float]:
    """Replay requests into a started engine at their arrival times (seconds from now), from a client
    thread, and collect every result. Returns (results in finishing order, t0 as perf_counter)."""
    if len(requests) != len(arrivals):
        raise UserError(f"{len(requests)} requests but {len(arrivals)} arrival times")
    stop = stop or threading.Event()
    t0 = time.perf_counter()
    errors: queue.Queue = queue.Queue()

    def client():
        try:
            for (rid, ids, text), at in zip(requests, arrivals):
                delay = t0 + at - time.perf_counter()
                if delay > 0 and stop.wait(delay):
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


__all__ = ["ServeEngine", "TrailRuntime", "ServedRequest", "StepRecord", "serve", "check_transformers",
           "generated_count", "SUPPORTED_TRANSFORMERS", "ENGINE_POLICIES"]
