"""TRAIL's vLLM scheduler without an engine: its own `schedule` and `update_from_output` on stand-in
requests, with vLLM's request queue and running list, to time it and to check its decisions.

    s = dry_scheduler("trail", max_running=64)
    with vllm_steps_replaced():
        for _ in range(100):
            dry_step(s, arrivals=2)

Only vLLM's part of a step (`Scheduler.schedule` and `update_from_output`, which TRAIL's call) is
replaced: it admits from the front of the waiting queue while a slot is free and gives every running
request TRAIL did not pause one token, as a decode step would. States are random (no model; fixed by request and token count), BERT's
distributions are random and come with each request, as they do from serve-bench's client.
`benchmarks/vllm_rank_cost.py` and tests/test_vllm_scheduler.py use it.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from types import SimpleNamespace

import torch

HIDDEN = 576  # SmolLM2's width


class StandIn:
    """The fields of a vLLM `Request` the TRAIL scheduler reads; `length` is its true output length."""

    def __init__(self, rid: str, arrival: float, length: int):
        from trail_probe.serving.vllm_scheduler import (
            EXACT_LENGTH_KEY,
            INITIAL_PROBS_KEY,
        )

        self.request_id, self.arrival_time, self.length = rid, arrival, length
        self.num_output_tokens = 0
        self.num_computed_tokens = 100
        rng = random.Random(rid)
        probs = [rng.random() ** 4 for _ in range(10)]
        self.sampling_params = SimpleNamespace(extra_args={INITIAL_PROBS_KEY: [p / sum(probs) for p in probs],
                                                           EXACT_LENGTH_KEY: length})


def dry_scheduler(policy: str, max_running: int, seed: int = 0, max_length: int = 512):
    """A TrailVLLMScheduler without an engine: its state set as __init__ would, vLLM's FCFS queue, a
    random probe on layer 19 (none for the oracle); requests ask for 1..max_length tokens."""
    from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue

    from trail_probe.runtime.bins import Bins
    from trail_probe.runtime.predictor import LengthPredictor
    from trail_probe.runtime.probe import LengthProbe
    from trail_probe.serving.trail_runtime import TrailRuntime
    from trail_probe.serving.vllm_scheduler import TrailVLLMScheduler

    torch.manual_seed(seed)
    s = TrailVLLMScheduler.__new__(TrailVLLMScheduler)
    predictor = None if policy == "oracle" else LengthPredictor(LengthProbe(HIDDEN), Bins(10, 512), layer=19)
    bert = SimpleNamespace(bins=Bins(10, 512))  # only its bins: the distributions come with the requests
    s.runtime = TrailRuntime(policy, predictor=predictor, text_predictor=bert, initial="bert", max_new_tokens=512)
    s.settings, s.step_log, s.requests = {}, [], {}
    s.running, s.waiting = [], create_request_queue(SchedulingPolicy.FCFS)
    s.max_num_running_reqs = max_running
    s._init_state()
    s.dry_rng, s.dry_max_length = random.Random(seed), max_length
    return s


def arrive(s, n: int = 1, lengths: list[int] | None = None) -> list[StandIn]:
    """n new requests (random lengths unless given), as vLLM's add_request hands them to the scheduler."""
    new = []
    for k in range(n):
        i = len(s.requests)
        r = StandIn(f"r{i}", float(i), s.dry_rng.randint(1, s.dry_max_length) if lengths is None else lengths[k])
        s.requests[r.request_id] = r
        s.waiting.add_request(r)
        s.track(r)
        new.append(r)
    return new


def _vllm_schedule(self, *args, **kwargs):
    while self.waiting and len(self.running) < self.max_num_running_reqs:
        self.running.append(self.waiting.pop_request())
    for r in self.running:
        r.num_output_tokens += 1
    return SimpleNamespace(num_scheduled_tokens={r.request_id: 1 for r in self.running})


def _vllm_update(self, scheduler_output, model_runner_output):
    return {}


@contextlib.contextmanager
def vllm_steps_replaced():
    """vLLM's `Scheduler.schedule` / `update_from_output` replaced by the stand-ins above, then restored."""
    from vllm.v1.core.sched.scheduler import Scheduler

    patched = {"schedule": _vllm_schedule, "update_from_output": _vllm_update}
    originals = {name: getattr(Scheduler, name) for name in patched}
    for name, fn in patched.items():
        setattr(Scheduler, name, fn)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(Scheduler, name, fn)


def _state(rid: str, generated: int) -> torch.Tensor:
    """A random state fixed by the request and its token count, whatever the batch order."""
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(zlib.crc32(f"{rid}:{generated}".encode())))


def dry_step(s, arrivals: int = 0) -> list[str]:
    """One engine step: schedule, the batch's states back to the scheduler, finished requests freed,
    then `arrivals` new requests. Returns the ids that got a token (the batch)."""
    from trail_probe.serving.vllm_worker import STATES_ATTR

    s.schedule()
    batch = [r for r in s.running if r.request_id not in s._paused]
    ids = [r.request_id for r in batch]
    for r in batch:  # update_from_output sees the count before this step's token
        r.num_output_tokens -= 1
    states = torch.stack([_state(rid, r.num_output_tokens) for rid, r in zip(ids, batch)]) if ids else torch.empty(0, HIDDEN)
    s.update_from_output(None, SimpleNamespace(req_ids=ids, sampled_token_ids=[[1]] * len(ids),
                                               **{STATES_ATTR: (ids, states.numpy())}))  # as the worker sends them
    for r in batch:
        r.num_output_tokens += 1
    for r in [r for r in s.running if r.num_output_tokens >= r.length]:  # finished: freed as vLLM does
        s.running.remove(r)
        s.forget(r.request_id)
    arrive(s, arrivals)
    return ids
