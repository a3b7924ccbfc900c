"""Iteration cost model of a continuous-batching LLM engine, its presets, and its fit.

    from trail_probe.serving.cost_model import load_cost_model, fit_cost_model
    cost = load_cost_model("measured_cpu")     # or "llama3_8b_a100", or a JSON file from the fit

The simulator (`trail_probe.serving.simulator`) charges each iteration `CostModel.iteration_time`;
`benchmarks/fit_cost_model.py` times real SmolLM2 iterations here and fits the coefficients, and the
`measured_cpu` preset is that fit, read from the copy of its results shipped in `serving/data/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from trail_probe.errors import UserError


@dataclass
class CostModel:
    """Seconds per iteration = fixed + per_token * tokens + per_context_token * decode_context
    + per_prefill_pair * prefill_pairs (see the module docstring)."""

    fixed_s: float
    per_token_s: float
    per_context_token_s: float = 0.0
    per_prefill_pair_s: float = 0.0
    source: str = ""

    def iteration_time(self, tokens: float, decode_context: float = 0.0, prefill_pairs: float = 0.0) -> float:
        return (self.fixed_s + self.per_token_s * tokens + self.per_context_token_s * decode_context
                + self.per_prefill_pair_s * prefill_pairs)


# Llama-3-8B(-Instruct), bf16, one A100-80GB SXM, vLLM. An approximation from a roofline calibrated
# on one published measurement, not a measurement of vLLM 0.5 itself:
# - fixed_s: one decode step must read all weights, 8.03e9 params * 2 B = 16.06 GB. "vLLM
#   throughput-latency sweep on NVIDIA A100" (J. Musgrave,
#   https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on; Llama-3.1-8B-Instruct bf16, vLLM,
#   A100-40GB) measures ~75 tok/s at one request, ~77 % of the 1.555 TB/s memory roofline. The same
#   77 % of the A100-80GB SXM's 2.039 TB/s (NVIDIA datasheet) gives 16.06e9 / 1.570e12 = 10.2 ms.
# - per_token_s: 2 * 8.03e9 FLOP per token at 60 % of the 312 TFLOP/s bf16 peak = 85.8 us
#   (prefill is compute-bound; decode tokens are charged the same, which overestimates small batches).
# - per_context_token_s: each decode token reads its KV cache, 32 layers * 8 KV heads * 128 dims *
#   2 (K, V) * 2 B = 128 KiB per cached token, at 1.570 TB/s = 83.5 ns.
# - per_prefill_pair_s: 4 * 4096 * 32 FLOP per (query, key) pair (QK^T and PV) at 187 TFLOP/s = 2.8 ns.
# Check against the same source: 8 concurrent requests at ~1.1k context give 7.1x the throughput of
# one in this model; the source reports 6.6x. TTFT of a 1024-token prompt alone: ~100 ms.
LLAMA3_8B_A100 = CostModel(10.2e-3, 85.8e-6, 83.5e-9, 2.8e-9,
                           source="llama3_8b_a100: roofline calibrated on a published vLLM A100 measurement (see cost_model.py)")

# SmolLM2-135M-Instruct (fp32, Hugging Face eager forward passes) on this project's 2-core CPU machine:
# the fit benchmarks/fit_cost_model.py wrote last. It writes benchmarks/results/cost_model_cpu.json and
# this copy, shipped as package data (pyproject's package-data), so an installed wheel has it too and
# re-running the benchmark updates the preset.
MEASURED_CPU_FILE = Path(__file__).with_name("data") / "cost_model_cpu.json"


def measured_cost_model(path: str | Path = MEASURED_CPU_FILE) -> CostModel:
    """The `measured_cpu` preset: the cost model of a fit_cost_model.py results file."""
    data = json.loads(Path(path).read_text())
    return replace(cost_model_from_json(path), source=f"measured_cpu: {data.get('model', '?')}, {data.get('threads', '?')} "
                   f"torch threads, fitted {str(data.get('date', '?'))[:10]} (benchmarks/results/cost_model_cpu.json)")


def cost_model_from_json(path: str | Path) -> CostModel:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        params = data.get("cost_model", data)
        return CostModel(float(params["fixed_s"]), float(params["per_token_s"]),
                         float(params.get("per_context_token_s", 0.0)), float(params.get("per_prefill_pair_s", 0.0)),
                         source=f"{path} ({params.get('source', 'fitted')})")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cost model file '{path}' is not readable ({e}); re-run benchmarks/fit_cost_model.py") from None


COST_PRESETS = {"llama3_8b_a100": LLAMA3_8B_A100, "measured_cpu": measured_cost_model()}


def load_cost_model(preset: str) -> CostModel:
    """A preset name, or a JSON file with fixed_s, per_token_s[, per_context_token_s, per_prefill_pair_s]."""
    if preset in COST_PRESETS:
        return COST_PRESETS[preset]
    if preset.endswith(".json"):
        if not Path(preset).is_file():
            raise UserError(f"cost model file '{preset}' not found; give a preset ({', '.join(COST_PRESETS)}) or a JSON file")
        return cost_model_from_json(preset)
    raise UserError(f"simulate.cost_preset = '{preset}' is not one of {', '.join(COST_PRESETS)} or a .json file")


def iteration_features(batch: list[tuple[int, int]]) -> dict:
    """Cost-model features of one iteration; `batch` holds (new tokens, tokens already cached) per
    request. A decode is (1, cached); a prefill chunk of q tokens after `cached` is (q, cached)."""
    tokens = context = pairs = 0
    for q, cached in batch:
        tokens += q
        if q == 1:
            context += cached + 1
        else:
            pairs += q * cached + q * (q + 1) // 2
    return {"tokens": tokens, "decode_context": context, "prefill_pairs": pairs}


def fit_cost_model(timings: list[dict], source: str = "fitted") -> CostModel:
    """Non-negative least squares on relative error. Each timing: {"tokens", "decode_context",
    "prefill_pairs", "seconds"} for one measured iteration."""
    from scipy.optimize import nnls

    if len(timings) < 4:
        raise UserError(f"fit_cost_model needs at least 4 timings to fit 4 parameters, got {len(timings)}")
    x = np.array([[1.0, t["tokens"], t["decode_context"], t["prefill_pairs"]] for t in timings])
    y = np.array([float(t["seconds"]) for t in timings])
    w = 1.0 / y  # relative error: a 2 ms step matters as much as a 2 s one
    scale = x.max(0)  # columns differ by orders of magnitude
    coef, _ = nnls(x * w[:, None] / scale, y * w)
    coef = coef / scale
    return CostModel(*(float(c) for c in coef), source=source)
