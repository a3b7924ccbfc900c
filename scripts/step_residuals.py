"""Where the time goes in vLLM serve-bench runs: per policy, mean latency, TRAIL's own code per step,
and each decode step's duration against FCFS's (a fit of FCFS's decode steps on batch size, batch
size squared and decode context, from the first folder's fifo run).

    python scripts/step_residuals.py checkpoints/smollm2_alpaca/serve_vllm_rate2.1_200a ..._200b

Residual percentiles show whether a policy's steps are slower at the same batch everywhere (a
shifted median) or now and then (a heavier tail). Writes reports/<run>/<first folder>_step_residuals.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from trail_probe.atomic import atomic_write_json


def decode_steps(path: Path):
    steps = json.loads(path.read_text())["steps"]
    arr = lambda k: np.array([s.get(k, 0.0) for s in steps], dtype=float)  # noqa: E731
    dur, n, q, ctx = arr("end") - arr("start"), arr("requests"), arr("query_tokens"), arr("decode_context")
    keep = (q == n) & (n >= 3)  # decode-only steps
    return dur[keep], n[keep], ctx[keep], arr("rank_s")[keep], arr("observe_s")[keep]


def features(n, ctx):
    return np.c_[np.ones(len(n)), n, n ** 2, ctx]


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]]
    if not folders:
        raise SystemExit(__doc__)
    dur, n, ctx, _, _ = decode_steps(folders[0] / "fifo.json")
    coef, *_ = np.linalg.lstsq(features(n, ctx), dur, rcond=None)
    rows = []
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        for f in sorted(folder.glob("*.json")):
            if f.name in ("summary.json", "step_residuals.json"):
                continue
            dur, n, ctx, rank, observe = decode_steps(f)
            res = (dur - features(n, ctx) @ coef) * 1e3
            lat = summary["policies"][f.stem]["latency_s"]["mean"] if "policies" in summary else json.loads(f.read_text())["summary"]["latency_s"]["mean"]
            row = {"run": folder.name, "policy": f.stem, "mean_latency_s": lat, "decode_steps": int(len(dur)),
                   "mean_step_ms": float(dur.mean() * 1e3), "mean_batch": float(n.mean()),
                   "rank_ms": float(rank.mean() * 1e3), "observe_ms": float(observe.mean() * 1e3),
                   "residual_ms": {p: float(np.percentile(res, p)) for p in (10, 50, 90, 99)},
                   "residual_mean_ms": float(res.mean()), "steps_over_10ms": int((res > 10).sum())}
            rows.append(row)
            r = row["residual_ms"]
            print(f"{folder.name:28s} {f.stem:8s} mean latency {lat:6.2f} s  step {row['mean_step_ms']:5.1f} ms at batch "
                  f"{row['mean_batch']:4.1f}  TRAIL code {row['rank_ms']:.2f} + {row['observe_ms']:.2f} ms  residual "
                  f"p50 {r[50]:+.1f} p90 {r[90]:+.1f} p99 {r[99]:+.1f} ms, {row['steps_over_10ms']} steps > +10 ms")
    run = json.loads((folders[0] / "summary.json").read_text())["config"]["run_name"]
    out = Path(__file__).resolve().parents[1] / "reports" / run / f"{folders[0].name}_step_residuals.json"
    atomic_write_json(out, {"command": "python scripts/step_residuals.py " + " ".join(sys.argv[1:]),
                            "fit_on": str(folders[0] / "fifo.json"), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
