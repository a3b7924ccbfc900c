"""The serving simulator: queueing theory, a hand-worked schedule per policy, KV overflow, the CLI."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from trail_probe.cli import main
from trail_probe.config import load_recipe
from trail_probe.errors import UserError
from trail_probe.serving.cost_model import (
    COST_PRESETS,
    MEASURED_CPU_FILE,
    CostModel,
    fit_cost_model,
    iteration_features,
    load_cost_model,
    measured_cost_model,
)
from trail_probe.serving.policies import make_policy
from trail_probe.serving.simulator import (
    Engine,
    Workload,
    sample_workload,
    simulate,
    summarize,
)
from trail_probe.stages.simulate import load_predictions, run_simulate

UNIT_COST = CostModel(0.0, 1.0)  # one second per token processed, nothing else
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2_alpaca.yaml"


def write_predictions(path, n=120, seed=0, k=8, **overrides):
    """A small eval predictions.json: noisy BERT estimates, better refined ones every k tokens."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        out = int(min(512, max(1, rng.lognormal(4.5, 0.8))))
        requests.append({
            "id": f"req-{i}", "prompt_tokens": int(rng.integers(10, 80)), "output_tokens": out, "hit_cap": out >= 512,
            "bert_estimate": float(np.clip(out + rng.normal(0, 60), 5, 500)), "prompt_probe_estimate": float(out),
            "refined": [[j, float(max(0.0, out - j + rng.normal(0, 15)))] for j in range(1, out + 1, k)],
            "per_step": [],
        })
    data = {"bins": {"num_bins": 10, "max_len": 512}, "refine_interval": k, "max_new_tokens": 512, "layer": 2,
            "requests": requests}
    data.update(overrides)
    path.write_text(json.dumps(data))
    return path


def workload(arrival, output, bert=None, refined=None, prompt=None):
    n = len(output)
    return Workload(np.asarray(arrival, float), np.asarray(prompt or [1] * n), np.asarray(output),
                    np.asarray(bert if bert is not None else output, float), refined or [([], [])] * n)


# --------------------------------------------------------------------------------------------
# Queueing theory: one request at a time, service time = output tokens, Poisson arrivals (M/G/1)
# --------------------------------------------------------------------------------------------
SIZES = np.arange(1, 201)
PROBS = np.where(SIZES <= 40, 0.6 / 40, 0.4 / 160)  # many short jobs, a long tail: SRPT matters
RHO = 0.7


def mg1_workload(num_jobs=40_000, seed=0):
    lam = RHO / (SIZES * PROBS).sum()
    rng = np.random.default_rng(seed)
    out = rng.choice(SIZES, num_jobs, p=PROBS)
    return workload(np.cumsum(rng.exponential(1 / lam, num_jobs)), out), lam


MG1_ENGINE = Engine(max_running=1, token_budget=1, kv_capacity_tokens=10**9, paused_cache="keep")


def mean_response(policy, wl):
    r = simulate(wl, make_policy(policy), MG1_ENGINE, UNIT_COST)
    return float((r.finish - r.arrival).mean())


def test_fcfs_matches_pollaczek_khinchine():
    wl, lam = mg1_workload()
    es, es2 = (SIZES * PROBS).sum(), (SIZES ** 2 * PROBS).sum()
    expected = es + lam * es2 / (2 * (1 - RHO))
    assert mean_response("fcfs", wl) == pytest.approx(expected, rel=0.05)


def test_srpt_with_exact_sizes_matches_schrage_miller():
    wl, lam = mg1_workload()
    # E[T(x)] = lam (int_0^x t^2 dF + x^2 (1 - F(x))) / (2 (1 - rho_x)^2) + int_0^x dt / (1 - rho_t),
    # rho_x = lam int_0^x t dF. For integer sizes rho_t is constant on [j, j+1).
    rho_x = lam * np.cumsum(SIZES * PROBS)
    waiting = lam * (np.cumsum(SIZES ** 2 * PROBS) + SIZES ** 2 * (1 - np.cumsum(PROBS))) / (2 * (1 - rho_x) ** 2)
    residence = np.cumsum(1 / (1 - np.concatenate([[0.0], rho_x[:-1]])))
    expected = (PROBS * (waiting + residence)).sum()
    assert mean_response("oracle@1", wl) == pytest.approx(expected, rel=0.05)
    assert expected < 0.65 * mean_response("fcfs", wl)  # the check can tell the two apart


def test_aging_trades_mean_latency_for_the_longest_waits():
    wl, _ = mg1_workload(num_jobs=20_000)
    runs = {}
    for spec in ("fcfs", "oracle@1", "oracle@1~0.02", "oracle@1~1000"):
        r = simulate(wl, make_policy(spec), MG1_ENGINE, UNIT_COST)
        latency = r.finish - r.arrival
        runs[spec] = (float(latency.mean()), float(latency.max()))
    (fcfs_mean, fcfs_max), (srpt_mean, srpt_max) = runs["fcfs"], runs["oracle@1"]
    aged_mean, aged_max = runs["oracle@1~0.02"]
    assert srpt_max > 2 * fcfs_max  # shortest-first starves the long ones
    assert aged_max < 0.75 * srpt_max and aged_mean < fcfs_mean  # aging bounds the wait, keeps most of the gain
    assert srpt_mean < aged_mean  # and costs some mean latency
    # aging far above the service rate is arrival order again
    assert runs["oracle@1~1000"][0] == pytest.approx(fcfs_mean, rel=0.02)


def test_nonpreemptive_sjf_matches_priority_queue_formula():
    wl, lam = mg1_workload()
    # Non-preemptive priority by size: W(x) = lam E[S^2] / 2 / ((1 - rho(<x)) (1 - rho(<=x))).
    rho_le = lam * np.cumsum(SIZES * PROBS)
    rho_lt = np.concatenate([[0.0], rho_le[:-1]])
    es2 = (SIZES ** 2 * PROBS).sum()
    expected = (PROBS * (SIZES + lam * es2 / 2 / ((1 - rho_lt) * (1 - rho_le)))).sum()
    assert mean_response("sjf_bert", wl) == pytest.approx(expected, rel=0.05)  # BERT estimate = exact here


# --------------------------------------------------------------------------------------------
# A hand-worked schedule: one slot, 1 s per token, 1-token prompts
# --------------------------------------------------------------------------------------------
# r0 arrives at 0 (8 tokens; BERT says 10, the probe says 14 left after its first token),
# r1 at 0.5 (2 tokens; BERT says 12, the probe says 20 left after its first token),
# r2 at 2.5 (3 tokens; BERT says 3).
HAND = workload([0.0, 0.5, 2.5], [8, 2, 3], bert=[10, 12, 3],
                refined=[([1], [14.0]), ([1], [20.0]), ([1], [2.0])])
HAND_ENGINE = Engine(max_running=1, token_budget=1, kv_capacity_tokens=1000, paused_cache="keep")


@pytest.mark.parametrize("policy, finish, first_token, preemptions", [
    # FCFS: r0 0-8, r1 8-10, r2 10-13.
    ("fcfs", [8, 10, 13], [1, 9, 11], 0),
    # SJF on BERT: r0 runs to 8, then r2 (3) before r1 (12).
    ("sjf_bert", [8, 13, 11], [1, 12, 9], 0),
    ("trail@0", [8, 13, 11], [1, 12, 9], 0),  # C = 0: ordering only
    # TRAIL-BERT: r1 (12) never beats r0's countdown (9 at t=1); r2 (3) preempts r0 (7 left) at t=3.
    ("trail_bert", [11, 13, 6], [1, 12, 4], 1),
    # TRAIL: r0's refined 14 > r1's BERT 12 -> preempt at t=1; r1's refined 20 > r0's 14 -> r0 back at t=2;
    # r2 (3) preempts r0 (13) at t=3; then r0 (13) before r1 (20).
    ("trail", [12, 13, 6], [1, 2, 4], 3),
    # Oracle: r1 (2) preempts r0 (7 left) at t=1 and finishes at 3; r2 (3) beats r0 (7) at 3.
    ("oracle", [13, 3, 6], [1, 2, 4], 1),
])
def test_hand_worked_schedule(policy, finish, first_token, preemptions):
    r = simulate(HAND, make_policy(policy, 0.8), HAND_ENGINE, UNIT_COST)
    assert r.finish.tolist() == finish
    assert r.first_token.tolist() == first_token
    assert r.preemptions == preemptions and r.recomputes == 0


def test_hand_worked_schedule_discarding_the_preempted_cache():
    # TRAIL-BERT again, but r0's 3 cached tokens are dropped at t=3: back at t=6 it re-prefills
    # prompt + 3 tokens (4 iterations at 1 token each, the last producing token 4), then 4 more.
    engine = Engine(max_running=1, token_budget=1, kv_capacity_tokens=1000, paused_cache="discard")
    r = simulate(HAND, make_policy("trail_bert", 0.8), engine, UNIT_COST)
    assert r.finish.tolist() == [14, 16, 6]
    assert (r.recomputes, r.recomputed_tokens) == (1, 3)


# --------------------------------------------------------------------------------------------
# Engine invariants
# --------------------------------------------------------------------------------------------
def random_workload(n=300, seed=0, rate=2.0):
    rng = np.random.default_rng(seed)
    out = rng.integers(1, 120, n)
    refined = [(list(range(1, o + 1, 8)), [float(max(0, o - j + rng.normal(0, 10))) for j in range(1, o + 1, 8)])
               for o in out]
    return workload(np.cumsum(rng.exponential(1 / rate, n)), out, bert=np.clip(out + rng.normal(0, 40, n), 1, None),
                    refined=refined, prompt=rng.integers(1, 60, n).tolist())


@pytest.mark.parametrize("paused_cache", ["keep", "discard"])
@pytest.mark.parametrize("policy", ["fcfs", "trail", "oracle@1"])
def test_kv_overflow_loses_and_duplicates_nothing(policy, paused_cache):
    wl = random_workload()
    engine = Engine(max_running=16, token_budget=64, kv_capacity_tokens=400, paused_cache=paused_cache)
    r = simulate(wl, make_policy(policy), engine, CostModel(0.01, 0.001, 1e-6, 1e-8))
    assert r.evictions > 0 and r.recomputes > 0  # the cache really overflowed
    assert (r.served == 1).all()
    assert r.tokens_generated == wl.output_tokens.sum()  # recomputation re-prefills, never re-generates
    assert (r.first_token > r.arrival).all() and (r.finish >= r.first_token).all()


@pytest.mark.parametrize("policy", ["fcfs", "sjf_bert", "trail_bert", "trail", "oracle"])
def test_block_skipping_matches_one_iteration_at_a_time(policy):
    wl = random_workload(n=150, seed=1, rate=0.5)
    engine = Engine(max_running=8, token_budget=32, kv_capacity_tokens=1500)
    cost = CostModel(0.02, 0.002, 1e-5, 1e-7)
    fast = simulate(wl, make_policy(policy), engine, cost)
    slow = simulate(wl, make_policy(policy), engine, cost, max_block_steps=1)
    assert fast.steps < slow.steps / 3  # the blocks really skip
    np.testing.assert_allclose(fast.finish, slow.finish, rtol=1e-9)
    np.testing.assert_allclose(fast.first_token, slow.first_token, rtol=1e-9)
    assert (fast.preemptions, fast.evictions, fast.iterations) == (slow.preemptions, slow.evictions, slow.iterations)


def test_chunked_prefill_and_batching_timeline():
    # Two 5-token prompts at t=0, budget 4 tokens per iteration, cost 1 + 1 per token.
    wl = workload([0.0, 0.0], [2, 1], prompt=[5, 5])
    r = simulate(wl, make_policy("fcfs"), Engine(max_running=2, token_budget=4, kv_capacity_tokens=100),
                 CostModel(1.0, 1.0))
    # it1: r0 4 prefill (t=5); it2: r0 last prompt token -> token 1, r1 3 tokens (t=10);
    # it3: r0 decodes -> done, r1 last 2 prompt tokens -> its only token (t=14).
    assert r.first_token.tolist() == [10, 14] and r.finish.tolist() == [14, 14]


def test_iteration_features():
    assert iteration_features([(1, 9), (1, 4)]) == {"tokens": 2, "decode_context": 15, "prefill_pairs": 0}
    assert iteration_features([(4, 2)]) == {"tokens": 4, "decode_context": 0, "prefill_pairs": 4 * 2 + 10}


def test_fit_cost_model_recovers_parameters():
    true = CostModel(0.05, 0.002, 3e-6, 4e-8)
    timings = []
    for batch in [(4, 0)], [(64, 0)], [(256, 0)], [(64, 300)], [(1, 50)] * 8, [(1, 400)] * 8, [(1, 100)] * 32, [(1, 10)]:
        f = iteration_features(batch)
        timings.append({**f, "seconds": true.iteration_time(f["tokens"], f["decode_context"], f["prefill_pairs"])})
    fitted = fit_cost_model(timings)
    for name in ("fixed_s", "per_token_s", "per_context_token_s", "per_prefill_pair_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=1e-4)


def test_measured_cpu_preset_is_the_benchmarks_fit_shipped_as_package_data(tmp_path):
    """The preset is read from the package's copy of fit_cost_model.py's results, which the benchmark
    writes with benchmarks/results/cost_model_cpu.json (so a re-run changes both, and no number is
    copied into code), and which the wheel ships (pyproject's package-data)."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    root = Path(__file__).resolve().parents[1]
    shipped = json.loads(MEASURED_CPU_FILE.read_text())
    assert shipped == json.loads((root / "benchmarks" / "results" / "cost_model_cpu.json").read_text())
    preset = COST_PRESETS["measured_cpu"]
    for name in ("fixed_s", "per_token_s", "per_context_token_s", "per_prefill_pair_s"):
        assert getattr(preset, name) == shipped["cost_model"][name], name
    other = {**shipped, "cost_model": {**shipped["cost_model"], "fixed_s": 0.5, "per_token_s": 0.25}}
    (tmp_path / "fit.json").write_text(json.dumps(other))
    rerun = measured_cost_model(tmp_path / "fit.json")
    assert (rerun.fixed_s, rerun.per_token_s) == (0.5, 0.25) and rerun.source.startswith("measured_cpu: ")
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = root / "trail_probe" / "serving"
    assert any(MEASURED_CPU_FILE in package.glob(pattern) for pattern in package_data["trail_probe.serving"])


def test_cost_presets_and_json(tmp_path):
    assert load_cost_model("llama3_8b_a100") is COST_PRESETS["llama3_8b_a100"]
    assert load_cost_model("measured_cpu").fixed_s > 0
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"cost_model": {"fixed_s": 0.1, "per_token_s": 0.01}}))
    assert load_cost_model(str(path)).per_token_s == 0.01
    with pytest.raises(UserError, match="is not one of"):
        load_cost_model("h100")


# --------------------------------------------------------------------------------------------
# Predictions file, config checks and the CLI
# --------------------------------------------------------------------------------------------
def test_load_and_resample_predictions(tmp_path):
    pool, meta = load_predictions(write_predictions(tmp_path / "p.json", n=50), refine_interval=16)
    assert len(pool) == 50 and meta["simulated_refine_interval"] == 16
    assert all(all((j - 1) % 16 == 0 for j in js) for js, _ in pool.refined)
    big = sample_workload(pool, 200, seed=3)
    assert len(big) == 200 and set(big.ids) <= set(pool.ids)
    assert sample_workload(pool, 200, seed=3).ids == big.ids
    assert sample_workload(pool, 200, seed=4).ids != big.ids
    assert len(set(sample_workload(pool, 20, seed=3).ids)) == 20  # fewer than the pool: no repeats


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(requests=[]), "no 'requests' list"),
    (lambda d: d["requests"][3].pop("bert_estimate"), "request #3 .* lacks 'bert_estimate'"),
    (lambda d: d["requests"][1].update(output_tokens="many"), "non-numeric"),
    (lambda d: d["requests"][2].update(refined=[[9, 3.0], [1, 5.0]]), "out of order"),
    (lambda d: d.update(refine_interval=3), "not a multiple"),
])
def test_bad_predictions_files(tmp_path, mutate, match):
    path = write_predictions(tmp_path / "p.json", n=5)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=match):
        load_predictions(path, refine_interval=8)


def test_missing_estimates_refuse_only_the_policies_that_need_them(tmp_path):
    path = write_predictions(tmp_path / "p.json", n=20)
    data = json.loads(path.read_text())
    for r in data["requests"]:
        r["bert_estimate"], r["refined"] = None, []  # no baseline, no decode probe
    path.write_text(json.dumps(data))
    pool, _ = load_predictions(path)
    for name in ("fcfs", "oracle"):
        assert (simulate(pool, make_policy(name), Engine(), UNIT_COST).served == 1).all()
    for name, match in (("sjf_bert", "needs BERT"), ("trail", "needs BERT")):
        with pytest.raises(UserError, match=match):
            simulate(pool, make_policy(name), Engine(), UNIT_COST)
    pool.bert_estimate[:] = 50.0
    with pytest.raises(UserError, match="refined probe estimates"):
        simulate(pool, make_policy("trail"), Engine(), UNIT_COST)


def recipe(tmp_path, *overrides):
    """A config whose checkpoint folder holds a synthetic eval/predictions.json."""
    (tmp_path / "eval").mkdir(exist_ok=True)
    pred = write_predictions(tmp_path / "eval" / "predictions.json")
    cfg = load_recipe(None, [f"train.out_dir={tmp_path}", "simulate.num_requests=150", "simulate.loads=[0.6,0.9]",
                             "simulate.max_running=8", "simulate.token_budget=64", "simulate.kv_capacity_tokens=4000",
                             "simulate.cost_preset=llama3_8b_a100", *overrides])
    return cfg, pred


@pytest.mark.parametrize("override, match", [
    ("simulate.rates=[2,-1]", "simulate.rates contains -1"),
    ("simulate.rates=[0]", "simulate.rates contains 0"),
    ("simulate.kv_capacity_tokens=100", "cannot hold the largest request"),
    ("refine.preemption_c=1.2", r"must be in \[0, 1\]"),
    ("simulate.token_budget=4", "must be >= max_running"),
    ("simulate.policies=[fcfs,lifo]", "unknown scheduling policy"),
    ("simulate.predictions=nowhere.json", "not found; run 'trail-probe eval"),
])
def test_config_errors(tmp_path, override, match):
    with pytest.raises(UserError, match=match):  # some are refused by the recipe loader already
        cfg, _ = recipe(tmp_path, override)
        run_simulate(cfg, verbose=False)


def test_run_writes_results_and_is_deterministic(tmp_path):
    cfg, _ = recipe(tmp_path)
    first = run_simulate(cfg, verbose=False)
    out = tmp_path / "simulate"
    assert {p.name for p in out.iterdir()} >= {"results.json", "config.yaml", "latency_vs_rate.png", "ttft_vs_rate.png"}
    saved = json.loads((out / "results.json").read_text())
    policies = ["fcfs", "sjf_bert", "trail_bert", "trail", "oracle"]
    assert [(p["policy"], p["mode"]) for p in saved["points"]] == (
        [(p, "poisson") for p in policies] * 2 + [(p, "burst") for p in policies])
    assert [s["policy"] for s in saved["ablation"][0]["steps"]] == policies
    assert len(saved["targets"]) == 3 and saved["targets"][1]["in_target_band"]
    point = saved["points"][0]
    assert point["load"] == pytest.approx(0.6) and point["rate"] == pytest.approx(0.6 * saved["saturated_throughput_rps"])
    assert 0 < point["slot_utilisation"] <= 1
    assert run_simulate(cfg, verbose=False)["points"] == first["points"]
    other, _ = recipe(tmp_path, "simulate.seed=1")
    assert run_simulate(other, verbose=False)["points"] != first["points"]


def test_cli_end_to_end_and_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRAIL_PROBE_QUIET", "1")
    _, pred = recipe(tmp_path)
    common = ["simulate", str(RECIPE), f"simulate.predictions={pred}", f"simulate.out_dir={tmp_path / 'sim'}",
              "simulate.num_requests=100", "simulate.rates=[5,10]", "simulate.burst=false",
              "simulate.policies=[fcfs,trail]", "simulate.cost_preset=llama3_8b_a100"]
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "mean lat" in out and "TRAIL vs FCFS" in out
    assert (tmp_path / "sim" / "results.json").is_file()
    assert main(common + ["refine.preemption_c=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trail-probe simulate: error: refine.preemption_c = 2.0")


def test_summary_metrics():
    r = simulate(HAND, make_policy("fcfs"), HAND_ENGINE, UNIT_COST)
    s = summarize(r)
    assert s["mean_latency_s"] == pytest.approx(np.mean([8, 9.5, 10.5]))
    assert s["mean_ttft_s"] == pytest.approx(np.mean([1, 8.5, 8.5]))
    assert s["throughput_rps"] == pytest.approx(3 / 13)
    assert s["slot_utilisation"] == pytest.approx(1.0)
