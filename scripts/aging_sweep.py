"""Aging in the simulator on a real serve-bench workload: mean, p99 and max latency as aging A grows.

    python scripts/aging_sweep.py checkpoints/smollm2_alpaca/serve_vllm_rate3.0 checkpoints/smollm2_alpaca/serve_vllm_burst1000
    python scripts/aging_sweep.py FOLDER --aging 0,0.5,1,2,4,8 --policy trail

For each serve-bench folder (its resolved config.yaml and per-policy JSONs), the simulator replays
the same requests as `trail-probe serve-bench` checks it: the recorded arrivals, the measured output
lengths, the estimates the TRAIL run recorded, and the cost model fitted to that engine's own steps
(`serve_report.fit_engine_cost`). It runs FCFS and `<policy>~A` for every A (A = 0 is TRAIL's rule,
no aging). Writes reports/<run_name>/aging/aging.json, aging_mean_vs_p99.png and aging.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trail_probe.atomic import atomic_write_json, atomic_write_text
from trail_probe.config import load_recipe
from trail_probe.offline.serve_report import (
    fit_engine_cost,
    served_engine,
    served_workload,
)
from trail_probe.offline.simulate_report import aging_curves, format_aging, plot_aging
from trail_probe.serving import simulator
from trail_probe.serving.policies import make_policy

REPO = Path(__file__).resolve().parents[1]


def sweep(folder: Path, policy: str, agings: list[float]) -> tuple[list[dict], dict]:
    cfg = load_recipe(folder / "config.yaml")
    summary = json.loads((folder / "summary.json").read_text())
    runs = {p: json.loads((folder / f"{p}.json").read_text()) for p in summary["summary"]}
    workload, recorded = served_workload(runs)
    if not recorded:
        sys.exit(f"{folder} has no TRAIL run whose estimates the simulator can replay; run serve-bench with trail first")
    engine, cost = served_engine(cfg), fit_engine_cost(runs)
    rate = cfg.serve.rate
    mode = "burst" if rate >= 100 else "poisson"  # docs/results.md's burst is serve.rate=1000: all within a second
    rows = []
    for spec in ["fcfs"] + [policy if a == 0 else f"{policy}~{a:g}" for a in agings]:
        p = make_policy(spec, cfg.refine.preemption_c)
        s = simulator.summarize(simulator.simulate(workload, p, engine, cost))
        rows.append({"policy": p.name, "aging": p.aging, "mode": mode, "rate": None if mode == "burst" else rate,
                     "load": None, "folder": folder.name, **s})
        print(f"{folder.name:<24} {p.name:<10} mean {s['mean_latency_s']:7.1f} s  p99 {s['p99_latency_s']:7.1f} s  "
              f"max {s['max_latency_s']:7.1f} s  mean TTFT {s['mean_ttft_s']:6.1f} s", flush=True)
    measured = {p: r["summary"]["latency_s"] for p, r in runs.items()}
    return rows, {"folder": str(folder), "cost_model": cost.source, "measured_latency_s": measured, "run_name": cfg.run_name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--policy", default="trail")
    ap.add_argument("--aging", default="0,0.25,0.5,1,2,4,8,16", help="comma-separated A values (tokens per second waited)")
    args = ap.parse_args()
    agings = [float(a) for a in args.aging.split(",")]
    rows, sources = [], []
    for folder in args.folders:
        r, src = sweep(folder, args.policy, agings)
        rows += r
        sources.append(src)
    curves = aging_curves(rows)
    out = REPO / "reports" / sources[0]["run_name"] / "aging"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "aging.json", {"policy": args.policy, "aging": agings, "sources": sources, "rows": rows,
                                           "curves": curves})
    plot = plot_aging(curves, out)
    table = format_aging(curves)
    atomic_write_text(out / "aging.md", "# Aging in the simulator\n\n```\n" + table + "\n```\n\n"
                      f"![mean vs p99]({plot.name})\n\nReproduce: `python scripts/aging_sweep.py "
                      + " ".join(str(f) for f in args.folders) + f" --policy {args.policy} --aging {args.aging}`\n")
    print("\n" + table + f"\nwrote {out}")


if __name__ == "__main__":
    main()
