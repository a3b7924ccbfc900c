"""What TRAIL's vLLM scheduler costs per step in ranking, as the queue grows, without running a model.

    python benchmarks/vllm_rank_cost.py                   # oracle and trail, queues of 0 to 1,000
    python benchmarks/vllm_rank_cost.py --profile 900     # cProfile of the steps at 900 waiting

`TrailVLLMScheduler.schedule` runs as in the engine (the same code, vLLM's own request queue and
running list) on stand-in requests; only vLLM's `Scheduler.schedule`, which TRAIL's step calls after
ranking, is replaced by one that admits from the front of the waiting queue and gives every running
request one token, as a decode step would. 64 run at once (`max_num_seqs`, as in the README's vLLM
runs); every running request past its first token is preemptible, so paused requests pile up as in
a burst. Per queue size, the median `rank_s` of the step log over the steps after a warm-up.

Target (issue 13): TRAIL's code under 2% of a mean step (the vLLM runs' steps are 96-130 ms, so
ranking should stay well under 1 ms). Prints a table and writes benchmarks/results/vllm_rank_cost.json.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import random
import statistics
from pathlib import Path
from types import SimpleNamespace

from trail_probe.atomic import atomic_write_json

RESULTS = Path(__file__).parent / "results" / "vllm_rank_cost.json"
MAX_RUNNING = 64
WAITING = (0, 100, 300, 600, 900)


class StandIn:
    """The fields of a vLLM `Request` the TRAIL scheduler reads."""

    def __init__(self, rid: str, arrival: float, length: int):
        self.request_id, self.arrival_time, self.length = rid, arrival, length
        self.num_output_tokens = 0
        self.num_computed_tokens = 100
        from trail_probe.serving.vllm_scheduler import (
            EXACT_LENGTH_KEY,
            INITIAL_PROBS_KEY,
        )

        rng = random.Random(rid)
        probs = [rng.random() ** 4 for _ in range(10)]
        self.sampling_params = SimpleNamespace(extra_args={INITIAL_PROBS_KEY: [p / sum(probs) for p in probs],
                                                           EXACT_LENGTH_KEY: length})


def make_scheduler(policy: str, waiting: int, seed: int = 0):
    """A TrailVLLMScheduler without an engine: its state set as __init__ would, vLLM's FCFS queue."""
    import torch
    from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue

    from trail_probe.runtime.bins import Bins
    from trail_probe.runtime.predictor import LengthPredictor
    from trail_probe.runtime.probe import LengthProbe
    from trail_probe.serving.trail_runtime import TrailRuntime
    from trail_probe.serving.vllm_scheduler import TrailVLLMScheduler

    torch.manual_seed(seed)
    s = TrailVLLMScheduler.__new__(TrailVLLMScheduler)
    predictor = None if policy == "oracle" else LengthPredictor(LengthProbe(576), Bins(10, 512), layer=19)
    # BERT's distribution comes from the client (as in the README's runs): random ones here
    bert = SimpleNamespace(bins=Bins(10, 512))
    s.runtime = TrailRuntime(policy, predictor=predictor, text_predictor=bert, initial="bert", max_new_tokens=512)
    s.settings, s.step_log, s.requests = {}, [], {}
    s.running, s.waiting = [], create_request_queue(SchedulingPolicy.FCFS)
    s.max_num_running_reqs = MAX_RUNNING
    s._init_state()
    rng = random.Random(seed)
    for i in range(waiting + MAX_RUNNING):
        r = StandIn(f"r{i}", float(i), rng.randint(1, 512))
        s.requests[r.request_id] = r
        s.waiting.add_request(r)
        s.track(r)
    return s


def fake_vllm_schedule(self, *args, **kwargs):
    """vLLM's part of a step: admit from the front while a slot is free, one token per running request."""
    while self.waiting and len(self.running) < self.max_num_running_reqs:
        self.running.append(self.waiting.pop_request())
    for r in self.running:
        r.num_output_tokens += 1
    return SimpleNamespace(num_scheduled_tokens={r.request_id: 1 for r in self.running})


def fake_vllm_update(self, scheduler_output, model_runner_output):
    return {}


def time_steps(policy: str, waiting: int, steps: int, warmup: int) -> dict:
    """Median ranking and refinement seconds per step, and the mean number of paused requests."""
    import torch
    from vllm.v1.core.sched.scheduler import Scheduler

    from trail_probe.serving.vllm_worker import STATES_ATTR

    s = make_scheduler(policy, waiting)
    patched = {"schedule": fake_vllm_schedule, "update_from_output": fake_vllm_update}
    originals = {name: getattr(Scheduler, name) for name in patched}
    for name, fn in patched.items():
        setattr(Scheduler, name, fn)
    gen = torch.Generator().manual_seed(0)
    try:
        for _ in range(warmup + steps):
            s.schedule()
            # the states the worker would attach: one row per request that ran this step
            batch = [r for r in s.running if r.request_id not in s._paused]
            ids = [r.request_id for r in batch]
            for r in batch:  # update_from_output sees the count before this step's token
                r.num_output_tokens -= 1
            states = torch.randn(len(ids), 576, generator=gen)
            s.update_from_output(None, SimpleNamespace(req_ids=ids, sampled_token_ids=[[1]] * len(ids),
                                                       **{STATES_ATTR: (ids, states)}))
            for r in batch:
                r.num_output_tokens += 1
            for r in [r for r in s.running if r.num_output_tokens >= r.length]:  # finished: freed as vLLM does
                s.running.remove(r)
                s.forget(r.request_id)
            # open loop: two arrivals per step, the oldest waiting dropped to hold the queue at its size
            for _ in range(2):
                i = len(s.requests)
                r = StandIn(f"r{i}", float(i), random.Random(i).randint(1, 512))
                s.requests[r.request_id] = r
                s.waiting.add_request(r)
                s.track(r)
            while len(s.waiting) > waiting:
                old = s.waiting.pop_request()
                s.forget(old.request_id)
    finally:
        for name, fn in originals.items():
            setattr(Scheduler, name, fn)
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
