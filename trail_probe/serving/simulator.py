"""An iteration-level simulator of a continuous-batching LLM server, for any scheduling policy.

    from trail_probe.serving.simulator import Engine, simulate, summarize, poisson_arrivals
    result = simulate(workload.with_arrivals(poisson_arrivals(len(workload), 2.0, seed=0)),
                      make_policy("trail"), Engine(max_running=64), load_cost_model("measured_cpu"))

The engine is iteration-level continuous batching in the style of vLLM with chunked prefill:
- at most `max_running` requests hold a slot; each iteration processes one decode token for every
  running request that has been prefilled, then fills the rest of `token_budget` with prefill
  chunks in priority order; the iteration that completes a prefill produces the next token;
- KV cache: a running request holds prompt + generated tokens of `kv_capacity_tokens` (a 1 %
  watermark is kept free at admission, as vLLM does). When the cache overflows, the
  lowest-ranked running request is evicted: its cache is discarded and recomputed (prompt +
  tokens so far, as one prefill) when it runs again, as in the paper. A request preempted by the
  policy keeps its cache while memory allows (`paused_cache=keep`, the default: paused caches are
  the first to go on overflow, as in the paper, and the public TRAIL runtime keeps them in SGLang's
  radix cache), or loses it at once (`paused_cache=discard`: every preemption is a recompute).
- the time of one iteration is a linear cost model (`trail_probe.serving.cost_model.CostModel`):
      t = a + b * tokens + c * decode_context + d * prefill_pairs

Estimates: `trail` ranks a request by BERT's estimate until its first token (nothing else exists
before the prefill), then by the refined probe estimate of the latest refinement (j = 1, 1+k, ...),
counted down by one per generated token in between (`trail_probe.runtime.estimates.count_down`, the
rule the engines use); `trail_bert` counts BERT's estimate down; `oracle` knows the remaining length.
The limited-preemption threshold uses the initial (BERT) estimate, as the public TRAIL runtime does.
An answer of 0 tokens (immediate EOS) is simulated as 1: the step that produces EOS still runs.

Scheduling decisions are `trail_probe.serving.policies.schedule`, the same code the serving engines
run. Speed: between two events (an arrival that could change the running set, a completion, a
refinement of a preemptible request while others wait, a KV overflow) all running requests just
decode, so the simulator advances such stretches as one block in closed form.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

from trail_probe.choices import PausedCache, check_choice
from trail_probe.errors import UserError
from trail_probe.runtime.estimates import count_down
from trail_probe.serving.cost_model import CostModel
from trail_probe.serving.policies import Policy, RequestQueue, make_policy, schedule

WATERMARK = 0.01  # fraction of the KV cache kept free when admitting (vLLM's default)


# --------------------------------------------------------------------------------------------
# Workload: requests replayed from the eval predictions
# --------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """One row per request. `refined[i]` = (generated counts j, estimated remaining tokens at j)."""

    arrival: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    bert_estimate: np.ndarray
    refined: list[tuple[list[int], list[float]]]
    ids: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.output_tokens)

    def take(self, index: np.ndarray) -> "Workload":
        return Workload(self.arrival[index], self.prompt_tokens[index], self.output_tokens[index],
                        self.bert_estimate[index], [self.refined[i] for i in index],
                        [self.ids[i] for i in index] if self.ids else [])

    def with_arrivals(self, arrival: np.ndarray) -> "Workload":
        return Workload(np.asarray(arrival, dtype=float), self.prompt_tokens, self.output_tokens,
                        self.bert_estimate, self.refined, self.ids)


def sample_workload(pool: Workload, num_requests: int, seed: int) -> Workload:
    """`num_requests` requests from the pool: a random subset, or resampled with replacement when more
    are asked for than the pool holds. Deterministic for the seed."""
    if num_requests < 1:
        raise UserError(f"simulate.num_requests = {num_requests} must be >= 1")
    rng = np.random.default_rng(seed)
    n = len(pool)
    index = rng.permutation(n)[:num_requests] if num_requests <= n else rng.integers(0, n, num_requests)
    return pool.take(index)


def poisson_arrivals(num_requests: int, rate: float, seed: int) -> np.ndarray:
    """Arrival times of a Poisson process; the same unit gaps are scaled for every rate, so rates
    differ only in speed (common random numbers across rates and policies)."""
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise UserError(f"request rate {rate!r} must be a positive number of requests per second")
    gaps = np.random.default_rng([seed, 1]).exponential(1.0, num_requests)
    return np.cumsum(gaps) / rate


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
@dataclass
class Engine:
    max_running: int = 64
    token_budget: int = 512
    kv_capacity_tokens: int = 60000
    paused_cache: str = "keep"  # keep | discard

    def check(self, workload: Workload | None = None) -> None:
        if self.max_running < 1:
            raise UserError(f"simulate.max_running = {self.max_running} must be >= 1")
        if self.token_budget < self.max_running:
            raise UserError(f"simulate.token_budget = {self.token_budget} must be >= max_running = {self.max_running} "
                            "so every running request can decode in one iteration (vLLM requires the same)")
        check_choice(self.paused_cache, PausedCache, "simulate.paused_cache")
        if workload is not None:
            largest = int((workload.prompt_tokens + workload.output_tokens).max())
            if largest > self.usable_tokens:
                raise UserError(f"simulate.kv_capacity_tokens = {self.kv_capacity_tokens} cannot hold the largest request "
                                f"({largest} prompt + output tokens, plus a {WATERMARK:.0%} watermark); raise it to at "
                                f"least {math.ceil(largest / (1 - WATERMARK)) + 1}")

    @property
    def usable_tokens(self) -> int:
        return self.kv_capacity_tokens - int(WATERMARK * self.kv_capacity_tokens)


class _Req:
    """A request inside the simulator; the attributes `policies.SchedRequest` asks for, plus state."""

    __slots__ = ("rid", "arrival", "prompt_tokens", "output_tokens", "generated", "kv", "initial_estimate",
                 "remaining_estimate", "bert", "ref_j", "ref_est", "first_token", "finish", "served")

    def __init__(self, rid, arrival, prompt, output, bert, ref_j, ref_est):
        self.rid, self.arrival, self.prompt_tokens, self.output_tokens = rid, arrival, prompt, output
        self.bert, self.ref_j, self.ref_est = bert, ref_j, ref_est
        self.generated = self.kv = self.served = 0
        self.initial_estimate = self.remaining_estimate = 0.0
        self.first_token = self.finish = math.nan


def _estimator(predictor: str):
    """The remaining-length estimate a predictor gives after `generated` tokens."""
    if predictor == "exact":
        return lambda r: float(r.output_tokens - r.generated)
    if predictor == "bert":
        return lambda r: count_down(r.bert, r.generated)
    if predictor == "refined":
        def refined(r):
            g = r.generated
            i = bisect_right(r.ref_j, g) - 1
            if g == 0 or i < 0:  # before the first decode state only BERT has an estimate (TRAIL)
                return count_down(r.bert, g)
            return count_down(r.ref_est[i], g - r.ref_j[i])  # counted down between refinements
        return refined
    return lambda r: 0.0


@dataclass
class SimResult:
    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    output_tokens: np.ndarray
    served: np.ndarray  # completions per request: all 1 unless the engine is wrong
    tokens_generated: int  # output tokens produced, recomputation excluded
    preemptions: int  # by the policy
    evictions: int  # running requests pushed out by a full KV cache
    recomputes: int  # caches discarded that had to be rebuilt
    recomputed_tokens: int
    iterations: int
    steps: int  # loop passes (iterations advanced one block at a time)
    slot_seconds: float  # integral of the number of running requests over time
    max_running: int


def check_estimates(workload: Workload, policy: Policy) -> None:
    if policy.predictor in ("bert", "refined") and np.isnan(workload.bert_estimate).any():
        raise UserError(f"policy '{policy.name}' needs BERT's initial estimates, which the predictions lack; "
                        "run 'trail-probe train-baseline' and 'trail-probe eval', or keep to fcfs and oracle")
    if policy.predictor == "refined" and not any(j for j, _ in workload.refined):
        raise UserError(f"policy '{policy.name}' replays refined probe estimates, which the predictions lack; "
                        "train a decode probe and re-run 'trail-probe eval', or drop it from simulate.policies")


def _block_length(dt: float, per_step: float, growth: float) -> int:
    """Smallest n >= 1 with n * per_step + growth * n * (n - 1) / 2 >= dt (n steps of a decode block)."""
    def elapsed(n):
        return n * per_step + growth * n * (n - 1) / 2

    if growth > 0:
        b = per_step - growth / 2
        n = math.ceil((-b + math.sqrt(b * b + 2 * growth * dt)) / growth)
    else:
        n = math.ceil(dt / per_step)
    n = max(n, 1)
    while elapsed(n) < dt:
        n += 1
    while n > 1 and elapsed(n - 1) >= dt:
        n -= 1
    return n


def simulate(workload: Workload, policy: Policy, engine: Engine, cost: CostModel,
             max_block_steps: int | None = None) -> SimResult:
    """Run every request of `workload` to completion under `policy`. Deterministic.
    `max_block_steps=1` advances one iteration at a time (the reference the block skipping must match)."""
    engine.check(workload)
    check_estimates(workload, policy)
    if cost.fixed_s + cost.per_token_s <= 0:
        raise UserError("the cost model gives iterations no duration (fixed_s + per_token_s = 0); fit it or pick a preset")
    return _Simulation(workload, policy, engine, cost, max_block_steps).run()


def _footprint(r: _Req) -> int:
    """KV tokens a running request holds: its prompt and what it has generated."""
    return r.prompt_tokens + r.generated


class _Simulation:
    """One `simulate` run: the clock, the queues, the KV cache held by running and paused requests, and
    the counters `SimResult` reports. `run` is the event loop; each method below is one of its steps."""


    def __init__(self, workload: Workload, policy: Policy, engine: Engine, cost: CostModel,
                 max_block_steps: int | None):
        self.policy, self.engine, self.cost, self.max_block_steps = policy, engine, cost, max_block_steps
        self.estimate = _estimator(policy.predictor)
        self.ranks_by_remaining = policy.order == "remaining"
        self.refinement_events = policy.predictor == "refined" and policy.preemption_c > 0
        self.capacity, self.usable = engine.kv_capacity_tokens, engine.usable_tokens
        self.keep_paused = engine.paused_cache == "keep"
        self.reqs = []
        for rid in range(len(workload)):
            ref_j, ref_est = workload.refined[rid]
            r = _Req(rid, float(workload.arrival[rid]), int(workload.prompt_tokens[rid]),
                     int(workload.output_tokens[rid]), float(workload.bert_estimate[rid]), ref_j, ref_est)
            r.initial_estimate = float(r.output_tokens) if policy.predictor == "exact" else r.bert
            r.remaining_estimate = self.estimate(r)
            self.reqs.append(r)
        self.arrivals = [self.reqs[i] for i in np.argsort(workload.arrival, kind="stable")]
        self.next_arrival = 0
        self.waiting = RequestQueue(policy)
        self.running: list[_Req] = []
        self.paused: dict[int, _Req] = {}  # keep mode: waiting requests whose cache is still held
        self.used = self.paused_kv = 0  # KV tokens held by running requests (prompt + generated) and by paused ones
        self.t = self.slot_seconds = 0.0
        self.done = self.tokens_generated = self.preemptions = self.evictions = 0
        self.recomputes = self.recomputed_tokens = self.iterations = self.steps = 0

    def run(self) -> SimResult:
        while self.done < len(self.reqs):
            self.steps += 1
            while self.next_arrival < len(self.arrivals) and self.arrivals[self.next_arrival].arrival <= self.t:
                self.waiting.push(self.arrivals[self.next_arrival])
                self.next_arrival += 1
            if not self.running and not self.waiting:
                self.t = self.arrivals[self.next_arrival].arrival
                continue
            self._relieve_overflow()
            if self.waiting:
                self._schedule()
            # Compose the iteration: every prefilled request decodes one token, prefill chunks take the rest.
            decoders, prefills = [], []
            for r in self.running:
                (decoders if r.prompt_tokens + r.generated - r.kv == 1 else prefills).append(r)
            if prefills:
                self._prefill_iteration(decoders, prefills)
            else:
                self._decode_block(decoders)
        return self._result()

    # -- the loop's steps -------------------------------------------------------------------------
    def _relieve_overflow(self) -> None:
        """KV overflow: paused caches go first, then the lowest-ranked running request is evicted."""
        while self.used + self.paused_kv > self.capacity:
            if self.paused:
                self._drop_worst_paused()
                continue
            self._refresh_estimates()
            victim = max(self.running, key=self.policy.key)
            self.running.remove(victim)
            self.used -= _footprint(victim)
            self._drop_cache(victim)
            self.waiting.push(victim)
            self.evictions += 1

    def _schedule(self) -> None:
        """The policy's decision (`policies.schedule`, as in the engines): who starts, who is paused."""
        self._refresh_estimates()
        started, preempted = schedule(self.policy, self.waiting, self.running, self.engine.max_running,
                                      self.usable - self.used, _footprint)
        for r in started:
            self.used += _footprint(r)
            if r.rid in self.paused:
                del self.paused[r.rid]
                self.paused_kv -= r.kv
        for r in preempted:
            self.used -= _footprint(r)
            self.preemptions += 1
            if self.keep_paused and r.kv:
                self.paused[r.rid] = r
                self.paused_kv += r.kv
            else:
                self._drop_cache(r)
        while self.used + self.paused_kv > self.capacity:  # the admitted requests need the paused caches' room
            self._drop_worst_paused()

    def _prefill_iteration(self, decoders: list[_Req], prefills: list[_Req]) -> None:
        """One iteration: a token for every decoder, prefill chunks in priority order in the rest of the budget."""
        context = sum([r.prompt_tokens + r.generated for r in decoders])
        prefills.sort(key=self.policy.key)
        left, tokens, pairs, chunks = self.engine.token_budget - len(decoders), len(decoders), 0, []
        for r in prefills:
            if left == 0:
                break
            q = min(_footprint(r) - r.kv, left)
            chunks.append((r, q))
            pairs += q * r.kv + q * (q + 1) // 2
            tokens += q
            left -= q
        dt = self.cost.iteration_time(tokens, context, pairs)
        self.t += dt
        self.slot_seconds += dt * len(self.running)
        self.iterations += 1
        for r in decoders:
            r.kv += 1
            self._produced(r, self.t)
        for r, q in chunks:
            r.kv += q
            if r.kv == _footprint(r):
                self._produced(r, self.t)

    def _decode_block(self, decoders: list[_Req]) -> None:
        """Only decodes: n identical-shape iterations at once, up to the next event."""
        nd, context = len(decoders), sum([r.prompt_tokens + r.generated for r in decoders])
        per_step = self.cost.iteration_time(nd, context)
        growth = self.cost.per_context_token_s * nd
        n = self._block_steps(decoders, per_step, growth)
        t_first = self.t + per_step
        dt = n * per_step + growth * n * (n - 1) / 2
        self.t += dt
        self.slot_seconds += dt * nd
        self.iterations += n
        for r in decoders:
            if r.generated == 0:
                r.first_token = t_first
            r.kv += n
            r.generated += n - 1  # the last step's token goes through _produced()
            self.used += n - 1
            self.tokens_generated += n - 1
            self._produced(r, self.t)

    def _block_steps(self, decoders: list[_Req], per_step: float, growth: float) -> int:
        """How many decode iterations run before the next event: a completion, a full KV cache, a
        refinement of a preemptible request while others wait, or an arrival that could change the set."""
        policy = self.policy
        n = min(r.output_tokens - r.generated for r in decoders)
        n = min(n, (self.capacity - self.used - self.paused_kv) // len(decoders) + 1)
        if self.refinement_events and self.waiting:
            for r in decoders:
                if policy.can_preempt(r):
                    i = bisect_right(r.ref_j, r.generated)
                    if i < len(r.ref_j):
                        n = min(n, r.ref_j[i] - r.generated)
        if self.max_block_steps:
            n = min(n, self.max_block_steps)
        if self.next_arrival < len(self.arrivals) and (len(self.running) < self.engine.max_running or (
                policy.preemption_c > 0 and any(policy.can_preempt(r) for r in self.running))):
            n = min(n, _block_length(self.arrivals[self.next_arrival].arrival - self.t, per_step, growth))
        return n

    # -- bookkeeping ------------------------------------------------------------------------------
    def _refresh_estimates(self) -> None:
        if self.ranks_by_remaining:
            for r in self.running:
                r.remaining_estimate = self.estimate(r)

    def _drop_cache(self, r: _Req) -> None:
        if r.kv:
            self.recomputes += 1
            self.recomputed_tokens += r.kv
            r.kv = 0

    def _drop_worst_paused(self) -> None:
        victim = max(self.paused.values(), key=self.policy.key)
        del self.paused[victim.rid]
        self.paused_kv -= victim.kv
        self._drop_cache(victim)

    def _produced(self, r: _Req, now: float) -> None:
        """Request r has just produced its next token at time `now`."""
        r.generated += 1
        self.used += 1
        self.tokens_generated += 1
        if r.generated == 1:
            r.first_token = now
        if r.generated == r.output_tokens:
            r.finish = now
            r.served += 1
            self.done += 1
            self.used -= _footprint(r)
            self.running.remove(r)

    def _result(self) -> SimResult:
        reqs = self.reqs
        return SimResult(
            arrival=np.array([r.arrival for r in reqs]), first_token=np.array([r.first_token for r in reqs]),
            finish=np.array([r.finish for r in reqs]), output_tokens=np.array([r.output_tokens for r in reqs]),
            served=np.array([r.served for r in reqs]), tokens_generated=self.tokens_generated,
            preemptions=self.preemptions, evictions=self.evictions, recomputes=self.recomputes,
            recomputed_tokens=self.recomputed_tokens, iterations=self.iterations, steps=self.steps,
            slot_seconds=self.slot_seconds, max_running=self.engine.max_running)


def summarize(result: SimResult) -> dict:
    latency = result.finish - result.arrival
    ttft = result.first_token - result.arrival
    span = float(result.finish.max() - result.arrival.min())
    return {
        "mean_latency_s": float(latency.mean()),
        "median_latency_s": float(np.median(latency)),
        "p99_latency_s": float(np.percentile(latency, 99)),
        "max_latency_s": float(latency.max()),
        "mean_ttft_s": float(ttft.mean()),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "throughput_rps": len(latency) / span,
        "throughput_tokens_per_s": float(result.output_tokens.sum()) / span,
        "preemptions": result.preemptions,
        "recomputes": result.recomputes,
        "evictions": result.evictions,
        "recomputed_tokens": result.recomputed_tokens,
        "slot_utilisation": result.slot_seconds / (result.max_running * span),  # mean running / max_running
        "iterations": result.iterations,
    }


def completion_rate(finish) -> float:
    """Requests/s of a queue served from time 0 (`finish`: completion times) between the 10th and 90th percentile
    completion, without ramp and drain: load 1 of the simulator and of `benchmarks/vllm_serve_client.py`."""
    finish = np.sort(np.asarray(finish, dtype=float))
    lo, hi = int(0.1 * len(finish)), int(0.9 * len(finish)) - 1
    if hi - lo < 5 or finish[hi] <= finish[lo]:
        return len(finish) / float(finish[-1])
    return (hi - lo) / float(finish[hi] - finish[lo])


def saturated_throughput(workload: Workload, engine: Engine, cost: CostModel) -> float:
    """Requests/s FCFS sustains when all requests wait from the start: its simulated burst's `completion_rate`."""
    result = simulate(workload.with_arrivals(np.zeros(len(workload))), make_policy("fcfs"), engine, cost)
    return completion_rate(result.finish)
