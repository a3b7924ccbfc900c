"""TRAIL's vLLM scheduler step on stand-in requests (no engine): `trail_probe.serving.vllm_dry_run`."""

import random

import pytest

pytest.importorskip("vllm")

from trail_probe.serving.vllm_dry_run import (  # noqa: E402
    arrive,
    dry_scheduler,
    dry_step,
    vllm_steps_replaced,
)
from trail_probe.serving.vllm_scheduler import TrailVLLMScheduler  # noqa: E402


def _batches(policy, unranked_allowed, steps=300, limit=8, seed=3):
    s = dry_scheduler(policy, max_running=limit, seed=seed, max_length=24)
    if not unranked_allowed:
        s._everyone_runs = lambda in_running, limit: False
    arrivals = random.Random(seed)
    batches = []
    with vllm_steps_replaced():
        for step in range(steps):
            # light load, then a burst that forms a queue, then light again
            n = arrivals.choice([0, 0, 0, 1]) if not 100 <= step < 110 else 3
            batches.append(sorted(dry_step(s, arrivals=n)))
    return batches, s


@pytest.mark.parametrize("policy", ["trail", "oracle"])
def test_the_step_without_a_queue_decides_what_the_ranked_step_decides(policy):
    fast, s = _batches(policy, unranked_allowed=True)
    ranked, r = _batches(policy, unranked_allowed=False)
    assert fast == ranked  # the same requests get a token at every step
    took = [x["ranked"] for x in s.step_log]
    assert not all(took) and any(took)  # both paths ran: light load unranked, the burst's queue ranked
    assert all(x["ranked"] for x in r.step_log)
    assert s.runtime.refinements == r.runtime.refinements > 0 or policy == "oracle"
    assert s.runtime.preemptions == r.runtime.preemptions > 0


def test_a_request_vllm_sent_back_to_waiting_is_ranked_again():
    s = dry_scheduler("oracle", max_running=4)
    arrive(s, 2)
    with vllm_steps_replaced():
        dry_step(s)
        victim = s.running.pop()  # vLLM's own recompute preemption: KV blocks ran out
        victim.num_computed_tokens = 0
        s.waiting.prepend_request(victim)
        dry_step(s)
    assert s.step_log[0]["ranked"] is False and s.step_log[1]["ranked"] is True
    assert victim in s.running


def test_a_paused_request_resumes_as_soon_as_there_is_room():
    s = dry_scheduler("oracle", max_running=1)
    (long,) = arrive(s, 1, lengths=[20])
    with vllm_steps_replaced():
        dry_step(s, arrivals=0)
        (short,) = arrive(s, 1, lengths=[3])
        batches = [dry_step(s) for _ in range(5)]
    assert batches[:3] == [[short.request_id]] * 3  # the long request is paused for the short one
    assert batches[3:] == [[long.request_id]] * 2 and not s._paused  # and resumes once it finishes
    assert s.runtime.preemptions == 1


def test_the_scheduler_class_is_the_one_vllm_loads():
    assert TrailVLLMScheduler.__module__ == "trail_probe.serving.vllm_scheduler"
