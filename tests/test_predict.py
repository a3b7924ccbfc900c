"""`trail-probe predict`: the runtime's refined estimates while a tiny random Llama answers a prompt."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_bert_predictor, trail_weights, write_trail_dir

from trail_probe.cli import main
from trail_probe.config import load_recipe
from trail_probe.runtime import LengthPredictor, LengthTracker
from trail_probe.runtime.estimates import refines_at
from trail_probe.runtime.models import encode_prompt, eos_token_ids, load_causal_lm
from trail_probe.stages.predict import load_predictors, predict_one

LAYER, BUDGET, K_REFINE = 1, 40, 4
PROMPT = "Tell me a fact about the sea."


@pytest.fixture
def recipe(tiny_llama, tmp_path):
    predictor = write_trail_dir(tmp_path / "predictor", trail_weights(d=64), hidden_size=64, probe_layer_idx=LAYER,
                                max_len=BUDGET, device="cpu")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"run_name: tiny\nmodel:\n  name_or_path: {tiny_llama}\ngeneration:\n  max_new_tokens: {BUDGET}\n"
                    f"bins:\n  max_len: {BUDGET}\nrefine:\n  interval: {K_REFINE}\n"
                    f"serve:\n  predictor: {predictor}\n  bert: {tmp_path / 'no-bert'}\n")
    return path


def test_estimates_are_the_trackers_on_the_answers_own_states(recipe):
    cfg = load_recipe(recipe)
    model, tok = load_causal_lm(cfg.model)
    predictors = load_predictors(cfg, model)
    seen = []
    rec = predict_one(cfg, model, tok, predictors, PROMPT, on_refine=lambda g, e: seen.append((g, e)))
    # the same answer as plain greedy generation
    ids = encode_prompt(tok, PROMPT)
    eos = sorted(eos_token_ids(model, tok))
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=BUDGET, eos_token_id=eos,
                             pad_token_id=eos[0])[0, len(ids):].tolist()
    n = len(ref) - 1 if ref[-1] in eos else len(ref)
    assert rec["output_tokens"] == n and rec["answer"] == tok.decode(ref[:n], skip_special_tokens=True)
    assert n > 2 * K_REFINE  # the random model answers long enough to refine several times
    gens = [r["generated"] for r in rec["refined"]]
    assert gens == [g for g in range(1, n + 1) if refines_at(g, K_REFINE)]
    assert [r["actual_left"] for r in rec["refined"]] == [n - g for g in gens]
    assert [g for g, _ in seen][: len(gens)] == gens  # the live view saw each refinement as it happened
    # a LengthTracker fed teacher-forced hidden_states[L + 1] of prompt + answer gives the same estimates;
    # with no prompt probe or BERT beside it, the export's first estimate is the decode probe on the last
    # prompt token's state (TRAIL's release), a real number rather than the budget
    predictor = LengthPredictor.from_pretrained(cfg.paths.serve_predictor, device="cpu")
    tracker = LengthTracker(predictor, max_new_tokens=BUDGET)
    with torch.no_grad():
        states = model(torch.tensor([ids + ref]), output_hidden_states=True).hidden_states[LAYER + 1][0]
    tracker.add(["r"], initial_probs=predictor.probs(states[len(ids) - 1][None]))
    assert rec["initial_source"] == "last_token"
    assert rec["initial_estimate"] == pytest.approx(float(tracker.initial_estimates(["r"])[0]), abs=1e-3)
    for r in rec["refined"]:
        g = r["generated"]
        tracker.observe(["r"], states[len(ids) + g - 1][None], [g])
        assert tracker.estimates(["r"], [g])[0].item() == pytest.approx(r["estimate_left"], abs=1e-3)


def test_cli_prints_the_table_and_json(recipe, capsys, tmp_path):
    assert main(["predict", str(recipe), PROMPT]) == 0
    out = capsys.readouterr().out
    assert "estimate left" in out and "actually left" in out and "prompt-time estimate (last_token)" in out
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "prompt": t}) for i, t in enumerate([PROMPT, "Name a colour."])))
    assert main(["predict", str(recipe), "generation.max_new_tokens=16", "--file", str(prompts), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["id"] for r in rows] == ["p0", "p1"]
    assert all(r["output_tokens"] <= 16 and r["refined"][0]["generated"] == 1 for r in rows)


def test_bert_gives_the_prompt_time_estimate(recipe, tiny_llama, tmp_path):
    bert = tmp_path / "bert"
    make_tiny_bert_predictor(bert, num_labels=10, max_len=BUDGET)
    cfg = load_recipe(recipe, [f"serve.bert={bert}"])
    model, tok = load_causal_lm(cfg.model)
    rec = predict_one(cfg, model, tok, load_predictors(cfg, model), PROMPT)
    assert rec["initial_source"] == "bert"
    assert rec["initial_estimate"] == pytest.approx(min(rec["bert_estimate"], BUDGET), abs=1e-3)


@pytest.mark.parametrize("change, match", [
    ({"hidden_size": 32}, "width"),
    ({"probe_layer_idx": 7}, "layer 7"),
])
def test_a_predictor_for_another_model_is_refused_in_one_line(recipe, tmp_path, capsys, change, match):
    d = change.get("hidden_size", 64)
    other = write_trail_dir(tmp_path / "other", trail_weights(d=d), **{"hidden_size": 64, "probe_layer_idx": LAYER,
                                                                      "max_len": BUDGET, "device": "cpu", **change})
    assert main(["predict", str(recipe), PROMPT, f"serve.predictor={other}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trail-probe")]
    assert len(err) == 1 and match in err[0]  # (transformers' weight-loading bar aside)


def test_another_models_weights_are_refused(recipe, tmp_path, capsys):
    meta = {"serving_model": {"name_or_path": "elsewhere", "weights_sha256": "0" * 64}}
    (tmp_path / "predictor" / "trail_probe.json").write_text(json.dumps(meta))
    assert main(["predict", str(recipe), PROMPT]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trail-probe")]
    assert len(err) == 1 and "trained on 'elsewhere'" in err[0]


def test_no_prompt_and_two_prompts_are_one_line_errors(recipe, capsys):
    assert main(["predict", str(recipe)]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main(["predict", str(recipe), "one", "two"]) == 2
    assert "one prompt at a time" in capsys.readouterr().err
    assert main(["extract", str(recipe), "not-an-override"]) == 2
    assert "key=value" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_on_smollm2_with_the_committed_predictor(capsys, tmp_path):
    """The embedded serving model and the predictor exported from the real transformers run (its recipe;
    no BERT or prompt probe ships with it, so the first estimate comes from the prompt's last token)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    recipe = str(repo / "recipes" / "smollm2_alpaca_hf.yaml")
    predictor = repo / "checkpoints" / "smollm2_alpaca" / "predictor"
    args = ["predict", recipe, "Name three primary colours.", "generation.max_new_tokens=40",
            f"serve.predictor={predictor}", f"serve.bert={tmp_path / 'none'}", "serve.initial=last_token", "--json"]
    assert main(args) == 0
    (rec,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rec["layer"] == 19 and 0 < rec["output_tokens"] <= 40 and rec["answer"].strip()
    assert rec["refined"][0]["generated"] == 1 and all(0 <= r["estimate_left"] <= 40 for r in rec["refined"])
