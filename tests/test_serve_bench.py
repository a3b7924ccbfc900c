"""`trail-probe serve-bench` end to end on a tiny random Llama, a tiny BERT and a random probe."""

from __future__ import annotations

import json

import pytest
from conftest import (
    make_tiny_bert_predictor,
    trail_weights,
    write_prompts,
    write_trail_dir,
)

from trail_probe.config import load_recipe
from trail_probe.errors import UserError
from trail_probe.stages import serve_bench

MAX_NEW = 48


@pytest.fixture
def recipe(tmp_path, tiny_llama):
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows=[
        {"id": f"p{i}", "prompt": f"Write {i} words about {'cats' if i % 3 else 'the sea'}."} for i in range(40)])
    predictor = write_trail_dir(tmp_path / "predictor", trail_weights(d=64), hidden_size=64, probe_layer_idx=1,
                                max_len=MAX_NEW, device="cpu")
    make_tiny_bert_predictor(tmp_path / "bert", max_len=MAX_NEW)

    def make(*overrides):
        return load_recipe(None, [
            f"model.name_or_path={tiny_llama}", "model.dtype=float32", "model.device=cpu",
            f"prompts.source={prompts}", f"generation.max_new_tokens={MAX_NEW}", f"train.out_dir={tmp_path / 'ckpt'}",
            "serve.num_requests=5", "serve.rate=20", "serve.max_batch=2", "serve.max_batch_tokens=64",
            "serve.page_size=16", "serve.num_blocks=256", "serve.threads=1",
            f"serve.predictor={predictor}", f"serve.bert={tmp_path / 'bert'}", "serve.initial=bert", *overrides])

    return make


def test_serve_bench_runs_both_policies_reports_and_resumes(recipe, monkeypatch):
    cfg = recipe()
    report = serve_bench.run_serve_bench(cfg, verbose=False)
    out = cfg.paths.serve
    for name in ("fifo.json", "trail.json", "summary.json", "report.md", "serve_bench.png", "config.yaml"):
        assert (out / name).is_file(), name
    fifo, trail = (json.loads((out / f"{p}.json").read_text()) for p in ("fifo", "trail"))
    assert [r["id"] for r in fifo["requests"]] == [r["id"] for r in trail["requests"]]  # same prompts
    assert [r["planned_arrival"] for r in fifo["requests"]] == [r["planned_arrival"] for r in trail["requests"]]
    for run in (fifo, trail):
        for r in run["requests"]:
            assert r["arrival"] <= r["first_token"] <= r["finish"] and 1 <= r["output_tokens"] <= MAX_NEW
        assert 0 < run["summary"]["busy_fraction"] <= 1.0 + 1e-9
    assert report["vs_fifo"]["trail"]["same_outputs"]["share"] == 1.0
    assert trail["trail"]["refinements"] > 0 and all(r["initial_estimate"] is not None for r in trail["requests"])
    assert set(report["simulator"]) == {"fifo", "trail"}
    assert report["simulator"]["fifo"]["mean_latency_s"] > 0
    # A second call keeps both runs (same settings) instead of serving again.
    monkeypatch.setattr(serve_bench, "run_policy", lambda *a, **k: pytest.fail("re-ran a finished policy"))
    again = serve_bench.run_serve_bench(cfg, verbose=False)
    assert again["summary"] == report["summary"]


def test_changed_settings_run_again_and_one_policy_alone(recipe, monkeypatch):
    serve_bench.run_serve_bench(recipe("serve.policies=[fifo]"), verbose=False)
    ran = []
    real = serve_bench.run_policy
    monkeypatch.setattr(serve_bench, "run_policy", lambda cfg, policy, *a, **k: ran.append(policy) or real(cfg, policy, *a, **k))
    report = serve_bench.run_serve_bench(recipe("serve.policies=[fifo]", "serve.rate=10"), only="trail_bert", verbose=False)
    assert ran == ["trail_bert"] and "fifo" not in report["summary"]  # fifo's file is for another rate


@pytest.mark.parametrize("override, message", [
    (("serve.rate=0",), "serve.rate"),
    (("serve.num_requests=500",), "holds out"),
    (("serve.policies=[lifo]",), "not one of fifo"),
    (("serve.max_batch_tokens=1",), "max_batch_tokens"),
    (("serve.predictor=/nonexistent",), "no predictor"),
    (("serve.bert=/nonexistent",), "no BERT predictor"),
    (("serve.initial=prompt_probe",), "prompt_predictor"),
    (("serve.policies=[fifo,oracle]",), "not one of fifo"),  # the oracle runs on vLLM only
    (("serve.engine=vllm", "serve.policies=[oracle,trail]"), "add fifo to serve.policies"),
    (("serve.engine=vllm", "serve.initial=prompt_probe"), "prompt_predictor"),
])
def test_bad_settings_fail_in_one_line(recipe, override, message):
    with pytest.raises(UserError, match=message):
        serve_bench.run_serve_bench(recipe(*override), verbose=False)


def test_repeat_prompts_sends_each_held_out_prompt_again_under_its_own_id(recipe):
    from transformers import AutoTokenizer

    cfg = recipe("serve.num_requests=25", "serve.repeat_prompts=true")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    held = serve_bench.held_out_prompts(cfg)
    requests, arrivals = serve_bench.workload(cfg, tokenizer)
    ids = [rid for rid, _, _ in requests]
    assert len(ids) == len(set(ids)) == len(arrivals) == 25 and len(held) < 25
    first = {p.id for p in held}
    assert set(ids[: len(held)]) == first  # one full pass before any prompt comes again
    assert all(rid.partition("#")[0] in first and rid.partition("#")[2] in ("", "1", "2") for rid in ids)
    # the first pass is what a run without repeats sends
    short, _ = serve_bench.workload(recipe(f"serve.num_requests={len(held)}"), tokenizer)
    assert [r[0] for r in short] == ids[: len(held)]


def test_runs_recorded_before_the_aging_and_cadence_keys_are_kept():
    from trail_probe.stages.serve_bench import _relevant

    old = {"serve": {"rate": 3.0}, "refine": {"interval": 8, "preemption_c": 0.8}}
    new = {"serve": {"rate": 3.0}, "refine": {"interval": 8, "preemption_c": 0.8, "aging": 0.0, "cadence": "per_request"}}
    assert _relevant(old, "trail") == _relevant(new, "trail")
    aged = {**new, "refine": {**new["refine"], "aging": 2.0}}
    assert _relevant(old, "trail") != _relevant(aged, "trail")  # a real change still runs again
