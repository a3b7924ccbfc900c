"""The worker side of TRAIL in vLLM: the probe layer's states of every forward pass, sent to the scheduler.

The hook goes in right after the worker loads the model, by a vLLM general plugin (`register`, the
`vllm.general_plugins` entry point of this package), whenever the engine was configured for TRAIL
(`additional_config["trail_probe"]["predictor"]`), so a plain `vllm serve` needs nothing else;
`TrailWorkerExtension.trail_probe_attach` does the same on demand through `collective_rpc`. A
forward hook on the probe's decoder layer keeps that layer's output of the flattened batch, and every
`ModelRunnerOutput` the worker returns carries `trail_probe_states`: (request ids in batch order,
[requests, d] float32 numpy array, the state of each request's last scheduled token). The output
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

from pathlib import Path

import torch

from trail_probe.runtime.capture import LayerCapture, residual_sum
from trail_probe.runtime.models import decoder_layers

STATES_ATTR = "trail_probe_states"
PROMPT_ATTR = "trail_probe_prompt_sums"  # with a prompt probe: (request ids, [requests, d] sums, [requests] token counts)


def attach(runner, layer: int, prompt_layer: int | None = None) -> dict:
    """Hook decoder layer `layer` of the runner's model and attach its last-token states to every
    output the runner returns (once per runner); with `prompt_layer` (a prompt probe's layer), also
    the sum and count of each request's states over the tokens it ran in the pass, which the
    scheduler averages over the prefill chunks of a prompt. Returns the model's shape, and whether
    the hook was already there (put in by the plugin when the model loaded)."""
    model = runner.model
    attached_before = getattr(runner, "_trail_probe_capture", None) is not None
    if not attached_before:
        layers = [layer] + ([] if prompt_layer is None else [prompt_layer])
        capture = runner._trail_probe_capture = LayerCapture(model, layers, states_of=residual_sum)
        original = runner.sample_tokens

        def sample_tokens(*args, **kwargs):
            out = original(*args, **kwargs)
            states = capture.take(layer)
            prompt = states if prompt_layer in (None, layer) else capture.take(prompt_layer)
            req_ids = getattr(out, "req_ids", None)
            if states is not None and req_ids:
                n = len(req_ids)
                bounds = torch.as_tensor(runner.query_start_loc.np[:n + 1], dtype=torch.long, device=states.device)
                # numpy arrays: pickled as one buffer (a torch tensor pickles through torch.save, ~8x slower)
                setattr(out, STATES_ATTR, (list(req_ids), states.index_select(0, bounds[1:] - 1).float().cpu().numpy()))
                if prompt_layer is not None and prompt is not None:
                    counts = bounds[1:] - bounds[:-1]
                    rows = torch.repeat_interleave(torch.arange(n, device=states.device), counts)
                    sums = torch.zeros(n, prompt.shape[-1], dtype=torch.float32, device=states.device)
                    sums.index_add_(0, rows, prompt[: int(bounds[-1])].float())
                    setattr(out, PROMPT_ATTR, (list(req_ids), sums.cpu().numpy(), counts.cpu().numpy()))
            return out

        runner.sample_tokens = sample_tokens
    config = getattr(model, "config", None)
    return {"num_layers": len(decoder_layers(model)), "hidden_size": getattr(config, "hidden_size", None),
            "attached_at_load": attached_before}


class TrailWorkerExtension:
    """Methods vLLM adds to its worker (`worker_extension_cls`); prefixed so they never clash with its own."""

    def trail_probe_attach(self, layer: int, prompt_layer: int | None = None) -> dict:
        return attach(self.model_runner, layer, prompt_layer)


def register() -> None:
    """The vLLM general plugin: wrap the model runners' `load_model` so that a worker of an engine
    configured for TRAIL hooks the predictor's layer as soon as its model is loaded."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        original = cls.__dict__.get("load_model")
        if original is None or getattr(original, "_trail_probe", False):
            continue

        def load_model(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            settings = (self.vllm_config.additional_config or {}).get("trail_probe") or {}
            if settings.get("predictor"):
                from trail_probe.runtime.predictor import read_predictor_config
                from trail_probe.serving.vllm_engine import prompt_predictor_path

                prompt = prompt_predictor_path(settings)
                attach(self, read_predictor_config(Path(settings["predictor"]))["probe_layer_idx"],
                       None if prompt is None else read_predictor_config(Path(prompt))["probe_layer_idx"])

        load_model._trail_probe = True
        cls.load_model = load_model
