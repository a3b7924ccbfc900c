"""Every forward hook trail_probe installs: the residual stream of chosen decoder layers.

    with LayerCapture(model, [11, 19]) as capture:      # extraction: several layers
        model(input_ids)
        states = capture.outputs[19]                     # [B, T, d]

    with capture_layer(model, 19) as cap:                # a serving engine: the probe's layer
        model(input_ids)
        cap.last_token()                                 # [B, d], the decode-time probe input

Layer numbering is TRAIL's: layer L is the output of decoder layer L (0-based), i.e. Hugging Face
`hidden_states[L + 1]` before the final norm. A hook only keeps a reference to the layer's output
of the latest forward pass (plus an optional callback); nothing is copied. Hooks are removed on
`remove()` / leaving the `with` block, also after an exception, as TransformerLens's hook points are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from trail_probe.errors import UserError
from trail_probe.runtime.models import decoder_layers


def first_output(output) -> torch.Tensor:
    """A Hugging Face decoder layer's residual stream: its output, or the first item of its tuple."""
    return output[0] if isinstance(output, tuple) else output


def residual_parts(output) -> tuple[torch.Tensor, ...]:
    """The tensors whose sum is a decoder layer's residual stream: vLLM's (mlp output, residual) pair,
    or the one output of a Hugging Face layer."""
    if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
        return output[0], output[1]
    return (first_output(output),)


def residual_sum(output) -> torch.Tensor:
    """A vLLM decoder layer's residual stream: it returns (mlp output, residual) so that the next layer
    can fuse the add into its norm; their sum is Hugging Face's `hidden_states[L + 1]`."""
    parts = residual_parts(output)
    return parts[0] + parts[1] if len(parts) > 1 else parts[0]


class LayerCapture:
    """Forward hooks that keep the latest output of the requested decoder layers only.
    `on_forward(layer, states)`, when given, runs after each hooked layer's forward pass; `states_of`
    turns a layer's raw output into the residual stream (`first_output` for Hugging Face models,
    `residual_sum` for vLLM's); `keep=False` keeps nothing (the callback consumes each output, so no
    layer's activations outlive the forward pass)."""

    def __init__(self, model: nn.Module, layers: Iterable[int],
                 on_forward: Callable[[int, torch.Tensor], None] | None = None,
                 states_of: Callable[[object], torch.Tensor] = first_output, keep: bool = True):
        blocks = decoder_layers(model)
        layers = sorted(set(layers))
        bad = [layer for layer in layers if not 0 <= layer < len(blocks)]
        if bad:
            raise UserError(f"layer {bad[0]} is outside the model, which has layers 0..{len(blocks) - 1}; "
                            "use a layer of this model (TRAIL numbering: residual after decoder layer L)")
        self.layers = layers
        self.outputs: dict[int, torch.Tensor] = {}
        self._on_forward = on_forward
        self._states_of = states_of
        self._keep = keep
        self._handles = []
        try:
            for layer in layers:
                self._handles.append(blocks[layer].register_forward_hook(self._hook(layer)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            states = self._states_of(output)
            if self._keep:
                self.outputs[layer] = states
            if self._on_forward is not None:
                self._on_forward(layer, states)

        return hook

    def take(self, layer: int) -> torch.Tensor | None:
        """The layer's latest output, forgotten here (None when no forward pass ran since)."""
        return self.outputs.pop(layer, None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "LayerCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class ProbeLayerCapture(LayerCapture):
    """The hook on one decoder layer, the probe's. `on_forward(states [B, T, d])` runs after every
    forward pass (prefill: T = prompt length; decode: T = 1)."""

    def __init__(self, model: nn.Module, layer_idx: int, on_forward: Callable[[torch.Tensor], None] | None = None):
        self.layer_idx = layer_idx
        super().__init__(model, [layer_idx], None if on_forward is None else (lambda _, states: on_forward(states)))

    @property
    def states(self) -> torch.Tensor:
        """The layer's output of the latest forward pass, [B, T, d]."""
        if self.layer_idx not in self.outputs:
            raise UserError("no forward pass has run since the hook was installed; call the model first")
        return self.outputs[self.layer_idx]

    def last_token(self) -> torch.Tensor:
        """[B, d]: the state of the position just processed (the decode-time probe input)."""
        return self.states[:, -1]

    def prompt_mean(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d]: mean over the prompt's real tokens (the prompt-time probe input); call it right
        after the prefill. Padding (attention_mask == 0) is left out."""
        states = self.states.float()
        if attention_mask is None:
            return states.mean(1)
        mask = attention_mask.to(states.device, states.dtype)[:, -states.shape[1]:, None]
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1)


def capture_layer(model: nn.Module, layer_idx: int,
                  on_forward: Callable[[torch.Tensor], None] | None = None) -> ProbeLayerCapture:
    """Context manager capturing layer `layer_idx` (TRAIL numbering) of `model`; hooks are removed
    on exit, also after an exception."""
    return ProbeLayerCapture(model, layer_idx, on_forward)
