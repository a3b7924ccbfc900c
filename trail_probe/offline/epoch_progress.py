"""A Lightning callback that moves the stage's one progress bar (`trail_probe.progress`) instead of
Lightning's per-epoch bars: the sweep counts epochs of every probe, the baseline its batches, and
both show the epoch and the validation MAE so far. The per-epoch metrics still go to the loggers."""

from __future__ import annotations

import math

import lightning as L


class StageBest:
    """The best validation MAE seen so far in a stage, across its probes (and which probe had it)."""

    def __init__(self):
        self.mae, self.name = math.inf, None

    def offer(self, mae: float, name: str) -> None:
        if mae < self.mae:
            self.mae, self.name = mae, name

    def __str__(self) -> str:
        return "" if self.name is None else f"best val MAE so far {self.mae:.1f} ({self.name})"


class EpochProgress(L.Callback):
    """`bar` counts `offset` + epochs done (per_batch=False) or batches done (per_batch=True);
    its postfix: `label`, the epoch, this epoch's val MAE and the stage's best so far."""

    def __init__(self, bar, label: str, offset: int = 0, per_batch: bool = False, best: StageBest | None = None,
                 monitor: str = "val/mae", name: str | None = None, probes: int = 1):
        self.bar, self.label, self.offset, self.per_batch = bar, label, offset, per_batch
        self.probes = probes  # probes trained together (a stack): each epoch counts that many probe-epochs
        self.name = name or label  # what the stage's best is called by
        self.best, self.monitor = best or StageBest(), monitor
        self.last_mae: float | None = None

    def _postfix(self, trainer) -> None:
        parts = [self.label, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        if self.last_mae is not None:
            parts.append(f"val MAE {self.last_mae:.1f}")
        if str(self.best):
            parts.append(str(self.best))
        self.bar.set_postfix_str(", ".join(p for p in parts if p))

    def _advance_to(self, done: int) -> None:
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:  # a resumed run starts past its finished epochs
            self._advance_to(self.offset + trainer.current_epoch * (trainer.num_training_batches if self.per_batch
                                                                    else self.probes))
            self._postfix(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.per_batch and trainer.is_global_zero:
            self._advance_to(self.offset + trainer.current_epoch * trainer.num_training_batches + batch_idx + 1)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.last_mae = float(value)
            self.best.offer(self.last_mae, self.name)
        if not self.per_batch:
            self._advance_to(self.offset + (trainer.current_epoch + 1) * self.probes)
        self._postfix(trainer)
