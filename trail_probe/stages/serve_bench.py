"""TRAIL in a real engine under load (`trail-probe serve-bench`).

    trail-probe serve-bench recipes/smollm2_alpaca.yaml
    trail-probe serve-bench recipes/smollm2_alpaca.yaml --policy trail serve.rate=0.6
    trail-probe serve-bench recipes/smollm2_alpaca.yaml serve.num_requests=20 serve.rate=2   # a quick look

Held-out prompts of the run (the same 75/25 split as train and eval) arrive as a Poisson process
in real time: a client thread hands each to Hugging Face transformers' continuous-batching engine
at its arrival time. Every policy of `serve.policies` replays the same prompts at the same arrival
times, greedy: `fifo` is the engine's own FIFO scheduler, `trail` is `hf_engine.TrailScheduler`
(BERT's initial estimate, the probe's refinement every k steps, limited preemption), `trail_bert`
and `sjf_bert` the ablations. Per request: arrival, first-token and finish times and the tokens.

Outputs in `cfg.paths.serve` (serve.out_dir, default `<checkpoint_dir>/serve/`); the measurements and
the report are `trail_probe.offline.serve_report`'s:
- `<policy>.json` per policy: settings, every request, every engine step, the summary. Written as
  soon as that policy's run ends, so an interrupted bench resumes with the policies not yet run
  (a file whose settings differ is run again).
- `summary.json`, `report.md`, `serve_bench.png` (latency and TTFT distributions).

Also reported:
- busy: the share of the time from the first arrival to the last finish during which the engine
  had a forward pass to run (its step log), the load measure of the targets;
- same outputs: the share of requests whose tokens equal FIFO's (greedy decoding: scheduling may
  change when a token is produced, not which). Floating-point sums depend on how a batch is packed,
  so a near-tie can flip and the texts diverge from there: each mismatch is listed with the index
  of the first differing token;
- the simulator's prediction: `trail_probe.serving.simulator` replays the same arrivals, the measured
  output lengths, BERT's initial estimates and the probe's refinements (as recorded by the TRAIL run)
  with a cost model fitted to this engine's own step log, and the measured means are compared to it;
- the probe's overhead per decode step: time in refinement and initial estimates inside
  `schedule_batch`, against the mean step.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from trail_probe.atomic import atomic_write_json
from trail_probe.choices import EnginePolicy, VLLMPolicy, check_choice, options
from trail_probe.config import RecipeConfig, config_to_dict, save_config
from trail_probe.errors import UserError
from trail_probe.offline.serve_report import compare_runs, summarize_run
from trail_probe.progress import progress_bar
from trail_probe.serving.policies import base_name

HELP = "Replay held-out prompts into transformers' continuous-batching engine under FIFO and TRAIL; measure latency."


EXAMPLES = """examples:
  trail-probe serve-bench recipes/smollm2_alpaca.yaml
  trail-probe serve-bench recipes/smollm2_alpaca.yaml --policy trail
  trail-probe serve-bench recipes/smollm2_alpaca.yaml serve.rate=0.6 serve.num_requests=300
  trail-probe serve-bench recipes/smollm2_alpaca.yaml --overwrite"""


def add_arguments(parser) -> None:
    parser.add_argument("--policy", help="run only this policy (fifo, trail, trail_bert, sjf_bert)")
    parser.add_argument("--overwrite", action="store_true", help="run every policy again even if its results exist")


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
def held_out_prompts(cfg: RecipeConfig) -> list:
    """The run's held-out prompts, in source order: split.json's val ids when it exists, else the
    same hash split recomputed from the prompt ids (it depends only on ids and split_seed)."""
    from trail_probe.offline.prompts import load_prompts
    from trail_probe.offline.split import make_split

    prompts, _ = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.skip_bad_rows)
    path = cfg.paths.split
    if path.is_file():
        val = set(json.loads(path.read_text()).get("val_ids") or [])
    else:
        val = set(make_split([p.id for p in prompts], cfg.train.train_fraction, cfg.train.split_seed)[1])
    held = [p for p in prompts if p.id in val]
    if not held:
        raise UserError(f"none of the prompts in '{cfg.prompts.source}' is held out by '{path}'; point prompts.source at the run's prompts")
    return held


def workload(cfg: RecipeConfig, tokenizer) -> tuple[list[tuple[str, list[int], str]], np.ndarray]:
    from trail_probe.runtime.models import encode_prompt
    from trail_probe.serving.simulator import poisson_arrivals

    sc = cfg.serve
    held = held_out_prompts(cfg)
    if sc.num_requests < 1:
        raise UserError(f"serve.num_requests = {sc.num_requests} must be >= 1")
    if sc.num_requests > len(held) and not sc.repeat_prompts:
        raise UserError(f"serve.num_requests = {sc.num_requests} but the run holds out {len(held)} prompts; ask for at most "
                        f"{len(held)}, or set serve.repeat_prompts=true to send each held-out prompt more than once")
    rng = np.random.default_rng(sc.seed)
    order = np.concatenate([rng.permutation(len(held)) for _ in range(-(-sc.num_requests // len(held)))])
    requests = []
    for n, i in enumerate(order[: sc.num_requests]):
        p, again = held[i], n // len(held)  # the first pass keeps the prompt ids (and today's workloads)
        requests.append((p.id if again == 0 else f"{p.id}#{again}", encode_prompt(tokenizer, p.text), p.text))
    return requests, poisson_arrivals(len(requests), sc.rate, sc.seed)


def _check(cfg: RecipeConfig, only: str | None) -> list[str]:
    sc = cfg.serve
    if sc.engine == "vllm":
        from trail_probe.serving.vllm_engine import check_vllm

        check_vllm()
        allowed = VLLMPolicy
    else:
        from trail_probe.serving.hf_scheduler import check_transformers

        check_transformers()
        allowed = EnginePolicy
    policies = [only] if only else list(sc.policies)
    if not policies:
        raise UserError("serve.policies is empty; name at least one of " + ", ".join(options(allowed)))
    for p in policies:
        check_choice(base_name(p), allowed, f"serve policy for engine {sc.engine} (serve.policies or --policy)")
        if base_name(p) in ("fifo", "priority") and p != base_name(p):
            raise UserError(f"serve policy '{p}': @C and ~A (aging) settings apply to TRAIL's policies, not to {base_name(p)}")
    if any(base_name(p) == "oracle" for p in policies) and "fifo" not in sc.policies:
        raise UserError("the oracle policy takes each request's exact length from the fifo run; add fifo to serve.policies")
    if not (isinstance(sc.rate, (int, float)) and math.isfinite(sc.rate) and sc.rate > 0):
        raise UserError(f"serve.rate = {sc.rate!r} must be a positive number of requests per second")
    for name in ("max_batch", "max_batch_tokens", "page_size", "num_blocks", "threads"):
        if getattr(sc, name) < 1:
            raise UserError(f"serve.{name} = {getattr(sc, name)} must be >= 1")
    if sc.max_batch_tokens < sc.max_batch:
        raise UserError(f"serve.max_batch_tokens = {sc.max_batch_tokens} must be >= serve.max_batch = {sc.max_batch}")
    return policies


def uses_bert(cfg: RecipeConfig) -> bool:
    """Whether TRAIL's runs take BERT's estimate: the first distribution (initial=bert), or the initial
    number of TRAIL's release (initial=last_token, when a baseline is trained)."""
    return cfg.serve.initial == "bert" or (cfg.serve.initial == "last_token" and cfg.paths.serve_bert.is_dir())


def settings_for(cfg: RecipeConfig, policy: str):
    """The recipe's TRAIL settings for one policy of a benchmark: estimates kept for the report; the
    client (this replay) may hand over BERT's distribution and, for the oracle, exact lengths."""
    from trail_probe.offline.serving_setup import trail_settings

    return trail_settings(cfg, policy=policy, record=True, client_estimates=True)


def make_runtime(cfg: RecipeConfig, policy: str):
    from trail_probe.serving.trail_state import build_state

    predictor_dir = cfg.paths.serve_predictor
    if base_name(policy) != "oracle" and not predictor_dir.is_dir():
        raise UserError(f"no predictor at '{predictor_dir}'; run 'trail-probe export RECIPE' or set serve.predictor")
    if cfg.serve.initial == "bert" and not cfg.paths.serve_bert.is_dir():
        raise UserError(f"no BERT predictor at '{cfg.paths.serve_bert}'; run 'trail-probe train-baseline RECIPE', set serve.bert, "
                        "or use serve.initial=prompt_probe")
    runtime = build_state(settings_for(cfg, policy), max_new_tokens=cfg.generation.max_new_tokens)
    if runtime.initial == "last_token" and uses_bert(cfg) and runtime.text_predictor is None:
        from trail_probe.runtime import BertLengthPredictor

        runtime.text_predictor = BertLengthPredictor.from_pretrained(cfg.paths.serve_bert, device="cpu")
    return runtime, None if base_name(policy) == "oracle" else predictor_dir


def _records(requests, arrivals, by_id: dict, t0: float, estimates: dict | None, trace: dict | None) -> list[dict]:
    """One record per request, times relative to the start of the replay, the same for both engines."""
    records = []
    for (rid, ids, _), at in zip(requests, arrivals):
        r = by_id[rid]
        rec = {"id": rid, "planned_arrival": float(at), "arrival": r.arrival - t0, "first_token": r.first_token - t0,
               "finish": r.finish - t0, "prompt_tokens": len(ids), "output_tokens": len(r.tokens), "tokens": r.tokens}
        if estimates is not None:
            rec["initial_estimate"] = estimates.get(rid)
            rec["refined"] = trace.get(rid, [])
        records.append(rec)
    return records


def run_policy(cfg: RecipeConfig, policy: str, model, tokenizer, requests, arrivals, settings: dict,
               runtime=None, predictor_dir: Path | None = None, exact_lengths: list[int] | None = None) -> dict:
    """Serve the workload under `policy`; every policy but fifo needs its `make_runtime` result, the
    oracle its requests' exact lengths."""
    if cfg.serve.engine == "vllm":
        return run_policy_vllm(cfg, policy, requests, arrivals, settings, predictor_dir, exact_lengths)
    from trail_probe.runtime.models import eos_token_ids
    from trail_probe.serving.hf_engine import ServeEngine, serve

    sc = cfg.serve
    engine = ServeEngine(model, policy, runtime=runtime, max_batch=sc.max_batch,
                         max_new_tokens=cfg.generation.max_new_tokens, eos_token_id=sorted(eos_token_ids(model, tokenizer)),
                         page_size=sc.page_size, num_blocks=sc.num_blocks, max_batch_tokens=sc.max_batch_tokens)
    bar = progress_bar(cfg.progress, total=len(requests), desc=f"serve-bench {policy}", unit="req")
    start = time.time()
    try:
        with engine:
            engine.warmup(requests[0][1])
            results, t0 = serve(engine, requests, arrivals, progress=bar)
            steps = [asdict(s) for s in engine.scheduler.steps]
    finally:
        bar.close()
    records = _records(requests, arrivals, {r.request_id: r for r in results}, t0,
                       None if runtime is None else runtime.initial_estimates, None if runtime is None else runtime.trace)
    for s in steps:
        s["start"] -= t0
        s["end"] -= t0
    out = {"policy": policy, "settings": settings, "wall_clock_s": time.time() - start,
           "summary": summarize_run(records, steps), "requests": records, "steps": steps}
    if runtime is not None:
        out["trail"] = {"predictor": str(predictor_dir), "preemptions": runtime.preemptions,
                        "refinements": runtime.refinements, "paused_past_limit": runtime.paused_past_limit,
                        "policy": runtime.policy.name, "preemption_c": runtime.policy.preemption_c}
    return out


def run_policy_vllm(cfg: RecipeConfig, policy: str, requests, arrivals, settings: dict,
                    predictor_dir: Path | None, exact_lengths: list[int] | None = None) -> dict:
    """The same workload in vLLM (`trail_probe.serving.vllm_engine`): vLLM's FCFS, its priority policy
    fed BERT's estimate, or TRAIL's scheduler; the scheduler's step log comes back over vLLM's utility channel."""
    from trail_probe.runtime import BertLengthPredictor
    from trail_probe.model_files import plain_hf_folder
    from trail_probe.serving.vllm_engine import VLLMEngine

    sc = cfg.serve
    name = base_name(policy)
    trail = name not in ("fifo", "priority")
    priorities = probs = None
    bert_s = 0.0
    if policy == "priority" or (trail and uses_bert(cfg) and name != "oracle"):
        # BERT before the engine, as an API server would run it: vLLM's priority (smaller runs first)
        # is its estimate; TRAIL gets its distribution
        bert = BertLengthPredictor.from_pretrained(cfg.paths.serve_bert, device="cpu")
        t_bert = time.perf_counter()
        probs = bert.probs([text for _, _, text in requests])
        bert_s = (time.perf_counter() - t_bert) / len(requests)
        if policy == "priority":
            priorities = [int(round(e)) for e in bert.bins.expectation(probs).tolist()]
            probs = None
        else:
            probs = probs.tolist()
    engine_settings = settings_for(cfg, policy) if trail else None
    kwargs = {"max_num_seqs": sc.max_batch, "max_num_batched_tokens": sc.max_batch_tokens, "dtype": sc.vllm_dtype,
              "kv_cache_memory_bytes": int(sc.vllm_kv_cache_gb * (1 << 30)), "seed": sc.seed}
    bar = progress_bar(cfg.progress, total=len(requests), desc=f"serve-bench vllm {policy}", unit="req")
    start = time.time()
    try:
        with VLLMEngine(plain_hf_folder(cfg.model), policy, engine_settings, **kwargs) as engine:
            engine.replay(requests[:2], [0.0, 0.0], max_new_tokens=8,  # warm-up, left out of the log below
                          exact_lengths=None if exact_lengths is None else exact_lengths[:2],
                          initial_probs=None if probs is None else probs[:2])
            results, t0 = engine.replay(requests, arrivals, cfg.generation.max_new_tokens, priorities, progress=bar,
                                        exact_lengths=exact_lengths, initial_probs=probs)
            log = engine.scheduler_log()
    finally:
        bar.close()
    steps = [{**s, "start": s["start"] - t0, "end": s["end"] - t0} for s in log["steps"]
             if s["end"] is not None and s["start"] >= t0]
    records = _records(requests, arrivals, {r.request_id: r for r in results}, t0,
                       log.get("initial_estimates") if trail else None, log.get("trace") if trail else None)
    out = {"policy": policy, "settings": settings, "wall_clock_s": time.time() - start,
           "summary": {**summarize_run(records, steps), "bert_before_engine_s_per_request": bert_s},
           "requests": records, "steps": steps}
    if trail:
        out["trail"] = {"predictor": None if predictor_dir is None else str(predictor_dir), **log["trail"],
                        "live": log.get("live")}
    return out


def _settings(cfg: RecipeConfig, requests, arrivals) -> dict:
    sc = cfg.serve
    digest = hashlib.sha256(json.dumps([[r[0], r[1]] for r in requests] + [list(map(float, arrivals))]).encode()).hexdigest()
    keep = {k: v for k, v in config_to_dict(sc).items() if k not in ("policies", "out_dir", "threads")}
    return {"serve": keep, "refine": config_to_dict(cfg.refine), "model": cfg.model.name_or_path,
            "max_new_tokens": cfg.generation.max_new_tokens, "workload_sha256": digest}


TRAIL_ONLY = ("initial", "predictor", "prompt_predictor", "bert")  # serve keys; the refine section too
ADDED_REFINE = {"aging": 0.0, "cadence": "per_request"}  # refine keys added since runs were recorded: their defaults


def _relevant(settings: dict | None, policy: str) -> dict | None:
    """The settings a policy's results depend on: FIFO's do not change with the TRAIL-only keys."""
    if isinstance(settings, dict) and isinstance(settings.get("refine"), dict):  # runs from before these keys
        settings = {**settings, "refine": {**ADDED_REFINE, **settings["refine"]}}
    if not isinstance(settings, dict) or policy != "fifo":
        return settings
    kept = {k: v for k, v in settings.items() if k != "refine"}
    return {**kept, "serve": {k: v for k, v in settings.get("serve", {}).items() if k not in TRAIL_ONLY}}


def run_serve_bench(cfg: RecipeConfig, only: str | None = None, overwrite: bool = False, verbose: bool = True) -> dict:
    import torch

    from trail_probe.runtime.models import load_causal_lm

    say = print if verbose else (lambda *a, **k: None)
    policies = _check(cfg, only)
    sc = cfg.serve
    out = cfg.paths.serve
    out.mkdir(parents=True, exist_ok=True)
    # Predictors load now, so a missing one fails before an hour of FIFO, and only once.
    runtimes = {p: make_runtime(cfg, p) for p in policies if p not in ("fifo", "priority")}
    if "priority" in policies and not cfg.paths.serve_bert.is_dir():
        raise UserError(f"policy 'priority' ranks by BERT's estimate, but there is no BERT predictor at '{cfg.paths.serve_bert}'; "
                        "run 'trail-probe train-baseline RECIPE' or set serve.bert")
    torch.set_num_threads(sc.threads)
    model, tokenizer = load_causal_lm(cfg.model)
    requests, arrivals = workload(cfg, tokenizer)
    settings = _settings(cfg, requests, arrivals)
    save_config(cfg, out)
    say(f"# {len(requests)} held-out prompts, Poisson {sc.rate} req/s over {arrivals[-1]:.0f} s, batch {sc.max_batch}, "
        f"{cfg.generation.max_new_tokens} tokens max; results in {out}")
    runs = {}
    order = sorted(dict.fromkeys(list(sc.policies) + policies), key=lambda p: p != "fifo")  # fifo first: the oracle's lengths
    for policy in order:  # every configured run is reported, only the asked-for ones run
        path = out / f"{policy}.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        same = old is not None and _relevant(old.get("settings"), policy) == _relevant(settings, policy)
        if same and not (overwrite and policy in policies):
            say(f"# {policy}: kept {path} (same settings; --overwrite runs it again)")
            old["summary"] = {**summarize_run(old["requests"], old["steps"]),  # derived, so always current
                              **{k: v for k, v in old["summary"].items() if k == "bert_before_engine_s_per_request"}}
            runs[policy] = old
            continue
        if policy not in policies:
            continue
        if old is not None and not same:
            say(f"# {policy}: {path} was run with other settings; running again")
        exact = None
        if base_name(policy) == "oracle":
            if "fifo" not in runs:
                raise UserError(f"the oracle policy takes its lengths from the fifo run, and there is none in {out}; run fifo first")
            lengths = {r["id"]: r["output_tokens"] for r in runs["fifo"]["requests"]}
            exact = [lengths[rid] for rid, _, _ in requests]
        runs[policy] = run_policy(cfg, policy, model, tokenizer, requests, arrivals, settings,
                                  *runtimes.get(policy, (None, None)), exact_lengths=exact)
        atomic_write_json(path, runs[policy])
        s = runs[policy]["summary"]
        say(f"# {policy}: mean latency {s['latency_s']['mean']:.2f} s, mean TTFT {s['ttft_s']['mean']:.2f} s, "
            f"busy {s['busy_fraction']:.2f}, {runs[policy]['wall_clock_s']:.0f} s")
    report, lines = compare_runs(cfg, runs, settings, len(requests))
    say("\n" + "\n".join(lines[4:-4]))
    say(f"# wrote {out / 'summary.json'}, {out / 'report.md'}, serve_bench.png")
    return report


def run(cfg: RecipeConfig, args) -> None:
    run_serve_bench(cfg, getattr(args, "policy", None), getattr(args, "overwrite", False))
