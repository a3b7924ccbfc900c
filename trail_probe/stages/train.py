"""Train TRAIL's length probe on an extraction, one probe per layer and task (`trail-probe train`).

    trail-probe train recipes/smollm2_alpaca.yaml                    # the recipe: a layer search, both tasks
    trail-probe train recipes/smollm2_alpaca.yaml train.task=decode train.layers=11 train.multi_layer=none
    trail-probe train recipes/smollm2_alpaca.yaml --resume           # continue an interrupted run

Tasks: `prompt` maps a layer's mean prompt state to the total output length; `decode` maps the state
of a decode step to the tokens still to come. `train.task=both` trains each. Labels are
`bins.num_bins` equal bins over [0, bins.max_len]; recipe defaults are the paper's (cross-entropy,
AdamW, cosine lr 0.01 -> 0 over 30 epochs, batch 32, 75/25 split of requests from `split.json`).
Beyond the paper: `train.prompt_input` / `train.decode_input` choose what the probes read
(`runtime/probe_inputs.py`: a pooled prompt, a running pool of the generated tokens), from what the
extraction stored; `train.prompt_labels=median|soft` trains the prompt probe on sampled answers'
lengths (`offline/probe_data.py`); `train.loss=rank` adds a pairwise ranking loss (`offline/probe_losses.py`).

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

`train.layers=search` trains fewer: a coarse grid of layers, then the layers near the best so far
until none of them is better (`offline/layer_search.py`); its sweep files list the layers it trained
and record the search (`search` in layer_sweep.json), so eval and export choose the same way.

A sweep's (or a search round's) single-layer probes can also train `train.stack_layers` layers at a
time as one batched model (`offline/probe_stack.py`, `fit_stack`): the same batches, initial weights
and schedule as one run per layer, so the same results (a test checks weights, histories and best
epochs), with the Lightning step paid once per stack (benchmarks/sweep_speed.py: 1.6x on this 2-core
CPU; on a GPU the stack's batched products replace many small steps by one). Each layer still gets
its own best epoch and probe folder; the stack's `last.ckpt` resumes it.

Several devices (`train.strategy=ddp train.devices=N`): each rank takes every N-th batch of the same
(seed, epoch) order, so `train.batch_size` is per device, as usual in Lightning; every rank scores
the whole held-out set and only rank 0 writes files.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass

import torch

from trail_probe.atomic import atomic_write_json, temp_files_in
from trail_probe.choices import Task, options
from trail_probe.config import RecipeConfig, config_sha256, resolve_layers
from trail_probe.errors import UserError
from trail_probe.model_files import file_sha256
from trail_probe.offline.artifacts import probe_input, probe_name, write_probe
from trail_probe.offline.layer_screen import ridge_mae, screened
from trail_probe.offline.layer_search import best_of, coarse_grid, expected_probes, search_layers
from trail_probe.offline.probe_data import ProbeData, load_data  # noqa: F401 (ProbeData: its old home)
from trail_probe.offline.probe_fit import fit_module, latest_checkpoint, quiet_lightning, resume_point
from trail_probe.offline.probe_module import sample_per_group
from trail_probe.offline.split import load_or_make_split, manifest_sha256, selection_split
from trail_probe.offline.store import LAYER_NUMBERING, Extraction
from trail_probe.offline.sweep_report import print_results, write_sweep
from trail_probe.progress import progress_bar
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.probe_inputs import DEFAULT_INPUT

HELP = "Train the length probe on extracted hidden states; sweep layers to find the best one."
EXAMPLES = """examples:
  trail-probe train recipes/smollm2_alpaca.yaml
  trail-probe train recipes/smollm2_alpaca.yaml train.task=decode train.layers=11 train.multi_layer=none
  trail-probe train recipes/smollm2_alpaca.yaml train.multi_layer=weighted_mean train.multi_layer_layers=8-15
  trail-probe train recipes/smollm2_alpaca.yaml train.layers=all          # every layer, not a search
  trail-probe train recipes/smollm2_alpaca.yaml train.layers=all train.accelerator=gpu train.devices=4 train.strategy=ddp
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
        if self.mode == "stack" and list(self.layers) != list(range(self.layers[0], self.layers[-1] + 1)):
            return "stack-" + "_".join(map(str, self.layers))  # a search's stack of layers apart: its own folder
        return probe_name(self.layers, self.mode)


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
    if t.loss == "rank" and not t.rank_weight > 0:
        raise UserError(f"train.rank_weight = {t.rank_weight} must be > 0 with train.loss=rank (e.g. 1.0)")
    if t.standardize and t.multi_layer == "weighted_mean":
        raise UserError("train.standardize needs a fixed probe input; use train.multi_layer=concat or none with it")
    if t.decode_samples_per_request < 0:
        raise UserError("train.decode_samples_per_request must be >= 0 (0 = every stored decode position)")
    if t.layer_search and (t.search_points < 2 or t.search_radius < 1):
        raise UserError(f"train.search_points = {t.search_points} and train.search_radius = {t.search_radius} need "
                        "at least 2 and 1 (the recipe's 6 and 2)")
    if t.layer_search and t.ridge_screen != "none" and t.screen_points < 1:
        raise UserError(f"train.screen_points = {t.screen_points} must be >= 1 (the recipe's 3)")
    if t.layer_search and (str(t.devices) != "1" or "ddp" in str(t.strategy)):
        raise UserError("train.layers=search picks each round's layers from the last round's results, which only rank "
                        "0 of a multi-device run holds; use train.layers=all there, or train.devices=1")


def _select_layers(spec, available: list[int], num_layers: int, task: str) -> list[int]:
    if isinstance(spec, str) and spec.strip().lower() in ("all", "search"):
        return list(available)  # every layer that was extracted for this task (a search's candidates)
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
                loss=t.loss, label_smoothing=t.label_smoothing, **_added_hparams(cfg, spec.task))


def _added_hparams(cfg: RecipeConfig, task: str) -> dict:
    """The settings after the paper's that change a probe, given only where they differ from TRAIL's (so
    probes trained before them stay resumable; probe_fit.ADDED_HPARAMS holds their defaults)."""
    t, kind = cfg.train, probe_input(cfg, task)
    return {**({"rank_weight": t.rank_weight} if t.loss == "rank" else {}),
            **({"probe_input": kind} if kind != DEFAULT_INPUT[task] else {}),
            **({"prompt_labels": t.prompt_labels} if task == "prompt" and t.prompt_labels != "greedy" else {})}


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
    ckpt_path, done = resume_point(folder, hparams, cfg.train.epochs, resume, overwrite, fast_dev_run,
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
    return write_probe(cfg, spec, folder, weights, module.history, entry, data.input_dim, context, say)


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
    ckpt_path, done = resume_point(folder, hparams, cfg.train.epochs, resume, overwrite, fast_dev_run,
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
        metas.append(write_probe(cfg, member, member_dir, weights, module.layer_history(i), entry, data.input_dim,
                                  context, say, trained_in=spec.name))
    atomic_write_json(folder / "written.json", {"probes": [str(d) for d in member_dirs]})
    return metas


@dataclass
class _Session:
    """What every run of one `train` call shares, and the stage bar's count of probes done."""

    cfg: RecipeConfig
    extraction: Extraction
    split: dict
    bins: Bins
    context: dict
    flags: tuple  # (resume, overwrite, fast_dev_run, callbacks)
    bar: object
    best: dict  # task -> StageBest
    done: int = 0  # probes finished before the current run
    later: int = 0  # probes still planned after the current round (a search's bar total grows as it goes)

    def fit(self, specs: list[ProbeSpec], where: str = "") -> list[dict]:
        """Train `specs` (in stacks when the recipe stacks them); their probe.json metadata."""
        from trail_probe.offline.epoch_progress import EpochProgress

        cfg, epochs, results = self.cfg, self.cfg.train.epochs, []
        runs = stack_runs(specs, cfg.train.stack_layers)
        for i, spec in enumerate(runs):
            size = len(spec.layers) if spec.mode == "stack" else 1
            if self.bar.total is not None and (self.done + size + self.later) * epochs > self.bar.total:
                self.bar.total = (self.done + size + self.later) * epochs
            progress = EpochProgress(self.bar, f"{spec.task} {spec.name} ({where or f'{i + 1}/{len(runs)}'})",
                                     offset=self.done * epochs, best=self.best[spec.task], name=f"{spec.task} {spec.name}",
                                     probes=size)
            data = load_data(self.extraction, spec, self.split, self.bins, cfg.train.decode_samples_per_request,
                             cfg.train.seed, probe_input(cfg, spec.task), cfg.train.prompt_labels)
            if spec.mode == "stack":
                results += fit_stack(cfg, spec, data, self.context, *self.flags, progress)
            else:
                meta = fit_probe(cfg, spec, data, self.context, *self.flags, progress)
                results += [] if meta is None else [meta]
            self.done += size
            if self.bar.n < self.done * epochs:  # a kept probe, or fast_dev_run
                self.bar.update(self.done * epochs - self.bar.n)
        return results

    def search(self, task: str, layers: list[int]) -> tuple[list[dict], dict]:
        """`train.layers=search` for one task over `layers`: the probes it trained, in layer order, and
        what the sweep records about it (`offline/layer_search.py`)."""
        t, metas, rounds = self.cfg.train, {}, itertools.count(1)

        def train_round(todo: list[int]) -> dict[int, float]:
            number = next(rounds)
            metas.update({m["layers"][0]: m for m in self.fit([ProbeSpec(task, (layer,)) for layer in todo],
                                                              where=f"search round {number}")})
            scores = {layer: m["metrics"]["val/mae"] for layer, m in metas.items()}
            if scores:
                best = best_of(scores)
                self.bar.write(f"[{task}] layer search round {number}: layers {', '.join(map(str, todo))}; "
                               f"best so far layer {best} (val MAE {scores[best]:.1f})")
            return {layer: scores[layer] for layer in todo if layer in scores}

        screen, first = self.screen(task, layers) if t.ridge_screen in (task, "both") else (None, None)
        found = search_layers(layers, t.search_points, t.search_radius, train_round, first)
        summary = found.summary(t.screen_points if screen else t.search_points, t.search_radius)
        return [metas[layer] for layer in sorted(metas)], {**summary, **({"screen": screen} if screen else {})}

    def screen(self, task: str, layers: list[int]) -> tuple[dict, list[int]]:
        """`train.ridge_screen`: every candidate layer's ridge-regression validation MAE on the probe's
        own inputs, split and targets (`offline/layer_screen.py`), as the sweep records it, and the
        layers the search trains first."""
        t, began, scores = self.cfg.train, time.perf_counter(), {}
        for layer in layers:
            data = load_data(self.extraction, ProbeSpec(task, (layer,)), self.split, self.bins,
                             t.decode_samples_per_request, t.seed, probe_input(self.cfg, task), t.prompt_labels)
            x, _, tokens, _ = data.train.tensors
            if data.train_groups is not None and t.decode_samples_per_request > 0:  # as many rows as an epoch sees
                rows = sample_per_group(data.train_groups, t.decode_samples_per_request,
                                        torch.Generator().manual_seed(t.seed))
                x, tokens = x[rows], tokens[rows]
            val_x, _, val_tokens, val_cap = data.val.tensors
            scores[layer] = round(ridge_mae(x, tokens, val_x, val_tokens, val_cap), 2)
        first = screened(scores, t.screen_points)
        self.bar.write(f"[{task}] ridge screen of {len(layers)} layers in {time.perf_counter() - began:.0f} s: first "
                       f"round layers {', '.join(map(str, first))} (ridge val MAE {', '.join(f'{scores[k]:.1f}' for k in first)})")
        return {"method": "ridge", "val_mae": scores}, first  # no time recorded: a resumed run records the same

    def search_then_fit(self, specs: list[ProbeSpec]) -> tuple[list[dict], dict]:
        """Each task's layer search over the layers of its single-layer specs, then the other (multi-layer)
        probes; (their metadata, task -> what the sweep records about its search)."""
        t = self.cfg.train
        tasks = list(dict.fromkeys(spec.task for spec in specs))
        layers = {task: [s.layers[0] for s in specs if s.task == task and s.mode == "none"] for task in tasks}
        others = [spec for spec in specs if spec.mode != "none"]
        results, searched = [], {}
        for i, task in enumerate(tasks):
            self.later = len(others) + sum(len(coarse_grid(layers[k], t.search_points)) for k in tasks[i + 1:])
            metas, searched[task] = self.search(task, layers[task])
            results += metas
        self.later = 0
        return results + self.fit(others), searched


def planned_probes(cfg: RecipeConfig, specs: list[ProbeSpec]) -> int:
    """How many probes `train` trains: every spec, or for a search an estimate (the stage bar grows past it)."""
    if not cfg.train.layer_search:
        return len(specs)
    singles = {}
    for spec in specs:
        singles.setdefault(spec.task, []).extend(spec.layers if spec.mode == "none" else [])
    return sum(spec.mode != "none" for spec in specs) + sum(
        expected_probes(layers, cfg.train.search_points, cfg.train.search_radius) for layers in singles.values())


def train(cfg: RecipeConfig, resume: bool = False, overwrite: bool = False, fast_dev_run: bool = False,
          callbacks: tuple = ()) -> list[dict]:
    """Train every probe the config asks for; write the sweep when a task has several layers (or searched)."""
    check_train_config(cfg)
    # One thread unless asked: a probe's matmuls (32 x 576 x 512) gain little from more, and with another
    # job on the cores two threads ran an epoch 19x slower than one (benchmarks/train_speed.py).
    torch.set_num_threads(cfg.train.num_threads or 1)
    extraction = Extraction(cfg.paths.data)
    extraction.check_model(cfg.model.name_or_path)
    specs = plan_probes(cfg, extraction)
    for task in dict.fromkeys(spec.task for spec in specs):  # what the probes read is there, before any training
        extraction.check_input(task, probe_input(cfg, task))
        if task == "prompt" and cfg.train.prompt_labels != "greedy":
            extraction.sampled_lengths()
    split = selection_split(cfg, load_or_make_split(cfg, extraction))  # fit on train_ids, choose epochs on val_ids
    bins = Bins.from_config(cfg.bins)
    context = {"bins": bins.to_dict(), "model": extraction.model,
               "extraction": {"path": str(extraction.root), "manifest_sha256": manifest_sha256(extraction)},
               "split": {"path": str(cfg.paths.split), "sha256": file_sha256(cfg.paths.split)},
               "selected_on": {"side": split["side"], "path": split["path"], "requests": len(split["val_ids"]),
                               "sha256": file_sha256(split["path"])},
               "config_sha256": config_sha256(cfg), "layer_numbering": LAYER_NUMBERING}
    from trail_probe.offline.epoch_progress import StageBest

    with temp_files_in(cfg.paths.checkpoints), \
            progress_bar(cfg.progress, total=planned_probes(cfg, specs) * cfg.train.epochs, desc="train",
                         unit="epoch") as bar:
        session = _Session(cfg, extraction, split, bins, context, (resume, overwrite, fast_dev_run, callbacks), bar,
                           {task: StageBest() for task in options(Task)})
        results, searched = session.search_then_fit(specs) if cfg.train.layer_search else (session.fit(specs), {})
    if not results:  # fast_dev_run, or a non-zero DDP rank
        return results
    sweep = searched or any(sum(m["task"] == task and m["multi_layer"] == "none" for m in results) > 1
                            for task in options(Task))
    summary = write_sweep(cfg, results, searched or None) if sweep else None
    print_results(results, summary)
    if summary:
        print(f"sweep table and plot: {cfg.paths.sweep}/layer_sweep.{{csv,json,png}}")
    return results


def run(cfg: RecipeConfig, args) -> None:
    train(cfg, resume=args.resume, overwrite=args.overwrite, fast_dev_run=args.fast_dev_run)
