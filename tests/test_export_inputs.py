"""`trail-probe export` of probes that read the pooled inputs (issue 27): recorded in trail_probe.json, exposed by the runtime."""

import json

import pytest
from conftest import pooled_config as config

from trail_probe.errors import UserError
from trail_probe.stages.train import train


def test_the_export_records_each_probes_input_and_the_runtime_exposes_it(pooled_dir, tmp_path):
    from trail_probe.runtime.predictor import LengthPredictor
    from trail_probe.stages.export import export_predictor

    args = ("train.task=both", "train.prompt_input=last", "train.decode_input=current+entropy", "train.epochs=1",
            "export.layer=1", "train.layers=1")
    train(config(pooled_dir, tmp_path, *args))
    out = export_predictor(config(pooled_dir, tmp_path, *args))
    meta = json.loads((out / "trail_probe.json").read_text())
    assert meta["input"] == "current+entropy" and meta["inputs"] == {"prompt": "last", "decode": "current+entropy"}
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16  # TRAIL's files, the input's width
    assert json.loads((out / "prompt" / "trail_probe.json").read_text())["inputs"] == {"prompt": "last", "decode": None}
    decode, prompt = LengthPredictor.from_pretrained(out), LengthPredictor.from_pretrained(out / "prompt")
    assert (decode.input, decode.hidden_size, decode.state_width) == ("current+entropy", 16, 8)
    assert (prompt.input, prompt.state_width) == ("last", 8)
    decode.check_serving_model(3, hidden_size=8)  # the serving model's own width
    with pytest.raises(UserError, match="width 8 but the serving model's are 16"):
        decode.check_serving_model(3, hidden_size=16)
    # an export that does not say (ours before inputs, TRAIL's release) reads TRAIL's inputs
    for folder, expected in ((out, "current"), (out / "prompt", "mean")):
        data = json.loads((folder / "trail_probe.json").read_text())
        data.pop("input")
        assert LengthPredictor(decode.probe, decode.bins, 1, data).input == expected
