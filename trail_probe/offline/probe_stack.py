"""The layer sweep as one model: every layer's probe of a task trained together, in one pass over the data.

    stack = ProbeStack.of(LengthProbe(576, 512, 10), num_layers=30)   # 30 copies of one initialization
    logits = stack(x)                                                  # x [B, 30, 576] -> [B, 30, 10]
    stack.probe_state(i)                                               # layer i's fc1/fc2 as LengthProbe's

A sweep trains one probe per layer on the same rows (the same requests and decode positions), with
the same batches, the same initial weights (each single-layer run seeds the same way) and the same
learning-rate schedule. Stacked, the layers' fc1/fc2 become batched matrix products, the loss is the
sum of the layers' own losses (so each probe's gradient is exactly its own), and AdamW, which is
elementwise, updates each probe as it would alone: the results equal training each layer by itself
(`tests/test_train.py` checks it to float tolerance), while the Python, Lightning and data work of a
step is paid once for all layers instead of once per layer.

`StackModule` is the Lightning module: it logs each layer's validation metrics and keeps each
layer's best-epoch weights itself (a layer's best epoch is its own), in the checkpoint, so a run
stopped mid-sweep resumes from `last.ckpt`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trail_probe.offline.probe_losses import training_loss
from trail_probe.offline.probe_module import RecipeModule
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.estimates import estimate
from trail_probe.runtime.probe import LengthProbe

WEIGHTS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class ProbeStack(nn.Module):
    """`num_layers` independent `LengthProbe`s as stacked weights; input [..., num_layers, d]."""

    def __init__(self, num_layers: int, input_dim: int, hidden_dim: int, num_labels: int, standardize: bool = False):
        super().__init__()
        self.num_layers, self.standardize = num_layers, standardize
        self.fc1_weight = nn.Parameter(torch.zeros(num_layers, hidden_dim, input_dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_layers, hidden_dim))
        self.fc2_weight = nn.Parameter(torch.zeros(num_layers, num_labels, hidden_dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_layers, num_labels))
        if standardize:
            self.register_buffer("input_mean", torch.zeros(num_layers, input_dim))
            self.register_buffer("input_std", torch.ones(num_layers, input_dim))

    @classmethod
    def of(cls, probe: LengthProbe, num_layers: int) -> "ProbeStack":
        stack = cls(num_layers, probe.input_dim, probe.hidden_dim, probe.num_labels, probe.standardize)
        with torch.no_grad():
            for name in WEIGHTS:
                getattr(stack, name.replace(".", "_")).copy_(probe.state_dict()[name].expand_as(
                    getattr(stack, name.replace(".", "_"))))
        return stack

    def set_input_stats(self, x: torch.Tensor) -> None:
        """Each layer's per-feature training mean and std, exactly as `LengthProbe.set_input_stats`."""
        for i in range(self.num_layers):
            one = LengthProbe(x.shape[-1], 1, 1, standardize=True)
            one.set_input_stats(x[:, i])
            self.input_mean[i], self.input_std[i] = one.input_mean, one.input_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.standardize:
            x = (x - self.input_mean) / self.input_std
        lead = x.shape[:-2]
        x = x.reshape(-1, self.num_layers, x.shape[-1])
        if x.is_cuda:  # one batched product per linear layer: a few kernels for all layers
            h = torch.relu(torch.baddbmm(self.fc1_bias[:, None], x.transpose(0, 1), self.fc1_weight.transpose(1, 2)))
            out = torch.baddbmm(self.fc2_bias[:, None], h, self.fc2_weight.transpose(1, 2)).transpose(0, 1)
        else:  # CPU: each layer's own F.linear (nn.Linear's kernels; bmm measured 1.3-2x slower per layer here)
            w1, b1, w2, b2 = (t.unbind(0) for t in (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias))
            out = torch.stack([F.linear(torch.relu(F.linear(xi, w1[i], b1[i])), w2[i], b2[i])
                               for i, xi in enumerate(x.unbind(1))], 1)
        return out.reshape(*lead, self.num_layers, -1)

    def probe_state(self, i: int, source: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Layer i's weights under `LengthProbe`'s names (from `source`, a dict of stacked tensors, if given)."""
        source = source if source is not None else dict(self.named_parameters()) | dict(self.named_buffers())
        state = {name: source[name.replace(".", "_")][i].detach().clone() for name in WEIGHTS}
        if self.standardize:
            state["input_mean"], state["input_std"] = source["input_mean"][i].clone(), source["input_std"][i].clone()
        return state


class StackModule(RecipeModule):
    """The paper recipe (cross-entropy over bins, AdamW, cosine per batch: `RecipeModule`) for a `ProbeStack`."""

    def __init__(self, task: str, layers: list[int], input_dim: int, hidden_dim: int, num_bins: int, max_len: int,
                 lr: float, min_lr: float, weight_decay: float, recipe: dict | None = None, standardize: bool = False,
                 loss: str = "ce", label_smoothing: float = 0.0, rank_weight: float = 1.0, probe_input: str | None = None,
                 prompt_labels: str = "greedy"):
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("class_weight", torch.ones(num_bins), persistent=False)
        self.probe = ProbeStack.of(LengthProbe(input_dim, hidden_dim, num_bins, standardize), len(layers))
        self.bins = Bins(num_bins, max_len)
        n = len(layers)
        self.register_buffer("best_mae", torch.full((n,), math.inf, dtype=torch.float64))
        self.register_buffer("best_epoch", torch.full((n,), -1, dtype=torch.long))
        for name, p in list(self.probe.named_parameters()) + list(self.probe.named_buffers()):
            self.register_buffer(f"best_{name}", p.detach().clone())
        self._sums, self._val_n, self._train, self._train_n = None, 0, None, 0  # this epoch's sums
        self.history: list[dict] = []  # per epoch: {"epoch", metric: [one value per layer]}

    def _layer_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[n]: each layer's plain cross-entropy (validation's), reduced as `F.cross_entropy(...,
        reduction="mean")` reduces it."""
        n = logits.shape[1]
        per = F.cross_entropy(logits.permute(0, 2, 1), labels[:, None].expand(-1, n), reduction="none")  # [B, n]
        return per.sum(0) / labels.numel()

    def training_step(self, batch, batch_idx):
        x, labels, lengths, _ = batch
        # each layer's own training loss, as `ProbeModule` computes it (offline/probe_losses.py)
        losses = training_loss(self.probe(x), labels, lengths, self.hparams, self.class_weight, self.bins)
        part = losses.detach() * len(labels)
        self._train = part if self._train is None else self._train + part
        self._train_n += len(labels)
        return losses.sum()  # each probe's gradient is its own loss's

    def validation_step(self, batch, batch_idx):
        x, labels, tokens, cap = batch
        logits = self.probe(x).float()
        est = estimate(logits.softmax(-1), self.bins, cap[:, None], dtype=logits.dtype)
        sums = torch.stack([self._layer_losses(logits, labels) * labels.numel(),
                            (logits.argmax(-1) == labels[:, None]).float().sum(0),
                            (est - tokens[:, None]).abs().sum(0)])
        self._sums = sums if self._sums is None else self._sums + sums
        self._val_n += labels.numel()

    def on_validation_epoch_end(self):
        reduce = self.trainer.strategy.reduce
        sums = reduce(self._sums, reduce_op="sum")
        count = reduce(torch.tensor(float(self._val_n), device=sums.device), reduce_op="sum")
        train = reduce(self._train, reduce_op="sum") / reduce(torch.tensor(float(self._train_n), device=sums.device),
                                                              reduce_op="sum")
        self._sums, self._val_n, self._train, self._train_n = None, 0, None, 0
        loss, acc, mae = sums / count
        self.log_dict({"val/mae": mae.min(), "val/mae_median": mae.median()}, prog_bar=True)
        self.history.append({"epoch": self.current_epoch, "val/loss": loss.tolist(), "val/acc": acc.tolist(),
                             "val/mae": mae.tolist(), "train/loss": train.tolist()})
        better = mae.double() < self.best_mae
        if better.any():
            self.best_mae[better] = mae.double()[better]
            self.best_epoch[better] = self.current_epoch
            for name, p in list(self.probe.named_parameters()) + list(self.probe.named_buffers()):
                getattr(self, f"best_{name}")[better] = p.detach()[better]

    def best_state(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Layer i's best-epoch weights (`LengthProbe` names) and that epoch's metrics."""
        source = {name: getattr(self, f"best_{name}") for name, _ in
                  list(self.probe.named_parameters()) + list(self.probe.named_buffers())}
        epoch = int(self.best_epoch[i])
        entry = next(h for h in self.history if h["epoch"] == epoch)
        return self.probe.probe_state(i, source), {k: (v if k == "epoch" else v[i]) for k, v in entry.items()}

    def layer_history(self, i: int) -> list[dict]:
        return [{k: (v if k == "epoch" else v[i]) for k, v in h.items()} for h in self.history]

