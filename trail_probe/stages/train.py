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

A sweep's single-layer probes can also train `train.stack_layers` layers at a time as one batched
model (`offline/probe_stack.py`, `fit_stack`): the same batches, initial weights and schedule as one
run per layer, so the same results (a test checks weights, histories and best epochs), with the
Lightning step paid once per stack. On this 2-core CPU that buys little (benchmarks/sweep_speed.py:
one epoch of a 30-layer decode sweep takes 39.5 s one probe at a time, 24.1 s in stacks of 5 on
2 threads): a probe step is compute- and memory-bound, and 30 probes' weights and AdamW state do not
stay in cache; on a GPU the stack's batched products replace 30 small steps by one. Each layer still
gets its own best epoch and probe folder; the stack's `last.ckpt` resumes it.

Several devices (`train.strategy=ddp train.devices=N`): each rank takes every N-th batch of the same
(seed, epoch) order, so `train.batch_size` is per device, as usual in Lightning; every rank scores
the whole held-out set and only rank 0 writes files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from trail_probe.atomic import atomic_path, atomic_write_json, temp_files_in
from trail_probe.choices import Task, options
from trail_probe.config import RecipeConfig, config_sha256, resolve_layers, save_config
from trail_probe.errors import UserError
from trail_probe.offline.artifacts import PROBE_FORMAT, probe_name
from trail_probe.offline.probe_fit import fit_module, latest_checkpoint, quiet_lightning
from trail_probe.offline.split import (
    load_or_make_split,
    manifest_sha256,
    selection_split,
)
from trail_probe.offline.store import LAYER_NUMBERING, Extraction
from trail_probe.offline.sweep_report import print_results, write_sweep
from trail_probe.progress import progress_bar
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.models import dtype_of, file_sha256

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
    if t.loss == "emd" and t.label_smoothing:
        raise UserError("train.label_smoothing smooths cross-entropy's targets; set it to 0 with train.loss=emd")
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


def stack_runs(specs: list[ProbeSpec], stack_layers: int) -> list[ProbeSpec]:
    """The runs that train `specs`: with `stack_layers` > 1, a task's single-layer probes go in stacks
    of up to that many consecutive layers (mode "stack", `fit_stack`); everything else alone."""
    if stack_layers <= 1:
        return list(specs)
    runs, pending = [], {}
    for spec in specs:
        if spec.mode != "none":
            runs.append(spec)
            continue
        group = pending.setdefault(spec.task, [])
        group.append(spec.layers[0])
        if len(group) == stack_layers:
            runs.append(ProbeSpec(spec.task, tuple(pending.pop(spec.task)), "stack"))
    for task, group in pending.items():
        runs.append(ProbeSpec(task, tuple(group), "stack") if len(group) > 1 else ProbeSpec(task, (group[0],)))
    order = {spec.task: i for i, spec in reversed(list(enumerate(specs)))}
    return sorted(runs, key=lambda r: order[r.task])  # stable: each task's runs in layer order, tasks as planned


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
        # a stack holds many layers in memory at once: kept in the storage dtype (exact), fp32 per batch
        keep = dtype_of(extraction.manifest.get("storage_dtype", "float32")) if spec.mode == "stack" else torch.float32
        first = extraction.decode(spec.layers[0])
        states = [first.states.to(keep)] + [extraction.decode(layer).states.to(keep) for layer in spec.layers[1:]]
        tokens, request = first.remaining, first.request
        cap = max_new - first.generated.float()  # the runtime never predicts past max_new_tokens
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


def _hparams(cfg: RecipeConfig, spec: ProbeSpec, data: ProbeData, context: dict) -> dict:
    t = cfg.train
    recipe = {key: getattr(t, key) for key in ("epochs", "batch_size", "seed", "decode_samples_per_request")}
    recipe.update(split_sha256=context["split"]["sha256"],
                  extraction_manifest_sha256=context["extraction"]["manifest_sha256"])
    if context["selected_on"]["side"] == "validation":  # (absent otherwise: probes trained before it stay resumable)
        recipe["validation_sha256"] = context["selected_on"]["sha256"]
    return dict(task=spec.task, layers=list(spec.layers), **({} if spec.mode == "stack" else {"multi_layer": spec.mode}),
                input_dim=data.input_dim, hidden_dim=t.hidden_dim, num_bins=cfg.bins.num_bins, max_len=cfg.bins.max_len,
                lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, recipe=recipe, standardize=t.standardize,
                loss=t.loss, label_smoothing=t.label_smoothing)


def _resume_point(folder: Path, hparams: dict, epochs: int, resume: bool, overwrite: bool, fast_dev_run: bool,
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
    for key, value in hparams.items():
        # settings added after a checkpoint was written count as their defaults
        if saved["hyper_parameters"].get(key, ADDED_HPARAMS.get(key)) != value:
            raise UserError(f"'{folder / 'last.ckpt'}' was trained with {key}={saved['hyper_parameters'].get(key)!r} "
                            f"but the config gives {value!r}; restore the old settings or use --overwrite")
    return folder / "last.ckpt", finished.is_file() and saved["epoch"] + 1 >= epochs


def fit_probe(cfg: RecipeConfig, spec: ProbeSpec, data: ProbeData, context: dict, resume: bool = False,
              overwrite: bool = False, fast_dev_run: bool = False, callbacks: tuple = (),
              progress=None) -> dict | None:
    """Train one probe into its contract-1 folder; returns its probe.json metadata (None on non-zero ranks).
    `progress`: the stage bar's `EpochProgress` callback (None: a bar of this probe alone)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from trail_probe.offline.epoch_progress import EpochProgress
    from trail_probe.offline.probe_module import ProbeModule

    quiet_lightning()
    own_bar = progress is None
    if own_bar:
        progress = EpochProgress(progress_bar(cfg.progress, total=cfg.train.epochs, desc=f"train {spec.task} {spec.name}",
                                              unit="epoch"), f"{spec.task} {spec.name}")
    say = progress.bar.write
    folder = cfg.paths.probe(spec.task, spec.name)
    hparams = _hparams(cfg, spec, data, context)
    ckpt_path, done = _resume_point(folder, hparams, cfg.train.epochs, resume, overwrite, fast_dev_run,
                                    folder / "probe.json")
    if done:
        say(f"[{spec.task} {spec.name}] already trained; kept")
        meta = json.loads((folder / "probe.json").read_text())
        progress.best.offer(meta["metrics"]["val/mae"], progress.name)
        return meta
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)  # same initial weights for every run of this recipe
    module = ProbeModule(**hparams)
    checkpoint = ModelCheckpoint(dirpath=folder, filename="best", monitor="val/mae", mode="min", save_top_k=1,
                                 enable_version_counter=False)
    try:
        trainer = fit_module(cfg, spec, module, data, folder, ckpt_path, [checkpoint, latest_checkpoint(folder)], progress, callbacks,
                       fast_dev_run, context)
    finally:
        if own_bar:
            progress.bar.close()
    if fast_dev_run or not trainer.is_global_zero:
        return None
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    weights = {k.removeprefix("probe."): v.contiguous() for k, v in best["state_dict"].items() if k.startswith("probe.")}
    entry = next(h for h in module.history if h["epoch"] == best["epoch"])
    return _write_probe(cfg, spec, folder, weights, module.history, entry, data.input_dim, context, say)


def fit_stack(cfg: RecipeConfig, spec: ProbeSpec, data: ProbeData, context: dict, resume: bool = False,
              overwrite: bool = False, fast_dev_run: bool = False, callbacks: tuple = (),
              progress=None) -> list[dict]:
    """Train the single-layer probes of `spec.layers` as one `ProbeStack` (`offline/probe_stack.py`);
    each layer's best epoch goes into its own probe folder, as `fit_probe` writes it. The stack's own
    folder (`<task>/stack-<first>-<last>/`) holds its last.ckpt for --resume."""
    import lightning as L

    from trail_probe.offline.epoch_progress import EpochProgress
    from trail_probe.offline.probe_stack import StackModule

    quiet_lightning()
    if progress is None:  # a bar of this stack alone (the stage passes its own)
        progress = EpochProgress(progress_bar(cfg.progress, total=cfg.train.epochs * len(spec.layers),
                                              desc=f"train {spec.task} {spec.name}", unit="epoch"),
                                 f"{spec.task} {spec.name}", probes=len(spec.layers))
    say = progress.bar.write
    folder = cfg.paths.probe(spec.task, spec.name)
    members = [ProbeSpec(spec.task, (layer,)) for layer in spec.layers]
    member_dirs = [cfg.paths.probe(m.task, m.name) for m in members]
    if overwrite and not fast_dev_run:
        for d in member_dirs:
            shutil.rmtree(d, ignore_errors=True)
    taken = [d for d in member_dirs if (d / "probe.json").is_file()]
    if taken and not (resume or fast_dev_run) and not (folder / "last.ckpt").is_file():
        raise UserError(f"'{taken[0]}' already holds a probe; add --resume to keep finished probes "
                        "or --overwrite to train them again")
    hparams = _hparams(cfg, spec, data, context)
    ckpt_path, done = _resume_point(folder, hparams, cfg.train.epochs, resume, overwrite, fast_dev_run,
                                    folder / "written.json")
    if done and all((d / "probe.json").is_file() for d in member_dirs):
        say(f"[{spec.task} {spec.name}] already trained; kept")
        metas = [json.loads((d / "probe.json").read_text()) for d in member_dirs]
        for m, meta in zip(members, metas):
            progress.best.offer(meta["metrics"]["val/mae"], f"{m.task} {m.name}")
        return metas
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)  # each layer's initial weights as alone
    module = StackModule(**hparams)
    trainer = fit_module(cfg, spec, module, data, folder, ckpt_path, [latest_checkpoint(folder)], progress, callbacks, fast_dev_run,
                   context)
    if fast_dev_run or not trainer.is_global_zero:
        return []
    metas = []
    for i, (member, member_dir) in enumerate(zip(members, member_dirs)):
        weights, entry = module.best_state(i)
        metas.append(_write_probe(cfg, member, member_dir, weights, module.layer_history(i), entry, data.input_dim,
                                  context, say, trained_in=spec.name))
    atomic_write_json(folder / "written.json", {"probes": [str(d) for d in member_dirs]})
    return metas


def _write_probe(cfg, spec: ProbeSpec, folder: Path, weights: dict, history: list[dict], entry: dict, input_dim: int,
                 context: dict, say=print, trained_in: str | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "probe.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    meta = {
        "format": PROBE_FORMAT, "task": spec.task, "layers": list(spec.layers), "multi_layer": spec.mode,
        "input_dim": input_dim, "hidden_dim": cfg.train.hidden_dim, "num_labels": cfg.bins.num_bins,
        "standardize": bool(cfg.train.standardize),
        **context, "metrics": {"val/mae": entry["val/mae"], "val/acc": entry["val/acc"], "val/loss": entry["val/loss"],
                               "best_epoch": entry["epoch"]},
        "epochs": cfg.train.epochs, "history": history,
        **({"trained_in": trained_in} if trained_in else {}),
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
    runs = stack_runs(specs, cfg.train.stack_layers)
    with temp_files_in(cfg.paths.checkpoints), \
            progress_bar(cfg.progress, total=len(specs) * epochs, desc="train", unit="epoch") as bar:
        done = 0  # probes finished before this run
        for i, spec in enumerate(runs):
            size = len(spec.layers) if spec.mode == "stack" else 1
            progress = EpochProgress(bar, f"{spec.task} {spec.name} ({i + 1}/{len(runs)})", offset=done * epochs,
                                     best=best[spec.task], name=f"{spec.task} {spec.name}", probes=size)
            data = load_data(extraction, spec, split, bins, cfg.train.decode_samples_per_request, cfg.train.seed)
            if spec.mode == "stack":
                results += fit_stack(cfg, spec, data, context, resume, overwrite, fast_dev_run, callbacks, progress)
            else:
                meta = fit_probe(cfg, spec, data, context, resume, overwrite, fast_dev_run, callbacks, progress)
                results += [] if meta is None else [meta]
            done += size
            if bar.n < done * epochs:  # a kept probe, or fast_dev_run
                bar.update(done * epochs - bar.n)
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
