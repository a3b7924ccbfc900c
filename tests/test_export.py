"""`trail-probe export`: a contract-1 probe folder in, a TRAIL predictor directory out."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_bert_predictor
from safetensors.torch import load_file, save_file

from trail_probe.cli import main
from trail_probe.config import load_recipe
from trail_probe.errors import UserError
from trail_probe.model_files import file_sha256
from trail_probe.runtime import BertLengthPredictor, LengthPredictor
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.probe import LengthProbe
from trail_probe.stages.export import export_predictor

D, NUM_LAYERS = 24, 6
MODEL = {"name_or_path": "synthetic://linear-length", "weights_sha256": "ab" * 32, "num_layers": NUM_LAYERS, "hidden_size": D}


def make_probe_folder(checkpoint_dir, layer, task="decode", multi_layer="none", seed=0, standardize=False) -> LengthProbe:
    """What `trail-probe train` writes for one probe (contract 1), without needing train.py."""
    torch.manual_seed(seed)
    layers = [layer] if multi_layer == "none" else [layer, layer + 1]
    probe = LengthProbe(D * len(layers) if multi_layer == "concat" else D, 512, 10, standardize=standardize)
    if standardize:  # states with large, uneven norms, as the deep layers of a real model give
        probe.set_input_stats(200 + 50 * torch.randn(500, probe.input_dim) * torch.linspace(0.1, 3, probe.input_dim))
    name = f"layer-{layer}" if multi_layer == "none" else f"{multi_layer}-{layers[0]}-{layers[-1]}"
    folder = checkpoint_dir / "probes" / task / name
    folder.mkdir(parents=True)
    save_file(probe.state_dict(), str(folder / "probe.safetensors"))
    (folder / "probe.json").write_text(json.dumps({
        "format": "trail_probe.probe/1", "task": task, "layers": layers, "multi_layer": multi_layer, "input_dim": probe.input_dim,
        "hidden_dim": 512, "num_labels": 10, "bins": Bins(10, 512).to_dict(), "model": MODEL, "standardize": standardize,
        "extraction": {"path": "data/x", "manifest_sha256": "cd" * 32}, "split": {"path": "split.json", "sha256": "ef" * 32},
        "metrics": {"val/mae": 33.9, "val/acc": 0.62, "val/loss": 1.1, "best_epoch": 4},
        "config_sha256": "12" * 32, "layer_numbering": "TRAIL runtime numbering",
    }))
    return probe


def recipe(tmp_path, *overrides):
    return load_recipe(None, [f"train.out_dir={tmp_path / 'ckpt'}", "train.layers=3", *overrides])


def test_export_then_load_predicts_bit_identically(tmp_path):
    probe = make_probe_folder(tmp_path / "ckpt", layer=3).eval()
    out = export_predictor(recipe(tmp_path))
    assert out == tmp_path / "ckpt" / "predictor"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "recipe.yaml", "trail_probe.json"]
    assert json.loads((out / "config.json").read_text()) == {
        "hidden_size": D, "hidden_dim": 512, "num_labels": 10, "max_len": 512, "probe_layer_idx": 3, "dtype": "float32",
        "device": "cpu"}  # the recipe's model.device: TRAIL's runtime reads it (and defaults to cpu without it)
    assert sorted(load_file(out / "model.safetensors")) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]

    predictor = LengthPredictor.from_pretrained(out, num_layers=NUM_LAYERS)
    x = torch.randn(33, D)
    with torch.no_grad():
        expected = torch.softmax(probe(x), -1)
    assert torch.equal(predictor.probs(x), expected)
    assert torch.equal(predictor.predict(x), Bins(10, 512).expectation(expected))

    meta = json.loads((out / "trail_probe.json").read_text())
    assert meta["serving_model"] == MODEL and meta["probe_layer_idx"] == 3 and meta["task"] == "decode"
    assert meta["weights_sha256"] == file_sha256(out / "model.safetensors")
    assert meta["bins"]["edges"] == Bins(10, 512).edges.tolist()
    assert meta["metrics"]["val/mae"] == 33.9
    assert meta["training"]["split"]["sha256"] == "ef" * 32 and meta["training"]["config_sha256"] == "12" * 32
    assert meta["source"]["probe_dir"].endswith("probes/decode/layer-3") and meta["bert"] is None
    assert meta["label_prior"] is None  # no extraction here: nothing to count the training labels from
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp folders left

    first_hash = meta["weights_sha256"]
    export_predictor(recipe(tmp_path))  # a second export replaces the first, byte for byte the same weights
    assert json.loads((out / "trail_probe.json").read_text())["weights_sha256"] == first_hash


def test_a_standardizing_probe_exports_folded_into_fc1_with_the_same_probabilities(tmp_path):
    from trail_probe.offline.artifacts import load_probe

    probe = make_probe_folder(tmp_path / "ckpt", layer=3, standardize=True).eval()
    assert float(probe.input_mean.mean()) > 100 and float(probe.input_std.min()) < float(probe.input_std.max()) / 5
    out = export_predictor(recipe(tmp_path))
    assert sorted(load_file(out / "model.safetensors")) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    predictor = LengthPredictor.from_pretrained(out, num_layers=NUM_LAYERS)
    loaded, meta = load_probe(tmp_path / "ckpt" / "probes" / "decode" / "layer-3")
    assert meta["standardize"] and loaded.standardize
    x = 200 + 50 * torch.randn(64, D)
    with torch.no_grad():
        expected = torch.softmax(probe(x), -1)
        assert torch.equal(torch.softmax(loaded(x), -1), expected)
        unstandardized = torch.softmax(probe.fc2(torch.relu(probe.fc1(x))), -1)  # fc1 without the fold
    torch.testing.assert_close(predictor.probs(x), expected, atol=1e-5, rtol=1e-4)
    assert (unstandardized - expected).abs().max() > 1e-2  # the fold is doing the work


def test_device_follows_the_model_unless_set_and_the_last_layer_needs_consent(tmp_path, capsys):
    make_probe_folder(tmp_path / "ckpt", layer=3)
    out = export_predictor(recipe(tmp_path, "model.device=cuda:1"))
    assert json.loads((out / "config.json").read_text())["device"] == "cuda:1"
    out = export_predictor(recipe(tmp_path, "model.device=cuda", "export.device=cpu"))
    assert json.loads((out / "config.json").read_text())["device"] == "cpu"
    with pytest.raises(UserError, match="is not cpu, cuda or cuda:N"):
        export_predictor(recipe(tmp_path, "export.device=gpu0"))
    make_probe_folder(tmp_path / "ckpt", layer=NUM_LAYERS - 1)
    with pytest.raises(UserError, match="last decoder layer, which TRAIL's runtime cannot capture"):
        export_predictor(recipe(tmp_path, f"export.layer={NUM_LAYERS - 1}"))
    out = export_predictor(recipe(tmp_path, f"export.layer={NUM_LAYERS - 1}", "export.allow_last_layer=true",
                                  f"export.out_dir={tmp_path / 'last'}"))
    assert json.loads((out / "config.json").read_text())["probe_layer_idx"] == NUM_LAYERS - 1


def test_layer_choice_sweep_then_train_layers_then_override(tmp_path):
    for layer in (2, 3, 4):
        make_probe_folder(tmp_path / "ckpt", layer=layer, seed=layer)
    assert json.loads((export_predictor(recipe(tmp_path)) / "config.json").read_text())["probe_layer_idx"] == 3
    sweep = tmp_path / "ckpt" / "sweep" / "layer_sweep.json"
    sweep.parent.mkdir()
    sweep.write_text(json.dumps({"best_layer": {"decode": 4, "prompt": 1}}))
    assert json.loads((export_predictor(recipe(tmp_path)) / "config.json").read_text())["probe_layer_idx"] == 4
    out = export_predictor(recipe(tmp_path, "export.layer=2", f"export.out_dir={tmp_path / 'p2'}"))
    assert json.loads((out / "config.json").read_text())["probe_layer_idx"] == 2


def test_include_baseline_copies_the_bert_predictor(tmp_path):
    make_probe_folder(tmp_path / "ckpt", layer=3)
    make_tiny_bert_predictor(tmp_path / "ckpt" / "baseline")
    (tmp_path / "ckpt" / "baseline" / "last.ckpt").write_bytes(b"lightning state")
    out = export_predictor(recipe(tmp_path, "export.include_baseline=true"))
    assert (out / "bert" / "config.json").is_file() and not (out / "bert" / "last.ckpt").exists()
    assert json.loads((out / "trail_probe.json").read_text())["bert"] == {
        "dir": "bert", "source": str(tmp_path / "ckpt" / "baseline"), "metrics": {"val/mae": 46.1}}
    bert = BertLengthPredictor.from_pretrained(out / "bert")
    assert bert.probs(["write a poem"]).shape == (1, 10)


BAD_EXPORTS = {
    "multi-layer probe": (lambda c: make_probe_folder(c, 3, multi_layer="concat", seed=1), ["export.probe=concat-3-4"], "multi-layer probe"),
    "no probe": (lambda c: make_probe_folder(c, 2), [], "found: layer-2"),
    "no baseline": (lambda c: make_probe_folder(c, 3), ["export.include_baseline=true"], "no BERT baseline"),
    "baseline on other bins": (lambda c: (make_probe_folder(c, 3), make_tiny_bert_predictor(c / "baseline", num_labels=8)),
                               ["export.include_baseline=true"], "8 bins over [0, 512]"),
    "recipe on other bins": (lambda c: make_probe_folder(c, 3), ["bins.num_bins=12"], "uses 12 over"),
    "bad task": (lambda c: make_probe_folder(c, 3), ["export.task=total"], "must be one of prompt, decode"),
    "nan metrics": (lambda c: (make_probe_folder(c, 3), _set_metric(c / "probes/decode/layer-3", "val/mae", float("nan"))),
                    [], r"non-finite metrics \(val/mae nan\)"),
}


def _set_metric(folder, key, value):
    meta = json.loads((folder / "probe.json").read_text())
    meta["metrics"][key] = value
    (folder / "probe.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", sorted(BAD_EXPORTS))
def test_bad_exports_fail_in_one_line(tmp_path, case):
    setup, overrides, message = BAD_EXPORTS[case]
    setup(tmp_path / "ckpt")
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        export_predictor(recipe(tmp_path, *overrides))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt" / "predictor").exists()


def test_nan_weights_in_the_probe_are_refused(tmp_path):
    make_probe_folder(tmp_path / "ckpt", layer=3)
    folder = tmp_path / "ckpt" / "probes" / "decode" / "layer-3"
    state = load_file(folder / "probe.safetensors")
    state["fc1.weight"][0, 0] = float("nan")
    save_file(state, str(folder / "probe.safetensors"))
    with pytest.raises(UserError, match="NaN/inf"):
        export_predictor(recipe(tmp_path))


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    make_probe_folder(tmp_path / "ckpt", layer=3)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a predictor export"):
        export_predictor(recipe(tmp_path, f"export.out_dir={tmp_path / 'mine'}"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRAIL_PROBE_QUIET", "1")
    make_probe_folder(tmp_path / "ckpt", layer=3)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"run_name: tiny\ntrain:\n  out_dir: {tmp_path / 'ckpt'}\n  layers: '3'\n")
    assert main(["export", str(path)]) == 0
    assert "exported the decode probe of layer 3" in capsys.readouterr().out
    assert main(["export", str(path), "export.layer=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trail-probe export: error: no trained decode probe") and "\n" not in err
