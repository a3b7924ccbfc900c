"""What the probe buys a server: simulate continuous batching under each policy (`trail-probe simulate`).

    trail-probe simulate recipes/smollm2_alpaca.yaml
    trail-probe simulate recipes/smollm2_alpaca.yaml simulate.cost_preset=llama3_8b_a100
    trail-probe simulate recipes/smollm2_alpaca.yaml simulate.loads=[0.8,0.9] simulate.policies=[fcfs,trail,oracle]

Requests replay the held-out split of a real run: prompt lengths, true output lengths, BERT's
estimate and the probe's refined estimates come from eval's predictions.json (`cfg.paths.predictions`),
so the prediction errors are the real ones; refinements are kept every `refine.interval` tokens (a
multiple of the interval eval refined at). Requests arrive as a Poisson process at each rate (or, by
default, at rates that put FCFS at `simulate.loads` of its saturated throughput) and all at once
("burst", the paper's Figure 8). The simulator itself is `trail_probe.serving.simulator`; the tables
and plots `trail_probe.offline.simulate_report`.

Load: `simulate.loads` are fractions of FCFS's saturated throughput, measured by simulating FCFS
with every request queued at time 0 (completions per second between the 10th and 90th percentile
completion). Requests wait in the queue only once all `max_running` slots are taken, so the
policies differ only where slots run full; each point reports `slot_utilisation` (mean running /
max_running) to show how often that is.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from trail_probe.atomic import atomic_write_json
from trail_probe.config import RecipeConfig, config_to_dict, save_config
from trail_probe.errors import UserError
from trail_probe.offline.simulate_report import (
    aging_curves,
    comparisons,
    format_ablation,
    format_aging,
    format_table,
    plot_aging,
    plot_rates,
)
from trail_probe.runtime.estimates import refines_at
from trail_probe.serving.cost_model import load_cost_model
from trail_probe.serving.policies import Policy, make_policy
from trail_probe.serving.simulator import (
    Engine,
    Workload,
    check_estimates,
    poisson_arrivals,
    sample_workload,
    saturated_throughput,
    simulate,
    summarize,
)

HELP = "Simulate a continuous-batching server: FCFS vs SJF vs TRAIL (SPRPT with limited preemption) vs oracle."


EXAMPLES = """examples:
  trail-probe simulate recipes/smollm2_alpaca.yaml
  trail-probe simulate recipes/smollm2_alpaca.yaml simulate.cost_preset=llama3_8b_a100
  trail-probe simulate recipes/smollm2_alpaca.yaml simulate.rates=[2,4,6] simulate.burst=false
  trail-probe simulate recipes/smollm2_alpaca.yaml simulate.policies=[fcfs,trail,trail@1.0,oracle]
  trail-probe simulate recipes/smollm2_alpaca.yaml simulate.predictions=other/eval/predictions.json
Reads <checkpoint_dir>/eval/predictions.json (run 'trail-probe eval' first); writes
<checkpoint_dir>/simulate/results.json, latency_vs_rate.png and ttft_vs_rate.png."""


REQUIRED_FIELDS = ("id", "prompt_tokens", "output_tokens", "bert_estimate", "refined")


def load_predictions(path: str | Path, refine_interval: int | None = None) -> tuple[Workload, dict]:
    """(all held-out requests with arrival 0, the file's metadata) from an eval predictions.json.
    Only refinements every `refine_interval` tokens are kept (a multiple of the file's interval)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file '{path}' not found; run 'trail-probe eval RECIPE' first or set simulate.predictions")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"predictions file '{path}' is not valid JSON ({str(e)[:80]}); re-run 'trail-probe eval'") from None
    requests = data.get("requests") if isinstance(data, dict) else None
    if not isinstance(requests, list) or not requests:
        raise UserError(f"predictions file '{path}' has no 'requests' list; re-run 'trail-probe eval' to write it")
    try:
        file_k = int(data.get("refine_interval") or 1)
    except (TypeError, ValueError):
        raise UserError(f"predictions file '{path}' has a non-integer refine_interval; re-run 'trail-probe eval'") from None
    k = refine_interval or file_k
    if k < 1 or k % file_k:
        raise UserError(f"refine.interval = {k} is not a multiple of the {file_k}-token interval '{path}' "
                        f"was refined at; use a multiple of {file_k}, or 0 for the file's own")
    prompt, output, bert, refined, ids = [], [], [], [], []
    for i, r in enumerate(requests):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(r, dict) or f not in r]
        if missing:
            raise UserError(f"request #{i} in '{path}' lacks '{missing[0]}'; the file does not match what "
                            "the simulator replays, re-run 'trail-probe eval'")
        where = f"request #{i} (id {r['id']!r}) in '{path}'"
        try:
            p, o = int(r["prompt_tokens"]), int(r["output_tokens"])
            b = math.nan if r["bert_estimate"] is None else float(r["bert_estimate"])  # None: no baseline trained
            points = [(int(j), float(e)) for j, e in r["refined"]]
        except (TypeError, ValueError):
            raise UserError(f"{where} has a non-numeric length or estimate; re-run 'trail-probe eval'") from None
        if p < 0 or o < 0 or math.isinf(b) or any(j < 1 or not math.isfinite(e) for j, e in points):
            raise UserError(f"{where} has a negative length, a refinement before the first token or an "
                            "infinite estimate; re-run 'trail-probe eval'")
        if [j for j, _ in points] != sorted({j for j, _ in points}):
            raise UserError(f"{where} has refinements out of order; re-run 'trail-probe eval'")
        points = [(j, e) for j, e in points if refines_at(j, k)]
        prompt.append(max(p, 1))
        output.append(max(o, 1))  # an immediate EOS still costs the step that produces it
        bert.append(b)
        refined.append(([j for j, _ in points], [e for _, e in points]))
        ids.append(r["id"])
    meta = {key: data.get(key) for key in ("bins", "refine_interval", "max_new_tokens", "layer")}
    meta.update(path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), requests=len(requests),
                simulated_refine_interval=k)
    n = len(output)
    return Workload(np.zeros(n), np.array(prompt), np.array(output), np.array(bert, dtype=float), refined, ids), meta


def _check_config(sc, preemption_c: float, aging: float = 0.0) -> list[Policy]:
    for name, values in (("rates", sc.rates), ("loads", sc.loads)):
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad:
            unit = "requests per second" if name == "rates" else "fractions of FCFS's saturated throughput, e.g. 0.85"
            raise UserError(f"simulate.{name} contains {bad[0]}; give positive numbers ({unit})")
    if not sc.rates and not sc.loads and not sc.burst:
        raise UserError("nothing to simulate: simulate.rates and simulate.loads are empty and simulate.burst is false")
    if not sc.policies:
        raise UserError("simulate.policies is empty; name at least one of fcfs, sjf_bert, trail_bert, trail, oracle")
    return [make_policy(p, preemption_c, aging) for p in sc.policies]


def run_simulate(cfg: RecipeConfig, verbose: bool = True) -> dict:
    """Simulate every policy at every rate (and a burst); write results.json and plots."""
    sc = cfg.simulate
    policies = _check_config(sc, cfg.refine.preemption_c, cfg.refine.aging)
    engine = Engine(sc.max_running, sc.token_budget, sc.kv_capacity_tokens, sc.paused_cache)
    engine.check()
    cost = load_cost_model(sc.cost_preset)
    pool, meta = load_predictions(cfg.paths.predictions, cfg.refine.interval)
    workload = sample_workload(pool, sc.num_requests, sc.seed)
    engine.check(workload)
    for policy in policies:
        check_estimates(workload, policy)
    say = print if verbose else (lambda *a, **k: None)
    say(f"# {len(workload)} requests from {len(pool)} held-out ({meta['path']}); cost model: {cost.source}")
    capacity = saturated_throughput(workload, engine, cost)
    say(f"# FCFS saturated throughput: {capacity:.4g} requests/s (load 1.0)")
    settings = [("poisson", r, r / capacity) for r in sc.rates] or [("poisson", load * capacity, load) for load in sc.loads]
    if sc.burst:
        settings.append(("burst", None, None))
    rows = []
    for mode, rate, load in settings:
        arrival = np.zeros(len(workload)) if mode == "burst" else poisson_arrivals(len(workload), rate, sc.seed)
        for policy in policies:
            start = time.perf_counter()
            result = simulate(workload.with_arrivals(arrival), policy, engine, cost)
            row = {"policy": policy.name, "preemption_c": policy.preemption_c, "aging": policy.aging, "mode": mode,
                   "rate": rate, "load": load}
            row.update(summarize(result))
            rows.append(row)
            say(f"  {policy.name:<12} {mode:<8} load={'-' if load is None else f'{load:.2f}'} "
                f"mean latency {row['mean_latency_s']:.3g} s, mean TTFT {row['mean_ttft_s']:.3g} s "
                f"({time.perf_counter() - start:.1f} s to simulate)", flush=True)
    ablation, targets = comparisons(rows)
    aging = aging_curves(rows)
    out_dir = cfg.paths.simulate
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "config": config_to_dict(sc),
        "refine": config_to_dict(cfg.refine),
        "predictions": meta,
        "workload": {"num_requests": len(workload), "mean_prompt_tokens": float(workload.prompt_tokens.mean()),
                     "mean_output_tokens": float(workload.output_tokens.mean()), "seed": sc.seed},
        "engine": asdict(engine),
        "cost_model": asdict(cost),
        "saturated_throughput_rps": capacity,
        "points": rows,
        "ablation": ablation,
        "targets": targets,
        "aging": aging,
    }
    atomic_write_json(out_dir / "results.json", results)
    save_config(cfg, out_dir)
    plots = plot_rates(rows, out_dir) + [p for p in [plot_aging(aging, out_dir)] if p]
    say("\n" + format_table(rows))
    say("\n" + format_ablation(ablation))
    if aging:
        say("\n" + format_aging(aging))
    for t in targets:
        where = "burst" if t["mode"] == "burst" else f"load {t['load']:.2f}"
        say(f"# {where}: TRAIL vs FCFS mean latency {t['latency_speedup']:.2f}x, mean TTFT {t['ttft_speedup']:.2f}x"
            + (f", TRAIL / oracle latency {t['trail_over_oracle_latency']:.2f}" if "trail_over_oracle_latency" in t else ""))
    say(f"# wrote {out_dir / 'results.json'}, {', '.join(p.name for p in plots)}")
    return results


def run(cfg: RecipeConfig, args) -> None:
    run_simulate(cfg)
