"""The worker side of TRAIL in vLLM: the probe layer's states of every forward pass, sent to the scheduler.

vLLM mixes this class into its worker (`worker_extension_cls`, see `vllm_engine.engine_args`); the
engine calls `trail_probe_attach(layer)` once through `collective_rpc` after start-up. From then on a
forward hook on decoder layer `layer` keeps that layer's output of the flattened batch, and every
`ModelRunnerOutput` the worker returns carries `trail_probe_states`: (request ids in batch order,
[requests, d] float32 on the CPU, the state of each request's last scheduled token). The output
travels to the scheduler's process pickled (vLLM's multiprocess executor), attribute included, so
this works in vLLM's default multiprocess engine and in-process alike.

Layer numbering is TRAIL's: a vLLM Llama decoder layer returns (mlp output, residual), whose sum is
the residual stream after the layer, Hugging Face `hidden_states[L + 1]`. Python hooks run only in
eager mode (`enforce_eager=True`): compiled graphs skip them.

vLLM internals relied on (0.32; the smallest upstream change that would remove each): the runner's
`sample_tokens` returning the step's `ModelRunnerOutput` (upstream: an output-extension hook on the
model runner), `model_runner.query_start_loc.np` (upstream: per-request hidden states on the output,
as `pooler_output` is for pooling models), and `model_runner.model`'s decoder layers.
"""

from __future__ import annotations

import torch

from trail_probe.runtime.capture import LayerCapture, residual_sum
from trail_probe.runtime.models import decoder_layers

STATES_ATTR = "trail_probe_states"


class TrailWorkerExtension:
    """Methods vLLM adds to its worker; names are prefixed so they never clash with the worker's own."""

    def trail_probe_attach(self, layer: int) -> dict:
        """Hook decoder layer `layer` and attach its last-token states to every output; returns the
        model's shape so the caller can check the predictor against it."""
        runner = self.model_runner
        model = runner.model
        capture = self._trail_probe_capture = LayerCapture(model, [layer], states_of=residual_sum)
        original = runner.sample_tokens

        def sample_tokens(*args, **kwargs):
            out = original(*args, **kwargs)
            states = capture.take(layer)
            req_ids = getattr(out, "req_ids", None)
            if states is not None and req_ids:
                n = len(req_ids)
                last = torch.as_tensor(runner.query_start_loc.np[1:n + 1] - 1, dtype=torch.long, device=states.device)
                setattr(out, STATES_ATTR, (list(req_ids), states.index_select(0, last).float().cpu()))
            return out

        runner.sample_tokens = sample_tokens
        config = getattr(model, "config", None)
        return {"num_layers": len(decoder_layers(model)), "hidden_size": getattr(config, "hidden_size", None)}
