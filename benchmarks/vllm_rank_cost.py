"""What TRAIL's vLLM scheduler costs per step in ranking, as the queue grows, without running a model.

    python benchmarks/vllm_rank_cost.py                   # oracle and trail, queues of 0 to 1,000
    python benchmarks/vllm_rank_cost.py --profile 900     # cProfile of the steps at 900 waiting

`TrailVLLMScheduler.schedule` runs as in the engine (the same code, vLLM's own request queue and
running list) on stand-in requests; only vLLM's `Scheduler.schedule`, which TRAIL's step calls after
ranking, is replaced by one that admits from the front of the waiting queue and gives every running
request one token, as a decode step would. 64 run at once (`max_num_seqs`, as in the vLLM runs of
docs/results.md); every running request past its first token is preemptible, so paused requests pile
up as in a burst. Per queue size, the median `rank_s` of the step log over the steps after a warm-up.

Target (issue 13): TRAIL's code under 2% of a mean step (the vLLM runs' steps are 96-130 ms, so
ranking should stay well under 1 ms). Prints a table and writes benchmarks/results/vllm_rank_cost.json.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import statistics
from pathlib import Path

from trail_probe.atomic import atomic_write_json

RESULTS = Path(__file__).parent / "results" / "vllm_rank_cost.json"
MAX_RUNNING = 64
WAITING = (0, 100, 300, 600, 900)


def time_steps(policy: str, waiting: int, steps: int, warmup: int) -> dict:
    """Median ranking and refinement seconds per step, and the mean number of paused requests."""
    from trail_probe.serving.vllm_dry_run import (
        arrive,
        dry_scheduler,
        dry_step,
        vllm_steps_replaced,
    )

    s = dry_scheduler(policy, MAX_RUNNING)
    arrive(s, waiting + MAX_RUNNING)
    with vllm_steps_replaced():
        for _ in range(warmup + steps):
            # open loop: two arrivals per step, the oldest waiting dropped to hold the queue at its size
            dry_step(s, arrivals=2)
            while len(s.waiting) > waiting:
                old = s.waiting.pop_request()
                s.forget(old.request_id)
    log = s.step_log[warmup:]
    return {"rank_ms": 1e3 * statistics.median(x["rank_s"] for x in log),
            "observe_ms": 1e3 * statistics.median(x["observe_s"] for x in log),
            "paused": statistics.mean(x["paused"] for x in log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--policies", default="oracle,trail")
    ap.add_argument("--profile", type=int, default=None, help="cProfile the steps at this many waiting requests")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if args.profile is not None:
        prof = cProfile.Profile()
        prof.enable()
        time_steps(args.policies.split(",")[0], args.profile, args.steps, args.warmup)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        return
    rows = []
    for policy in args.policies.split(","):
        for waiting in WAITING:
            row = {"policy": policy, "waiting": waiting, **time_steps(policy, waiting, args.steps, args.warmup)}
            rows.append(row)
            print(f"{policy:8s} waiting {waiting:5d}: ranking {row['rank_ms']:.3f} ms, refinement "
                  f"{row['observe_ms']:.3f} ms per step ({row['paused']:.0f} paused)", flush=True)
    load = os.getloadavg()[0]
    atomic_write_json(RESULTS, {"benchmark": "vllm_rank_cost", "max_running": MAX_RUNNING, "steps": args.steps,
                                "warmup": args.warmup, "rows": rows, "machine": platform.processor() or platform.machine(),
                                "cpus": os.cpu_count(), "load_average_1min": load, "background_load": load > 1.5})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
