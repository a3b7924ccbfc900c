"""TRAIL inside vLLM's engine, in-process (serve-bench and the tests): engine set-up and a replaying client.

    with VLLMEngine(folder, "trail", settings=TrailSettings(predictor=...)) as engine:
        results, t0 = engine.replay(requests, arrivals, max_new_tokens=512)   # real-time replay

`policy="fifo"` is vLLM's own FCFS scheduler, unchanged apart from a step log
(`RecordingScheduler`); `"priority"` is vLLM's priority policy fed an estimate as the priority (what
a user could do without trail_probe); every other policy runs `vllm_scheduler.TrailVLLMScheduler`.
The engine runs at vLLM's defaults (torch.compile, vLLM's own async-scheduling choice, its
max_num_seqs and token budget) unless a caller asks otherwise; the scheduler lives in vLLM's
engine-core process and the model in its worker, settings reach both through `additional_config`.
`trail-probe serve` starts vLLM's OpenAI server with the same settings instead.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trail_probe.errors import UserError
from trail_probe.serving.policies import base_name
from trail_probe.serving.trail_settings import TrailSettings
from trail_probe.serving.vllm_checks import check_vllm

SCHEDULERS = {
    "fifo": "trail_probe.serving.vllm_scheduler.RecordingScheduler",
    "priority": "trail_probe.serving.vllm_scheduler.RecordingScheduler",
    "trail": "trail_probe.serving.vllm_scheduler.TrailVLLMScheduler",
    "trail_bert": "trail_probe.serving.vllm_scheduler.TrailVLLMScheduler",
    "sjf_bert": "trail_probe.serving.vllm_scheduler.TrailVLLMScheduler",
    "oracle": "trail_probe.serving.vllm_scheduler.TrailVLLMScheduler",  # needs replay(exact_lengths=...)
}
TRAIL_SCHEDULER = SCHEDULERS["trail"]


def engine_kwargs(model: str | Path, policy: str, settings: TrailSettings | None, *, dtype: str = "bfloat16",
                  seed: int = 0, **engine_args) -> dict:
    """`vllm.EngineArgs` keyword arguments for one policy: vLLM's defaults plus the scheduler and its
    settings; `engine_args` (max_num_seqs, max_num_batched_tokens, kv_cache_memory_bytes, enforce_eager,
    async_scheduling, ...) are passed to vLLM as given, None values left to vLLM."""
    name = base_name(policy)  # `trail~2`: the trail scheduler, with aging 2
    if name not in SCHEDULERS:
        raise UserError(f"vLLM serving policy '{policy}' is not one of {', '.join(SCHEDULERS)}")
    trail = SCHEDULERS[name] == TRAIL_SCHEDULER
    if name != policy and not trail:
        raise UserError(f"vLLM serving policy '{policy}': @C and ~A settings apply to TRAIL's scheduler only")
    if trail and settings is None:
        raise UserError(f"policy '{policy}' needs TrailSettings(predictor=...) (the exported probe)")
    return {"model": str(model), "dtype": dtype, "seed": seed, **{k: v for k, v in engine_args.items() if v is not None},
            "scheduling_policy": "priority" if policy == "priority" else "fcfs",
            "scheduler_cls": SCHEDULERS[name],
            **({"additional_config": settings.additional_config()} if trail and settings is not None else {})}


def reserved_cpus(vllm_config) -> set[int]:
    """The CPUs vLLM's CPU backend reserves for the processes outside its worker (the engine core, the
    client), by its own rule (`OMPProcessManager`, VLLM_CPU_NUM_OF_RESERVED_CPU); empty on a GPU, with
    a user-given VLLM_CPU_OMP_THREADS_BIND, or in-process mode (the model runs in this process)."""
    import vllm.envs
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING:
        return set()
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    manager = OMPProcessManager(vllm_config)
    return set(getattr(manager, "reserved_cpu_list", []) or []) & os.sched_getaffinity(0)


def pin_outside_the_worker(vllm_config) -> set[int] | None:
    """Keep this process (the engine core, or the client) on the CPUs vLLM reserves for it: vLLM binds
    its worker's threads to the other cores but leaves these processes free to run there, where a
    step's Python work (TRAIL's more than FCFS's) then delays the forward pass. Returns the previous
    affinity (None: nothing changed). TRAIL_PROBE_VLLM_PIN=0 leaves every process where the OS puts it."""
    if os.environ.get("TRAIL_PROBE_VLLM_PIN", "1") == "0":
        return None
    cpus = reserved_cpus(vllm_config)
    before = os.sched_getaffinity(0)
    if not cpus or cpus == before:
        return None
    os.sched_setaffinity(0, cpus)
    return before


@dataclass
class VLLMResult:
    request_id: str
    arrival: float  # perf_counter
    first_token: float
    finish: float
    tokens: list[int] = field(default_factory=list)


class VLLMEngine:
    """vLLM's `LLMEngine` with a TRAIL (or a recording FCFS / priority) scheduler; a context manager."""

    def __init__(self, model: str | Path, policy: str, settings: TrailSettings | None = None, **kwargs):
        from trail_probe.serving.vllm_checks import check_before_start

        check_vllm()
        if settings is not None:
            check_before_start(str(model), settings, kwargs.get("dtype", "bfloat16"))
        self.policy, self.settings = policy, settings
        self.kwargs = engine_kwargs(model, policy, settings, **kwargs)
        self.engine = None

    def __enter__(self) -> "VLLMEngine":
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.engine = LLMEngine.from_engine_args(EngineArgs(**self.kwargs))
        self._affinity = pin_outside_the_worker(self.engine.vllm_config)  # the worker keeps its own cores
        return self

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            self.engine.engine_core.shutdown()
            self.engine = None
        if getattr(self, "_affinity", None):
            os.sched_setaffinity(0, self._affinity)
            self._affinity = None

    def scheduler_log(self) -> dict:
        """The scheduler's step log (and TRAIL's counters, trace and estimates), fetched from the
        engine-core process; call it after `replay`, before the engine shuts down."""
        from trail_probe.serving.vllm_scheduler import LOG_UTILITY

        client = self.engine.engine_core
        if hasattr(client, "call_utility"):  # the default: engine core in its own process
            return client.call_utility(LOG_UTILITY)
        return client.engine_core.scheduler.log()  # VLLM_ENABLE_V1_MULTIPROCESSING=0

    def replay(self, requests: Sequence[tuple[str, list[int], str | None]], arrivals: Sequence[float],
               max_new_tokens: int, priorities: Sequence[int] | None = None, progress=None,
               exact_lengths: Sequence[int] | None = None,
               initial_probs: Sequence[Sequence[float]] | None = None) -> tuple[list[VLLMResult], float]:
        """Hand each request to the engine at its arrival time (seconds from now), step the engine
        until all finish; returns (results in finishing order, t0 as perf_counter). `priorities` feed
        vLLM's priority policy, `exact_lengths` the oracle policy, `initial_probs` (BERT's distribution
        per request, computed before the engine as an API server would) TRAIL's initial estimate."""
        from vllm import SamplingParams

        from trail_probe.serving.vllm_scheduler import EXACT_LENGTH_KEY, INITIAL_PROBS_KEY, PROMPT_TEXT_KEY

        if len(requests) != len(arrivals):
            raise UserError(f"{len(requests)} requests but {len(arrivals)} arrival times")
        pending = sorted(range(len(requests)), key=lambda i: arrivals[i], reverse=True)
        live: dict[str, VLLMResult] = {}
        done: list[VLLMResult] = []
        t0 = time.perf_counter()
        while pending or live:
            now = time.perf_counter()
            while pending and t0 + arrivals[pending[-1]] <= now:
                i = pending.pop()
                rid, ids, text = requests[i]
                extra = {PROMPT_TEXT_KEY: text} if self.settings is not None and self.settings.client_estimates else {}
                if exact_lengths is not None:
                    extra[EXACT_LENGTH_KEY] = int(exact_lengths[i])
                if initial_probs is not None:
                    extra[INITIAL_PROBS_KEY] = [float(p) for p in initial_probs[i]]
                params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=False, extra_args=extra or None)
                self.engine.add_request(rid, {"prompt_token_ids": list(ids)}, params,
                                        priority=0 if priorities is None else int(priorities[i]))
                live[rid] = VLLMResult(rid, now, float("nan"), float("nan"))
            if not live:
                time.sleep(max(0.0, min(0.01, t0 + arrivals[pending[-1]] - time.perf_counter())))
                continue
            for out in self.engine.step():
                r = live.get(out.request_id)
                if r is None:
                    continue
                now = time.perf_counter()
                if out.outputs and out.outputs[0].token_ids and math.isnan(r.first_token):
                    r.first_token = now
                if out.finished:
                    r.finish, r.tokens = now, list(out.outputs[0].token_ids)
                    done.append(live.pop(out.request_id))
                    if progress is not None:
                        progress.update(1)
        return done, t0

