"""What the probe buys a server: simulate continuous batching under each policy (`trail-probe simulate`).

    trail-probe simulate recipes/smollm2_alpaca.yaml
    trail-probe simulate recipes/smollm2_alpaca.yaml simulate.cost_preset=llama3_8b_a100
    trail-probe simulate recipes/smollm2_alpaca.yaml simulate.loads=[0.8,0.9] simulate.policies=[fcfs,trail,oracle]

Requests replay the held-out split of a real run: prompt lengths, true output lengths, BERT's
estimate and the probe's refined estimates come from `<checkpoint_dir>/eval/predictions.json`
(written by `trail-probe eval`), so the prediction errors are the real ones. Requests arrive as a
Poisson process at each rate (or, by default, at rates that put FCFS at `simulate.loads` of its
saturated throughput) and all at once ("burst", the paper's Figure 8).

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
- the time of one iteration is a linear cost model (`CostModel`):
      t = a + b * tokens + c * decode_context + d * prefill_pairs
  tokens: tokens processed (decode + prefill); decode_context: KV entries the decode tokens attend
  to (memory-bound: each is read once); prefill_pairs: (query, key) pairs of prefill attention
  (compute-bound). Presets: `llama3_8b_a100` (derived below from published figures) and
  `measured_cpu` (fitted from SmolLM2 timings by benchmarks/fit_cost_model.py).

Estimates: `trail` ranks a request by BERT's estimate until its first token (nothing else exists
before the prefill), then by the refined probe estimate of the latest refinement (j = 1, 1+k, ...),
counted down by one per generated token in between; `trail_bert` counts BERT's estimate down;
`oracle` knows the remaining length. An estimate a request outlives stays at 1 token. The
limited-preemption threshold uses the initial (BERT) estimate, as the public TRAIL runtime does.
An answer of 0 tokens (immediate EOS) is simulated as 1: the step that produces EOS still runs.

Load: `simulate.loads` are fractions of FCFS's saturated throughput, measured by simulating FCFS
with every request queued at time 0 (completions per second between the 10th and 90th percentile
completion). Requests wait in the queue only once all `max_running` slots are taken, so the
policies differ only where slots run full; each point reports `slot_utilisation` (mean running /
max_running) to show how often that is.

Speed: between two events (an arrival that could change the running set, a completion, a refinement
of a preemptible request while others wait, a KV overflow) all running requests just decode, so the
simulator advances such stretches as one block in closed form.

Python API: `load_predictions`, `sample_workload`, `simulate(workload, policy, engine, cost)`,
`summarize`, `fit_cost_model`, `run_simulate(cfg)`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trail_probe.config import RecipeConfig, atomic_write_json, config_to_dict, save_config
from trail_probe.errors import UserError
from trail_probe.cost_model import CostModel, load_cost_model
from trail_probe.policies import Policy, RequestQueue, make_policy, schedule

HELP = "Simulate a continuous-batching server: FCFS vs SJF vs TRAIL (SPRPT with limited preemption) vs oracle."
EXAMPLES = """examples:
  trail-probe simulate recipes/smollm2_alpaca.yaml
  trail-probe simulate recipes/smollm2_alpaca.yaml simulate.cost_preset=llama3_8b_a100
  trail-probe simulate recipes/smollm2_alpaca.yaml simulate.rates=[2,4,6] simulate.burst=false
  trail-probe simulate recipes/smollm2_alpaca.yaml simulate.policies=[fcfs,trail,trail@1.0,oracle]
  trail-probe simulate recipes/smollm2_alpaca.yaml simulate.predictions=other/eval/predictions.json
Reads <checkpoint_dir>/eval/predictions.json (run 'trail-probe eval' first); writes
<checkpoint_dir>/simulate/results.json, latency_vs_rate.png and ttft_vs_rate.png."""

ESTIMATE_FLOOR = 1.0  # tokens: a request that outlives its estimate still has a little left
WATERMARK = 0.01  # fraction of the KV cache kept free when admitting (vLLM's default)
ABLATION = [  # (policy, what it adds), the paper's ablation order
    ("fcfs", "baseline"),
    ("sjf_bert", "ordering (SJF on BERT)"),
    ("trail_bert", "+ limited preemption (BERT, counted down)"),
    ("trail", "+ refinement (probe)"),
    ("oracle", "exact lengths (TRAIL+)"),
]


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


REQUIRED_FIELDS = ("id", "prompt_tokens", "output_tokens", "bert_estimate", "refined")


def load_predictions(path: str | Path, refine_interval: int | None = None) -> tuple[Workload, dict]:
    """(all held-out requests with arrival 0, the file's metadata) from an eval predictions.json.
    Only refinements every `refine_interval` tokens are kept (a multiple of the file's interval)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file '{path}' not found; run 'trail-probe eval RECIPE' first or set simulate.predictions")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"predictions file '{path}' is not valid JSON ({str(e)[:80]}); re-run 'trail-probe eval'") from None
    requests = data.get("requests") if isinstance(data, dict) else None
    if not isinstance(requests, list) or not requests:
        raise UserError(f"predictions file '{path}' has no 'requests' list; re-run 'trail-probe eval' to write it")
    try:
        file_k = int(data.get("refine_interval") or 1)
    except (TypeError, ValueError):
        raise UserError(f"predictions file '{path}' has a non-integer refine_interval; re-run 'trail-probe eval'") from None
    k = refine_interval or file_k
    if k < 1 or k % file_k:
        raise UserError(f"simulate.refine_interval = {k} is not a multiple of the {file_k}-token interval '{path}' "
                        f"was refined at; use a multiple of {file_k}, or 0 for the file's own")
    prompt, output, bert, refined, ids = [], [], [], [], []
    for i, r in enumerate(requests):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(r, dict) or f not in r]
        if missing:
            raise UserError(f"request #{i} in '{path}' lacks '{missing[0]}'; the file does not match what "
                            "the simulator replays, re-run 'trail-probe eval'")
        where = f"request #{i} (id {r['id']!r}) in '{path}'"
        try:
            p, o = int(r["prompt_tokens"]), int(r["output_tokens"])
            b = math.nan if r["bert_estimate"] is None else float(r["bert_estimate"])  # None: no baseline trained
            points = [(int(j), float(e)) for j, e in r["refined"]]
        except (TypeError, ValueError):
            raise UserError(f"{where} has a non-numeric length or estimate; re-run 'trail-probe eval'") from None
        if p < 0 or o < 0 or math.isinf(b) or any(j < 1 or not math.isfinite(e) for j, e in points):
            raise UserError(f"{where} has a negative length, a refinement before the first token or an "
                            "infinite estimate; re-run 'trail-probe eval'")
        if [j for j, _ in points] != sorted({j for j, _ in points}):
            raise UserError(f"{where} has refinements out of order; re-run 'trail-probe eval'")
        points = [(j, e) for j, e in points if (j - points[0][0]) % k == 0]  # every k tokens from the first
        prompt.append(max(p, 1))
        output.append(max(o, 1))  # an immediate EOS still costs the step that produces it
        bert.append(b)
        refined.append(([j for j, _ in points], [e for _, e in points]))
        ids.append(r["id"])
    meta = {key: data.get(key) for key in ("bins", "refine_interval", "max_new_tokens", "layer")}
    meta.update(path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), requests=len(requests),
                simulated_refine_interval=k)
    n = len(output)
    return Workload(np.zeros(n), np.array(prompt), np.array(output), np.array(bert, dtype=float), refined, ids), meta


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
        if self.paused_cache not in ("discard", "keep"):
            raise UserError(f"simulate.paused_cache = '{self.paused_cache}' must be 'keep' or 'discard'")
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
        return lambda r: max(r.bert - r.generated, ESTIMATE_FLOOR)
    if predictor == "refined":
        def refined(r):
            g = r.generated
            i = bisect_right(r.ref_j, g) - 1
            if g == 0 or i < 0:  # before the first decode state only BERT has an estimate (TRAIL)
                return max(r.bert - g, ESTIMATE_FLOOR)
            return max(r.ref_est[i] - (g - r.ref_j[i]), ESTIMATE_FLOOR)  # counted down between refinements
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
    estimate = _estimator(policy.predictor)
    ranks_by_remaining = policy.order == "remaining"
    refinement_events = policy.predictor == "refined" and policy.preemption_c > 0
    a, b, c, d = cost.fixed_s, cost.per_token_s, cost.per_context_token_s, cost.per_prefill_pair_s
    max_running, budget, capacity = engine.max_running, engine.token_budget, engine.kv_capacity_tokens
    usable, keep_paused = engine.usable_tokens, engine.paused_cache == "keep"

    order = np.argsort(workload.arrival, kind="stable")
    reqs = []
    for rid in range(len(workload)):
        ref_j, ref_est = workload.refined[rid]
        r = _Req(rid, float(workload.arrival[rid]), int(workload.prompt_tokens[rid]), int(workload.output_tokens[rid]),
                 float(workload.bert_estimate[rid]), ref_j, ref_est)
        r.initial_estimate = float(r.output_tokens) if policy.predictor == "exact" else r.bert
        r.remaining_estimate = estimate(r)
        reqs.append(r)
    arrivals = [reqs[i] for i in order]
    n_total, next_arrival = len(reqs), 0
    waiting = RequestQueue(policy)
    running: list[_Req] = []
    paused: dict[int, _Req] = {}  # keep mode: waiting requests whose cache is still held
    used = paused_kv = 0  # KV tokens held by running requests (prompt + generated) and by paused ones
    t = slot_seconds = 0.0
    done = tokens_generated = preemptions = evictions = recomputes = recomputed_tokens = iterations = steps = 0
    key = policy.key

    def drop_cache(r: _Req) -> None:
        nonlocal recomputes, recomputed_tokens
        if r.kv:
            recomputes += 1
            recomputed_tokens += r.kv
            r.kv = 0

    def drop_worst_paused() -> None:
        nonlocal paused_kv
        victim = max(paused.values(), key=key)
        del paused[victim.rid]
        paused_kv -= victim.kv
        drop_cache(victim)

    def produced(r: _Req, now: float) -> None:
        """Request r has just produced its next token at time `now`."""
        nonlocal done, used, tokens_generated
        r.generated += 1
        used += 1
        tokens_generated += 1
        if r.generated == 1:
            r.first_token = now
        if r.generated == r.output_tokens:
            r.finish = now
            r.served += 1
            done += 1
            used -= r.prompt_tokens + r.generated
            running.remove(r)

    while done < n_total:
        steps += 1
        while next_arrival < n_total and arrivals[next_arrival].arrival <= t:
            waiting.push(arrivals[next_arrival])
            next_arrival += 1
        if not running and not waiting:
            t = arrivals[next_arrival].arrival
            continue

        # KV overflow: paused caches go first, then the lowest-ranked running request is evicted.
        while used + paused_kv > capacity:
            if paused:
                drop_worst_paused()
                continue
            if ranks_by_remaining:
                for r in running:
                    r.remaining_estimate = estimate(r)
            victim = max(running, key=key)
            running.remove(victim)
            used -= victim.prompt_tokens + victim.generated
            drop_cache(victim)
            waiting.push(victim)
            evictions += 1

        if waiting:
            if ranks_by_remaining:
                for r in running:
                    r.remaining_estimate = estimate(r)
            started, preempted = schedule(policy, waiting, running, max_running, usable - used,
                                          lambda r: r.prompt_tokens + r.generated)
            for r in started:
                used += r.prompt_tokens + r.generated
                if r.rid in paused:
                    del paused[r.rid]
                    paused_kv -= r.kv
            for r in preempted:
                used -= r.prompt_tokens + r.generated
                preemptions += 1
                if keep_paused and r.kv:
                    paused[r.rid] = r
                    paused_kv += r.kv
                else:
                    drop_cache(r)
            while used + paused_kv > capacity:  # the admitted requests need the paused caches' room
                drop_worst_paused()

        # Compose the iteration: every prefilled request decodes one token, prefill chunks take the rest.
        decoders, prefills = [], []
        for r in running:
            (decoders if r.prompt_tokens + r.generated - r.kv == 1 else prefills).append(r)
        nd = len(decoders)
        context = 0
        for r in decoders:
            context += r.prompt_tokens + r.generated

        if prefills:
            prefills.sort(key=key)
            left, tokens, pairs, chunks = budget - nd, nd, 0, []
            for r in prefills:
                if left == 0:
                    break
                q = min(r.prompt_tokens + r.generated - r.kv, left)
                chunks.append((r, q))
                pairs += q * r.kv + q * (q + 1) // 2
                tokens += q
                left -= q
            dt = a + b * tokens + c * context + d * pairs
            t += dt
            slot_seconds += dt * len(running)
            iterations += 1
            for r in decoders:
                r.kv += 1
                produced(r, t)
            for r, q in chunks:
                r.kv += q
                if r.kv == r.prompt_tokens + r.generated:
                    produced(r, t)
            continue

        # Only decodes: advance n identical-shape iterations at once, up to the next event.
        n = min(r.output_tokens - r.generated for r in decoders)
        n = min(n, (capacity - used - paused_kv) // nd + 1)
        if refinement_events and waiting:
            for r in decoders:
                if policy.can_preempt(r):
                    i = bisect_right(r.ref_j, r.generated)
                    if i < len(r.ref_j):
                        n = min(n, r.ref_j[i] - r.generated)
        if max_block_steps:
            n = min(n, max_block_steps)
        per_step, growth = a + b * nd + c * context, c * nd
        if next_arrival < n_total and (len(running) < max_running
                                       or (policy.preemption_c > 0 and any(policy.can_preempt(r) for r in running))):
            n = min(n, _block_length(arrivals[next_arrival].arrival - t, per_step, growth))
        t_first = t + per_step
        dt = n * per_step + growth * n * (n - 1) / 2
        t += dt
        slot_seconds += dt * nd
        iterations += n
        for r in decoders:
            if r.generated == 0:
                r.first_token = t_first
            r.kv += n
            r.generated += n - 1  # the last step's token goes through produced()
            used += n - 1
            tokens_generated += n - 1
            produced(r, t)

    return SimResult(
        arrival=np.array([r.arrival for r in reqs]), first_token=np.array([r.first_token for r in reqs]),
        finish=np.array([r.finish for r in reqs]), output_tokens=np.array([r.output_tokens for r in reqs]),
        served=np.array([r.served for r in reqs]), tokens_generated=tokens_generated, preemptions=preemptions,
        evictions=evictions, recomputes=recomputes, recomputed_tokens=recomputed_tokens,
        iterations=iterations, steps=steps, slot_seconds=slot_seconds, max_running=max_running)


def summarize(result: SimResult) -> dict:
    latency = result.finish - result.arrival
    ttft = result.first_token - result.arrival
    span = float(result.finish.max() - result.arrival.min())
    return {
        "mean_latency_s": float(latency.mean()),
        "median_latency_s": float(np.median(latency)),
        "p99_latency_s": float(np.percentile(latency, 99)),
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


def saturated_throughput(workload: Workload, engine: Engine, cost: CostModel) -> float:
    """Requests/s FCFS sustains when all requests wait from the start (the load = 1 point): completions
    per second between the 10th and 90th percentile completion, leaving out the ramp and the drain."""
    result = simulate(workload.with_arrivals(np.zeros(len(workload))), make_policy("fcfs"), engine, cost)
    finish = np.sort(result.finish)
    lo, hi = int(0.1 * len(finish)), int(0.9 * len(finish)) - 1
    if hi - lo < 5 or finish[hi] <= finish[lo]:
        return len(finish) / float(finish[-1])
    return (hi - lo) / float(finish[hi] - finish[lo])


# --------------------------------------------------------------------------------------------
# The `trail-probe simulate` stage
# --------------------------------------------------------------------------------------------
def predictions_path(cfg: RecipeConfig) -> Path:
    if cfg.simulate.predictions:
        return Path(cfg.simulate.predictions)
    return Path(cfg.eval.out_dir or cfg.checkpoint_dir / "eval") / "predictions.json"


def _check_config(sc) -> list[Policy]:
    for name, values in (("rates", sc.rates), ("loads", sc.loads)):
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad:
            unit = "requests per second" if name == "rates" else "fractions of FCFS's saturated throughput, e.g. 0.85"
            raise UserError(f"simulate.{name} contains {bad[0]}; give positive numbers ({unit})")
    if not sc.rates and not sc.loads and not sc.burst:
        raise UserError("nothing to simulate: simulate.rates and simulate.loads are empty and simulate.burst is false")
    if not 0.0 <= sc.preemption_c <= 1.0:
        raise UserError(f"simulate.preemption_c = {sc.preemption_c} must be in [0, 1]: 0 never preempts, 1 is plain SPRPT")
    if not sc.policies:
        raise UserError("simulate.policies is empty; name at least one of fcfs, sjf_bert, trail_bert, trail, oracle")
    return [make_policy(p, sc.preemption_c) for p in sc.policies]


def _comparisons(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per arrival setting: the ablation ladder (fcfs -> sjf -> + preemption -> + refinement -> oracle)
    and TRAIL against FCFS and the oracle (the issue's targets)."""
    ablation, targets = [], []
    for setting in dict.fromkeys((r["mode"], r["rate"], r["load"]) for r in rows):
        at = {r["policy"]: r for r in rows if (r["mode"], r["rate"], r["load"]) == setting}
        mode, rate, load = setting
        base = at.get("fcfs")
        steps = []
        for name, ingredient in ABLATION:
            if name in at:
                m = at[name]
                steps.append({"policy": name, "ingredient": ingredient, "mean_latency_s": m["mean_latency_s"],
                              "mean_ttft_s": m["mean_ttft_s"],
                              "latency_speedup_vs_fcfs": base["mean_latency_s"] / m["mean_latency_s"] if base else None,
                              "ttft_speedup_vs_fcfs": base["mean_ttft_s"] / m["mean_ttft_s"] if base else None})
        ablation.append({"mode": mode, "rate": rate, "load": load, "steps": steps})
        if base and "trail" in at:
            trail = at["trail"]
            row = {"mode": mode, "rate": rate, "load": load,
                   "latency_speedup": base["mean_latency_s"] / trail["mean_latency_s"],
                   "ttft_speedup": base["mean_ttft_s"] / trail["mean_ttft_s"]}
            if "oracle" in at:
                row["trail_over_oracle_latency"] = trail["mean_latency_s"] / at["oracle"]["mean_latency_s"]
            row["in_target_band"] = load is not None and 0.8 <= load <= 0.9
            row["meets"] = {"latency_2x": row["latency_speedup"] >= 2.0, "ttft_1.76x": row["ttft_speedup"] >= 1.76,
                            "within_15pct_of_oracle": row.get("trail_over_oracle_latency", math.inf) <= 1.15}
            targets.append(row)
    return ablation, targets


def format_table(rows: list[dict]) -> str:
    head = (f"{'policy':<14}{'load':>6}{'rate/s':>9}{'mean lat':>10}{'p50 lat':>9}{'p99 lat':>9}"
            f"{'mean TTFT':>10}{'p99 TTFT':>10}{'req/s':>8}{'preempt':>9}{'recomp':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        load = "burst" if r["mode"] == "burst" else f"{r['load']:.2f}"
        rate = "inf" if r["mode"] == "burst" else f"{r['rate']:.3g}"
        lines.append(f"{r['policy']:<14}{load:>6}{rate:>9}{r['mean_latency_s']:>10.3g}{r['median_latency_s']:>9.3g}"
                     f"{r['p99_latency_s']:>9.3g}{r['mean_ttft_s']:>10.3g}{r['p99_ttft_s']:>10.3g}"
                     f"{r['throughput_rps']:>8.3g}{r['preemptions']:>9}{r['recomputes']:>8}")
    return "\n".join(lines)


def format_ablation(ablation: list[dict]) -> str:
    """Mean latency and mean TTFT speedups over FCFS, one row per arrival setting, one column per step."""
    names = [name for name, _ in ABLATION if any(s["policy"] == name for a in ablation for s in a["steps"])]
    head = f"{'load':>6}" + "".join(f"{name:>18}" for name in names)
    lines = ["speedup over FCFS in mean latency / mean TTFT "
             "(sjf_bert: ordering; trail_bert: + limited preemption; trail: + refinement; oracle: exact)", head]
    for a in ablation:
        steps = {s["policy"]: s for s in a["steps"]}
        cells = [f"{steps[n]['latency_speedup_vs_fcfs']:.2f}x / {steps[n]['ttft_speedup_vs_fcfs']:.2f}x"
                 if n in steps and steps[n]["latency_speedup_vs_fcfs"] else "-" for n in names]
        load = "burst" if a["mode"] == "burst" else f"{a['load']:.2f}"
        lines.append(f"{load:>6}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def _plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    poisson = [r for r in rows if r["mode"] == "poisson"]
    for metric, label, name in (("mean_latency_s", "mean latency (s)", "latency_vs_rate.png"),
                                ("mean_ttft_s", "mean time to first token (s)", "ttft_vs_rate.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in dict.fromkeys(r["policy"] for r in poisson):
            pts = sorted((r["rate"], r[metric]) for r in poisson if r["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def run_simulate(cfg: RecipeConfig, verbose: bool = True) -> dict:
    """Simulate every policy at every rate (and a burst); write results.json and plots."""
    sc = cfg.simulate
    policies = _check_config(sc)
    engine = Engine(sc.max_running, sc.token_budget, sc.kv_capacity_tokens, sc.paused_cache)
    engine.check()
    cost = load_cost_model(sc.cost_preset)
    pool, meta = load_predictions(predictions_path(cfg), sc.refine_interval)
    workload = sample_workload(pool, sc.num_requests, sc.seed)
    engine.check(workload)
    for policy in policies:
        check_estimates(workload, policy)
    say = print if verbose else (lambda *a, **k: None)
    say(f"# {len(workload)} requests from {len(pool)} held-out ({meta['path']}); cost model: {cost.source}")
    capacity = saturated_throughput(workload, engine, cost)
    say(f"# FCFS saturated throughput: {capacity:.4g} requests/s (load 1.0)")
    settings = [("poisson", r, r / capacity) for r in sc.rates] or [("poisson", load * capacity, load) for load in sc.loads]
    if sc.burst:
        settings.append(("burst", None, None))
    rows = []
    for mode, rate, load in settings:
        arrival = np.zeros(len(workload)) if mode == "burst" else poisson_arrivals(len(workload), rate, sc.seed)
        for policy in policies:
            start = time.perf_counter()
            result = simulate(workload.with_arrivals(arrival), policy, engine, cost)
            row = {"policy": policy.name, "preemption_c": policy.preemption_c, "mode": mode, "rate": rate, "load": load}
            row.update(summarize(result))
            rows.append(row)
            say(f"  {policy.name:<12} {mode:<8} load={'-' if load is None else f'{load:.2f}'} "
                f"mean latency {row['mean_latency_s']:.3g} s, mean TTFT {row['mean_ttft_s']:.3g} s "
                f"({time.perf_counter() - start:.1f} s to simulate)", flush=True)
    ablation, targets = _comparisons(rows)
    out_dir = Path(sc.out_dir or cfg.checkpoint_dir / "simulate")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "config": config_to_dict(sc),
        "predictions": meta,
        "workload": {"num_requests": len(workload), "mean_prompt_tokens": float(workload.prompt_tokens.mean()),
                     "mean_output_tokens": float(workload.output_tokens.mean()), "seed": sc.seed},
        "engine": asdict(engine),
        "cost_model": asdict(cost),
        "saturated_throughput_rps": capacity,
        "points": rows,
        "ablation": ablation,
        "targets": targets,
    }
    atomic_write_json(out_dir / "results.json", results)
    save_config(cfg, out_dir)
    plots = _plot(rows, out_dir)
    say("\n" + format_table(rows))
    say("\n" + format_ablation(ablation))
    for t in targets:
        where = "burst" if t["mode"] == "burst" else f"load {t['load']:.2f}"
        say(f"# {where}: TRAIL vs FCFS mean latency {t['latency_speedup']:.2f}x, mean TTFT {t['ttft_speedup']:.2f}x"
            + (f", TRAIL / oracle latency {t['trail_over_oracle_latency']:.2f}" if "trail_over_oracle_latency" in t else ""))
    say(f"# wrote {out_dir / 'results.json'}, {', '.join(p.name for p in plots)}")
    return results


def run(cfg: RecipeConfig, args) -> None:
    run_simulate(cfg)
