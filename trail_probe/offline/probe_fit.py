"""The Lightning side of training a probe (or a stack of them), shared by `trail-probe train`'s runs:
the recipe's `Trainer` over the in-memory feed, its loggers, the every-epoch `last.ckpt` and where a
run resumes from it, and quieter Lightning output (a sweep builds dozens of Trainers)."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from trail_probe.errors import UserError

# what older checkpoints lack, and the settings given only where they are not TRAIL's (train._added_hparams)
# (the modules' own defaults: Lightning saves every argument of a module, given or not)
ADDED_HPARAMS = {"standardize": False, "loss": "ce", "label_smoothing": 0.0, "rank_weight": 1.0, "probe_input": None,
                 "prompt_labels": "greedy"}


def make_loggers(cfg, spec) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    save_dir, name = str(cfg.paths.logs), f"{spec.task}/{spec.name}"
    loggers = []
    for kind in cfg.train.loggers:
        if kind == "csv":
            loggers.append(CSVLogger(save_dir, name=name))
        elif kind == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir, name=name, default_hp_metric=False))
        else:  # wandb goes online only when the user asked for a project and has a key
            online = bool(cfg.train.wandb_project) and bool(os.environ.get("WANDB_API_KEY"))
            if not online:
                os.environ["WANDB_MODE"] = "offline"
            loggers.append(WandbLogger(project=cfg.train.wandb_project or "trail_probe", name=f"{cfg.run_name}/{name}",
                                       group=cfg.run_name, save_dir=save_dir, offline=not online))
    return loggers


class _DropDeviceInfo(logging.Filter):
    """Lightning prints device availability, a tip and "fit stopped" for every Trainer; a sweep builds dozens."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("GPU available", "TPU available", "HPU available", "💡 Tip",
                                                   "`Trainer.fit` stopped", "Loading `train_dataloader` to estimate"))


_DROP_DEVICE_INFO = _DropDeviceInfo()


def quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DROP_DEVICE_INFO)
    # The feed is in memory (no workers needed); epoch metrics are torchmetrics values that compute()
    # already reduced over DDP ranks; the pytree note is Lightning's own deprecation.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")


def fit_module(cfg, spec, module, data, folder: Path, ckpt_path, checkpoints: list,
         progress, callbacks: tuple, fast_dev_run: bool, context: dict):
    """Lightning's fit of `module` on the in-memory feed, the recipe's Trainer; returns the trainer."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar

    from trail_probe.offline.probe_module import make_loader

    t = cfg.train
    if t.standardize:  # from the training side only; a resumed run recomputes the same values
        module.probe.set_input_stats(data.train.tensors[0])
    if t.loss == "balanced_ce":
        module.set_class_weights(data.train.tensors[1])
    train_loader = make_loader(data.train, t.batch_size, t.seed, True, data.train_groups, t.decode_samples_per_request)
    val_loader = make_loader(data.val, t.batch_size, t.seed, False)
    loggers = [] if fast_dev_run else make_loggers(cfg, spec)
    # Trainer(deterministic=True) switches torch to deterministic algorithms for the whole process;
    # switch back afterwards so later stages in the same process (eval on CUDA) are not refused ops.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    trainer = L.Trainer(
        max_epochs=t.epochs, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=t.precision,
        deterministic=t.deterministic, logger=loggers or False, fast_dev_run=fast_dev_run,
        callbacks=[*([] if fast_dev_run else checkpoints), progress,
                   *([TQDMProgressBar(refresh_rate=10)] if cfg.progress.lightning_bars else []),
                   *([LearningRateMonitor("epoch")] if loggers else []), *callbacks],
        enable_progress_bar=cfg.progress.lightning_bars,
        num_sanity_val_steps=0, enable_model_summary=False, use_distributed_sampler=False, log_every_n_steps=1,
        default_root_dir=folder)
    progress.bar.write(f"[{spec.task} {spec.name}] {len(data.train)} training samples ({data.num_train_requests} requests), "
                       f"{len(data.val)} {context['selected_on']['side']} ({data.num_val_requests} requests), {t.epochs} epochs")
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()  # else the next probe's logger would reuse this wandb run
    return trainer


def latest_checkpoint(folder: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # Lightning's save_last=True copies "last" only when a best checkpoint is saved, so last.ckpt would
    # be the best epoch, not the latest; an unmonitored checkpoint rewritten every epoch is the latest.
    return ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                           enable_version_counter=False)


def resume_point(folder: Path, hparams: dict, epochs: int, resume: bool, overwrite: bool, fast_dev_run: bool,
                 finished: Path) -> tuple[Path | None, bool]:
    """(checkpoint to continue from, whether `folder` already holds the finished run: `finished` exists)."""
    if fast_dev_run:
        return None, False
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    if not (folder / "last.ckpt").is_file():
        return None, False
    if not resume:
        raise UserError(f"'{folder}' already holds a probe; add --resume to continue it (finished probes are kept) "
                        "or --overwrite to train it again")
    # Our own checkpoint; Lightning stores hparams as an AttributeDict, which weights_only refuses.
    saved = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
    for key in sorted(set(hparams) | (set(saved["hyper_parameters"]) & set(ADDED_HPARAMS))):
        # settings added after a checkpoint was written (or left at TRAIL's) count as their defaults
        value = hparams.get(key, ADDED_HPARAMS.get(key))
        if saved["hyper_parameters"].get(key, ADDED_HPARAMS.get(key)) != value:
            raise UserError(f"'{folder / 'last.ckpt'}' was trained with {key}={saved['hyper_parameters'].get(key)!r} "
                            f"but the config gives {value!r}; restore the old settings or use --overwrite")
    return folder / "last.ckpt", finished.is_file() and saved["epoch"] + 1 >= epochs
