"""Train TRAIL's length probe on an extraction, one probe per layer and task (`trail-probe train`).

    trail-probe train recipes/smollm2_alpaca.yaml                    # the recipe: sweep both tasks
    trail-probe train recipes/smollm2_alpaca.yaml train.task=decode train.layers=11 train.multi_layer=none
    trail-probe train recipes/smollm2_alpaca.yaml --resume           # continue an interrupted run

Tasks: `prompt` maps a layer's mean prompt state to the total output length; `decode` maps the state
of a decode step to the tokens still to come. `train.task=both` trains each. Labels are
`bins.num_bins` equal bins over [0, bins.max_len]; recipe defaults are the paper's (cross-entropy,
AdamW, cosine lr 0.01 -> 0 over 30 epochs, batch 32, 75/25 split of requests from `split.json`).

Decode samples: the held-out side uses a fixed `decode_samples_per_request` positions per request
(drawn once from the seed), so val metrics compare across epochs; the training side draws a fresh
set each epoch from (seed, epoch), so training sees every stored position over the run while each
request weighs the same in an epoch (TRAIL samples 16 per request). 0 means every stored position.

Outputs (contract 1), for every probe `<checkpoint_dir>/probes/<task>/<name>/` with name `layer-<L>`
or `<mode>-<first>-<last>`: probe.safetensors (the plain module's weights from the best epoch by
val/mae), probe.json (metadata; `load_probe` reads both without Lightning), best.ckpt, last.ckpt and
config.yaml. Logs go to `<checkpoint_dir>/logs/<task>/<name>/`. With several layers for a task (a
sweep), `<checkpoint_dir>/sweep/layer_sweep.{csv,json,png}` show val MAE and accuracy by layer,
multi-layer probes beside them, and name the best layer per task.

Why one probe at a time, not all layers stacked in one batched model: on CPU a step of 30 stacked
probes (d=576) took 63 ms against 1.4 ms for one probe, i.e. slower than 30 separate steps, because
one probe's weights and AdamW state stay in cache and 30 probes' do not. Separate runs are also
exactly the single-layer recipe, have their own best epoch, checkpoints and resume, and a sweep
interrupted at layer 17 resumes at layer 17.

Several devices (`train.strategy=ddp train.devices=N`): each rank takes every N-th batch of the same
(seed, epoch) order, so `train.batch_size` is per device, as usual in Lightning; every rank scores
the whole held-out set and only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from trail_probe.atomic import atomic_path, atomic_write_json, temp_files_in
from trail_probe.choices import Task, options
from trail_probe.config import RecipeConfig, config_sha256, resolve_layers, save_config
from trail_probe.errors import UserError
from trail_probe.offline.artifacts import PROBE_FORMAT, probe_name
from trail_probe.offline.split import (
    load_or_make_split,
    manifest_sha256,
    selection_split,
)
from trail_probe.offline.store import LAYER_NUMBERING, Extraction
from trail_probe.offline.sweep_report import print_results, write_sweep
from trail_probe.progress import progress_bar
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.models import file_sha256

HELP = "Train the length probe on extracted hidden states; sweep layers to find the best one."
EXAMPLES = """examples:
  trail-probe train recipes/smollm2_alpaca.yaml
  trail-probe train recipes/smollm2_alpaca.yaml train.task=decode train.layers=11 train.multi_layer=none
  trail-probe train recipes/smollm2_alpaca.yaml train.multi_layer=weighted_mean train.multi_layer_layers=8-15
  trail-probe train recipes/smollm2_alpaca.yaml train.accelerator=gpu train.devices=4 train.strategy=ddp
  trail-probe train recipes/smollm2_alpaca.yaml train.loggers=[csv,tensorboard] --resume
Interrupt at any time and add --resume to continue from each probe's last.ckpt."""



def add_arguments(parser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue each probe from its last.ckpt; keep finished ones")
    parser.add_argument("--overwrite", action="store_true", help="delete existing probe folders and train from scratch")
    parser.add_argument("--fast-dev-run", action="store_true", help="one batch of train and val per probe; writes no probes")


@dataclass(frozen=True)
class ProbeSpec:
    task: str  # prompt | decode
    layers: tuple[int, ...]
    mode: str = "none"  # none (one layer) | concat | weighted_mean

    @property
    def name(self) -> str:
        return probe_name(self.layers, self.mode)


@dataclass
class ProbeData:
    train: object  # TensorRows(x, labels, tokens, cap); x is [n, d] or [n, layers, d]
    val: object
    train_groups: torch.Tensor | None  # request of each training row (decode task), for per-request sampling
    input_dim: int
    num_train_requests: int
    num_val_requests: int


ADDED_HPARAMS = {"standardize": False, "loss": "ce", "label_smoothing": 0.0}  # what older checkpoints lack


def check_train_config(cfg: RecipeConfig) -> None:
    t = cfg.train
    Bins.from_config(cfg.bins)  # invalid bins -> UserError
    for key in ("epochs", "batch_size", "hidden_dim"):
        if getattr(t, key) < 1:
            raise UserError(f"train.{key} = {getattr(t, key)} must be at least 1")
    if not (t.lr > 0 and 0 <= t.min_lr <= t.lr):
        raise UserError(f"train.lr = {t.lr} and train.min_lr = {t.min_lr} need 0 <= min_lr <= lr and lr > 0")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise UserError(f"train.label_smoothing = {t.label_smoothing} must be in [0, 1), e.g. 0.1")
    if t.standardize and t.multi_layer == "weighted_mean":
        raise UserError("train.standardize needs a fixed probe input; use train.multi_layer=concat or none with it")
    if t.decode_samples_per_request < 0:
        raise UserError("train.decode_samples_per_request must be >= 0 (0 = every stored decode position)")


def _select_layers(spec, available: list[int], num_layers: int, task: str) -> list[int]:
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return list(available)  # every layer that was extracted for this task
    layers = resolve_layers(spec, num_layers, what="train layer")
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise UserError(f"layer {missing[0]} was not extracted for {task} states (extracted: "
                        f"{','.join(map(str, available))}); pick those or re-run extract with it")
    return layers


def plan_probes(cfg: RecipeConfig, extraction: Extraction) -> list[ProbeSpec]:
    """Every probe this config trains: one per selected layer and task, plus the multi-layer one."""
    t = cfg.train
    specs = []
    for task in options(Task) if t.task == "both" else (t.task,):
        available = extraction.prompt_layers if task == "prompt" else extraction.decode_layers
        num_layers = int(extraction.model["num_layers"])
        specs += [ProbeSpec(task, (layer,)) for layer in _select_layers(t.layers, available, num_layers, task)]
        if t.multi_layer != "none":
            layers = _select_layers(t.multi_layer_layers or t.layers, available, num_layers, task)
            if len(layers) < 2:
                raise UserError(f"train.multi_layer={t.multi_layer} needs at least two layers; set "
                                "train.multi_layer_layers to a range like 8-15")
            specs.append(ProbeSpec(task, tuple(layers), t.multi_layer))
    return specs


def load_data(extraction: Extraction, spec: ProbeSpec, split: dict, bins: Bins, per_request: int,
              seed: int) -> ProbeData:
    """The probe's inputs, labels and true lengths as in-memory tensors, split by request."""
    from trail_probe.offline.probe_module import TensorRows, sample_per_group

    train_ids, val_ids = set(split["train_ids"]), set(split["val_ids"])
    is_train = torch.tensor([rid in train_ids for rid in extraction.ids], dtype=torch.bool)
    is_val = torch.tensor([rid in val_ids for rid in extraction.ids], dtype=torch.bool)  # what selects epochs
    max_new = float(extraction.manifest["generation"]["max_new_tokens"])
    if spec.task == "prompt":
        states = [extraction.prompt_states(layer) for layer in spec.layers]
        tokens = extraction.output_tokens
        request = torch.arange(len(tokens))
        cap = torch.full((len(tokens),), max_new)
    else:
        decodes = [extraction.decode(layer) for layer in spec.layers]
        states = [d.states for d in decodes]
        tokens, request = decodes[0].remaining, decodes[0].request
        cap = max_new - decodes[0].generated.float()  # the runtime never predicts past max_new_tokens
    x = states[0] if spec.mode == "none" else torch.stack(states, 1)
    rows = TensorRows(x, bins.label(tokens), tokens.float(), cap)
    train_rows = torch.nonzero(is_train[request]).squeeze(1)
    val_rows = torch.nonzero(is_val[request]).squeeze(1)
    if spec.task == "decode" and per_request > 0:
        picked = sample_per_group(request[val_rows], per_request, torch.Generator().manual_seed(seed))
        val_rows = val_rows[picked.sort().values]
    for side, picked in (("training", train_rows), (split.get("side", "held-out"), val_rows)):
        if len(picked) == 0:
            raise UserError(f"the {side} side of the split has no {spec.task} samples; extract more prompts "
                            "or change train.train_fraction")
    return ProbeData(
        train=TensorRows(*(t[train_rows] for t in rows.tensors)), val=TensorRows(*(t[val_rows] for t in rows.tensors)),
        train_groups=request[train_rows] if spec.task == "decode" else None, input_dim=x.shape[-1],
        num_train_requests=int(is_train.sum()), num_val_requests=int(is_val.sum()))


def _loggers(cfg: RecipeConfig, spec: ProbeSpec) -> list:
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


def fit_probe(cfg: RecipeConfig, spec: ProbeSpec, data: ProbeData, context: dict, resume: bool = False,
              overwrite: bool = False, fast_dev_run: bool = False, callbacks: tuple = (),
              progress=None) -> dict | None:
    """Train one probe into its contract-1 folder; returns its probe.json metadata (None on non-zero ranks).
    `progress`: the stage bar's `EpochProgress` callback (None: a bar of this probe alone)."""
    import lightning as L
    from lightning.pytorch.callbacks import (
        LearningRateMonitor,
        ModelCheckpoint,
        TQDMProgressBar,
    )

    from trail_probe.offline.epoch_progress import EpochProgress
    from trail_probe.offline.probe_module import ProbeModule, make_loader

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DROP_DEVICE_INFO)
    # The feed is in memory (no workers needed); epoch metrics are torchmetrics values that compute()
    # already reduced over DDP ranks; the pytree note is Lightning's own deprecation.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    t = cfg.train
    own_bar = progress is None
    if own_bar:
        progress = EpochProgress(progress_bar(cfg.progress, total=t.epochs, desc=f"train {spec.task} {spec.name}",
                                              unit="epoch"), f"{spec.task} {spec.name}")
    say = progress.bar.write
    folder = cfg.paths.probe(spec.task, spec.name)
    recipe = {key: getattr(t, key) for key in ("epochs", "batch_size", "seed", "decode_samples_per_request")}
    recipe.update(split_sha256=context["split"]["sha256"],
                  extraction_manifest_sha256=context["extraction"]["manifest_sha256"])
    if context["selected_on"]["side"] == "validation":  # (absent otherwise: probes trained before it stay resumable)
        recipe["validation_sha256"] = context["selected_on"]["sha256"]
    hparams = dict(task=spec.task, layers=list(spec.layers), multi_layer=spec.mode, input_dim=data.input_dim,
                   hidden_dim=t.hidden_dim, num_bins=cfg.bins.num_bins, max_len=cfg.bins.max_len, lr=t.lr,
                   min_lr=t.min_lr, weight_decay=t.weight_decay, recipe=recipe, standardize=t.standardize,
                   loss=t.loss, label_smoothing=t.label_smoothing)
    ckpt_path = None
    if overwrite and folder.exists() and not fast_dev_run:
        shutil.rmtree(folder)
    if (folder / "last.ckpt").is_file() and not fast_dev_run:
        if not resume:
            raise UserError(f"'{folder}' already holds a probe; add --resume to continue it (finished probes are kept) "
                            "or --overwrite to train it again")
        # Our own checkpoint; Lightning stores hparams as an AttributeDict, which weights_only refuses.
        saved = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
        for key, value in hparams.items():
            # settings added after a checkpoint was written count as their defaults
            if saved["hyper_parameters"].get(key, ADDED_HPARAMS.get(key)) != value:
                raise UserError(f"'{folder / 'last.ckpt'}' was trained with {key}={saved['hyper_parameters'].get(key)!r} "
                                f"but the config gives {value!r}; restore the old settings or use --overwrite")
        if (folder / "probe.json").is_file() and saved["epoch"] + 1 >= t.epochs:
            say(f"[{spec.task} {spec.name}] already trained; kept")
            meta = json.loads((folder / "probe.json").read_text())
            progress.best.offer(meta["metrics"]["val/mae"], progress.name)
            return meta
        ckpt_path = folder / "last.ckpt"

    L.seed_everything(t.seed, workers=True, verbose=False)  # same initial weights for every run of this recipe
    module = ProbeModule(**hparams)
    if t.standardize:  # from the training side only; a resumed run recomputes the same values
        module.probe.set_input_stats(data.train.tensors[0])
    if t.loss == "balanced_ce":
        module.set_class_weights(data.train.tensors[1])
    train_loader = make_loader(data.train, t.batch_size, t.seed, True, data.train_groups, t.decode_samples_per_request)
    val_loader = make_loader(data.val, t.batch_size, t.seed, False)
    checkpoint = ModelCheckpoint(dirpath=folder, filename="best", monitor="val/mae", mode="min", save_top_k=1,
                                 enable_version_counter=False)
    # Lightning's save_last=True copies "last" only when a best checkpoint is saved, so last.ckpt would
    # be the best epoch, not the latest; an unmonitored checkpoint rewritten every epoch is the latest.
    latest = ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                             enable_version_counter=False)
    loggers = [] if fast_dev_run else _loggers(cfg, spec)
    # Trainer(deterministic=True) switches torch to deterministic algorithms for the whole process;
    # switch back afterwards so later stages in the same process (eval on CUDA) are not refused ops.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    trainer = L.Trainer(
        max_epochs=t.epochs, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=t.precision,
        deterministic=t.deterministic, logger=loggers or False, fast_dev_run=fast_dev_run,
        callbacks=[*([] if fast_dev_run else [checkpoint, latest]), progress,
                   *([TQDMProgressBar(refresh_rate=10)] if cfg.progress.lightning_bars else []),
                   *([LearningRateMonitor("epoch")] if loggers else []), *callbacks],
        enable_progress_bar=cfg.progress.lightning_bars,
        num_sanity_val_steps=0, enable_model_summary=False, use_distributed_sampler=False, log_every_n_steps=1,
        default_root_dir=folder)
    say(f"[{spec.task} {spec.name}] {len(data.train)} training samples ({data.num_train_requests} requests), "
        f"{len(data.val)} {context['selected_on']['side']} ({data.num_val_requests} requests), {t.epochs} epochs")
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
        if own_bar:
            progress.bar.close()
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()  # else the next probe's logger would reuse this wandb run
    if fast_dev_run or not trainer.is_global_zero:
        return None
    return _write_probe(cfg, spec, folder, module, checkpoint.best_model_path, context, say)


def _write_probe(cfg, spec: ProbeSpec, folder: Path, module, best_path: str, context: dict, say=print) -> dict:
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    weights = {k.removeprefix("probe."): v.contiguous() for k, v in best["state_dict"].items() if k.startswith("probe.")}
    with atomic_path(folder / "probe.safetensors") as tmp:
        save_file(weights, str(tmp))
    entry = next(h for h in module.history if h["epoch"] == best["epoch"])
    meta = {
        "format": PROBE_FORMAT, "task": spec.task, "layers": list(spec.layers), "multi_layer": spec.mode,
        "input_dim": module.hparams.input_dim, "hidden_dim": cfg.train.hidden_dim, "num_labels": cfg.bins.num_bins,
        "standardize": bool(module.hparams.standardize),
        **context, "metrics": {"val/mae": entry["val/mae"], "val/acc": entry["val/acc"], "val/loss": entry["val/loss"],
                               "best_epoch": entry["epoch"]},
        "epochs": cfg.train.epochs, "history": module.history,
    }
    save_config(cfg, folder)
    atomic_write_json(folder / "probe.json", meta)
    m = meta["metrics"]
    say(f"[{spec.task} {spec.name}] best epoch {m['best_epoch']}: val/mae {m['val/mae']:.1f} tokens, "
        f"val/acc {m['val/acc']:.3f}")
    return meta


def train(cfg: RecipeConfig, resume: bool = False, overwrite: bool = False, fast_dev_run: bool = False,
          callbacks: tuple = ()) -> list[dict]:
    """Train every probe the config asks for; write the sweep when a task has several layers."""
    check_train_config(cfg)
    # One thread unless asked: a probe's matmuls (32 x 576 x 512) gain little from more, and with another
    # job on the cores two threads ran an epoch 19x slower than one (benchmarks/train_speed.py).
    torch.set_num_threads(cfg.train.num_threads or 1)
    extraction = Extraction(cfg.paths.data)
    extraction.check_model(cfg.model.name_or_path)
    specs = plan_probes(cfg, extraction)
    split = selection_split(cfg, load_or_make_split(cfg, extraction))  # fit on train_ids, choose epochs on val_ids
    bins = Bins.from_config(cfg.bins)
    context = {"bins": bins.to_dict(), "model": extraction.model,
               "extraction": {"path": str(extraction.root), "manifest_sha256": manifest_sha256(extraction)},
               "split": {"path": str(cfg.paths.split), "sha256": file_sha256(cfg.paths.split)},
               "selected_on": {"side": split["side"], "path": split["path"], "requests": len(split["val_ids"]),
                               "sha256": file_sha256(split["path"])},
               "config_sha256": config_sha256(cfg), "layer_numbering": LAYER_NUMBERING}
    from trail_probe.offline.epoch_progress import EpochProgress, StageBest

    results, epochs = [], cfg.train.epochs
    best = {task: StageBest() for task in options(Task)}
    with temp_files_in(cfg.paths.checkpoints), \
            progress_bar(cfg.progress, total=len(specs) * epochs, desc="train", unit="epoch") as bar:
        for i, spec in enumerate(specs):
            progress = EpochProgress(bar, f"{spec.task} {spec.name} ({i + 1}/{len(specs)})", offset=i * epochs,
                                     best=best[spec.task], name=f"{spec.task} {spec.name}")
            data = load_data(extraction, spec, split, bins, cfg.train.decode_samples_per_request, cfg.train.seed)
            meta = fit_probe(cfg, spec, data, context, resume, overwrite, fast_dev_run, callbacks, progress)
            if bar.n < (i + 1) * epochs:  # a kept probe, or fast_dev_run
                bar.update((i + 1) * epochs - bar.n)
            if meta is not None:
                results.append(meta)
    if not results:  # fast_dev_run, or a non-zero DDP rank
        return results
    sweep = any(sum(m["task"] == task and m["multi_layer"] == "none" for m in results) > 1 for task in options(Task))
    summary = write_sweep(cfg, results) if sweep else None
    print_results(results, summary)
    if summary:
        print(f"sweep table and plot: {cfg.paths.sweep}/layer_sweep.{{csv,json,png}}")
    return results


def run(cfg: RecipeConfig, args) -> None:
    train(cfg, resume=args.resume, overwrite=args.overwrite, fast_dev_run=args.fast_dev_run)
