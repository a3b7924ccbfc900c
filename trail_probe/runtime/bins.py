"""Length bins shared by every stage: edges, labels, and the expectation estimate.

TRAIL uses K equal-width bins over [0, max_len] (K=10, max_len=512, width 51.2). A length past the
last edge falls in the last bin. The point estimate is the expectation over bin midpoints, exactly
as the serving runtime computes it, not the argmax.
"""

from __future__ import annotations

import torch

from trail_probe.errors import UserError


class Bins:
    def __init__(self, num_bins: int = 10, max_len: int = 512):
        if not isinstance(num_bins, int) or num_bins < 2:
            raise UserError(f"bins.num_bins = {num_bins!r} must be an integer >= 2")
        if not isinstance(max_len, int) or max_len <= 0:
            raise UserError(f"bins.max_len = {max_len!r} must be a positive integer number of tokens")
        self.num_bins = num_bins
        self.max_len = max_len
        self.edges = torch.linspace(0, max_len, num_bins + 1, dtype=torch.float64)
        self.midpoints = ((self.edges[:-1] + self.edges[1:]) / 2).float()
        self.width = max_len / num_bins

    @classmethod
    def from_config(cls, cfg) -> "Bins":
        return cls(cfg.num_bins, cfg.max_len)

    def to_dict(self) -> dict:
        return {"num_bins": self.num_bins, "max_len": self.max_len, "edges": self.edges.tolist()}

    def check_matches(self, other: dict, where: str) -> None:
        """Refuse artifacts made with different bins (a dict from `to_dict`)."""
        if int(other["num_bins"]) != self.num_bins or int(other["max_len"]) != self.max_len:
            raise UserError(
                f"{where} was made with {other['num_bins']} bins over [0, {other['max_len']}] but this "
                f"config uses {self.num_bins} over [0, {self.max_len}]; use matching bins.* settings"
            )

    def label(self, lengths: torch.Tensor) -> torch.Tensor:
        """Bin index of each length; lengths >= max_len go to the last bin."""
        idx = torch.floor(lengths.double() / self.width).long()
        return idx.clamp(0, self.num_bins - 1)

    def frequencies(self, lengths: torch.Tensor) -> torch.Tensor:
        """Share of `lengths` in each bin [K] (float64): the label prior of a training set."""
        counts = torch.bincount(self.label(lengths), minlength=self.num_bins).double()
        return counts / counts.sum()

    def expectation(self, probs: torch.Tensor) -> torch.Tensor:
        """Expected length sum_i p_i * m_i over the last dimension."""
        return probs @ self.midpoints.to(device=probs.device, dtype=probs.dtype)
