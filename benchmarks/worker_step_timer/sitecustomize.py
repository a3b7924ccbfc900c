"""A stopwatch on vLLM's model runner, for benchmarks/vllm_side_by_side.py: with this folder on PYTHONPATH and
TRAIL_STEP_TIMER_OUT set, each process that imports vLLM's V1 GPU model runner (which vLLM's CPU runner
extends) times every pass: `execute_model` (the forward pass), `sample_tokens`, and the time from the end of
one pass to the start of the next (the engine core's part of a synchronous step: its scheduler, the output
to the API server, the messages both ways). Rows [start, execute ms, sample ms, gap ms, requests, tokens]
go to TRAIL_STEP_TIMER_OUT + "_<pid>.json" every few seconds. The wrappers sit under TRAIL's own worker
hooks, so TRAIL's part of sampling counts in `sample` and its part of the step outside the runner in `gap`."""

import os
import sys

if os.environ.get("TRAIL_STEP_TIMER_OUT"):
    import importlib.abc
    import importlib.util
    import json
    import time

    _TARGET = "vllm.v1.worker.gpu_model_runner"
    _rows: list = []
    _state = {"end": None, "written": time.monotonic(), "pass": None}

    def _write() -> None:
        path = f"{os.environ['TRAIL_STEP_TIMER_OUT']}_{os.getpid()}.json"
        with open(path + ".tmp", "w") as f:
            json.dump(_rows, f)
        os.replace(path + ".tmp", path)

    def _patch(module) -> None:
        cls = module.GPUModelRunner
        execute, sample = cls.execute_model, cls.sample_tokens

        def execute_model(self, scheduler_output, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return execute(self, scheduler_output, *args, **kwargs)
            finally:
                _state["pass"] = (t0, time.perf_counter(), len(scheduler_output.num_scheduled_tokens),
                                  scheduler_output.total_num_scheduled_tokens)

        def sample_tokens(self, *args, **kwargs):
            try:
                return sample(self, *args, **kwargs)
            finally:
                t2, p, _state["pass"] = time.perf_counter(), _state["pass"], None
                if p is not None and p[2] > 0:
                    gap = None if _state["end"] is None else round((p[0] - _state["end"]) * 1e3, 3)
                    _rows.append([round(p[0], 4), round((p[1] - p[0]) * 1e3, 3), round((t2 - p[1]) * 1e3, 3), gap, p[2], p[3]])
                    _state["end"] = t2
                    if time.monotonic() - _state["written"] > 5:
                        _state["written"] = time.monotonic()
                        _write()

        cls.execute_model, cls.sample_tokens = execute_model, sample_tokens

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != _TARGET:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
