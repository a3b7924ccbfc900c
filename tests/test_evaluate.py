"""`trail-probe eval` on tiny synthetic runs whose right answers are known, plus its bad inputs.

The synthetic extraction is noise-free in layers 1 and 2 (the state is length/512 * 4 * direction),
so a hand-built "oracle" probe recovers the true bin exactly: every estimate is the midpoint of the
true bin (clamped to the tokens left), and the expected MAEs can be computed directly.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from trail_probe.config import load_recipe
from trail_probe.errors import UserError
from trail_probe.model_files import file_sha256
from trail_probe.offline.artifacts import PROBE_FORMAT
from trail_probe.offline.metrics import accuracy, confusion, kendall_tau, mae, summary
from trail_probe.offline.split import load_or_make_split
from trail_probe.offline.store import LAYER_NUMBERING, Extraction
from trail_probe.offline.synthetic import SYNTHETIC_MODEL, make_synthetic_extraction
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.estimates import count_down, estimate
from trail_probe.runtime.probe import LengthProbe

BINS = Bins(10, 512)
MAX_NEW = 512


# -- metric functions against hand computations ---------------------------------------------------
def test_metric_functions_match_hand_computations():
    probs = torch.tensor([[1.0] + [0.0] * 9, [0.0] * 9 + [1.0], [0.5, 0.5] + [0.0] * 8])
    # expectations 25.6, 486.4, 51.2; the second is capped at 100 tokens left
    est = estimate(probs, BINS, torch.tensor([512.0, 100.0, 512.0]))
    assert est.tolist() == pytest.approx([25.6, 100.0, 51.2], abs=1e-4)
    assert count_down(torch.tensor([30.0, 5.0]), torch.tensor([10, 8]), torch.tensor([400, 400])).tolist() == [20.0, 0.0]
    assert count_down(torch.tensor([300.0]), 10, 50).tolist() == [50.0]
    truth = torch.tensor([20, 110, 60])
    assert mae(est, truth) == pytest.approx((5.6 + 10.0 + 8.8) / 3, abs=1e-4)
    assert math.isnan(mae(torch.zeros(0), torch.zeros(0)))
    # bins of truth: 0, 2, 1; argmax: 0, 9, 0 (ties go to the lower bin)
    assert accuracy(probs, truth, BINS) == pytest.approx(1 / 3)
    c = confusion(probs, truth, BINS)
    assert c[0, 0] == 1 and c[2, 9] == 1 and c[1, 0] == 1 and c.sum() == 3
    s = summary(est, truth, probs, BINS)
    assert {k: s[k] for k in ("mae", "n", "acc")} == {"mae": pytest.approx(8.1333, abs=1e-3), "n": 3, "acc": pytest.approx(1 / 3)}
    assert s["kendall_tau"] == pytest.approx(1.0)  # 25.6 < 51.2 < 100 orders as 20 < 60 < 110: 3 of 3 pairs agree
    # tau-b by hand: one of six pairs swapped, (5 - 1) / 6; a tie in the estimates, 2 / sqrt((3 - 1) * 3)
    assert kendall_tau(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(2 / 3)
    assert kendall_tau(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / math.sqrt(6))


# -- a tiny synthetic run -------------------------------------------------------------------------
def oracle_probe(direction: torch.Tensor, sharp: float = 1000.0) -> LengthProbe:
    """A probe whose logit for bin i is -sharp * |s + 0.1 - m_i|, s = the length the state encodes:
    one-hot on the bin that holds s. (|x| = relu(x) + relu(-x); the 0.1 token breaks the tie at the
    integer edge 256 towards the upper bin, as Bins.label does, without moving any other length.)"""
    k, d = BINS.num_bins, direction.numel()
    probe = LengthProbe(d, 2 * k, k)
    reading = direction * MAX_NEW / 4  # s = state . reading
    with torch.no_grad():
        probe.fc1.weight.copy_(torch.cat([reading.expand(k, d), -reading.expand(k, d)]))
        m = BINS.midpoints - 0.1
        probe.fc1.bias.copy_(torch.cat([-m, m]))
        probe.fc2.weight.copy_(-sharp * torch.cat([torch.eye(k), torch.eye(k)], 1))
        probe.fc2.bias.zero_()
    return probe


def uniform_probe(d: int) -> LengthProbe:
    probe = LengthProbe(d, 4, BINS.num_bins)
    with torch.no_grad():
        probe.fc2.weight.zero_()
        probe.fc2.bias.zero_()
    return probe


def write_probe(cfg, task: str, layer: int, probe: LengthProbe, extraction: Extraction, changes=None) -> None:
    """A contract-1 probe folder, as `trail-probe train` writes it."""
    folder = cfg.paths.checkpoints / "probes" / task / f"layer-{layer}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(folder / "probe.safetensors"))
    split = cfg.paths.split
    meta = {"format": PROBE_FORMAT, "task": task, "layers": [layer], "multi_layer": "none",
            "input_dim": probe.input_dim, "hidden_dim": probe.hidden_dim, "num_labels": probe.num_labels,
            "bins": BINS.to_dict(), "model": dict(extraction.model),
            "extraction": {"path": str(extraction.root), "manifest_sha256": file_sha256(extraction.root / "manifest.json")},
            "split": {"path": str(split), "sha256": file_sha256(split)},
            "metrics": {"val/mae": 1.0, "val/acc": 1.0, "val/loss": 0.0, "best_epoch": 0},
            "config_sha256": "test", "layer_numbering": LAYER_NUMBERING}
    meta.update(changes or {})
    (folder / "probe.json").write_text(json.dumps(meta))


def make_run(tmp_path, decode: str = "oracle", prompt: bool = True, layers=(1,), overrides=()):
    """Synthetic extraction (noise-free), split.json, and probes for `layers`; returns (cfg, extraction)."""
    data = tmp_path / "data"
    make_synthetic_extraction(data, num_requests=80, hidden_size=8, num_layers=3, informative=(1, 2),
                              noise=0.0, dtype=torch.float32)
    cfg = load_recipe(None, [f"extract.out_dir={data}", f"train.out_dir={tmp_path / 'ckpt'}",
                             f"model.name_or_path={SYNTHETIC_MODEL}", f"eval.layer={layers[0]}",
                             "eval.curve_step=32", *overrides])
    extraction = Extraction(data)
    load_or_make_split(cfg, extraction)
    longest = int(extraction.output_tokens.argmax())
    x = extraction.prompt_states(1)[longest]
    direction = x / x.norm()
    for layer in layers:
        if prompt:
            write_probe(cfg, "prompt", layer, oracle_probe(direction), extraction)
        if decode:
            probe = oracle_probe(direction) if decode == "oracle" else uniform_probe(8)
            write_probe(cfg, "decode", layer, probe, extraction)
    return cfg, extraction


def quantised(lengths: torch.Tensor, cap) -> torch.Tensor:
    """What a perfect bin classifier estimates: the true bin's midpoint, clamped to [0, cap]."""
    return BINS.midpoints.double()[BINS.label(lengths)].minimum(torch.as_tensor(cap, dtype=torch.float64))


def held_out(cfg, extraction):
    val = json.loads((cfg.paths.split).read_text())["val_ids"]
    rows = torch.tensor([extraction.ids.index(i) for i in val])
    return rows, extraction.output_tokens[rows]


def decode_steps(extraction, rows):
    ds = extraction.decode(1)
    keep = torch.isin(ds.request, rows)
    return ds.request[keep], ds.generated[keep], ds.remaining[keep]


def test_oracle_probes_score_exactly_the_quantisation_error(tmp_path):
    from trail_probe.stages.evaluate import evaluate

    cfg, extraction = make_run(tmp_path)
    report = evaluate(cfg)
    rows, total = held_out(cfg, extraction)
    _, j, remaining = decode_steps(extraction, rows)
    m = report["methods"]

    assert m["prompt_probe"]["total"]["acc"] == 1.0
    assert m["prompt_probe"]["total"]["mae"] == pytest.approx(mae(quantised(total, MAX_NEW), total), abs=1e-3)
    expected_step = mae(quantised(remaining, MAX_NEW - j), remaining)
    for method in ("per_step", "refined"):  # a perfect predictor: refinement keeps it perfect
        assert m[method]["remaining"]["acc"] == 1.0
        assert m[method]["remaining"]["n"] == len(j)
        assert m[method]["remaining"]["mae"] == pytest.approx(expected_step, abs=1e-3)
    assert m["refined"]["prior"] == "prompt_probe"
    # The prompt probe counted down over the decode steps: the total's midpoint minus j, clamped.
    request, _, _ = decode_steps(extraction, rows)
    own_total = extraction.output_tokens[request]
    counted = count_down(quantised(own_total, MAX_NEW), j, MAX_NEW - j)
    assert m["prompt_probe"]["remaining"]["mae"] == pytest.approx(mae(counted, remaining), abs=1e-3)
    assert m["bert"] is None and any("BERT baseline skipped" in n for n in report["notes"])
    assert report["headline"]["bert_over_refined_decode"] is None

    out = tmp_path / "ckpt" / "eval"
    for name in ("report.md", "report.json", "predictions.json", "mae_by_layer.png", "mae_vs_generated.png",
                 "bin_heatmap.png", "config.yaml"):
        assert (out / name).is_file(), name
    predictions = json.loads((out / "predictions.json").read_text())
    assert set(predictions) == {"bins", "refine_interval", "max_new_tokens", "layer", "requests"}
    assert predictions["refine_interval"] == 8 and predictions["layer"] == 1 and predictions["max_new_tokens"] == 512
    assert [r["id"] for r in predictions["requests"]] == json.loads((cfg.paths.split).read_text())["val_ids"]
    for r in predictions["requests"]:
        n = r["output_tokens"]
        assert r["bert_estimate"] is None
        assert r["prompt_probe_estimate"] == pytest.approx(float(quantised(torch.tensor([n]), MAX_NEW)), abs=1e-3)
        js = list(range(1, n + 1, 8))
        assert [p[0] for p in r["refined"]] == js == [p[0] for p in r["per_step"]]
        left = torch.tensor([n - x for x in js])
        want = quantised(left, MAX_NEW - torch.tensor(js)).tolist()
        assert [p[1] for p in r["refined"]] == pytest.approx(want, abs=1e-3)
        assert [p[1] for p in r["per_step"]] == pytest.approx(want, abs=1e-3)
    # The confusion of a perfect predictor is diagonal.
    c = torch.tensor(report["confusion"]["refined"])
    assert c.sum() == len(j) and torch.equal(c, torch.diag(torch.diag(c)))


def test_curve_counts_down_between_refinements(tmp_path):
    """With k = 16 > stride 8, the refined estimate at t is that of the last refinement j0 <= t
    (j0 = 1, 17, 33, ...) minus (t - j0); BERT-like totals are counted down by t."""
    from trail_probe.stages.evaluate import evaluate

    cfg, extraction = make_run(tmp_path, overrides=["refine.interval=16", "eval.curve_step=24"])
    report = evaluate(cfg)
    _, total = held_out(cfg, extraction)
    curve = report["curve"]
    assert curve["tokens"][:4] == [0, 24, 48, 72]
    assert curve["per_step"][0] is None and curve["refined"][0] is None
    for i, t in enumerate(curve["tokens"]):
        active = total > t if t else torch.ones_like(total, dtype=torch.bool)
        n = total[active]
        assert curve["requests"][i] == int(active.sum())
        prompt = count_down(quantised(n, MAX_NEW), t, MAX_NEW - t)
        assert curve["prompt_probe"][i] == pytest.approx(mae(prompt, n - t), abs=1e-3)
        if t:
            j0 = 1 + (t - 1) // 16 * 16
            refined = count_down(quantised(n - j0, MAX_NEW - j0), t - j0, MAX_NEW - t)
            assert curve["refined"][i] == pytest.approx(mae(refined, n - t), abs=1e-3)
            assert curve["per_step"][i] == pytest.approx(curve["refined"][i], abs=1e-3)
    # Over all stored steps j (every 8 tokens), the refined estimate between refinements is the last
    # one counted down; its most likely bin stays the last refinement's, so accuracy drops below 1
    # exactly where a bin edge was crossed since.
    rows, _ = held_out(cfg, extraction)
    request, j, remaining = decode_steps(extraction, rows)
    n = extraction.output_tokens[request]
    j0 = 1 + (j - 1) // 16 * 16
    want = count_down(quantised(n - j0, MAX_NEW - j0), j - j0, MAX_NEW - j)
    refined = report["methods"]["refined"]["remaining"]
    assert refined["mae"] == pytest.approx(mae(want, remaining), abs=1e-3)
    same_bin = (BINS.label(n - j0) == BINS.label(remaining)).double().mean().item()
    assert refined["acc"] == pytest.approx(same_bin) and same_bin < 1
    predictions = json.loads((tmp_path / "ckpt" / "eval" / "predictions.json").read_text())
    assert all([p[0] for p in r["refined"]] == list(range(1, r["output_tokens"] + 1, 16))
               for r in predictions["requests"])


def test_uninformative_decode_probe_leaves_the_counted_down_prior(tmp_path):
    from trail_probe.stages.evaluate import evaluate

    cfg, _ = make_run(tmp_path, decode="uniform")
    report = evaluate(cfg)
    predictions = json.loads((tmp_path / "ckpt" / "eval" / "predictions.json").read_text())
    checked = 0
    for r in predictions["requests"]:
        prior = r["prompt_probe_estimate"]
        for j, est in r["refined"]:
            # Far from bin 0 and early, the prior moved by T^j falls by one per token.
            if prior > 4 * BINS.width and j <= 33:
                assert est == pytest.approx(prior - j, abs=0.5)
                checked += 1
        assert all(p == pytest.approx(256.0, abs=1e-3) or p == pytest.approx(512 - j, abs=1e-3)
                   for j, p in r["per_step"])
    assert checked > 10
    m = report["methods"]
    # Refining a useless per-step predictor onto a perfect prior does far better than the per-step one.
    assert m["refined"]["remaining"]["mae"] < 0.5 * m["per_step"]["remaining"]["mae"]
    assert m["refined"]["prior"] == "prompt_probe"


def test_report_holds_every_method_with_the_baseline_and_all_layers(tmp_path):
    from conftest import make_tiny_bert_encoder

    from trail_probe.stages.baseline import train_baseline
    from trail_probe.stages.evaluate import METHODS, evaluate

    make_tiny_bert_encoder(tmp_path / "bert")
    cfg, extraction = make_run(tmp_path, layers=(2, 0, 1), overrides=[
        f"baseline.model={tmp_path / 'bert'}", "baseline.epochs=1", "baseline.batch_size=16",
        "baseline.max_length=16", "eval.all_layers=true"])
    train_baseline(cfg, show_progress=False)
    report = evaluate(cfg, command=["trail-probe", "eval", "recipe.yaml", "eval.all_layers=true"])

    assert report["layer"] == 2 and report["layers"] == [0, 1, 2]
    for method in METHODS:
        assert report["methods"][method] is not None, method
    assert set(report["methods"]["bert"]) == {"total", "remaining"}
    h = report["headline"]
    bert = report["methods"]["bert"]
    assert h["bert_over_refined_decode"] == pytest.approx(bert["remaining"]["mae"] / report["methods"]["refined"]["remaining"]["mae"])
    assert h["bert_over_prompt_probe_step0"] == pytest.approx(bert["total"]["mae"] / report["methods"]["prompt_probe"]["total"]["mae"])
    assert h["bert_over_refined_decode"] > 1  # a perfect probe beats a 1-epoch BERT on uninformative text
    # Layer 0 carries no signal (all-zero states): its probe is much worse than layers 1 and 2.
    by_layer = report["by_layer"]
    assert by_layer["0"]["refined"]["remaining"]["mae"] > 2 * by_layer["1"]["refined"]["remaining"]["mae"]
    assert by_layer["1"]["refined"]["remaining"]["mae"] == pytest.approx(by_layer["2"]["refined"]["remaining"]["mae"])

    out = tmp_path / "ckpt" / "eval"
    md = (out / "report.md").read_text()
    assert "trail-probe eval recipe.yaml eval.all_layers=true" in md
    for label in ("(a) BERT", "(b) probe", "(c) decode probe", "(d) decode probe, refined", "MAE by layer",
                  "MAE against tokens generated", "True against predicted bin", "Resolved config"):
        assert label in md, label
    saved = json.loads((out / "report.json").read_text())
    assert saved["hashes"]["split"] == file_sha256(cfg.paths.split)
    assert saved["hashes"]["extraction_manifest"] == file_sha256(tmp_path / "data" / "manifest.json")
    assert len(saved["hashes"]["probes"]) == 6
    assert saved["hashes"]["baseline_weights"]["model.safetensors"] == file_sha256(
        tmp_path / "ckpt" / "baseline" / "model.safetensors")
    assert saved["config"]["eval"]["all_layers"] is True
    assert set(saved["confusion"]) == {"bert", "prompt_probe", "refined"}
    predictions = json.loads((out / "predictions.json").read_text())
    assert all(isinstance(r["bert_estimate"], float) for r in predictions["requests"])
    assert saved["split"]["selection"]["side"] == "held-out"  # train.validation_fraction=0: the same requests

    # BERT's distribution as the refinement's starting point (with this perfect decode probe the
    # posterior is one-hot after the first refinement, so the MAE is the same; the label says which)
    cfg.refine.prior = "bert"
    with_bert = evaluate(cfg)["methods"]["refined"]
    assert with_bert["prior"] == "bert"
    assert with_bert["remaining"]["mae"] == pytest.approx(report["methods"]["refined"]["remaining"]["mae"])


def test_layer_defaults_to_the_best_decode_layer_of_the_sweep(tmp_path):
    from trail_probe.stages.evaluate import choose_layer

    cfg, extraction = make_run(tmp_path, layers=(1,), overrides=["eval.layer=null", "train.layers=0-2"])
    assert choose_layer(cfg) == (0, "first of train.layers")
    sweep = cfg.paths.checkpoints / "sweep" / "layer_sweep.json"
    sweep.parent.mkdir(parents=True)
    sweep.write_text(json.dumps({"best_layer": {"prompt": 2, "decode": 1}}))
    assert choose_layer(cfg)[0] == 1


def test_after_a_layer_search_the_prompt_probe_beside_the_decode_layer_is_the_one_export_bundles(tmp_path):
    """A search trains the best prompt layer (2) but not the decode layer's (1): row (b) and the refined
    prior are layer 2's prompt probe, as the server's initial estimator is."""
    from trail_probe.stages.evaluate import evaluate

    cfg, extraction = make_run(tmp_path, layers=(1,), prompt=False, overrides=["eval.layer=null", "train.layers=0-2"])
    x = extraction.prompt_states(2)[int(extraction.output_tokens.argmax())]
    write_probe(cfg, "prompt", 2, oracle_probe(x / x.norm()), extraction)
    sweep = cfg.paths.checkpoints / "sweep" / "layer_sweep.json"
    sweep.parent.mkdir(parents=True)
    sweep.write_text(json.dumps({"best_layer": {"prompt": 2, "decode": 1}}))
    report = evaluate(cfg)
    rows, total = held_out(cfg, extraction)
    m = report["methods"]
    assert m["prompt_probe"]["total"]["mae"] == pytest.approx(mae(quantised(total, MAX_NEW), total), abs=1e-3)
    assert m["refined"]["prior"] == "prompt_probe" and any("layer 2's prompt probe, the sweep's best prompt layer" in n
                                                            for n in report["notes"])


# -- bad input ------------------------------------------------------------------------------------
def test_refine_interval_must_be_a_multiple_of_the_stride(tmp_path):
    from trail_probe.stages.evaluate import evaluate

    cfg, _ = make_run(tmp_path, overrides=["refine.interval=12"])
    with pytest.raises(UserError, match="multiple of the extraction's decode_stride 8"):
        evaluate(cfg)


@pytest.mark.parametrize("change, message", [
    ({"model": {"name_or_path": "other/model", "weights_sha256": "abc"}}, "trained for model 'other/model'"),
    ({"extraction": {"path": "data/elsewhere", "manifest_sha256": "0" * 64}}, "another extraction"),
    ({"split": {"path": "old/split.json", "sha256": "0" * 64}}, "another split"),
    ({"bins": Bins(5, 512).to_dict(), "num_labels": 5}, "5 bins"),
])
def test_probes_from_another_run_are_refused(tmp_path, change, message):
    from trail_probe.stages.evaluate import evaluate

    cfg, extraction = make_run(tmp_path)
    probe = LengthProbe(8, 4, change.get("num_labels", 10))
    write_probe(cfg, "decode", 1, probe, extraction, change)
    with pytest.raises(UserError, match=message):
        evaluate(cfg)


def test_probes_and_split_of_an_older_extraction_are_refused(tmp_path):
    from trail_probe.stages.evaluate import evaluate

    cfg, _ = make_run(tmp_path)
    make_synthetic_extraction(tmp_path / "data", num_requests=80, hidden_size=8, num_layers=3, seed=1,
                              noise=0.0, dtype=torch.float32)  # re-extracted: same ids, other manifest
    with pytest.raises(UserError, match="another extraction"):
        evaluate(cfg)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(val_ids=[]), "held-out side .* is empty"),
    (lambda s: s.update(val_ids=s["val_ids"] + s["train_ids"][:2]), "in both training and held-out"),
])
def test_bad_splits_are_refused(tmp_path, edit, message):
    from trail_probe.stages.evaluate import evaluate

    cfg, _ = make_run(tmp_path)
    path = cfg.paths.split
    split = json.loads(path.read_text())
    edit(split)
    path.write_text(json.dumps(split))
    with pytest.raises(UserError, match=message):
        evaluate(cfg)


def _fake_baseline(cfg, extraction, **changes):
    folder = cfg.paths.checkpoints / "baseline"
    folder.mkdir(parents=True)
    split = cfg.paths.split
    meta = {"bins": BINS.to_dict(), "model": extraction.model,
            "split": {"path": str(split), "sha256": file_sha256(split)},
            "extraction": {"path": str(extraction.root), "manifest_sha256": file_sha256(extraction.root / "manifest.json")}}
    meta.update(changes)
    (folder / "baseline.json").write_text(json.dumps(meta))


def test_a_baseline_on_other_bins_than_the_probe_is_refused(tmp_path):
    from trail_probe.stages.evaluate import evaluate

    cfg, extraction = make_run(tmp_path)
    _fake_baseline(cfg, extraction, bins=Bins(20, 512).to_dict())
    with pytest.raises(UserError, match="baseline .* 20 bins over \\[0, 512\\]"):
        evaluate(cfg)


def test_a_baseline_on_another_split_is_refused(tmp_path):
    from trail_probe.stages.evaluate import evaluate

    cfg, extraction = make_run(tmp_path)
    _fake_baseline(cfg, extraction, split={"path": "x/split.json", "sha256": "1" * 64})
    with pytest.raises(UserError, match="baseline .* another split"):
        evaluate(cfg)


def test_no_probe_for_the_layer_is_a_user_error(tmp_path):
    from trail_probe.stages.evaluate import evaluate

    cfg, _ = make_run(tmp_path, overrides=["eval.layer=2"])
    with pytest.raises(UserError, match="no trained probe for layer 2"):
        evaluate(cfg)


def test_cli_prints_one_line_errors(tmp_path, capsys):
    from trail_probe.cli import main

    cfg, _ = make_run(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"extract:\n  out_dir: {cfg.paths.data}\ntrain:\n  out_dir: {cfg.paths.checkpoints}\n"
                      f"model:\n  name_or_path: '{SYNTHETIC_MODEL}'\neval:\n  layer: 1\n")
    assert main(["eval", str(recipe), "refine.interval=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trail-probe eval: error:") and "\n" not in err
    assert main(["eval", str(recipe)]) == 0
    assert "BERT MAE" not in capsys.readouterr().out  # no baseline: no ratio, but a clean run


def test_rank_agreement_and_confusion_from_scipy_and_sklearn():
    import torch

    from trail_probe.offline.metrics import confusion, rank_agreement, summary
    from trail_probe.runtime.bins import Bins

    truth = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    assert rank_agreement(truth * 2, truth)["kendall_tau"] == pytest.approx(1.0)
    assert rank_agreement(-truth, truth)["kendall_tau"] == pytest.approx(-1.0)
    # two steps: ordered right within each, but step 1's estimates all above step 0's true lengths' order
    est = torch.tensor([1.0, 2.0, 3.0, 100.0, 200.0, 300.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    flipped = torch.tensor([3.0, 2.0, 1.0, 100.0, 200.0, 300.0])
    assert rank_agreement(est, truth, groups)["kendall_tau_same_step"] == pytest.approx(1.0)
    assert rank_agreement(flipped, truth, groups)["kendall_tau_same_step"] == pytest.approx(0.0)  # (-1 + 1) / 2
    s = summary(est, truth, groups=groups)
    assert set(s) == {"mae", "n", "kendall_tau", "kendall_tau_same_step"}
    bins = Bins(4, 80)
    probs = torch.eye(4)[torch.tensor([0, 1, 1, 2, 3, 3])]
    expected = torch.zeros(4, 4, dtype=torch.long)
    for t, p in zip(bins.label(truth).tolist(), [0, 1, 1, 2, 3, 3]):
        expected[t, p] += 1
    assert torch.equal(confusion(probs, truth, bins).long(), expected)


def test_eval_on_the_validation_side_scores_only_it_and_refuses_probes_that_saw_it(tmp_path):
    from trail_probe.config import load_recipe as reload
    from trail_probe.offline.split import selection_split
    from trail_probe.stages.evaluate import evaluate

    cfg, extraction = make_run(tmp_path, overrides=["train.validation_fraction=0.3", "eval.split=validation"])
    validation = selection_split(cfg, load_or_make_split(cfg, extraction))  # writes validation.json
    with pytest.raises(UserError, match="not trained with this validation split"):
        evaluate(cfg)  # the probes of make_run say nothing of it: they could have been fitted on it
    chosen = {"side": "validation", "path": validation["path"], "sha256": file_sha256(validation["path"])}
    for task in ("prompt", "decode"):
        folder = cfg.paths.checkpoints / "probes" / task / "layer-1"
        meta = json.loads((folder / "probe.json").read_text())
        (folder / "probe.json").write_text(json.dumps({**meta, "selected_on": chosen}))
    report = evaluate(cfg)
    held_ids = json.loads(cfg.paths.split.read_text())["val_ids"]
    assert report["scored_side"] == "validation" and cfg.paths.eval.name == "eval_validation"
    assert report["held_out"]["requests"] == len(validation["val_ids"]) != len(held_ids)
    predicted = json.loads((cfg.paths.eval / "predictions.json").read_text())
    assert [r["id"] for r in predicted["requests"]] == validation["val_ids"]  # a list, in the split's order
    assert not set(validation["val_ids"]) & set(held_ids)
    no_validation = reload(None, [f"extract.out_dir={extraction.root}", f"train.out_dir={cfg.paths.checkpoints}",
                                  f"model.name_or_path={SYNTHETIC_MODEL}", "eval.layer=1", "eval.split=validation"])
    with pytest.raises(UserError, match="train.validation_fraction is 0"):
        evaluate(no_validation)


def test_global_cadence_refines_each_request_at_its_phase_and_keeps_the_prior_before(tmp_path):
    """TRAIL's release (refine.cadence=global): request r refines at j = 1 + phase_r + 16 i; before its
    first refinement it keeps the prompt probe's estimate, counted down."""
    from trail_probe.offline.refine_scoring import phase_of
    from trail_probe.stages.evaluate import evaluate

    cfg, extraction = make_run(tmp_path, overrides=["refine.interval=16", "refine.cadence=global"])
    report = evaluate(cfg)
    rows, _ = held_out(cfg, extraction)
    ids = [extraction.ids[i] for i in rows.tolist()]
    phase = dict(zip(rows.tolist(), phase_of(ids, 16, 8).tolist()))
    assert set(phase.values()) == {0, 8}  # the stride-8 extraction shows two phases of k = 16
    request, j, remaining = decode_steps(extraction, rows)
    n = extraction.output_tokens[request]
    p = torch.tensor([phase[r] for r in request.tolist()])
    started = j >= 1 + p
    j0 = torch.where(started, 1 + p + (j - 1 - p).clamp_min(0) // 16 * 16, torch.zeros_like(j))
    want = torch.where(started, count_down(quantised(n - j0, MAX_NEW - j0), j - j0, MAX_NEW - j),
                       count_down(quantised(n, MAX_NEW), j, MAX_NEW - j))
    refined = report["methods"]["refined"]["remaining"]
    assert report["methods"]["refined"]["cadence"] == "global"
    assert refined["mae"] == pytest.approx(mae(want, remaining), abs=1e-3)
    per_request = evaluate(load_recipe(None, [f"extract.out_dir={extraction.root}", f"train.out_dir={cfg.paths.checkpoints}",
                                              f"model.name_or_path={SYNTHETIC_MODEL}", "eval.layer=1", "refine.interval=16"]))
    assert per_request["methods"]["refined"]["remaining"]["mae"] != pytest.approx(refined["mae"], abs=1e-3)


def test_global_cadence_needs_a_prior(tmp_path):
    from trail_probe.stages.evaluate import evaluate

    cfg, _ = make_run(tmp_path, overrides=["refine.cadence=global", "refine.prior=none"])
    with pytest.raises(UserError, match="cadence=global .* give it a prior"):
        evaluate(cfg)
