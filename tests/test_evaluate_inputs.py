"""`trail-probe eval` of probes that read the pooled inputs (issue 27): each scored on its own input, named in the report."""

import json

import pytest
from conftest import pooled_config as config

from trail_probe.errors import UserError
from trail_probe.stages.train import train


def test_eval_scores_each_probe_on_its_input_names_it_and_ranks_every_method(pooled_dir, tmp_path):
    from trail_probe.stages.evaluate import evaluate

    args = ("train.task=both", "train.prompt_input=entropy", "train.decode_input=current+mean", "train.epochs=3",
            "eval.layer=1", f"baseline.out_dir={tmp_path / 'no-baseline'}")
    train(config(pooled_dir, tmp_path, *args))
    report = evaluate(config(pooled_dir, tmp_path, *args))
    assert report["inputs"] == {"prompt": "entropy", "decode": "current+mean"}
    m = report["methods"]
    assert m["prompt_probe"]["input"] == "entropy" and m["refined"]["input"] == m["per_step"]["input"] == "current+mean"
    for method in ("prompt_probe", "per_step", "refined"):  # MAE and Kendall's tau on every target of every row
        for target, entry in m[method].items():
            if isinstance(entry, dict):
                assert entry["mae"] is not None and -1 <= entry["kendall_tau"] <= 1, (method, target)
    text = (tmp_path / "eval" / "report.md").read_text()
    assert "(b) probe on the entropy-weighted prompt state |" in text
    assert "(d) decode probe on the current state beside the generated tokens' mean, refined |" in text
    with pytest.raises(UserError, match="refine.prior=last_token feeds the last prompt token's state"):
        evaluate(config(pooled_dir, tmp_path, *args, "refine.prior=last_token", f"eval.out_dir={tmp_path / 'e2'}"))
