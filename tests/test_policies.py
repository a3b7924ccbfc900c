"""Scheduling policies: parsing, limited preemption, and one scheduling step in isolation."""

from dataclasses import dataclass

import pytest

from trail_probe.errors import UserError
from trail_probe.serving.policies import (
    POLICIES,
    RequestQueue,
    base_name,
    make_policy,
    schedule,
)


@dataclass(eq=False)
class Req:
    rid: int
    arrival: float
    initial_estimate: float = 100.0
    remaining_estimate: float = 100.0
    generated: int = 0
    tokens: int = 10  # KV footprint for the memory tests


def queue_of(policy, *reqs):
    q = RequestQueue(policy)
    for r in reqs:
        q.push(r)
    return q


def test_make_policy_defaults_and_overrides():
    assert make_policy("fcfs", 0.8).preemption_c == 0.0
    assert make_policy("sjf_bert", 0.8).preemption_c == 0.0
    for name in ("trail_bert", "trail", "oracle"):
        assert make_policy(name, 0.5).preemption_c == 0.5
    p = make_policy("trail@1", 0.8)
    assert (p.name, p.preemption_c, p.predictor, p.order) == ("trail@1", 1.0, "refined", "remaining")
    assert make_policy("oracle").predictor == "exact"
    assert set(POLICIES) == {"fcfs", "sjf_bert", "trail_bert", "trail", "oracle"}


def test_aging_specs_and_defaults():
    assert make_policy("trail").aging == 0.0  # off by default: TRAIL's rule
    assert make_policy("trail", 0.8, aging=2.0).aging == 2.0  # the configured aging (refine.aging)
    p = make_policy("trail@1~0.5", 0.8, aging=2.0)  # the spec's own A wins
    assert (p.preemption_c, p.aging, base_name(p.name)) == (1.0, 0.5, "trail")
    assert make_policy("sjf_bert~3").aging == 3.0
    assert make_policy("fcfs", aging=2.0).aging == 0.0  # arrival order has nothing to age


@pytest.mark.parametrize("spec, c, match", [
    ("lifo", 0.8, "unknown scheduling policy"),
    ("trail~x", 0.8, "is not a number"),
    ("trail~-1", 0.8, "must be >= 0"),
    ("fcfs~2", 0.8, "aging needs a policy that ranks"),
    ("trail~1@0.5", 0.8, "unknown scheduling policy"),
    ("trail@x", 0.8, "is not a number"),
    ("trail@1.5", 0.8, r"must be in \[0, 1\]"),
    ("trail", -0.1, r"must be in \[0, 1\]"),
])
def test_make_policy_refuses_bad_specs(spec, c, match):
    with pytest.raises(UserError, match=match):
        make_policy(spec, c)


def test_limited_preemption_boundary():
    p = make_policy("trail", 0.8)
    assert p.can_preempt(Req(0, 0, initial_estimate=10, generated=8))  # 8 <= 0.8 * 10
    assert not p.can_preempt(Req(0, 0, initial_estimate=10, generated=9))
    assert p.can_preempt(Req(0, 0, initial_estimate=0.2, generated=0))  # initial below 1 counts as 1
    assert not p.can_preempt(Req(0, 0, initial_estimate=0.2, generated=1))
    assert not make_policy("trail@0").can_preempt(Req(0, 0, initial_estimate=10, generated=0))
    assert make_policy("trail@1").can_preempt(Req(0, 0, initial_estimate=10, generated=10))


def test_aging_lets_an_old_long_request_overtake_newer_short_ones():
    old = Req(0, arrival=0.0, remaining_estimate=300)
    new = Req(1, arrival=100.0, remaining_estimate=150)  # 100 s later, 150 tokens shorter
    assert queue_of(make_policy("trail"), old, new).pop() is new  # no aging: shortest first
    assert queue_of(make_policy("trail~1"), old, new).pop() is new  # 300 - 100 > 150
    assert queue_of(make_policy("trail~2"), old, new).pop() is old  # 300 - 200 < 150
    # the order does not depend on when it is asked: keys hold no clock
    assert make_policy("trail~2").key(old) < make_policy("trail~2").key(new)


def test_queue_orders_by_policy_key_with_arrival_tiebreak():
    a, b, c = Req(0, 0.0, 50, 30), Req(1, 1.0, 20, 30), Req(2, 2.0, 20, 10)
    assert queue_of(make_policy("fcfs"), c, b, a).pop().rid == 0
    q = queue_of(make_policy("sjf_bert"), c, a, b)
    assert [q.pop().rid for _ in range(3)] == [1, 2, 0]  # equal initial estimates: earlier arrival first
    q = queue_of(make_policy("trail"), c, a, b)
    assert [q.pop().rid for _ in range(3)] == [2, 0, 1]  # equal remaining: earlier arrival first


def test_schedule_fills_free_slots_in_priority_order():
    p = make_policy("sjf_bert")
    waiting = queue_of(p, Req(0, 0, 30), Req(1, 1, 10), Req(2, 2, 20))
    running = []
    started, preempted = schedule(p, waiting, running, max_running=2)
    assert [r.rid for r in started] == [1, 2] and preempted == []
    assert [r.rid for r in running] == [1, 2] and len(waiting) == 1


def test_schedule_preempts_worst_preemptible_running_request():
    p = make_policy("trail", 0.8)
    locked = Req(0, 0, initial_estimate=10, remaining_estimate=90, generated=9)  # past 0.8 * 10
    long = Req(1, 1, initial_estimate=100, remaining_estimate=80, generated=5)
    short = Req(2, 2, initial_estimate=100, remaining_estimate=40, generated=5)
    running = [locked, long, short]
    waiting = queue_of(p, Req(3, 3, remaining_estimate=50), Req(4, 4, remaining_estimate=85))
    started, preempted = schedule(p, waiting, running, max_running=3)
    # rid 3 (50) outranks rid 1 (80), which is preemptible; rid 4 (85) outranks nobody preemptible.
    assert [r.rid for r in preempted] == [1] and [r.rid for r in started] == [3]
    assert {r.rid for r in running} == {0, 2, 3}
    assert sorted(r.rid for r in (waiting.pop(), waiting.pop())) == [1, 4]


def test_schedule_never_preempts_without_strictly_better_key_or_with_c_zero():
    running = [Req(0, 0, remaining_estimate=50, generated=1)]
    for spec in ("trail", "fcfs", "trail@0"):
        p = make_policy(spec, 0.8)
        waiting = queue_of(p, Req(1, 1, remaining_estimate=50 if spec == "trail" else 5))
        assert schedule(p, waiting, list(running), max_running=1) == ([], [])


def test_schedule_memory_head_of_line_and_no_useless_preemption():
    footprint = lambda r: r.tokens  # noqa: E731
    p = make_policy("fcfs")
    big, small = Req(0, 0, tokens=50), Req(1, 1, tokens=5)
    waiting = queue_of(p, big, small)
    # FCFS stops at the first request that does not fit, even if a later one would.
    assert schedule(p, waiting, [], max_running=4, free_tokens=20, footprint=footprint) == ([], [])
    p = make_policy("oracle", 1.0)
    victim = Req(2, 0, remaining_estimate=90, tokens=10)
    running = [victim]
    waiting = queue_of(p, Req(3, 1, remaining_estimate=5, tokens=100))
    # Preempting the only candidate frees 10 tokens, not enough for 100: nothing happens.
    assert schedule(p, waiting, running, max_running=4, free_tokens=20, footprint=footprint) == ([], [])
    assert running == [victim]
    waiting = queue_of(p, Req(4, 1, remaining_estimate=5, tokens=25))
    started, preempted = schedule(p, waiting, running, max_running=4, free_tokens=20, footprint=footprint)
    assert [r.rid for r in preempted] == [2] and [r.rid for r in started] == [4]
