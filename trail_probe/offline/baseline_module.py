"""The BERT baseline's training pieces: tokenized prompts, the `LightningModule`, and the callback
that keeps the best epoch as a `save_pretrained` folder (what TRAIL's runtime and
`trail_probe.runtime.BertLengthPredictor` load). `trail-probe train-baseline` runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import torchmetrics

from trail_probe.atomic import atomic_dir, atomic_write_json
from trail_probe.offline.seeding import epoch_generator, epoch_seed
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.estimates import estimate

BEST_FILE = "best_epoch.json"  # inside the partial run's best/ folder: what that folder holds


# -- data -----------------------------------------------------------------------------------------
def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """All texts at once, right-padded to the longest (batches trim the padding they do not need)."""
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def trim_batch(encodings: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `idx` of the encodings without the padding columns none of them needs."""
    width = int(encodings["attention_mask"][idx].sum(1).max())
    return {k: v[idx, :width] for k, v in encodings.items()}


class BaselineModule(L.LightningModule):
    """The HF sequence classifier plus its loss, optimizer (AdamW, optional linear warm-up, then linear
    decay to 0) and the val/mae of the expected length.

    `history` holds one dict of metrics per finished epoch and travels in the checkpoint, so a
    resumed run still reports every epoch."""

    def __init__(self, model, bins: Bins, max_new_tokens: int, lr: float, weight_decay: float,
                 warmup_fraction: float, seed: int = 0):
        super().__init__()
        self.model = model
        self.bins = bins
        self.seed = seed
        self.save_hyperparameters({"lr": lr, "weight_decay": weight_decay, "warmup_fraction": warmup_fraction,
                                   "bins": bins.to_dict(), "max_new_tokens": max_new_tokens})
        self.train_loss = torchmetrics.MeanMetric()
        self.val_loss = torchmetrics.MeanMetric()
        self.val_mae = torchmetrics.MeanAbsoluteError()
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(bins.num_bins, average="micro")
        self.history: list[dict] = []

    def _logits(self, batch):
        return self.model(**{k: v for k, v in batch.items() if k not in ("labels", "lengths")}).logits

    def on_train_batch_start(self, batch, batch_idx):
        # Dropout draws from (seed, epoch, batch) alone, as the data order does (EpochShuffle): a run
        # resumed at an epoch boundary trains the same weights as an uninterrupted one, whatever else
        # drew from the global generator in between (a resumed fit builds its loaders in another order).
        torch.manual_seed(epoch_seed(self.seed, self.current_epoch, batch_idx + 1))

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self._logits(batch), batch["labels"])
        self.train_loss.update(loss.detach(), len(batch["labels"]))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self._logits(batch).float()
        self.val_loss.update(torch.nn.functional.cross_entropy(logits, batch["labels"]), len(batch["labels"]))
        self.val_mae.update(estimate(torch.softmax(logits, -1), self.bins, self.hparams.max_new_tokens).float(),
                            batch["lengths"].float())
        self.val_acc.update(logits.argmax(-1), batch["labels"])

    def on_validation_epoch_end(self):
        # Validation follows the epoch's last training batch, so the epoch's train loss is complete.
        metrics = {"train/loss": self.train_loss, "val/loss": self.val_loss, "val/mae": self.val_mae,
                   "val/acc": self.val_acc}
        values = {name: float(metric.compute()) for name, metric in metrics.items()}
        for metric in metrics.values():
            metric.reset()
        self.history.append({"epoch": self.current_epoch, **values})
        self.log_dict(values, prog_bar=True)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["history"] = self.history

    def on_load_checkpoint(self, checkpoint):
        self.history = checkpoint["history"]

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_fraction * total)

        def factor(step: int) -> float:  # linear warm-up (optional), then linear decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EpochShuffle(torch.utils.data.Sampler):
    """A new order every epoch, drawn from (seed, epoch) alone; Lightning calls `set_epoch` before
    each epoch, so a resumed run sees the orders an uninterrupted one would."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of prompts of similar length (the idea of Hugging Face's `group_by_length`): the epoch's
    order from `sampler` (an `EpochShuffle`, which Lightning advances through `set_epoch`), sorted by
    length inside chunks of `chunk` batches, then the batches themselves in an order drawn from (seed,
    epoch). Each batch is trimmed to its longest prompt, so this cuts the padding the encoder runs
    over (on the shared Alpaca prompts, 68% of a random batch's token slots, 9% of a grouped one's:
    `benchmarks/baseline_speed.py`). Without `sampler`: one fixed pass sorted by length (validation)."""

    def __init__(self, lengths: torch.Tensor, batch_size: int, sampler: EpochShuffle | None = None, chunk: int = 50):
        self.lengths, self.batch_size, self.sampler, self.chunk = lengths, batch_size, sampler, chunk

    def batches(self) -> list[torch.Tensor]:
        if self.sampler is None:
            return list(self.lengths.argsort(stable=True).split(self.batch_size))
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        order = torch.cat([c[self.lengths[c].argsort(stable=True)] for c in order.split(self.batch_size * self.chunk)])
        batches = order.split(self.batch_size)
        g = epoch_generator(self.sampler.seed, self.sampler.epoch, stream=1)
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self):
        return iter([b.tolist() for b in self.batches()])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


class PromptSet(torch.utils.data.Dataset):
    """Tokenized prompts with their true output lengths; items are indices, `collate` builds batches."""

    def __init__(self, encodings: dict[str, torch.Tensor], lengths: torch.Tensor, bins: Bins):
        self.encodings = encodings
        self.lengths = lengths
        self.labels = bins.label(lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(indices)
        batch = trim_batch(self.encodings, idx)
        batch["labels"] = self.labels[idx]
        batch["lengths"] = self.lengths[idx]
        return batch


def callbacks(work: Path, tokenizer, bins: Bins) -> list:
    """Keep the best epoch as a save_pretrained folder (work/best) and the last one for resuming."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    best_dir = work / "best"

    class KeepBest(Callback):
        def __init__(self):
            record = best_dir / BEST_FILE  # present when resuming: the best epoch so far
            self.best = json.loads(record.read_text()) if record.is_file() else None

        def on_validation_end(self, trainer, pl_module):
            latest = pl_module.history[-1]
            if self.best is not None and not latest["val/mae"] < self.best["val/mae"]:
                return
            self.best = {**latest, "best_epoch": latest["epoch"]}
            with atomic_dir(best_dir) as tmp:
                pl_module.model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                add_bin_fields(tmp / "config.json", bins)
                atomic_write_json(tmp / BEST_FILE, self.best)

    # Lightning runs checkpoint callbacks last, so last.ckpt is written after KeepBest has updated.
    last = ModelCheckpoint(dirpath=work, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    return [KeepBest(), last]


def add_bin_fields(config_json: Path, bins: Bins) -> None:
    """Write the bin layout into the saved config.json: `max_len` and `num_labels` (what TRAIL's
    runtime reads; transformers itself leaves num_labels out and derives it from id2label), the
    release's `trail_max_len` / `trail_num_bins` spelling, and the explicit `bin_edges`."""
    config = json.loads(config_json.read_text())
    config.update({"num_labels": bins.num_bins, "max_len": bins.max_len, "bin_edges": bins.edges.tolist(),
                   "trail_num_bins": bins.num_bins, "trail_max_len": bins.max_len})
    atomic_write_json(config_json, config)


def bin_names(bins: Bins) -> dict[int, str]:
    """Readable labels for the classifier's config, e.g. {0: "0-51.2", ...}."""
    e = bins.edges.tolist()
    return {i: f"{e[i]:g}-{e[i + 1]:g}" for i in range(bins.num_bins)}
