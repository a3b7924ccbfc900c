"""Lightning wrapper of the length probe, and the in-memory batch feed it trains on.

`ProbeModule` wraps the plain `LengthProbe` (one layer) or `MultiLayerProbe` (several layers) from
`trail_probe.runtime.probe`; its state dict is `probe.*`, so the plain module's weights come out by
stripping that prefix. The paper's recipe is built in: cross-entropy over length bins, AdamW, and a
cosine learning rate from `lr` to `min_lr` stepped per batch over the whole run (the other losses:
`offline/probe_losses.py`). Metrics are
torchmetrics objects, logged once per epoch under slash names:
    train/loss  mean cross-entropy over the epoch's training batches
    val/loss    cross-entropy on the held-out samples
    val/acc     argmax bin == true bin
    val/mae     |estimate - true tokens|, the estimate computed as the serving runtime does: the
                expectation over bin midpoints, clamped to what the request can still generate.

The feed keeps every tensor in memory and hands out whole batches by indexing with an index
tensor (`TensorRows.__getitems__`), so there is no per-sample Python work. Which rows form an epoch,
and in what order, depends only on (seed, epoch) -- not on a global RNG -- so a run resumed from
`last.ckpt` sees exactly the batches an uninterrupted run would. Lightning calls
`batch_sampler.sampler.set_epoch(epoch)` before each epoch.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics import MeanAbsoluteError, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from trail_probe.offline.probe_losses import emd_loss, training_loss  # noqa: F401 (emd_loss: its old home)
from trail_probe.offline.seeding import epoch_generator
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.estimates import estimate
from trail_probe.runtime.probe import LengthProbe, MultiLayerProbe


class RecipeModule(L.LightningModule):
    """The paper recipe's pieces every probe module shares (`ProbeModule`, the stacked sweep's
    `StackModule`): inverse-frequency class weights, fused AdamW with the per-batch cosine schedule,
    and the per-epoch `history` carried in checkpoints. Subclasses register `class_weight`, set
    `history` and save the hyperparameters `num_bins`, `lr`, `min_lr` and `weight_decay`."""

    def set_class_weights(self, labels: torch.Tensor) -> None:
        """Inverse-frequency bin weights from the training labels (bin indices, or the mass of soft
        labels per bin), mean 1 over the bins present."""
        counts = (labels.double().sum(0) if labels.is_floating_point()
                  else torch.bincount(labels, minlength=self.hparams.num_bins).double())
        weight = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts))
        self.class_weight.copy_((weight / weight[counts > 0].mean()).float())

    def configure_optimizers(self):
        hp = self.hparams
        # Fused AdamW: same update as the default, one kernel for all tensors (about 2x faster per step here).
        fused = self.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def cosine(step: int) -> float:
            progress = min(step, total) / total
            return (hp.min_lr + (hp.lr - hp.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / hp.lr

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("history", []))


class ProbeModule(RecipeModule):
    def __init__(self, task: str, layers: list[int], multi_layer: str, input_dim: int, hidden_dim: int,
                 num_bins: int, max_len: int, lr: float, min_lr: float, weight_decay: float,
                 recipe: dict | None = None, standardize: bool = False, loss: str = "ce",
                 label_smoothing: float = 0.0, rank_weight: float = 1.0, probe_input: str | None = None,
                 prompt_labels: str = "greedy"):
        """`input_dim` is one layer's input size; `recipe` records the other settings a resumed run must
        share; `standardize`: inputs standardized before fc1 (call `probe.set_input_stats` before fitting);
        `loss="balanced_ce"` weights bins by inverse training frequency (call `set_class_weights`);
        `rank_weight`: loss="rank"'s weight; `probe_input` and `prompt_labels` are recorded (the data
        carries them; None: TRAIL's input)."""
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("class_weight", torch.ones(num_bins), persistent=False)  # set again on resume
        if multi_layer == "none":
            self.probe = LengthProbe(input_dim, hidden_dim, num_bins, standardize)
        else:
            self.probe = MultiLayerProbe(len(layers), input_dim, multi_layer, hidden_dim, num_bins, standardize)
        self.bins = Bins(num_bins, max_len)
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes=num_bins, average="micro")
        self.val_mae = MeanAbsoluteError()
        self.history: list[dict] = []  # one dict of metrics per finished epoch; kept in checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(x)

    def training_step(self, batch, batch_idx):
        x, labels, lengths, _ = batch
        loss = training_loss(self.probe(x).float(), labels, lengths, self.hparams, self.class_weight, self.bins)
        self.train_loss.update(loss.detach(), len(labels))
        return loss

    def validation_step(self, batch, batch_idx):
        x, labels, tokens, cap = batch
        logits = self.probe(x).float()
        self.val_loss.update(F.cross_entropy(logits, labels), labels.numel())
        self.val_acc.update(logits, labels)
        self.val_mae.update(estimate(logits.softmax(-1), self.bins, cap, dtype=logits.dtype), tokens)

    def on_validation_epoch_end(self):
        metrics = {"val/loss": self.val_loss.compute(), "val/acc": self.val_acc.compute(),
                   "val/mae": self.val_mae.compute()}
        for metric in (self.val_loss, self.val_acc, self.val_mae):
            metric.reset()
        if self.trainer.sanity_checking:
            return
        # Validation runs after the epoch's last training batch, so the epoch's train loss is complete
        # here and one history entry (saved in the checkpoint written right after) holds all four.
        metrics["train/loss"] = self.train_loss.compute()
        self.train_loss.reset()
        self.log_dict(metrics, prog_bar=True)
        self.history.append({"epoch": self.current_epoch, **{k: float(v) for k, v in metrics.items()}})


# --------------------------------------------------------------------------------------------
# In-memory batch feed
# --------------------------------------------------------------------------------------------
class TensorRows(torch.utils.data.Dataset):
    """Aligned tensors (inputs, bin labels, true tokens, estimate cap) indexed a whole batch at a time."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitems__(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)


def sample_per_group(groups: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices of up to `k` random rows of each group (every row of a smaller group)."""
    keys = torch.rand(len(groups), generator=generator, dtype=torch.float64)
    order = torch.argsort(groups.double() + keys, stable=True)  # grouped, random order inside a group
    sorted_groups = groups[order]
    counts = torch.bincount(sorted_groups)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(groups)) - first[sorted_groups]
    return order[rank < k]


class EpochRows:
    """Which rows make up epoch e, in which order: a function of (seed, epoch) only (`offline.seeding`).

    With `groups` (the request of each decode sample) and `per_group` > 0, each epoch draws a fresh
    `per_group` samples per request, so over 30 epochs training sees all stored decode positions
    while every epoch weighs requests equally, as TRAIL's 16 samples per request do.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool, groups: torch.Tensor | None = None,
                 per_group: int = 0):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.groups = groups if groups is not None and per_group > 0 else None
        self.per_group = per_group
        self.epoch = 0
        if self.groups is None:
            self.rows_per_epoch = num_rows
        else:
            self.rows_per_epoch = int(torch.bincount(self.groups).clamp(max=per_group).sum())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        generator = epoch_generator(self.seed, self.epoch)
        rows = (torch.arange(self.num_rows) if self.groups is None
                else sample_per_group(self.groups, self.per_group, generator))
        return rows[torch.randperm(len(rows), generator=generator)] if self.shuffle else rows


class TensorBatches:
    """Batch sampler: slices of the epoch's index tensor. Under DDP each rank takes every world-th batch."""

    def __init__(self, sampler: EpochRows, batch_size: int, shard: bool):
        self.sampler, self.batch_size, self.shard = sampler, batch_size, shard

    def _rank_world(self) -> tuple[int, int]:
        dist = torch.distributed
        if self.shard and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        # Equal batch counts on every rank (DDP needs it); the few batches past that are dropped.
        return math.ceil(self.sampler.rows_per_epoch / self.batch_size) // self._rank_world()[1]

    def __iter__(self):
        rank, world = self._rank_world()
        rows = self.sampler.indices()
        for b in range(len(self)):
            start = (b * world + rank) * self.batch_size
            yield rows[start:start + self.batch_size]


def _whole_batch(batch):
    return batch


def make_loader(rows: TensorRows, batch_size: int, seed: int, train: bool, groups: torch.Tensor | None = None,
                per_group: int = 0) -> DataLoader:
    """Training: shuffled, resampled per epoch, sharded under DDP. Validation: fixed order, every rank all rows."""
    sampler = EpochRows(len(rows), seed, shuffle=train, groups=groups, per_group=per_group)
    return DataLoader(rows, batch_sampler=TensorBatches(sampler, batch_size, shard=train), collate_fn=_whole_batch)
