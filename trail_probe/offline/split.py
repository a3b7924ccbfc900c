"""The train / held-out split of requests, shared by `train`, `train-baseline` and `eval`.

    from trail_probe.offline.split import load_or_make_split, selection_split
    split = load_or_make_split(cfg, Extraction(cfg.paths.data))   # dict, also in cfg.paths.split
    split["train_ids"], split["val_ids"]
    fit = selection_split(cfg, split)   # what training fits on and what chooses epochs and layers

With `train.validation_fraction` > 0 a validation set is carved out of the training side by the same
kind of hash (`validation.json` beside split.json), and every choice (best epoch, layer, settings)
is made on it, so the held-out side is scored once, by `eval`. With 0 (the default, TRAIL's own
practice) the held-out side both selects and scores.

Each request goes to a side by a hash of (seed, id), not by its position in the list, so the same id
always lands on the same side: re-ordering or growing the extraction never moves a held-out prompt
into training. The split is written once to `<checkpoint_dir>/split.json` and reused by every
method, so all of them are scored on the same held-out prompts. A split.json made from another
extraction, or with another fraction or seed, is refused rather than silently replaced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from trail_probe.atomic import atomic_write_json
from trail_probe.errors import UserError
from trail_probe.model_files import file_sha256


def _unit_interval(seed: int, request_id: str) -> float:
    """A uniform number in [0, 1) that depends only on the seed and the id."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def make_split(ids: list[str], train_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train_ids, val_ids) in the order of `ids`; an id is in train when its hash is < train_fraction."""
    if not 0.0 < train_fraction < 1.0:
        raise UserError(f"train.train_fraction = {train_fraction} must be strictly between 0 and 1, e.g. 0.75")
    train, val = [], []
    for request_id in ids:
        (train if _unit_interval(seed, request_id) < train_fraction else val).append(request_id)
    for side, members in (("training", train), ("held-out", val)):
        if not members:
            raise UserError(
                f"the {side} side of the split has no requests ({len(ids)} requests, train_fraction "
                f"{train_fraction}); extract more prompts or change train.train_fraction"
            )
    return train, val


def manifest_sha256(extraction) -> str:
    """Identity of an extraction: the hash of its manifest.json (model, layers, settings)."""
    return file_sha256(Path(extraction.root) / "manifest.json")


def load_or_make_split(cfg, extraction) -> dict:
    """The split.json of this run: read (and checked) if present, else made from the extraction's ids."""
    path = cfg.paths.split
    seed, fraction = cfg.train.split_seed, cfg.train.train_fraction
    manifest = manifest_sha256(extraction)
    if path.is_file():
        split = json.loads(path.read_text())
        if split.get("extraction_manifest_sha256") != manifest:
            raise UserError(
                f"'{path}' was made from another extraction than '{extraction.root}'; point train.out_dir "
                "at a new folder for this extraction, or delete the old split.json (and its probes)"
            )
        if split.get("seed") != seed or split.get("train_fraction") != fraction:
            raise UserError(
                f"'{path}' was made with train_fraction={split.get('train_fraction')} and "
                f"split_seed={split.get('seed')}, but the config says {fraction} and {seed}; use those "
                "values, or another train.out_dir"
            )
        return split
    train_ids, val_ids = make_split(extraction.ids, fraction, seed)
    split = {"seed": seed, "train_fraction": fraction, "extraction_manifest_sha256": manifest,
             "train_ids": train_ids, "val_ids": val_ids}
    atomic_write_json(path, split)
    return split


def selection_split(cfg, split: dict) -> dict:
    """{"train_ids": what a model fits on, "val_ids": what selects its epoch (and the sweep's layer),
    "side": "validation" | "held-out", "path": the file that defines it}: with
    train.validation_fraction = f > 0, the training ids whose validation hash is < f (written once to
    validation.json beside split.json and checked like it); else the split itself."""
    fraction = cfg.train.validation_fraction
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"train.validation_fraction = {fraction} must be in [0, 1): the share of the training side "
                        "that chooses epochs and layers (0: the held-out side does)")
    if fraction == 0.0:
        return {"train_ids": split["train_ids"], "val_ids": split["val_ids"], "side": "held-out",
                "path": str(cfg.paths.split)}
    path = cfg.paths.split.with_name("validation.json")
    identity = {"fraction": fraction, "seed": cfg.train.split_seed, "split_sha256": file_sha256(cfg.paths.split)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in identity} != identity:
            raise UserError(f"'{path}' was made with validation_fraction={saved.get('fraction')} from another split or seed; "
                            "use the same settings, or delete validation.json (and the probes chosen on it)")
        validation = saved["validation_ids"]
    else:
        validation = [r for r in split["train_ids"] if _unit_interval(cfg.train.split_seed, f"validation:{r}") < fraction]
        atomic_write_json(path, {**identity, "validation_ids": validation})
    chosen = set(validation)
    fit = [r for r in split["train_ids"] if r not in chosen]
    if not fit or not validation:
        raise UserError(f"train.validation_fraction = {fraction} leaves {len(fit)} requests to fit and {len(validation)} "
                        "to validate; both need some, so change it or extract more prompts")
    return {"train_ids": fit, "val_ids": validation, "side": "validation", "path": str(path)}
