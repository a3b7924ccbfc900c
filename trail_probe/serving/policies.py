"""Scheduling policies for an LLM server: FCFS, SJF, and TRAIL's SPRPT with limited preemption.

Pure Python (no torch, no numpy), so a real engine can use the same code as the simulator:

    policy = make_policy("trail", preemption_c=0.8)
    waiting = RequestQueue(policy)            # push() each arriving request
    started, preempted = schedule(policy, waiting, running, max_running=64,
                                  free_tokens=kv_free, footprint=lambda r: r.prompt_tokens + r.generated)

A request is any object with the attributes of `SchedRequest`; the engine keeps
`generated` and `remaining_estimate` current before calling `schedule`.

Policies (TRAIL notes, section 4):
- `fcfs`: first come, first served, never preempts (vLLM's and SGLang's default).
- `sjf_bert`: shortest job first on the initial (BERT) estimate, never preempts.
- `trail_bert`: SPRPT with limited preemption, ranked by BERT's estimate counted down per token.
- `trail`: the same, ranked by the probe's refined estimate (TRAIL).
- `oracle`: the same, ranked by the exact remaining length (the paper's TRAIL+).
`name@C` sets that policy's preemption limit C (e.g. `trail@1.0` is plain SPRPT); otherwise the
SPRPT policies use the configured C and FCFS / SJF never preempt. `name~A` (also `name@C~A`) sets
its aging A; otherwise the ranked policies use the configured aging (`refine.aging`, default 0).

Aging (off by default, as in TRAIL): a request's priority is its predicted length minus A tokens per
second since it arrived, so no answer waits forever behind shorter ones. At any moment that orders
requests as predicted + A * arrival does (the A * now term is the same for all), so keys stay fixed
while a request waits and the queues need no re-sorting as time passes.

Limited preemption: a running request may be preempted only while generated <= C * (its initial
predicted length, at least 1 token); past that it runs to completion because its KV cache is large.
C = 0 turns preemption off (as in the public TRAIL runtime), C = 1 is plain SPRPT.
"""

from __future__ import annotations

import bisect
import heapq
import math
import re
from dataclasses import dataclass
from typing import Callable, Protocol

from trail_probe.errors import UserError


class SchedRequest(Protocol):
    rid: int  # unique; the last tie-breaker
    arrival: float
    generated: int  # output tokens produced so far
    initial_estimate: float  # the length predicted when the request arrived
    remaining_estimate: float  # the current prediction of tokens still to generate


# name -> (what ranks requests, which prediction feeds it, whether it may preempt)
POLICIES: dict[str, tuple[str, str, bool]] = {
    "fcfs": ("arrival", "none", False),
    "sjf_bert": ("initial", "bert", False),
    "trail_bert": ("remaining", "bert", True),
    "trail": ("remaining", "refined", True),
    "oracle": ("remaining", "exact", True),
}


@dataclass(frozen=True)
class Policy:
    name: str
    order: str  # arrival | initial | remaining
    predictor: str  # none | bert | refined | exact: where the engine takes the estimates from
    preemption_c: float  # 0: never preempt
    aging: float = 0.0  # tokens of predicted length a request is forgiven per second since it arrived

    def key(self, req: SchedRequest) -> tuple:
        """Sort key, smallest first; ties go to the earlier arrival, then the smaller id."""
        if self.order == "arrival":
            return (req.arrival, req.rid)
        estimate = req.initial_estimate if self.order == "initial" else req.remaining_estimate
        if self.aging:  # predicted - A * (now - arrival), without the A * now that every request shares
            estimate = estimate + self.aging * req.arrival
        return (estimate, req.arrival, req.rid)

    def can_preempt(self, req: SchedRequest) -> bool:
        return self.preemption_c > 0 and req.generated <= self.preemption_c * max(req.initial_estimate, 1.0)


_SPEC = re.compile(r"^(?P<name>[a-z_]+)(?:@(?P<c>[^~@]+))?(?:~(?P<aging>[^~@]+))?$")


def base_name(spec: str) -> str:
    """The policy's name without its `@C` / `~A` settings."""
    return re.split(r"[@~]", spec, maxsplit=1)[0]


def _number(text: str, spec: str, example: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"policy '{spec}': '{text}' is not a number; write e.g. {example}") from None


def make_policy(spec: str, preemption_c: float = 0.8, aging: float = 0.0) -> Policy:
    """`fcfs`, `sjf_bert`, `trail_bert`, `trail`, `oracle`, optionally `name@C`, `name~A`, `name@C~A`."""
    m = _SPEC.match(spec)
    if m is None or m["name"] not in POLICIES:
        raise UserError(f"unknown scheduling policy '{spec}'; choose from {', '.join(POLICIES)} (optionally name@C, name~A)")
    order, predictor, preempts = POLICIES[m["name"]]
    c = _number(m["c"], spec, "trail@0.8") if m["c"] else (preemption_c if preempts else 0.0)
    check_preemption_c(c, f"preemption limit C (policy '{spec}')")
    if m["aging"] and order == "arrival":
        raise UserError(f"policy '{spec}': aging needs a policy that ranks by predicted length; {m['name']} serves in arrival order")
    a = _number(m["aging"], spec, "trail~2") if m["aging"] else (aging if order != "arrival" else 0.0)
    check_aging(a, f"aging A (policy '{spec}')")
    return Policy(spec, order, predictor, c, a)


def check_preemption_c(c: float, what: str = "preemption_c") -> float:
    if not 0.0 <= c <= 1.0:
        raise UserError(f"{what} = {c} must be in [0, 1]: 0 never preempts, 1 is plain SPRPT")
    return c


def check_aging(a: float, what: str = "aging") -> float:
    if not (math.isfinite(a) and a >= 0):
        raise UserError(f"{what} = {a} must be >= 0 tokens per second waited (0: no aging, TRAIL's rule)")
    return a


class RequestQueue:
    """Waiting requests in a policy's order (a heap). Keys are taken when a request is pushed, so
    push a request again if its estimate changes while it waits."""

    def __init__(self, policy: Policy):
        self._key = policy.key
        self._heap: list[tuple[tuple, SchedRequest]] = []

    def push(self, req: SchedRequest) -> None:
        heapq.heappush(self._heap, (self._key(req), req))  # keys end with the unique rid: never compares requests

    def peek(self) -> SchedRequest:
        return self._heap[0][1]

    def peek_key(self) -> tuple:
        return self._heap[0][0]

    def pop(self) -> SchedRequest:
        return heapq.heappop(self._heap)[1]

    def __len__(self) -> int:
        return len(self._heap)


def schedule(policy: Policy, waiting: RequestQueue, running: list, max_running: int,
             free_tokens: float = float("inf"),
             footprint: Callable[[SchedRequest], float] = lambda req: 0) -> tuple[list, list]:
    """One scheduling step, in place: start waiting requests in priority order while a slot and
    `free_tokens` of KV memory are available, preempting worse-ranked preemptible running requests
    when the best waiting request does not fit. Stops at the first waiting request that cannot be
    placed (no skipping ahead, as vLLM does), so a long request is not starved by shorter ones that
    happen to fit. Started requests move to `running`, preempted ones to `waiting`.
    `footprint(req)`: KV tokens a request holds while running (and frees when preempted).
    Returns (started, preempted)."""
    started, preempted = [], []
    # The preemptible running requests by rank (keys are unique and fixed during one call), built on
    # first need and kept in order as requests start and are preempted, instead of re-sorted per admission.
    ranked: list[tuple[tuple, SchedRequest]] | None = None
    while waiting:
        need = footprint(waiting.peek())
        if len(running) < max_running and need <= free_tokens:
            req = waiting.pop()
            running.append(req)
            started.append(req)
            free_tokens -= need
            if ranked is not None and policy.can_preempt(req):
                bisect.insort(ranked, (policy.key(req), req))
            continue
        if policy.preemption_c <= 0:
            break
        # Preempt the worst-ranked preemptible requests that rank below the top waiting one, but
        # only if enough of them make room for it: a preemption that admits nothing only costs.
        top_key = waiting.peek_key()
        if ranked is None:
            ranked = sorted(((policy.key(r), r) for r in running if policy.can_preempt(r)), key=lambda kr: kr[0])
        victims, slots, free = [], max_running - len(running), free_tokens
        for k, req in reversed(ranked):
            if k <= top_key or (slots >= 1 and need <= free):
                break
            victims.append(req)
            slots, free = slots + 1, free + footprint(req)
        if not (slots >= 1 and need <= free):
            break
        if victims:
            del ranked[-len(victims):]
        for req in victims:
            running.remove(req)
            waiting.push(req)
            preempted.append(req)
        free_tokens = free
    return started, preempted
