"""TRAIL's length probe as a plain `nn.Module`: Linear(d, hidden) -> ReLU -> Linear(hidden, K).

It has no Lightning dependency so the exporter and the serving runtime can use it directly. The
parameter names `fc1.*` / `fc2.*` are the ones TRAIL's public runtime loads.
"""

from __future__ import annotations

import torch
from torch import nn


class LengthProbe(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int = 512, num_labels: int = 10):
        super().__init__()
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.num_labels = num_labels
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over length bins for embeddings `x` of shape [..., input_dim]."""
        return self.fc2(torch.relu(self.fc1(x)))


class MultiLayerProbe(LengthProbe):
    """The same probe fed several layers' states `[..., num_layers, layer_dim]` at once.

    `concat` joins the layers into one num_layers*layer_dim vector (Piotrowski et al. 2025 read
    layers 8-15 together); `weighted_mean` mixes them with learned softmax weights (`layer_logits`,
    starting uniform) so the input stays layer_dim wide. Beyond the paper; TRAIL's runtime reads one.
    """

    def __init__(self, num_layers: int, layer_dim: int, mode: str, hidden_dim: int = 512, num_labels: int = 10):
        if mode not in ("concat", "weighted_mean"):
            raise ValueError(f"multi-layer mode must be 'concat' or 'weighted_mean', not {mode!r}")
        super().__init__(layer_dim * num_layers if mode == "concat" else layer_dim, hidden_dim, num_labels)
        self.num_layers = num_layers
        self.layer_dim = layer_dim
        self.mode = mode
        if mode == "weighted_mean":
            self.layer_logits = nn.Parameter(torch.zeros(num_layers))

    def combine(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "concat":
            return x.flatten(-2)
        return torch.einsum("...ld,l->...d", x, torch.softmax(self.layer_logits, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.combine(x))
