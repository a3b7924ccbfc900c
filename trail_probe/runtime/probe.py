"""TRAIL's length probe as a plain `nn.Module`: Linear(d, hidden) -> ReLU -> Linear(hidden, K).

It has no Lightning dependency so the exporter and the serving runtime can use it directly. The
parameter names `fc1.*` / `fc2.*` are the ones TRAIL's public runtime loads.
"""

from __future__ import annotations

import torch
from torch import nn


class LengthProbe(nn.Module):
    """With `standardize`, inputs are standardized per feature before `fc1` with the training states'
    mean and standard deviation (buffers `input_mean`, `input_std`, set by `set_input_stats`);
    `fold_standardization` turns such weights into TRAIL's plain four tensors."""

    def __init__(self, input_dim: int, hidden_dim: int = 512, num_labels: int = 10, standardize: bool = False):
        super().__init__()
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.num_labels = num_labels
        self.standardize = standardize
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_labels)
        if standardize:
            self.register_buffer("input_mean", torch.zeros(input_dim))
            self.register_buffer("input_std", torch.ones(input_dim))

    def set_input_stats(self, x: torch.Tensor, chunk: int = 65536) -> None:
        """Per-feature mean and standard deviation of training inputs `x` [n, input_dim] (float64
        sums in chunks; a constant feature gets std 1, so it passes through centred)."""
        total = torch.zeros(self.input_dim, dtype=torch.float64)
        squares = torch.zeros(self.input_dim, dtype=torch.float64)
        for start in range(0, len(x), chunk):
            part = self.combine(x[start:start + chunk]).double()
            total += part.sum(0)
            squares += (part * part).sum(0)
        mean = total / max(len(x), 1)
        std = (squares / max(len(x), 1) - mean * mean).clamp_min(0).sqrt()
        std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
        self.input_mean.copy_(mean.float())
        self.input_std.copy_(std.float())

    def combine(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over length bins for embeddings `x` of shape [..., input_dim]."""
        if self.standardize:
            x = (x - self.input_mean) / self.input_std
        return self.fc2(torch.relu(self.fc1(x)))


def fold_standardization(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A standardizing probe's weights as a plain probe's: fc1(W (x - mu) / sigma + b) =
    fc1'(x) with W' = W / sigma and b' = b - W' mu (float64, then float32). Plain weights pass through."""
    if "input_mean" not in state:
        return dict(state)
    mean, std = state["input_mean"].double(), state["input_std"].double()
    weight = state["fc1.weight"].double() / std
    bias = state["fc1.bias"].double() - weight @ mean
    out = {k: v for k, v in state.items() if k not in ("input_mean", "input_std")}
    out["fc1.weight"], out["fc1.bias"] = weight.float(), bias.float()
    return out


class MultiLayerProbe(LengthProbe):
    """The same probe fed several layers' states `[..., num_layers, layer_dim]` at once.

    `concat` joins the layers into one num_layers*layer_dim vector (Piotrowski et al. 2025 read
    layers 8-15 together); `weighted_mean` mixes them with learned softmax weights (`layer_logits`,
    starting uniform) so the input stays layer_dim wide. Beyond the paper; TRAIL's runtime reads one.
    """

    def __init__(self, num_layers: int, layer_dim: int, mode: str, hidden_dim: int = 512, num_labels: int = 10,
                 standardize: bool = False):
        if mode not in ("concat", "weighted_mean"):
            raise ValueError(f"multi-layer mode must be 'concat' or 'weighted_mean', not {mode!r}")
        if standardize and mode != "concat":
            raise ValueError("input standardization needs a fixed input: a single-layer or concat probe")
        super().__init__(layer_dim * num_layers if mode == "concat" else layer_dim, hidden_dim, num_labels, standardize)
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
