"""The exported SmolLM2 predictor committed in checkpoints/ still loads and predicts what it did.

tests/data/smollm2_layer19_decode_samples.safetensors holds 32 held-out decode-step states of layer
19 from the real run (data/smollm2_alpaca), their true remaining lengths, and the predictor's output
at export time. If the artifact, the loader or the format drifts, this fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from trail_probe.runtime import LengthPredictor

REPO = Path(__file__).resolve().parents[1]
PREDICTOR = REPO / "checkpoints" / "smollm2_alpaca" / "predictor"
SAMPLES = REPO / "tests" / "data" / "smollm2_layer19_decode_samples.safetensors"


def test_committed_predictor_is_trail_format_for_smollm2():
    config = json.loads((PREDICTOR / "config.json").read_text())
    assert config["hidden_size"] == 576 and config["hidden_dim"] == 512
    assert config["num_labels"] == 10 and config["max_len"] == 512 and config["probe_layer_idx"] == 19
    assert (PREDICTOR / "model.safetensors").stat().st_size < 2_000_000
    meta = json.loads((PREDICTOR / "trail_probe.json").read_text())
    assert "SmolLM2" in json.dumps(meta)


def test_committed_predictor_reproduces_recorded_predictions_and_beats_a_constant():
    predictor = LengthPredictor.from_pretrained(PREDICTOR, num_layers=30)
    samples = load_file(str(SAMPLES))
    states = samples["states"].float()
    probs = predictor.probs(states).float()
    torch.testing.assert_close(probs, samples["probs_at_export"], atol=1e-5, rtol=1e-4)
    estimate = predictor.predict(states).float()
    remaining = samples["remaining"].float()
    assert ((estimate >= 0) & (estimate <= 512)).all()
    best_constant = (remaining - remaining.median()).abs().mean()
    assert (estimate - remaining).abs().mean() < 0.8 * best_constant
