"""How well the predictor fits the traffic a server actually gets, measured live.

When a request finishes its true length is known, so the server can score the estimates it made
for it: the initial estimate of the total length, and every refinement's estimate of the tokens
still to come. `LiveStats` keeps the running MAE of both over all finished requests, Kendall's tau
over a window of the latest ones (the initial estimates across requests; the refined ones among
estimates made at the same decode step, the order a scheduler acts on), and counters of what the
scheduler did. Memory is bounded: a request's trace is scored and dropped when it ends.

    stats = LiveStats()
    stats.finished(record={"initial": 120.0, "trace": [(1, 98.0), (9, 90.0)]}, length=110)
    stats.line()   # 'TRAIL: 1 finished | initial MAE 10.0 tau nan | refined MAE 9.0 tau nan | ...'

Only requests that ended on their own (EOS, a stop string, or a budget of at least the predictor's
range) are scored: an aborted request's length is unknown, and one cut short by a small max_tokens
says nothing about how long its answer would have been.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, deque

import torch

from trail_probe.runtime.accuracy import kendall_tau, same_step_tau

LINE_FIELDS = {"finished_scored": r"(\d+) finished", "initial_mae": r"initial MAE (\S+) tau", "initial_tau": r"initial MAE \S+ tau (\S+) \|",
               "refined_mae": r"refined MAE (\S+) tau", "refined_tau_same_step": r"tau \(same step\) (\S+) over",
               "refined_points": r"over (\d+) refinements", "pauses": r"pauses (\d+)", "prefill_steps": r"prefill-only steps (\d+)",
               "kv_preemptions": r"KV preemptions (\d+)", "ignored_client_inputs": r"ignored client inputs (\d+)",
               "fallback_steps": r"fallback steps (\d+)", "running_limit": r"decoding at most (\d+)"}  # `LiveStats.line`'s parts
COUNTERS = ("pauses", "resumes", "refinements", "kv_preemptions", "ignored_client_inputs", "fallback_steps",
            "unestimated", "incomplete_prompt_means", "prefill_steps")


class LiveStats:
    def __init__(self, window: int = 1000):
        from scipy.stats import kendalltau  # noqa: F401 - imported now: its first import (~1 s) must not stall a step
        self.scored = 0
        self.initial_abs = 0.0
        self.refined_abs = 0.0
        self.refined_points = 0
        self.counts: Counter = Counter()
        self._initial = deque(maxlen=window)  # (estimate, true length)
        self._refined = deque(maxlen=4 * window)  # (estimate, true remaining, generated at the estimate)
        self._gauges = None

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def finished(self, record: dict | None, length: int) -> None:
        """Score one request that ended on its own after `length` output tokens."""
        if record is None:
            return
        self.scored += 1
        initial = float(record["initial"])
        if math.isfinite(initial):
            self.initial_abs += abs(initial - length)
            self._initial.append((initial, length))
        for generated, estimate in record.get("trace", ()):
            truth = max(length - generated, 0)
            self.refined_abs += abs(estimate - truth)
            self.refined_points += 1
            self._refined.append((estimate, truth, generated))

    def snapshot(self) -> dict:
        init = torch.tensor(list(self._initial), dtype=torch.float64).reshape(-1, 2)
        ref = torch.tensor(list(self._refined), dtype=torch.float64).reshape(-1, 3)
        return {
            "finished_scored": self.scored,
            "initial_mae": self.initial_abs / len(self._initial) if self._initial else math.nan,
            "initial_tau": kendall_tau(init[:, 0], init[:, 1]),
            "refined_mae": self.refined_abs / self.refined_points if self.refined_points else math.nan,
            "refined_tau_same_step": same_step_tau(ref[:, 0], ref[:, 1], ref[:, 2]) if len(ref) else math.nan,
            "refined_points": self.refined_points,
            **{name: self.counts[name] for name in COUNTERS},
        }

    def line(self, snap: dict | None = None) -> str:
        s = snap or self.snapshot()
        return (f"TRAIL: {s['finished_scored']} finished | initial MAE {s['initial_mae']:.1f} tau {s['initial_tau']:.3f} | "
                f"refined MAE {s['refined_mae']:.1f} tau (same step) {s['refined_tau_same_step']:.3f} over "
                f"{s['refined_points']} refinements | pauses {s['pauses']}, prefill-only steps {s['prefill_steps']}, KV preemptions {s['kv_preemptions']}, "
                f"ignored client inputs {s['ignored_client_inputs']}, fallback steps {s['fallback_steps']}"
                + (f" | decoding at most {s['running_limit']}" if "running_limit" in s else ""))

    @staticmethod
    def parse(text: str) -> dict | None:
        """The numbers of a log line `line` wrote (None for any other line; a field the line lacks, such as
        an older server's, left out): what benchmarks read back from a server's log."""
        if "TRAIL: " not in text or " finished | initial MAE " not in text:
            return None
        out = {}
        for key, pattern in LINE_FIELDS.items():
            m = re.search(pattern, text)
            if m:
                out[key] = int(m.group(1)) if m.group(1).isdigit() else float(m.group(1))
        return out

    def publish(self, snap: dict) -> None:
        """Prometheus gauges beside vLLM's own, where vLLM's /metrics reads other processes' metrics
        (PROMETHEUS_MULTIPROC_DIR set, as `trail-probe serve` does); otherwise nothing."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return
        if self._gauges is None:
            from prometheus_client import Gauge

            self._gauges = {k: Gauge(f"trail_probe:{k}", f"TRAIL plugin: {k.replace('_', ' ')}",
                                     multiprocess_mode="livemostrecent") for k in snap}
        for k, v in snap.items():
            self._gauges[k].set(v if math.isfinite(v) else float("nan"))
