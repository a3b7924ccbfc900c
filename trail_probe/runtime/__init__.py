"""The predictor runtime a server loads: no Lightning, no pipeline stage.

    from trail_probe.runtime import LengthPredictor, BertLengthPredictor, LengthTracker, capture_layer

- `predictor`: the exported probe (`LengthPredictor`) and the BERT prompt predictor
- `tracker`:   `LengthTracker`, every running request's posterior, refined in batches
- `capture`:   the forward hooks that read a decoder layer's residual stream
- `estimates`: the shared rules (expectation, count-down, refinement cadence)
- `refine`, `bins`, `probe`, `models`: the Bayes update, length bins, the MLP, model loading
"""

from trail_probe.runtime.capture import LayerCapture, ProbeLayerCapture, capture_layer
from trail_probe.runtime.predictor import BertLengthPredictor, LengthPredictor
from trail_probe.runtime.tracker import LengthTracker

__all__ = ["BertLengthPredictor", "LayerCapture", "LengthPredictor", "LengthTracker", "ProbeLayerCapture",
           "capture_layer"]
