"""What the stages hand each other besides the extraction: probe folders, the layer choice, the
label prior, and the checks that an artifact belongs to this run.

    probe, meta = load_probe(cfg.paths.probe("decode", probe_name((19,))))
    layer, why = best_layer(cfg, "decode")

A probe folder (`train` writes it, `eval` and `export` read it) holds probe.safetensors (the plain
module's weights of the best epoch) and probe.json (format, task, layers, bins, the serving model,
the extraction / split / config hashes, metrics). `load_probe` reads it without Lightning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trail_probe.atomic import atomic_path, atomic_write_json
from trail_probe.config import RecipeConfig, resolve_layers, save_config
from trail_probe.errors import UserError
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.probe import LengthProbe, MultiLayerProbe
from trail_probe.runtime.probe_inputs import DEFAULT_INPUT

PROBE_FORMAT = "trail_probe.probe/1"


def probe_name(layers: tuple[int, ...] | list[int], mode: str = "none") -> str:
    """`layer-<L>` for a single-layer probe, `<mode>-<first>-<last>` for a multi-layer one."""
    return f"layer-{layers[0]}" if mode == "none" else f"{mode}-{layers[0]}-{layers[-1]}"


def probe_input(cfg: RecipeConfig, task: str) -> str:
    """What a `task` probe of this recipe reads (train.prompt_input / train.decode_input)."""
    return cfg.train.prompt_input if task == "prompt" else cfg.train.decode_input


def input_of(meta: dict) -> str:
    """What a trained probe reads (its probe.json's `input`; TRAIL's for probes trained before inputs)."""
    return meta.get("input") or DEFAULT_INPUT[meta["task"]]


def load_probe(folder: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """(plain probe in eval mode, probe.json metadata) from a probe folder, without Lightning."""
    folder = Path(folder)
    if not (folder / "probe.json").is_file() or not (folder / "probe.safetensors").is_file():
        raise UserError(f"no trained probe in '{folder}' (probe.json / probe.safetensors missing); run 'trail-probe train'")
    meta = json.loads((folder / "probe.json").read_text())
    if meta.get("format") != PROBE_FORMAT:
        raise UserError(f"'{folder}' holds probe format {meta.get('format')!r}, not {PROBE_FORMAT}; train it again")
    Bins(meta["num_labels"], meta["bins"]["max_len"]).check_matches(meta["bins"], f"probe.json in '{folder}'")
    standardize = bool(meta.get("standardize", False))
    if meta["multi_layer"] == "none":
        probe = LengthProbe(meta["input_dim"], meta["hidden_dim"], meta["num_labels"], standardize)
    else:
        probe = MultiLayerProbe(len(meta["layers"]), meta["input_dim"], meta["multi_layer"], meta["hidden_dim"],
                                meta["num_labels"], standardize)
    weights = load_file(str(folder / "probe.safetensors"))
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    if {k: tuple(v.shape) for k, v in weights.items()} != expected:
        raise UserError(f"probe.safetensors in '{folder}' does not match its probe.json (expected tensors {expected}); "
                        "train the probe again")
    probe.load_state_dict(weights)
    return probe.eval(), meta


def write_probe(cfg: RecipeConfig, spec, folder: Path, weights: dict, history: list[dict], entry: dict, input_dim: int,
                context: dict, say=print, trained_in: str | None = None) -> dict:
    """Write one probe folder (probe.safetensors, probe.json, config.yaml) from its best epoch; its probe.json.
    `spec`: the probe's task, layers, mode and name (`train.ProbeSpec`)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "probe.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    meta = {
        "format": PROBE_FORMAT, "task": spec.task, "layers": list(spec.layers), "multi_layer": spec.mode,
        "input_dim": input_dim, "hidden_dim": cfg.train.hidden_dim, "num_labels": cfg.bins.num_bins,
        "standardize": bool(cfg.train.standardize), "input": probe_input(cfg, spec.task), "loss": cfg.train.loss,
        **({"rank_weight": cfg.train.rank_weight} if cfg.train.loss == "rank" else {}),
        **({"labels": cfg.train.prompt_labels} if spec.task == "prompt" else {}),
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


def best_layer(cfg: RecipeConfig, task: str) -> tuple[int, str]:
    """(layer, where the choice came from): the sweep's best layer for `task` when a sweep ran, else
    the first of train.layers ("all" -> 0). Stages with a layer setting of their own check it first."""
    sweep = cfg.paths.sweep_summary
    if sweep.is_file():
        best = json.loads(sweep.read_text()).get("best_layer", {}).get(task)
        if isinstance(best, int):
            return best, f"best {task} layer of {sweep}"
    if cfg.train.layer_search:
        raise UserError(f"train.layers=search chooses the {task} layer in the sweep, and '{sweep}' names none; run "
                        "'trail-probe train' first, or name the layer (eval.layer / export.layer)")
    if str(cfg.train.layers).strip().lower() == "all":
        return 0, "first of train.layers"
    # Only the first layer is needed, and it does not depend on the model's depth.
    return resolve_layers(cfg.train.layers, num_layers=1 << 30, what="train.layers")[0], "first of train.layers"


def trained_layers(cfg: RecipeConfig) -> list[int]:
    """Layers with a trained single-layer probe of either task."""
    layers = set()
    for task in ("prompt", "decode"):
        for meta in (cfg.paths.probes / task).glob("layer-*/probe.json"):
            layers.add(int(meta.parent.name.removeprefix("layer-")))
    return sorted(layers)


def label_prior(extraction, split: dict, bins: Bins) -> torch.Tensor:
    """Bin frequencies [K] (float64) of the remaining lengths the decode probe trained on (every decode
    sample of the training side): what `refine.step_likelihood` divides out (prior_corrected)."""
    request, remaining = extraction.decode_labels()  # the same samples at every layer
    train_ids = set(split["train_ids"])
    is_train = torch.tensor([r["id"] in train_ids for r in extraction.records], dtype=torch.bool)
    return bins.frequencies(remaining[is_train[request]] if len(request) else remaining)


def check_artifact(meta: dict, what: str, extraction, manifest_sha: str, split_sha: str, bins: Bins) -> None:
    """Refuse a probe or baseline made from another model, extraction, split or bins than this run's."""
    model, ours = meta.get("model") or {}, extraction.model
    if (model.get("name_or_path"), model.get("weights_sha256")) != (ours["name_or_path"], ours["weights_sha256"]):
        raise UserError(f"{what} was trained for model '{model.get('name_or_path')}' but extraction '{extraction.root}' "
                        f"comes from '{ours['name_or_path']}' (or other weights); evaluate the matching run or retrain it")
    if meta["extraction"]["manifest_sha256"] != manifest_sha:
        raise UserError(f"{what} was trained on another extraction ('{meta['extraction']['path']}') than "
                        f"'{extraction.root}'; point extract.out_dir at that one or retrain it on this one")
    if meta["split"]["sha256"] != split_sha:
        raise UserError(f"{what} was trained on another split than the current '{meta['split']['path']}'; "
                        "retrain it so that the held-out requests were never seen in training")
    bins.check_matches(meta["bins"], what)
