"""serve-bench's measurements and report: per-run summaries (latency, TTFT, throughput, busy share,
probe overhead), FIFO against TRAIL (speed-ups, same outputs), the cost model fitted to the engine's
own steps and the simulator's prediction for the same arrivals, the table, plot and report.md."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from trail_probe.atomic import atomic_path, atomic_write_json, atomic_write_text
from trail_probe.config import config_to_dict
from trail_probe.serving import simulator
from trail_probe.serving.cost_model import fit_cost_model
from trail_probe.serving.policies import make_policy


# --------------------------------------------------------------------------------------------
# One policy
# --------------------------------------------------------------------------------------------
def _percentiles(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p99": float(np.percentile(x, 99)), "max": float(x.max())}


def summarize_run(records: list[dict], steps: list[dict]) -> dict:
    arrival = np.array([r["arrival"] for r in records])
    first = np.array([r["first_token"] for r in records])
    finish = np.array([r["finish"] for r in records])
    tokens = sum(r["output_tokens"] for r in records)
    lo, hi = float(arrival.min()), float(finish.max())
    span = hi - lo
    timed = [s for s in steps if math.isfinite(s["end"])]  # the last step before the engine stopped has no end
    durations = np.array([s["end"] - s["start"] for s in timed])
    # Busy time inside [first arrival, last finish]: the last step ends after the last finish is stamped.
    busy = float(sum(max(0.0, min(s["end"], hi) - max(s["start"], lo)) for s in timed))
    return {
        "requests": len(records),
        "latency_s": _percentiles(finish - arrival),
        "ttft_s": _percentiles(first - arrival),
        "throughput_tokens_per_s": tokens / span,
        "throughput_rps": len(records) / span,
        "span_s": span,
        "busy_fraction": busy / span,
        "steps": len(steps),
        "mean_step_s": float(durations.mean()) if len(durations) else float("nan"),
        "mean_batch": float(np.mean([s["requests"] for s in timed])) if timed else float("nan"),
        "probe_s_per_step": float(np.mean([s["probe_s"] for s in timed])) if timed else 0.0,
        # vLLM's TRAIL scheduler splits probe_s: ranking before vLLM schedules, refinement on the outputs
        **({k: float(np.mean([s.get(k.removesuffix("_per_step"), 0.0) for s in timed]))
            for k in ("rank_s_per_step", "observe_s_per_step")} if timed and "rank_s" in timed[0] else {}),
        "initial_s_per_request": float(sum(s["initial_s"] for s in steps)) / max(len(records), 1),
        "schedule_s_per_step": float(np.mean([s["schedule_s"] for s in timed])) if timed else 0.0,
        "max_active": max((s.get("active", 0) for s in steps), default=0),  # KV cache holders, paused included
        # measured or absent: a step log without the field (an older one) gives no number
        "min_free_cache": min((s["free_cache"] for s in steps if s.get("free_cache") is not None), default=None),
    }


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------
def same_outputs(a: dict, b: dict) -> dict:
    ta = {r["id"]: r["tokens"] for r in a["requests"]}
    mismatches = []
    for r in b["requests"]:
        x, y = ta[r["id"]], r["tokens"]
        if x != y:
            first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            mismatches.append({"id": r["id"], "first_difference": first, "lengths": [len(x), len(y)]})
    n = len(b["requests"])
    return {"identical": n - len(mismatches), "requests": n, "share": (n - len(mismatches)) / n, "mismatches": mismatches}


def fit_engine_cost(runs: dict) -> "object":
    timings = [{"tokens": s["query_tokens"], "decode_context": s["decode_context"], "prefill_pairs": s["prefill_pairs"],
                "seconds": s["end"] - s["start"]}
               for run in runs.values() for s in run["steps"] if math.isfinite(s["end"]) and s["end"] > s["start"]]
    return fit_cost_model(timings, source="fitted to this serve-bench's engine steps (all policies)")


def _or_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def served_workload(runs: dict) -> tuple["simulator.Workload", bool]:
    """The simulator's workload for a serve-bench's runs: the same arrivals, the measured lengths and
    the estimates a TRAIL run recorded; and whether there were such estimates."""
    base = runs.get("fifo") or next(iter(runs.values()))
    # a run that recorded the probe's estimates (the oracle's are the lengths themselves)
    trail = runs.get("trail") or next((r for p, r in runs.items() if "trail" in r and p != "oracle"), None)
    est = {r["id"]: r for r in trail["requests"]} if trail else {}
    reqs = base["requests"]
    # The engine counts the EOS token it produces; the simulator charges one step per output token.
    refined = []
    for r in reqs:
        points = est.get(r["id"], {}).get("refined") or []
        refined.append(([int(j) for j, _ in points], [float(e) for _, e in points]))
    w = simulator.Workload(np.array([r["planned_arrival"] for r in reqs]), np.array([max(r["prompt_tokens"], 1) for r in reqs]),
                 np.array([max(r["output_tokens"], 1) for r in reqs]),
                 np.array([_or_nan(est.get(r["id"], {}).get("initial_estimate")) for r in reqs], dtype=float),
                 refined, [r["id"] for r in reqs])
    return w, trail is not None


def served_engine(cfg) -> "simulator.Engine":
    sc = cfg.serve
    return simulator.Engine(sc.max_batch, sc.max_batch_tokens, kv_capacity_tokens(cfg), "keep")


def simulator_prediction(cfg, runs: dict, cost) -> dict:
    """The simulator on the same arrivals, measured lengths and recorded estimates."""
    w, trail = served_workload(runs)
    engine = served_engine(cfg)
    out = {}
    for policy in runs:
        # vLLM's priority policy fed BERT's estimate is shortest-BERT-first without preemption
        spec = {"fifo": "fcfs", "priority": "sjf_bert"}.get(policy, policy)  # trail~2 etc. as they are
        if spec != "fcfs" and not trail:
            continue
        result = simulator.simulate(w, make_policy(spec, cfg.refine.preemption_c, cfg.refine.aging), engine, cost)
        s = simulator.summarize(result)
        out[policy] = {"mean_latency_s": s["mean_latency_s"], "mean_ttft_s": s["mean_ttft_s"],
                       "median_latency_s": s["median_latency_s"], "p99_latency_s": s["p99_latency_s"],
                       "slot_utilisation": s["slot_utilisation"]}
    return out


def kv_capacity_tokens(cfg) -> int:
    """Tokens the engine's KV cache holds: pages x page size (transformers), or vLLM's cache bytes over
    the bytes one token's keys and values take in every layer."""
    sc = cfg.serve
    if sc.engine != "vllm":
        return sc.num_blocks * sc.page_size
    from transformers import AutoConfig

    from trail_probe.model_files import plain_hf_folder

    c = AutoConfig.from_pretrained(str(plain_hf_folder(cfg.model)))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    itemsize = 4 if sc.vllm_dtype == "float32" else 2
    return int(sc.vllm_kv_cache_gb * (1 << 30)) // (c.num_hidden_layers * kv_heads * head_dim * 2 * itemsize)


def format_table(runs: dict) -> str:
    head = "| policy | mean latency s | median | p99 | mean TTFT s | median | p99 | tokens/s | busy | mean batch | probe ms/step |"
    lines = [head, "|" + "---|" * 11]
    for p, r in runs.items():
        s = r["summary"]
        lines.append(f"| {p} | {s['latency_s']['mean']:.2f} | {s['latency_s']['median']:.2f} | {s['latency_s']['p99']:.2f} | "
                     f"{s['ttft_s']['mean']:.2f} | {s['ttft_s']['median']:.2f} | {s['ttft_s']['p99']:.2f} | "
                     f"{s['throughput_tokens_per_s']:.1f} | {s['busy_fraction']:.2f} | {s['mean_batch']:.2f} | "
                     f"{1e3 * s['probe_s_per_step']:.2f} |")
    return "\n".join(lines)


def plot_distributions(runs: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what, label in ((axes[0], "latency", "latency (s)"), (axes[1], "ttft", "time to first token (s)")):
        for p, r in runs.items():
            x = np.sort([(q["finish"] if what == "latency" else q["first_token"]) - q["arrival"] for q in r["requests"]])
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=f"{p} (mean {x.mean():.1f} s)")
        ax.set_xlabel(label)
        ax.set_ylabel("share of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    run = next(iter(runs.values()))
    sc = run["settings"]["serve"]
    engine = "vLLM" if sc.get("engine") == "vllm" else "transformers continuous batching"
    fig.suptitle(f"{engine}: {len(run['requests'])} requests, "
                 f"Poisson {sc['rate']} req/s, batch {sc['max_batch']}")
    fig.tight_layout()
    path = out / "serve_bench.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def compare_runs(cfg, runs: dict, settings: dict, num_requests: int) -> tuple[dict, list[str]]:
    """summary.json's content and report.md's lines for the policies' runs (both written into
    `cfg.paths.serve` here), with the simulator's prediction for the same arrivals."""
    out, sc = cfg.paths.serve, cfg.serve
    report = {"settings": settings, "config": config_to_dict(cfg),
              "summary": {p: r["summary"] for p, r in runs.items()},
              "trail": {p: r["trail"] for p, r in runs.items() if "trail" in r}}
    for ref in ("fifo", "priority"):  # vLLM's FCFS, and its priority policy fed BERT's estimate
        if ref in runs:
            base = runs[ref]["summary"]
            report[f"vs_{ref}"] = {p: {"latency_speedup": base["latency_s"]["mean"] / r["summary"]["latency_s"]["mean"],
                                       "ttft_speedup": base["ttft_s"]["mean"] / r["summary"]["ttft_s"]["mean"],
                                       "same_outputs": same_outputs(runs[ref], r)}
                                   for p, r in runs.items() if p not in ("fifo", ref)}
    cost = fit_engine_cost(runs)
    report["cost_model"] = asdict(cost)
    sim = simulator_prediction(cfg, runs, cost)
    report["simulator"] = {p: {**v, "measured_mean_latency_s": runs[p]["summary"]["latency_s"]["mean"],
                               "measured_mean_ttft_s": runs[p]["summary"]["ttft_s"]["mean"],
                               "latency_measured_over_predicted": runs[p]["summary"]["latency_s"]["mean"] / v["mean_latency_s"],
                               "ttft_measured_over_predicted": runs[p]["summary"]["ttft_s"]["mean"] / v["mean_ttft_s"]}
                           for p, v in sim.items()}
    atomic_write_json(out / "summary.json", report)
    plot = plot_distributions(runs, out)
    table = format_table(runs)
    lines = [f"# serve-bench: {cfg.model.name_or_path}", "",
             f"{num_requests} held-out prompts, Poisson {sc.rate} req/s, max batch {sc.max_batch}, "
             f"{cfg.generation.max_new_tokens} new tokens max, greedy, "
             + (f"vLLM ({sc.vllm_dtype})." if sc.engine == "vllm" else f"transformers continuous batching on {sc.threads} threads."),
             "", table, ""]
    for ref in ("fifo", "priority"):
        for p, v in report.get(f"vs_{ref}", {}).items():
            so = v["same_outputs"]
            lines.append(f"- {p} vs {ref}: mean latency {v['latency_speedup']:.2f}x lower, mean TTFT {v['ttft_speedup']:.2f}x; "
                         f"same tokens for {so['identical']}/{so['requests']} requests")
    for p, v in report["simulator"].items():
        lines.append(f"- simulator, {p}: mean latency {v['mean_latency_s']:.2f} s predicted vs {v['measured_mean_latency_s']:.2f} s "
                     f"measured ({v['latency_measured_over_predicted']:.2f}x); mean TTFT {v['mean_ttft_s']:.2f} vs "
                     f"{v['measured_mean_ttft_s']:.2f} s ({v['ttft_measured_over_predicted']:.2f}x)")
    for p, t in report["trail"].items():
        s = runs[p]["summary"]
        lines.append(f"- {p}: {t['preemptions']} preemptions, {t['refinements']} refinements, paused past the limit "
                     f"{t['paused_past_limit']}; probe {1e3 * s['probe_s_per_step']:.2f} ms per step = "
                     f"{100 * s['probe_s_per_step'] / s['mean_step_s']:.2f}% of the mean step ({1e3 * s['mean_step_s']:.1f} ms"
                     + (f"; ranking {1e3 * s['rank_s_per_step']:.2f} ms, refinement {1e3 * s['observe_s_per_step']:.2f} ms"
                        if "rank_s_per_step" in s else "") + "); "
                     f"admission (initial estimate) in the engine {1e3 * s['initial_s_per_request']:.1f} ms per request"
                     + (f", BERT before the engine {1e3 * s['bert_before_engine_s_per_request']:.1f} ms per request"
                        if s.get("bert_before_engine_s_per_request") else ""))
    lines += ["", f"Cost model fitted to the engine's steps: {cost.fixed_s * 1e3:.1f} ms + {cost.per_token_s * 1e3:.2f} ms/token"
              f" + {cost.per_context_token_s * 1e6:.2f} us/context token + {cost.per_prefill_pair_s * 1e9:.2f} ns/prefill pair.",
              "", f"![latency and TTFT]({plot.name})", "",
              f"Reproduce: `trail-probe serve-bench {out / 'config.yaml'}` (the resolved recipe saved beside this report)."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return report, lines
