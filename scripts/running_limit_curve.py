"""What ordering can buy at each running-request limit: the simulator on real vLLM workloads.

    python scripts/running_limit_curve.py checkpoints/smollm2_alpaca/serve_vllm_rate3.0 checkpoints/smollm2_alpaca/serve_vllm_burst1000

For each serve-bench folder the simulator replays the recorded arrivals, measured lengths and TRAIL
estimates with the cost model fitted to that engine's steps (as serve-bench's simulator check does),
under FCFS, TRAIL and the exact-length oracle, at running limits 16-256 (the runs used 64). Prints
mean latency and TTFT speedups over FCFS and writes reports/<run>/running_limit_curve.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from trail_probe.atomic import atomic_write_json
from trail_probe.config import load_recipe
from trail_probe.offline.serve_report import (
    fit_engine_cost,
    served_engine,
    served_workload,
)
from trail_probe.serving import simulator
from trail_probe.serving.policies import make_policy

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--limits", default="16,32,64,128,256")
    args = ap.parse_args()
    rows, run_name = [], None
    for folder in args.folders:
        cfg = load_recipe(folder / "config.yaml")
        run_name = cfg.run_name
        summary = json.loads((folder / "summary.json").read_text())
        runs = {p: json.loads((folder / f"{p}.json").read_text()) for p in summary["summary"] if p in ("fifo", "trail")}
        workload, _ = served_workload(runs)
        cost, base = fit_engine_cost(runs), served_engine(cfg)
        for limit in [int(x) for x in args.limits.split(",")]:
            engine = dataclasses.replace(base, max_running=limit, token_budget=max(base.token_budget, limit))
            out = {}
            for spec in ("fcfs", "trail", "oracle"):
                out[spec] = simulator.summarize(simulator.simulate(workload, make_policy(spec, cfg.refine.preemption_c),
                                                                   engine, cost))
            row = {"folder": folder.name, "max_running": limit,
                   **{f"{p}_mean_latency_s": out[p]["mean_latency_s"] for p in out},
                   **{f"{p}_latency_speedup": out["fcfs"]["mean_latency_s"] / out[p]["mean_latency_s"] for p in ("trail", "oracle")},
                   **{f"{p}_ttft_speedup": out["fcfs"]["mean_ttft_s"] / out[p]["mean_ttft_s"] for p in ("trail", "oracle")}}
            rows.append(row)
            print(f"{folder.name:<24} running {limit:>4}: FCFS {row['fcfs_mean_latency_s']:7.1f} s; TRAIL "
                  f"{row['trail_latency_speedup']:.2f}x latency, {row['trail_ttft_speedup']:.2f}x TTFT; oracle "
                  f"{row['oracle_latency_speedup']:.2f}x, {row['oracle_ttft_speedup']:.2f}x", flush=True)
    out_path = REPO / "reports" / run_name / "running_limit_curve.json"
    atomic_write_json(out_path, {"note": "simulator on recorded vLLM workloads, cost model fitted to vLLM's steps",
                                 "command": "python scripts/running_limit_curve.py " + " ".join(map(str, args.folders)),
                                 "rows": rows})
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
