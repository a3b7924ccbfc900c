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

Outputs in `serve.out_dir` (default `<checkpoint_dir>/serve/`):
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
- the simulator's prediction: `trail_probe.simulate` replays the same arrivals, the measured
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

from trail_probe.config import RecipeConfig, atomic_write_json, atomic_write_text, config_to_dict, save_config
from trail_probe.errors import UserError

HELP = "Replay held-out prompts into transformers' continuous-batching engine under FIFO and TRAIL; measure latency."
EXAMPLES = """examples:
  trail-probe serve-bench recipes/smollm2_alpaca.yaml
  trail-probe serve-bench recipes/smollm2_alpaca.yaml --policy trail
  trail-probe serve-bench recipes/smollm2_alpaca.yaml serve.rate=0.6 serve.num_requests=300
  trail-probe serve-bench recipes/smollm2_alpaca.yaml --overwrite"""


def add_arguments(parser) -> None:
    parser.add_argument("--policy", help="run only this policy (fifo, trail, trail_bert, sjf_bert)")
    parser.add_argument("--overwrite", action="store_true", help="run every policy again even if its results exist")


def out_dir(cfg: RecipeConfig) -> Path:
    return Path(cfg.serve.out_dir or cfg.checkpoint_dir / "serve")


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
def held_out_prompts(cfg: RecipeConfig) -> list:
    """The run's held-out prompts, in source order: split.json's val ids when it exists, else the
    same hash split recomputed from the prompt ids (it depends only on ids and split_seed)."""
    from trail_probe.prompts import load_prompts
    from trail_probe.split import make_split, split_path

    prompts, _ = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.skip_bad_rows)
    path = split_path(cfg)
    if path.is_file():
        val = set(json.loads(path.read_text()).get("val_ids") or [])
    else:
        val = set(make_split([p.id for p in prompts], cfg.train.train_fraction, cfg.train.split_seed)[1])
    held = [p for p in prompts if p.id in val]
    if not held:
        raise UserError(f"none of the prompts in '{cfg.prompts.source}' is held out by '{path}'; point prompts.source at the run's prompts")
    return held


def workload(cfg: RecipeConfig, tokenizer) -> tuple[list[tuple[str, list[int], str]], np.ndarray]:
    from trail_probe.extract import encode_prompt
    from trail_probe.simulate import poisson_arrivals

    sc = cfg.serve
    held = held_out_prompts(cfg)
    if sc.num_requests < 1:
        raise UserError(f"serve.num_requests = {sc.num_requests} must be >= 1")
    if sc.num_requests > len(held):
        raise UserError(f"serve.num_requests = {sc.num_requests} but the run holds out {len(held)} prompts; ask for at most {len(held)}")
    rng = np.random.default_rng(sc.seed)
    chosen = [held[i] for i in rng.permutation(len(held))[: sc.num_requests]]
    requests = [(p.id, encode_prompt(tokenizer, p.text), p.text) for p in chosen]
    return requests, poisson_arrivals(len(requests), sc.rate, sc.seed)


def _check(cfg: RecipeConfig, only: str | None) -> list[str]:
    from trail_probe.hf_engine import ENGINE_POLICIES, check_transformers

    check_transformers()
    sc = cfg.serve
    policies = [only] if only else list(sc.policies)
    bad = [p for p in policies if p not in ENGINE_POLICIES]
    if bad or not policies:
        raise UserError(f"serve policy '{bad[0] if bad else ''}' is not one of {', '.join(ENGINE_POLICIES)}; fix serve.policies or --policy")
    if not (isinstance(sc.rate, (int, float)) and math.isfinite(sc.rate) and sc.rate > 0):
        raise UserError(f"serve.rate = {sc.rate!r} must be a positive number of requests per second")
    for name in ("max_batch", "max_batch_tokens", "page_size", "num_blocks", "threads", "refine_interval"):
        if getattr(sc, name) < 1:
            raise UserError(f"serve.{name} = {getattr(sc, name)} must be >= 1")
    if sc.max_batch_tokens < sc.max_batch:
        raise UserError(f"serve.max_batch_tokens = {sc.max_batch_tokens} must be >= serve.max_batch = {sc.max_batch}")
    if sc.initial not in ("bert", "prompt_probe", "none"):
        raise UserError(f"serve.initial = '{sc.initial}' is not one of bert, prompt_probe, none")
    if sc.refine_likelihood not in ("posterior", "prior_corrected"):
        raise UserError(f"serve.refine_likelihood = '{sc.refine_likelihood}' is not one of posterior, prior_corrected")
    if not 0 <= sc.preemption_c <= 1:
        raise UserError(f"serve.preemption_c = {sc.preemption_c} must be in [0, 1]")
    return policies


def make_runtime(cfg: RecipeConfig, policy: str):
    from trail_probe.baseline import baseline_dir
    from trail_probe.hf_engine import TrailRuntime
    from trail_probe.runtime import BertLengthPredictor, LengthPredictor

    sc = cfg.serve
    predictor_dir = Path(sc.predictor or cfg.checkpoint_dir / "predictor")
    if not predictor_dir.is_dir():
        raise UserError(f"no predictor at '{predictor_dir}'; run 'trail-probe export RECIPE' or set serve.predictor")
    predictor = LengthPredictor.from_pretrained(predictor_dir, device="cpu")
    text_predictor = prompt_predictor = None
    if sc.initial == "bert":
        bert = Path(sc.bert) if sc.bert else baseline_dir(cfg)
        if not bert.is_dir():
            raise UserError(f"no BERT predictor at '{bert}'; run 'trail-probe train-baseline RECIPE', set serve.bert, or use serve.initial=prompt_probe")
        text_predictor = BertLengthPredictor.from_pretrained(bert, device="cpu")
    elif sc.initial == "prompt_probe":
        if not sc.prompt_predictor:
            raise UserError("serve.initial=prompt_probe needs serve.prompt_predictor (a prompt probe exported with 'trail-probe export RECIPE export.task=prompt')")
        prompt_predictor = LengthPredictor.from_pretrained(sc.prompt_predictor, device="cpu")
    return TrailRuntime(policy, predictor=predictor, text_predictor=text_predictor, prompt_predictor=prompt_predictor,
                        initial=sc.initial, max_new_tokens=cfg.generation.max_new_tokens,
                        refine_interval=sc.refine_interval, preemption_c=sc.preemption_c,
                        likelihood=sc.refine_likelihood), predictor_dir


# --------------------------------------------------------------------------------------------
# One policy
# --------------------------------------------------------------------------------------------
def _percentiles(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p99": float(np.percentile(x, 99))}


def summarize_run(records: list[dict], steps: list[dict], t0: float) -> dict:
    arrival = np.array([r["arrival"] for r in records])
    first = np.array([r["first_token"] for r in records])
    finish = np.array([r["finish"] for r in records])
    tokens = sum(r["output_tokens"] for r in records)
    span = float(finish.max() - arrival.min())
    durations = np.array([s["end"] - s["start"] for s in steps if math.isfinite(s["end"])])
    busy = float(durations.sum())
    decode_steps = [s for s in steps if math.isfinite(s["end"])]
    return {
        "requests": len(records),
        "latency_s": _percentiles(finish - arrival),
        "ttft_s": _percentiles(first - arrival),
        "throughput_tokens_per_s": tokens / span,
        "throughput_rps": len(records) / span,
        "span_s": span,
        "busy_fraction": busy / span,
        "steps": len(steps),
        "mean_step_s": float(durations.mean()) if len(durations) else float("nan"),
        "mean_batch": float(np.mean([s["requests"] for s in decode_steps])) if decode_steps else float("nan"),
        "probe_s_per_step": float(np.mean([s["probe_s"] for s in decode_steps])) if decode_steps else 0.0,
        "initial_s_per_request": float(sum(s["initial_s"] for s in steps)) / max(len(records), 1),
        "schedule_s_per_step": float(np.mean([s["schedule_s"] for s in decode_steps])) if decode_steps else 0.0,
        "max_active": max((s.get("active", 0) for s in steps), default=0),  # KV cache holders, paused included
        "min_free_cache": min((s.get("free_cache", 1.0) for s in steps), default=1.0),
    }


def run_policy(cfg: RecipeConfig, policy: str, model, tokenizer, requests, arrivals, settings: dict) -> dict:
    from tqdm import tqdm

    from trail_probe.extract import eos_token_ids
    from trail_probe.hf_engine import ServeEngine, serve

    sc = cfg.serve
    runtime, predictor_dir = (None, None) if policy == "fifo" else make_runtime(cfg, policy)
    engine = ServeEngine(model, policy, runtime=runtime, max_batch=sc.max_batch,
                         max_new_tokens=cfg.generation.max_new_tokens, eos_token_id=sorted(eos_token_ids(model, tokenizer)),
                         page_size=sc.page_size, num_blocks=sc.num_blocks, max_batch_tokens=sc.max_batch_tokens)
    bar = tqdm(total=len(requests), desc=f"serve-bench {policy}", unit="req", dynamic_ncols=True)
    start = time.time()
    try:
        with engine:
            engine.warmup(requests[0][1])
            results, t0 = serve(engine, requests, arrivals, progress=bar)
            steps = [asdict(s) for s in engine.scheduler.steps]
    finally:
        bar.close()
    by_id = {r.request_id: r for r in results}
    records = []
    for (rid, ids, _), at in zip(requests, arrivals):
        r = by_id[rid]
        rec = {"id": rid, "planned_arrival": float(at), "arrival": r.arrival - t0, "first_token": r.first_token - t0,
               "finish": r.finish - t0, "prompt_tokens": len(ids), "output_tokens": len(r.tokens), "tokens": r.tokens}
        if runtime is not None:
            rec["initial_estimate"] = runtime.initial_estimates.get(rid)
            rec["refined"] = runtime.trace.get(rid, [])
        records.append(rec)
    for s in steps:
        s["start"] -= t0
        s["end"] -= t0
    out = {"policy": policy, "settings": settings, "wall_clock_s": time.time() - start,
           "summary": summarize_run(records, steps, t0), "requests": records, "steps": steps}
    if runtime is not None:
        out["trail"] = {"predictor": str(predictor_dir), "preemptions": runtime.preemptions,
                        "refinements": runtime.refinements, "paused_past_limit": runtime.paused_past_limit,
                        "policy": runtime.policy.name, "preemption_c": runtime.policy.preemption_c}
    return out


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------
def same_outputs(a: dict, b: dict) -> dict:
    ta = {r["id"]: r["tokens"] for r in a["requests"]}
    mismatches = []
    for r in b["requests"]:
        x, y = ta[r["id"]], r["tokens"]
        if x != y:
            first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            mismatches.append({"id": r["id"], "first_difference": first, "lengths": [len(x), len(y)]})
    n = len(b["requests"])
    return {"identical": n - len(mismatches), "requests": n, "share": (n - len(mismatches)) / n, "mismatches": mismatches}


def fit_engine_cost(runs: dict) -> "object":
    from trail_probe.cost_model import fit_cost_model

    timings = [{"tokens": s["query_tokens"], "decode_context": s["decode_context"], "prefill_pairs": s["prefill_pairs"],
                "seconds": s["end"] - s["start"]}
               for run in runs.values() for s in run["steps"] if math.isfinite(s["end"]) and s["end"] > s["start"]]
    return fit_cost_model(timings, source="fitted to this serve-bench's engine steps (all policies)")


def simulator_prediction(cfg: RecipeConfig, runs: dict, cost) -> dict:
    """The simulator on the same arrivals, measured lengths and recorded estimates."""
    from trail_probe.policies import make_policy
    from trail_probe.simulate import Engine, Workload, simulate, summarize

    sc = cfg.serve
    base = runs.get("fifo") or next(iter(runs.values()))
    trail = next((r for p, r in runs.items() if p != "fifo"), None)
    est = {r["id"]: r for r in trail["requests"]} if trail else {}
    reqs = base["requests"]
    # The engine counts the EOS token it produces; the simulator charges one step per output token.
    refined = []
    for r in reqs:
        points = est.get(r["id"], {}).get("refined") or []
        refined.append(([int(j) for j, _ in points], [float(e) for _, e in points]))
    w = Workload(np.array([r["planned_arrival"] for r in reqs]), np.array([max(r["prompt_tokens"], 1) for r in reqs]),
                 np.array([max(r["output_tokens"], 1) for r in reqs]),
                 np.array([est.get(r["id"], {}).get("initial_estimate") or math.nan for r in reqs], dtype=float),
                 refined, [r["id"] for r in reqs])
    engine = Engine(sc.max_batch, sc.max_batch_tokens, sc.num_blocks * sc.page_size, "keep")
    out = {}
    for policy in runs:
        spec = "fcfs" if policy == "fifo" else policy
        if spec != "fcfs" and not trail:
            continue
        result = simulate(w, make_policy(spec, sc.preemption_c), engine, cost)
        s = summarize(result)
        out[policy] = {"mean_latency_s": s["mean_latency_s"], "mean_ttft_s": s["mean_ttft_s"],
                       "median_latency_s": s["median_latency_s"], "p99_latency_s": s["p99_latency_s"],
                       "slot_utilisation": s["slot_utilisation"]}
    return out


def _settings(cfg: RecipeConfig, requests, arrivals) -> dict:
    sc = cfg.serve
    digest = hashlib.sha256(json.dumps([[r[0], r[1]] for r in requests] + [list(map(float, arrivals))]).encode()).hexdigest()
    keep = {k: v for k, v in config_to_dict(sc).items() if k not in ("policies", "out_dir", "threads")}
    return {"serve": keep, "model": cfg.model.name_or_path, "max_new_tokens": cfg.generation.max_new_tokens,
            "workload_sha256": digest}


TRAIL_ONLY = ("initial", "predictor", "prompt_predictor", "bert", "refine_interval", "refine_likelihood", "preemption_c")


def _relevant(settings: dict | None, policy: str) -> dict | None:
    """The settings a policy's results depend on: FIFO's do not change with the TRAIL-only keys."""
    if not isinstance(settings, dict) or policy != "fifo":
        return settings
    return {**settings, "serve": {k: v for k, v in settings.get("serve", {}).items() if k not in TRAIL_ONLY}}


def format_table(runs: dict) -> str:
    head = "| policy | mean latency s | median | p99 | mean TTFT s | median | p99 | tokens/s | busy | mean batch | probe ms/step |"
    lines = [head, "|" + "---|" * 11]
    for p, r in runs.items():
        s = r["summary"]
        lines.append(f"| {p} | {s['latency_s']['mean']:.2f} | {s['latency_s']['median']:.2f} | {s['latency_s']['p99']:.2f} | "
                     f"{s['ttft_s']['mean']:.2f} | {s['ttft_s']['median']:.2f} | {s['ttft_s']['p99']:.2f} | "
                     f"{s['throughput_tokens_per_s']:.1f} | {s['busy_fraction']:.2f} | {s['mean_batch']:.2f} | "
                     f"{1e3 * s['probe_s_per_step']:.2f} |")
    return "\n".join(lines)


def _plot(runs: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what, label in ((axes[0], "latency", "latency (s)"), (axes[1], "ttft", "time to first token (s)")):
        for p, r in runs.items():
            x = np.sort([(q["finish"] if what == "latency" else q["first_token"]) - q["arrival"] for q in r["requests"]])
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=f"{p} (mean {x.mean():.1f} s)")
        ax.set_xlabel(label)
        ax.set_ylabel("share of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    run = next(iter(runs.values()))
    sc = run["settings"]["serve"]
    fig.suptitle(f"transformers continuous batching: {len(run['requests'])} requests, "
                 f"Poisson {sc['rate']} req/s, batch {sc['max_batch']}")
    fig.tight_layout()
    path = out / "serve_bench.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_serve_bench(cfg: RecipeConfig, only: str | None = None, overwrite: bool = False, verbose: bool = True) -> dict:
    import torch

    from trail_probe.models import load_causal_lm

    say = print if verbose else (lambda *a, **k: None)
    policies = _check(cfg, only)
    sc = cfg.serve
    out = out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for policy in policies:  # a missing predictor fails now, not after an hour of FIFO
        if policy != "fifo":
            make_runtime(cfg, policy)
    torch.set_num_threads(sc.threads)
    model, tokenizer = load_causal_lm(cfg.model)
    requests, arrivals = workload(cfg, tokenizer)
    settings = _settings(cfg, requests, arrivals)
    save_config(cfg, out)
    say(f"# {len(requests)} held-out prompts, Poisson {sc.rate} req/s over {arrivals[-1]:.0f} s, batch {sc.max_batch}, "
        f"{cfg.generation.max_new_tokens} tokens max; results in {out}")
    runs = {}
    for policy in dict.fromkeys(list(sc.policies) + policies):  # every configured run is reported, only/ones run
        path = out / f"{policy}.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        same = old is not None and _relevant(old.get("settings"), policy) == _relevant(settings, policy)
        if same and not (overwrite and policy in policies):
            say(f"# {policy}: kept {path} (same settings; --overwrite runs it again)")
            runs[policy] = old
            continue
        if policy not in policies:
            continue
        if old is not None and not same:
            say(f"# {policy}: {path} was run with other settings; running again")
        runs[policy] = run_policy(cfg, policy, model, tokenizer, requests, arrivals, settings)
        atomic_write_json(path, runs[policy])
        s = runs[policy]["summary"]
        say(f"# {policy}: mean latency {s['latency_s']['mean']:.2f} s, mean TTFT {s['ttft_s']['mean']:.2f} s, "
            f"busy {s['busy_fraction']:.2f}, {runs[policy]['wall_clock_s']:.0f} s")
    report = {"settings": settings, "config": config_to_dict(cfg),
              "summary": {p: r["summary"] for p, r in runs.items()},
              "trail": {p: r["trail"] for p, r in runs.items() if "trail" in r}}
    if "fifo" in runs:
        base = runs["fifo"]["summary"]
        report["vs_fifo"] = {p: {"latency_speedup": base["latency_s"]["mean"] / r["summary"]["latency_s"]["mean"],
                                 "ttft_speedup": base["ttft_s"]["mean"] / r["summary"]["ttft_s"]["mean"],
                                 "same_outputs": same_outputs(runs["fifo"], r)}
                             for p, r in runs.items() if p != "fifo"}
    cost = fit_engine_cost(runs)
    report["cost_model"] = asdict(cost)
    sim = simulator_prediction(cfg, runs, cost)
    report["simulator"] = {p: {**v, "measured_mean_latency_s": runs[p]["summary"]["latency_s"]["mean"],
                               "measured_mean_ttft_s": runs[p]["summary"]["ttft_s"]["mean"],
                               "latency_measured_over_predicted": runs[p]["summary"]["latency_s"]["mean"] / v["mean_latency_s"],
                               "ttft_measured_over_predicted": runs[p]["summary"]["ttft_s"]["mean"] / v["mean_ttft_s"]}
                           for p, v in sim.items()}
    atomic_write_json(out / "summary.json", report)
    plot = _plot(runs, out)
    table = format_table(runs)
    lines = [f"# serve-bench: {cfg.model.name_or_path}", "",
             f"{len(requests)} held-out prompts, Poisson {sc.rate} req/s, max batch {sc.max_batch}, "
             f"{cfg.generation.max_new_tokens} new tokens max, greedy, transformers continuous batching on "
             f"{sc.threads} threads.", "", table, ""]
    for p, v in report.get("vs_fifo", {}).items():
        so = v["same_outputs"]
        lines.append(f"- {p} vs fifo: mean latency {v['latency_speedup']:.2f}x lower, mean TTFT {v['ttft_speedup']:.2f}x; "
                     f"same tokens for {so['identical']}/{so['requests']} requests")
    for p, v in report["simulator"].items():
        lines.append(f"- simulator, {p}: mean latency {v['mean_latency_s']:.2f} s predicted vs {v['measured_mean_latency_s']:.2f} s "
                     f"measured ({v['latency_measured_over_predicted']:.2f}x); mean TTFT {v['mean_ttft_s']:.2f} vs "
                     f"{v['measured_mean_ttft_s']:.2f} s ({v['ttft_measured_over_predicted']:.2f}x)")
    for p, t in report["trail"].items():
        s = runs[p]["summary"]
        lines.append(f"- {p}: {t['preemptions']} preemptions, {t['refinements']} refinements, paused past the limit "
                     f"{t['paused_past_limit']}; probe {1e3 * s['probe_s_per_step']:.2f} ms per step = "
                     f"{100 * s['probe_s_per_step'] / s['mean_step_s']:.2f}% of the mean step ({1e3 * s['mean_step_s']:.1f} ms); "
                     f"BERT's initial estimate {1e3 * s['initial_s_per_request']:.1f} ms per request")
    lines += ["", f"Cost model fitted to the engine's steps: {cost.fixed_s * 1e3:.1f} ms + {cost.per_token_s * 1e3:.2f} ms/token"
              f" + {cost.per_context_token_s * 1e6:.2f} us/context token + {cost.per_prefill_pair_s * 1e9:.2f} ns/prefill pair.",
              "", f"![latency and TTFT]({plot.name})", "",
              f"Reproduce: `trail-probe serve-bench {out / 'config.yaml'}` (the resolved recipe saved beside this report)."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    say("\n" + "\n".join(lines[4:-4]))
    say(f"# wrote {out / 'summary.json'}, {out / 'report.md'}, {plot.name}")
    return report


def run(cfg: RecipeConfig, args) -> None:
    run_serve_bench(cfg, getattr(args, "policy", None), getattr(args, "overwrite", False))
