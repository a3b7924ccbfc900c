"""TRAIL's side of each vLLM scheduling step: who runs, who waits, who is paused, and what the worker
must send back. `vllm_scheduler.TrailVLLMScheduler` calls it around vLLM's own step.

Before vLLM's step (`before_step`), the requests fall in four groups:
- *ranked*: running, with an estimate (refined every k tokens from the states the worker sends);
- *paused*: running in vLLM's sense (they keep their KV blocks) but held out of the batch by TRAIL;
- *queued*: waiting with an estimate: never run (an estimate before prefill, initial=bert or none)
  or sent back by vLLM's own recompute preemption;
- *unranked*: no estimate yet. With an initial estimate from the model's own prefill (initial=
  prompt_probe or last_token, the default: no client help needed) a new request is prefilled at once,
  shortest prompt first (`prefill_order`), up to `max_prefill_tokens` prompt tokens per step (alone while
  they fill it: `prefills_alone`), and ranked once its prefill has given its estimate (the prompt probe
  on the mean of its prompt states, or the decode probe on its last prompt token's state).
`policies.schedule` (the simulator's code) then ranks the ranked, paused and queued requests by
predicted remaining length (SPRPT with limited preemption) for at most `max_running` decode slots.
Keys of paused and queued requests cannot change (they produce no tokens), so they sit in sorted
lists of which only the best few are looked at. The decision is applied to vLLM's lists: the chosen
running requests first in rank order, then the unranked ones; the paused ones held out for the step;
the chosen waiting ones at the front of the queue, with admissions capped to them. Under KV pressure
the worst-ranked paused requests give their blocks back first (vLLM's recompute preemption), never
a better-ranked running one. With no queue (nothing paused or queued, every ranked request fits)
the ranking is skipped: it could only start everyone and pause no one.

The states of a pass (`absorb`) give initial estimates at once; its refinements are made during the
next forward pass (`refine_deferred`, from the scheduler's `get_grammar_bitmask`), off the step's
critical path; by default (`refine_when=waiting`) only while some request waits for a slot, the only
time the ranking has a choice to make.

After vLLM's step (`after_step`) TRAIL reconciles its groups with what vLLM actually did (vLLM may
skip a request TRAIL chose, e.g. while its grammar compiles, and admit the next) and tells the
worker which states it needs from this pass (`vllm_worker.Wants`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from trail_probe.runtime.estimates import refines_at
from trail_probe.serving import vllm_internals as vi
from trail_probe.serving.policies import RequestQueue, schedule
from trail_probe.serving.sorted_keys import SortedKeys
from trail_probe.serving.step_cost import StepCost
from trail_probe.serving.trail_state import RequestView
from trail_probe.serving.vllm_worker import WANTS_ATTR, Wants


PREFILL_SHARE = 8  # with new requests waiting for their prefill, 1/8 of vLLM's batch slots is kept for them
REFINE_HOLD_STEPS = 64  # refine_when=waiting: steps after the last one where a request waited that refinements go on


@dataclass
class Plan:
    """What `before_step` changed on the scheduler, for `restore` to put back after vLLM's step."""

    held: list = field(default_factory=list)  # paused requests taken out of `running`
    active_cap: int | None = None  # vLLM's admission cap before TRAIL lowered it
    generated: dict = field(default_factory=dict)  # request -> output tokens when this step's pass runs


class TrailQueues:
    def __init__(self, scheduler, runtime, settings, stats, prompt_sums=None):
        self.s, self.rt, self.settings, self.stats = scheduler, runtime, settings, stats
        self.policy = runtime.policy
        self.prompt_sums = prompt_sums
        self.views: dict[str, RequestView] = {}
        self.counter = itertools.count()
        self.new: list[str] = []  # arrived, not yet admitted to the runtime
        self.unstarted: dict[str, None] = {}  # prefill-first: admitted, waiting for their first prefill (arrival order)
        self.awaiting: set[str] = set()  # prefill-first: started, no estimate yet (unranked)
        self.queued = SortedKeys()  # waiting with an estimate, never run
        self.paused = SortedKeys()
        self.ran: set[str] = set()  # started at least once and not finished
        self.initial_s = 0.0  # seconds in initial estimates since the scheduler last took the count
        self.refine_s = 0.0  # seconds in deferred refinements since the scheduler last took the count
        self.steps = 0  # before_step calls so far
        self.deferred: list[tuple[int, list[str], torch.Tensor, list[int]]] = []  # (step, ids, states, generated)
        self.step_cost = StepCost()  # the engine's step times, for the running limit (max_running 0)
        self.running_limit, self._limit_age = scheduler.max_num_running_reqs, 0
        self.waited_at = -REFINE_HOLD_STEPS - 1  # the last step at which a request waited for a slot

    # -- requests come and go --
    def track(self, request) -> None:
        rid = request.request_id
        if rid in self.views:  # a streaming-input update of a request already tracked
            return
        self.views[rid] = RequestView(rid, next(self.counter), request.arrival_time)
        self.new.append(rid)

    def forget(self, rid: str):
        """Drop a request (finished or aborted); returns the runtime's record of its estimates."""
        self.views.pop(rid, None)
        self.unstarted.pop(rid, None)
        self.awaiting.discard(rid)
        self.queued.remove(rid)
        self.paused.remove(rid)
        self.ran.discard(rid)
        if self.prompt_sums is not None:
            self.prompt_sums.drop(rid)
        return self.rt.remove(rid)

    def _admit_new(self) -> None:
        ids = [rid for rid in self.new if rid in self.views and rid in self.s.requests]
        self.new.clear()
        if not ids:
            return
        self.rt.admit(ids, [self.s.requests[rid].max_tokens for rid in ids])
        if self.settings.prefill_first:
            self.unstarted.update(dict.fromkeys(ids))
            return
        views = [self.views[rid] for rid in ids]
        self.rt.estimate(views)
        for rid, v in zip(ids, views):
            self.rt.prompt_texts.pop(rid, None)
            self.queued.insert(rid, self.policy.key(v))

    # -- the step --
    @property
    def current_limit(self) -> int:
        return min(self.settings.max_running or self.running_limit, self.s.max_num_running_reqs)

    @property
    def refining(self) -> bool:
        """Whether running requests' estimates are refined now: always, or (refine_when=waiting) while a
        request waits for a slot (paused, or left in vLLM's waiting queue after its step) and
        REFINE_HOLD_STEPS after (a failed ranking counts as waiting). Refinements only serve the ranking,
        which has a choice to make only then; with no queue TRAIL then costs its initial estimates alone
        (no states leave the worker, no probe runs), and a request that starts refining again does so
        from its last estimate counted down (the tracker moves it by the tokens generated since)."""
        return self.settings.refine_when == "always" or self.steps - self.waited_at <= REFINE_HOLD_STEPS

    def _limit(self) -> int:
        """Decode slots TRAIL fills: the setting, else the step-cost rule (recomputed every 64 steps)."""
        largest = self.s.max_num_running_reqs
        if self.settings.max_running:
            return min(self.settings.max_running, largest)
        self._limit_age += 1
        if self._limit_age >= 64:
            self._limit_age, self.running_limit = 0, self.step_cost.running_limit(largest, self.settings.max_throughput_loss)
        return min(self.running_limit, largest)

    def before_step(self) -> Plan:
        """Rank and reorder vLLM's lists for its next step (nothing is changed until the decision is made)."""
        s = self.s
        self.steps += 1
        self.refine_deferred(before=self.steps - 1)  # none left unless vLLM's step skipped get_grammar_bitmask
        vi.promote_ready_waiting(s)  # a compiled grammar or arrived KV: startable now (vLLM's own check)
        self._admit_new()
        running = [r for r in s.running if r.request_id not in self.paused]
        ranked = [r for r in running if self._ranked(r)]
        unranked = [r for r in running if not self._ranked(r)]
        requeued = [s.requests[rid] for rid in self.ran if rid in s.requests and _is_requeued(s.requests[rid])]
        # requests still awaiting their estimate keep their batch slots: TRAIL ranks into the rest, so
        # vLLM's batch never holds more than max_num_seqs requests (vLLM asserts it)
        limit = min(self._limit(), max(s.max_num_running_reqs - len(unranked), 0))
        if self.unstarted:  # keep batch slots for new requests' prefills, which give their estimates
            limit = min(limit, max(1, s.max_num_running_reqs - max(1, s.max_num_running_reqs // PREFILL_SHARE)))
        plan = Plan(generated={r.request_id: vi.generated_at_pass(r) for r in running})
        ready = [r for r in map(s.requests.get, self.unstarted) if r is not None and _ready(r)]  # new, startable
        if ready and self._prefills_alone(ready):  # a burst: this step prefills new requests and nothing else
            prefilling = [r for r in unranked if r.num_computed_tokens < r.num_prompt_tokens]
            starts = self._prefill_starts(ready, s.max_num_running_reqs - len(prefilling))
            if starts and sum(r.num_tokens for r in starts) <= vi.free_kv_tokens(s):  # else the ranking frees KV first
                step = {id(r) for r in prefilling}
                self._apply(plan, prefilling, [r for r in s.running if id(r) not in step], starts)
                self.stats.count("prefill_steps")
                return plan
        candidates = len(ranked) + len(self.paused) + len(self.queued) + len(requeued)
        starts = self._prefill_starts(ready, s.max_num_running_reqs - len(unranked) - min(limit, candidates))
        if not self.paused and not requeued and len(ranked) + len(self.queued) <= limit:
            admit = [s.requests[rid] for rid in self.queued.best(limit)]  # no queue: nobody to rank or pause
            self._apply(plan, ranked + unranked, [], admit + starts)
            return plan
        chosen = self._rank(ranked, requeued, limit)
        by_key = sorted((s.requests[rid] for rid in chosen if rid in s.requests), key=lambda r: chosen[r.request_id])
        keep = [r for r in by_key if not _waits(r)]  # running now (ranked, or paused and resumed)
        admit = [r for r in by_key if _waits(r)]  # queued or requeued, to start
        self._free_kv_for(admit, keep)
        self._apply(plan, keep + unranked, [s.requests[rid] for rid in self.paused.keys], admit + starts)
        return plan

    def _rank(self, ranked: list, requeued: list, limit: int) -> dict:
        """`policies.schedule` over the ranked, paused, queued and requeued requests; the paused set
        updated. Returns the chosen requests' ids with their keys."""
        s, rt = self.s, self.rt
        views = [self._view(r) for r in ranked + requeued]
        rt.estimate(views)  # the paused and queued requests keep the estimates their keys were made from
        queue = RequestQueue(self.policy)
        for v in views[len(ranked):]:
            queue.push(v)
        for rid in self.paused.best(limit) + self.queued.best(limit):
            queue.push(self.views[rid])
        # Running requests past the limit (a burst just prefilled) compete with the queue for the slots;
        # one past its preemption limit keeps running whatever its rank.
        locked = [v for v in views[: len(ranked)] if not self.policy.can_preempt(v)]
        movable = sorted((v for v in views[: len(ranked)] if self.policy.can_preempt(v)), key=self.policy.key)
        running = locked + movable[: max(limit - len(locked), 0)]
        for v in movable[len(running) - len(locked):]:
            queue.push(v)
        free = vi.free_kv_tokens(s) + sum(s.requests[rid].num_computed_tokens for rid in self.paused.keys)
        schedule(self.policy, queue, running, limit, free_tokens=free, footprint=lambda v: self._kv_need(v.request_id))
        kept = {v.request_id for v in running}
        preempted = [v for v in views[: len(ranked)] if v.request_id not in kept]
        for v in preempted:
            self.paused.insert(v.request_id, self.policy.key(v))
            self.stats.count("pauses")
            if self.policy.preemption_c > 0 and not self.policy.can_preempt(v):
                rt.paused_past_limit += 1
        rt.preemptions += len(preempted)
        chosen = {v.request_id: self.policy.key(v) for v in running}
        for rid in chosen:
            if rid in self.paused:
                self.paused.remove(rid)
                self.stats.count("resumes")
        return chosen

    def _ranked(self, request) -> bool:
        rid = request.request_id
        return rid in self.views and rid not in self.awaiting and rid not in self.unstarted and self.rt.tracks(rid)

    def _view(self, request) -> RequestView:
        v = self.views[request.request_id]
        v.generated = request.num_output_tokens
        return v

    def _kv_need(self, rid: str) -> int:
        """KV tokens a request needs to start: none while it holds its blocks (running or paused)."""
        r = self.s.requests.get(rid)
        return 0 if r is None or not _waits(r) else r.num_tokens

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens of new requests started per step: the setting, else vLLM's token budget."""
        return self.settings.max_prefill_tokens or self.s.max_num_scheduled_tokens

    def _prefills_alone(self, ready: list) -> bool:
        """`prefills_alone`, while the waiting prompts fill the prefill budget (a burst; never a trickle): the
        running requests lose the step's fixed cost, and its prefills do not wait for their decodes."""
        return self.settings.prefills_alone and sum(r.num_tokens for r in ready) >= self.prefill_budget

    def _prefill_starts(self, ready: list, slots: int) -> list:
        """Prefill-first: which of `ready` to start now, within the prefill budget and `slots` (what vLLM
        has beside the requests TRAIL may rank into the batch). `prefill_order` shortest: the oldest
        waiting request, then the fewest prompt tokens (ties in arrival order): a prefill ends in the first
        token, so shortest-first lowers a burst's mean TTFT, and the oldest first keeps any prompt from
        waiting for ever. `arrival`: in arrival order."""
        cap = self.prefill_budget
        if self.settings.prefill_order == "shortest":
            ready = ready[:1] + sorted(ready[1:], key=lambda r: r.num_tokens)  # sorted is stable
        starts, tokens = [], 0
        for r in ready:
            if len(starts) >= slots or (starts and tokens + r.num_tokens > cap):
                break
            starts.append(r)
            tokens += r.num_tokens
        return starts

    def _free_kv_for(self, admit: list, keep: list) -> None:
        """Under KV pressure, give back the blocks of the worst-ranked paused requests (vLLM's recompute
        preemption) until the chosen requests fit: a paused request never keeps memory a better-ranked
        one needs, and a step never stalls on blocks that unchosen requests hold."""
        s = self.s
        need = sum(r.num_tokens for r in admit) + s.block_size * sum(
            1 for r in keep if r.num_computed_tokens % s.block_size == 0)
        free = vi.free_kv_tokens(s)
        victims = [rid for _, rid in reversed(self.paused.items)]
        while free < need and victims:
            rid = victims.pop(0)
            r = s.requests.get(rid)
            self.paused.remove(rid)
            if r is None:
                continue
            if r in s.running:
                s.running.remove(r)
            free += r.num_computed_tokens
            vi.preempt(s, r)
            self.stats.count("kv_preemptions")

    def _apply(self, plan: Plan, running: list, held: list, admit: list) -> None:
        s = self.s
        held_ids = {id(r) for r in held}
        plan.held = [r for r in s.running if id(r) in held_ids]
        s.running = running
        moved = vi.set_waiting_front(s, admit)
        plan.active_cap = s.max_num_active_reqs
        # vLLM counts idle streaming sessions against this cap too
        s.max_num_active_reqs = min(plan.active_cap, len(running) + len(moved) + vi.idle_streaming_sessions(s))
        for r in moved:
            plan.generated[r.request_id] = r.num_output_tokens

    def restore(self, plan: Plan | None) -> None:
        """After vLLM's step: paused requests rejoin `running` (at the end), the admission cap is vLLM's again."""
        if plan is None:
            return
        s = self.s
        if plan.active_cap is not None:
            s.max_num_active_reqs = plan.active_cap
        present = {id(r) for r in s.running}
        s.running = s.running + [r for r in plan.held if id(r) not in present and not r.is_finished()]

    # -- after vLLM's step --
    def after_step(self, out, plan: Plan | None, async_mode: bool) -> None:
        """Reconcile with what vLLM scheduled and tell the worker which states this pass must return."""
        if self.settings.refine_when == "waiting" and (plan is None or plan.held or any(map(_ready, self.s.waiting))):
            self.waited_at = self.steps  # someone waits for a slot: TRAIL's hold, vLLM's slots, token budget or KV
        wants = Wants(block_size=self.s.block_size)
        generated = plan.generated if plan is not None else {}
        refining = self.refining
        for rid, n in out.num_scheduled_tokens.items():
            r = self.s.requests.get(rid)
            if r is None or rid not in self.views:
                continue
            self._started(rid)
            start = r.num_computed_tokens - n
            samples = not r.is_prefill_chunk
            g = generated.get(rid, r.num_output_tokens + r.num_output_placeholders - (1 if async_mode and samples else 0))
            if rid in self.awaiting and self.prompt_sums is not None and start < r.num_prompt_tokens:
                wants.prompt[rid] = (start, r.num_prompt_tokens)
                self.prompt_sums.start(rid, start, r.num_computed_tokens)
            if rid in self.awaiting and self.rt.prompt_input == "last" and samples and g == 0:
                wants.last.append(rid)  # this pass ends the prompt: its last token's state is the input
            if samples and self._wants_state(rid, g, refining):
                wants.states.append(rid)
        if wants:
            setattr(out, WANTS_ATTR, wants)

    def _started(self, rid: str) -> None:
        if rid in self.paused:  # TRAIL's hold failed this step (its ranking fell back): running again
            self.paused.remove(rid)
        self.queued.remove(rid)
        if rid in self.unstarted:  # prefill-first: unranked until its prefill gives the estimate
            del self.unstarted[rid]
            self.awaiting.add(rid)
        self.ran.add(rid)

    def _wants_state(self, rid: str, g: int, refining: bool) -> bool:
        if not self.rt.needs_states or not self.rt.tracks(rid):
            return False
        if g == 0:
            return self.rt.initial == "last_token"
        return refining and self.rt.refine and (self.rt.cadence == "global" or refines_at(g, self.rt.refine_interval))


    # -- the states of a pass, back from the worker --
    def absorb(self, payload) -> None:
        """Prompt sums and probe-layer states of the pass just run: initial estimates of the requests
        whose prefill they complete, refinements on the cadence (kept with each request's output count,
        which is still the one its states were computed at: this runs before vLLM applies the pass's
        tokens, and the refinements themselves wait for `refine_deferred`)."""
        s, rt = self.s, self.rt
        if payload is not None and self.prompt_sums is not None and payload.prompt_ids:
            sums = torch.as_tensor(payload.prompt_sums)
            for rid, rows in _group(payload.prompt_ids).items():
                self.prompt_sums.add(rid, [payload.prompt_blocks[i] for i in rows], sums[rows],
                                     [payload.prompt_counts[i] for i in rows])
        if payload is not None and payload.last_ids:
            last = torch.as_tensor(payload.last_states)
            for i, rid in enumerate(payload.last_ids):
                if rid in self.awaiting and rid in s.requests:
                    rt.add_prompt_last(rid, last[i])
                    self.awaiting.discard(rid)
        if payload is not None and payload.state_ids:
            rows = [i for i, rid in enumerate(payload.state_ids) if rid in s.requests and rt.tracks(rid)]
            ids = [payload.state_ids[i] for i in rows]
            gens = [s.requests[rid].num_output_tokens for rid in ids]
            states = torch.as_tensor(payload.states)[rows]
            if rt.initial == "last_token" and 0 in gens:  # a first estimate, needed before the request is ranked
                self._observe(ids, states, gens)
                self.awaiting.difference_update(rid for rid, g in zip(ids, gens) if g == 0)
            elif ids:
                self.deferred.append((self.steps, ids, states, gens))
        self._settle_prefills()

    def refine_deferred(self, before: int | None = None) -> None:
        """Refine with the states that arrived before step `before` (all when None). vLLM's step calls
        the scheduler's `get_grammar_bitmask` while the worker runs the pass just scheduled, and the
        scheduler refines there: the probe's work overlaps the forward pass instead of delaying the next
        step, and the ranking of a step uses states at most one pass old (TRAIL refines every k tokens).
        A request that finished in the meantime is skipped: its estimate no longer matters."""
        ready = [d for d in self.deferred if before is None or d[0] < before]
        if not ready:
            return
        self.deferred = self.deferred[len(ready):]  # in arrival order, so the ready ones are the oldest
        t0 = time.perf_counter()
        for _, ids, states, gens in ready:
            keep = [i for i, rid in enumerate(ids) if rid in self.s.requests and self.rt.tracks(rid)]
            if keep:
                self._observe([ids[i] for i in keep], states[keep], [gens[i] for i in keep])
        self.refine_s += time.perf_counter() - t0

    def _observe(self, ids: list[str], states: torch.Tensor, gens: list[int]) -> None:
        before = self.rt.refinements
        self.rt.observe(ids, states, gens, pooled=True)  # a pooled probe's inputs come from the worker's pools
        self.stats.count("refinements", self.rt.refinements - before)

    def _settle_prefills(self) -> None:
        """Requests whose whole prompt has been summed get the prompt probe's estimate; one that has
        produced tokens without an estimate (its states never came) is ranked at its budget."""
        s, done, t0 = self.s, {}, time.perf_counter()
        for rid in list(self.awaiting):
            r = s.requests.get(rid)
            covered = None if r is None or self.prompt_sums is None else self.prompt_sums.covered(rid)
            if r is None:
                self.awaiting.discard(rid)
            elif covered is not None and covered >= r.num_prompt_tokens:
                done[rid] = r.block_hashes
            elif r.num_output_tokens >= 1:
                self.awaiting.discard(rid)
                self.stats.count("unestimated")
        for rid, (total, count, complete) in (self.prompt_sums.finish(done) if done else {}).items():
            self.rt.add_prompt_sum(rid, total, count, done=True)
            self.stats.count("incomplete_prompt_means", int(not complete))
        self.awaiting.difference_update(done)
        self.initial_s += time.perf_counter() - t0


def _group(ids: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, rid in enumerate(ids):
        out.setdefault(rid, []).append(i)
    return out


def _waits(request) -> bool:
    """In vLLM's waiting queues (ready, preempted, or blocked on its grammar, remote KV or streamed input)."""
    return not request.is_finished() and request.status != _running_status()


def _ready(request) -> bool:
    """Waiting and ready to start: vLLM admits it when asked."""
    from vllm.v1.request import RequestStatus

    return request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)


def _running_status():
    from vllm.v1.request import RequestStatus

    return RequestStatus.RUNNING


def _is_requeued(request) -> bool:
    from vllm.v1.request import RequestStatus

    return request.status == RequestStatus.PREEMPTED
