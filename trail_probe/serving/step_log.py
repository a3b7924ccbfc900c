"""One engine step as both engines' schedulers log it (transformers' `hf_scheduler` and vLLM's
`vllm_scheduler`), so serve-bench's report, the cost-model fit and the simulator read one schema."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepRecord:
    start: float  # perf_counter when the step was scheduled
    requests: int
    query_tokens: int
    decode_context: int  # KV entries read by decode tokens
    prefill_pairs: int  # (query, key) pairs of prefill attention
    probe_s: float  # TRAIL's own time in the step: ranking, refinement (initial estimates excluded)
    initial_s: float  # initial estimates made in the step (BERT on prompts, or the prompt probe at prefill)
    schedule_s: float  # the whole scheduling call
    active: int = 0  # requests holding KV cache (running or paused)
    free_cache: float | None = None  # share of KV cache blocks free, as measured (None: not measured)
    end: float = float("nan")  # when the step's output was processed (vLLM), or the next step's start (transformers)
