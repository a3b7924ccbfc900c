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
