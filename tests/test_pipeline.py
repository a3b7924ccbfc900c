"""`trail-probe pipeline` runs every stage on tiny models, and running it again resumes cleanly."""

from __future__ import annotations

import json

from conftest import make_tiny_bert_encoder

from trail_probe.cli import main


def test_pipeline_end_to_end_then_resumes(tiny_llama, prompts_file, tmp_path, capsys):
    bert = make_tiny_bert_encoder(tmp_path / "bert")
    ckpt = tmp_path / "ckpt"
    args = ["pipeline", "recipes/smollm2_alpaca_hf.yaml", f"model.name_or_path={tiny_llama}",
            f"prompts.source={prompts_file}", f"extract.out_dir={tmp_path / 'data'}", f"train.out_dir={ckpt}",
            "generation.max_new_tokens=24", "generation.batch_size=4", "extract.decode_stride=2",
            "train.epochs=2", "train.layers=all", "train.multi_layer=none", "train.train_fraction=0.6",
            f"baseline.model={bert}", "baseline.epochs=1", "baseline.max_length=16",
            "refine.interval=2", "simulate.num_requests=40", "simulate.loads=[0.8]",
            "simulate.burst=false", "simulate.max_running=4", "simulate.token_budget=64",
            "simulate.kv_capacity_tokens=4000"]
    assert main(args) == 0, capsys.readouterr().err
    timings = json.loads((ckpt / "pipeline_timings.json").read_text())
    assert set(timings) == {"extract", "train", "train-baseline", "eval", "export", "simulate"}
    predictor = json.loads((ckpt / "predictor" / "config.json").read_text())
    assert predictor["hidden_size"] == 64 and predictor["probe_layer_idx"] in (0, 1, 2)
    prior = json.loads((ckpt / "predictor" / "trail_probe.json").read_text())["label_prior"]
    assert len(prior) == predictor["num_labels"] and abs(sum(prior) - 1) < 1e-9 and min(prior) >= 0
    report = json.loads((ckpt / "eval" / "report.json").read_text())
    assert report["methods"]["bert"] is not None and report["methods"]["refined"] is not None
    assert (ckpt / "simulate" / "results.json").is_file()
    probe = ckpt / "probes" / "decode" / "layer-0" / "probe.safetensors"
    before = probe.stat().st_mtime_ns
    assert main(args) == 0, capsys.readouterr().err  # a second run resumes: nothing is retrained
    assert probe.stat().st_mtime_ns == before
    assert "keeping the trained baseline" in capsys.readouterr().out
