"""TRAIL's vLLM scheduler with a stopwatch on each of its hooks, for benchmarks/vllm_step_overhead.py.

Each hook's time is split into vLLM's own part (the base `Scheduler` method it calls) and TRAIL's (the
rest); the totals go to the JSON file named by TRAIL_STEP_OVERHEAD_OUT every few seconds. Used as
`--scheduler-cls step_overhead_scheduler.TimedTrailScheduler` with this folder on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict

from vllm.v1.core.sched.scheduler import Scheduler

from trail_probe.serving.vllm_scheduler import TrailVLLMScheduler
from trail_probe.serving.vllm_worker import WANTS_ATTR

HOOKS = ("schedule", "get_grammar_bitmask", "update_from_output", "add_request", "_free_request")
_base_s: defaultdict = defaultdict(float)  # seconds in vLLM's own method, per hook


def _time_base(name: str) -> None:
    original = getattr(Scheduler, name)

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _base_s[name] += time.perf_counter() - t0

    setattr(Scheduler, name, timed)


for _name in HOOKS:
    _time_base(_name)


class TimedTrailScheduler(TrailVLLMScheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.total_s: defaultdict = defaultdict(float)
        self.calls: Counter = Counter()
        self.worst_trail_s: defaultdict = defaultdict(float)
        self.states_asked = self.steps_asking = 0
        self._written = time.monotonic()

    def write(self) -> None:
        out = {"steps": self.calls["schedule"], "steps_asking_states": self.steps_asking, "states_asked": self.states_asked,
               "hooks": {n: {"calls": self.calls[n], "total_s": self.total_s[n], "vllm_s": _base_s[n],
                             "trail_s": self.total_s[n] - _base_s[n], "worst_trail_ms": 1e3 * self.worst_trail_s[n]}
                         for n in HOOKS}}
        path = os.environ["TRAIL_STEP_OVERHEAD_OUT"]
        with open(path + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(path + ".tmp", path)


def _time_hook(name: str) -> None:
    original = getattr(TrailVLLMScheduler, name)

    def timed(self, *args, **kwargs):
        base0, t0 = _base_s[name], time.perf_counter()
        result = original(self, *args, **kwargs)
        spent = time.perf_counter() - t0
        self.total_s[name] += spent
        self.calls[name] += 1
        self.worst_trail_s[name] = max(self.worst_trail_s[name], spent - (_base_s[name] - base0))
        if name == "schedule":
            wants = getattr(result, WANTS_ATTR, None)
            if wants is not None and wants.states:
                self.steps_asking += 1
                self.states_asked += len(wants.states)
        if name == "update_from_output" and (time.monotonic() - self._written > 2 or not self.requests):
            self._written = time.monotonic()
            self.write()
        return result

    setattr(TimedTrailScheduler, name, timed)


for _name in HOOKS:
    _time_hook(_name)
