"""Ship a trained probe to a serving scheduler (`trail-probe export`).

    trail-probe export recipes/smollm2_alpaca.yaml
    trail-probe export recipes/smollm2_alpaca.yaml export.layer=11 export.include_baseline=true

Reads the probe `trail-probe train` wrote (`<checkpoint_dir>/probes/<task>/layer-<L>/`: the best
epoch's `probe.safetensors` + `probe.json`) and writes `<checkpoint_dir>/predictor/` (or
export.out_dir) in the layout TRAIL's public runtime loads:

    config.json         hidden_size, hidden_dim, num_labels, max_len, probe_layer_idx, dtype
    model.safetensors   fc1.weight, fc1.bias, fc2.weight, fc2.bias (float32; a probe trained with
                        train.standardize has its input standardization folded into fc1)
    trail_probe.json    serving model id + weight hash, bin edges, metrics, layer numbering, the
                        extraction/split/config hashes it was trained on, the source probe, and
                        what each probe reads ("input", and "inputs": {"prompt": ..., "decode": ...};
                        `runtime/probe_inputs.py`): TRAIL's files are the same for every input, but
                        only a current-state probe (a mean-state prompt probe) is what TRAIL's
                        runtime feeds; `LengthPredictor.input` tells a server which to build
    recipe.yaml         the resolved recipe of this export
    prompt/             the prompt probe (the same files), the initial estimator a server uses before
                        a request has decoded (export.include_prompt_probe, default true)
    bert/               with export.include_baseline=true: the BERT baseline (save_pretrained dir)

Load it with `trail_probe.runtime.LengthPredictor.from_pretrained(dir)` and, for the prompt-text
estimate, `BertLengthPredictor.from_pretrained(dir / "bert")`: no Lightning, no pickle. The
folder is built under a temporary name, loaded back as a check, then renamed into place, so a
reader never sees half an export. The layer is export.layer, else the sweep's best layer for the
task, else the first of train.layers; export.probe names a probe folder directly.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trail_probe import __version__
from trail_probe.atomic import atomic_dir, atomic_write_json
from trail_probe.config import RecipeConfig, save_config
from trail_probe.errors import UserError
from trail_probe.model_files import file_sha256
from trail_probe.offline.artifacts import best_layer, input_of, label_prior, probe_name
from trail_probe.offline.split import load_or_make_split, selection_split
from trail_probe.offline.store import LAYER_NUMBERING, Extraction
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.predictor import (
    CONFIG_FILE,
    METADATA_FILE,
    PROBE_KEYS,
    LengthPredictor,
    check_probe_weights,
)
from trail_probe.runtime.probe import fold_standardization
from trail_probe.runtime.probe_inputs import input_width

HELP = "Write the trained probe (and optionally the BERT baseline) as a predictor a serving scheduler loads."
EXAMPLES = """examples:
  trail-probe export recipes/smollm2_alpaca.yaml
  trail-probe export recipes/smollm2_alpaca.yaml export.layer=11 export.task=decode
  trail-probe export recipes/smollm2_alpaca.yaml export.include_baseline=true export.out_dir=dist/predictor
then, in the server:
  from trail_probe.runtime import LengthPredictor
  predictor = LengthPredictor.from_pretrained("checkpoints/smollm2_alpaca/predictor", num_layers=30)"""

FORMAT = "trail_probe.predictor/1"
PROMPT_DIR = "prompt"  # a decode export's initial estimator (serving.trail_settings.INITIAL_DIR reads it)


def run(cfg: RecipeConfig, args) -> None:
    out = export_predictor(cfg)
    meta = json.loads((out / METADATA_FILE).read_text())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in meta["metrics"].items() if isinstance(v, (int, float)))
    print(f"exported the {meta['task']} probe of layer {meta['probe_layer_idx']} to {out} "
          f"({size / 1e6:.2f} MB{'; with bert/' if meta['bert'] else ''}); {metrics}")


def export_predictor(cfg: RecipeConfig) -> Path:
    """Write the predictor directory for `cfg` and return its path. A decode probe's export bundles the
    prompt probe as its initial estimator (`prompt/`, the sweep's best prompt layer) when one was trained."""
    task = cfg.export.task  # a Task: the config loader checked it
    layer = cfg.export.layer if cfg.export.layer is not None else None
    probe_dir, state, meta, bins = _chosen_probe(cfg, task, cfg.export.probe or None, layer)
    baseline_dir = None
    if cfg.export.include_baseline:
        baseline_dir = cfg.paths.baseline
        check_baseline(baseline_dir, bins)
    prompt = _bundled_prompt_probe(cfg) if task == "decode" and cfg.export.include_prompt_probe else None

    out = cfg.paths.predictor
    if out.exists() and not (out / METADATA_FILE).is_file() and any(out.iterdir()):
        raise UserError(f"'{out}' exists and is not a predictor export; choose another export.out_dir or remove it")
    with atomic_dir(out) as tmp:
        if prompt is not None:  # first: the decode probe's trail_probe.json names it
            (tmp / PROMPT_DIR).mkdir()
            _write_probe(tmp / PROMPT_DIR, cfg, "prompt", *prompt, baseline_dir=None)
        _write_probe(tmp, cfg, task, probe_dir, state, meta, bins, baseline_dir)
        if baseline_dir is not None:
            (tmp / "bert").mkdir()
            # Only the save_pretrained files; training logs and Lightning checkpoints stay behind.
            for f in sorted(baseline_dir.iterdir()):
                if f.is_file() and f.suffix != ".ckpt":
                    shutil.copy2(f, tmp / "bert" / f.name)
        save_config(cfg, tmp, "recipe.yaml")
        LengthPredictor.from_pretrained(tmp, device="cpu", num_layers=meta["model"].get("num_layers"))
    return out


def _chosen_probe(cfg: RecipeConfig, task: str, name: str | None, layer: int | None):
    """(folder, state, probe.json, bins) of the probe to export: `name`, else `layer`, else the sweep's best."""
    if name is None:
        name = probe_name((layer if layer is not None else best_layer(cfg, task)[0],))
    probe_dir = cfg.paths.probe(task, name)
    if not (probe_dir / "probe.json").is_file():
        found = sorted(p.name for p in (cfg.paths.probes / task).glob("*") if (p / "probe.json").is_file())
        raise UserError(
            f"no trained {task} probe at '{probe_dir}' (found: {', '.join(found) or 'none'}); "
            "run 'trail-probe train' for that layer or set export.layer"
        )
    state, meta = read_probe(probe_dir)
    bad = {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise UserError(f"the probe in '{probe_dir}' has non-finite metrics ({', '.join(f'{k} {v}' for k, v in bad.items())}): "
                        "it did not learn; check the extraction with 'trail-probe extract RECIPE --verify' and train it again")
    chosen = meta["layers"][0]
    num_layers = (meta.get("model") or {}).get("num_layers")
    if num_layers is not None and chosen == num_layers - 1 and not cfg.export.allow_last_layer:
        raise UserError(f"layer {chosen} is the model's last decoder layer, which TRAIL's runtime cannot capture (it hooks "
                        f"the input of layer L + 1); export another layer, or set export.allow_last_layer=true for trail_probe's runtimes only")
    bins = Bins(int(meta["bins"]["num_bins"]), int(meta["bins"]["max_len"]))
    Bins.from_config(cfg.bins).check_matches(meta["bins"], f"probe '{probe_dir}'")
    return probe_dir, state, meta, bins


def _bundled_prompt_probe(cfg: RecipeConfig):
    """The prompt probe a decode export carries as its initial estimator (the sweep's best prompt layer), or None."""
    try:
        return _chosen_probe(cfg, "prompt", None, None)
    except UserError as e:
        print(f"# no prompt probe to bundle ({e}); serving falls back to initial=last_token or bert")
        return None


def _write_probe(tmp: Path, cfg: RecipeConfig, task: str, probe_dir: Path, state: dict, meta: dict, bins: Bins,
                 baseline_dir: Path | None) -> None:
    """TRAIL's predictor files (config.json, model.safetensors) and our trail_probe.json, in `tmp`."""
    layer = meta["layers"][0]
    weights = tmp / "model.safetensors"
    save_file({k: state[k].float().contiguous() for k in PROBE_KEYS}, str(weights), metadata={"format": "pt"})
    atomic_write_json(tmp / CONFIG_FILE, {
        "hidden_size": int(meta["input_dim"]),
        "hidden_dim": int(meta["hidden_dim"]),
        "num_labels": bins.num_bins,
        "max_len": bins.max_len,
        "probe_layer_idx": layer,
        "dtype": "float32",
        "device": export_device(cfg),  # TRAIL's runtime reads it (default cpu): the probe runs beside the model
    })
    atomic_write_json(tmp / METADATA_FILE, {
        "format": FORMAT,
        "trail_probe_version": __version__,
        "task": task,
        "probe_layer_idx": layer,
        "layer_numbering": meta.get("layer_numbering") or LAYER_NUMBERING,
        "serving_model": meta["model"],
        "bins": bins.to_dict(),
        "weights_sha256": file_sha256(weights),
        "metrics": meta.get("metrics", {}),
        "training": {k: meta.get(k) for k in ("extraction", "split", "config_sha256")},
        "source": {"probe_dir": str(probe_dir), "probe_sha256": file_sha256(probe_dir / "probe.safetensors")},
        "bert": None if baseline_dir is None else {"dir": "bert", "source": str(baseline_dir),
                                                   "metrics": _baseline_metrics(baseline_dir)},
        "initial": PROMPT_DIR if task == "decode" and (tmp / PROMPT_DIR).exists() else None,
        "input": input_of(meta),
        "inputs": _inputs(tmp, task, meta),
        "label_prior": _label_prior(cfg, bins) if task == "decode" else None,
    })


def _inputs(tmp: Path, task: str, meta: dict) -> dict:
    """What the exported probes read: this one's, and for a decode export the bundled prompt probe's."""
    inputs = {"prompt": None, "decode": None, task: input_of(meta)}
    bundled = tmp / PROMPT_DIR / METADATA_FILE
    if task == "decode" and bundled.is_file():
        inputs["prompt"] = json.loads(bundled.read_text())["input"]
    return inputs


def export_device(cfg: RecipeConfig) -> str:
    """export.device, else the serving model's device (`auto`: CUDA where this machine has it)."""
    device = cfg.export.device or cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserError(f"export.device = {device!r} is not cpu, cuda or cuda:N")
    return device


def _label_prior(cfg: RecipeConfig, bins: Bins) -> list[float] | None:
    """The training bin frequencies the runtime divides out of each refinement
    (`LengthTracker(likelihood="prior_corrected")`); None when the extraction is not on this machine."""
    if not (cfg.paths.data / "manifest.json").is_file() or not cfg.paths.split.is_file():
        print(f"# no extraction at '{cfg.paths.data}' (or no split): the export carries no label prior, so the "
              "runtime can only use TRAIL's own refinement rule (likelihood='posterior')")
        return None
    extraction = Extraction(cfg.paths.data)
    fitted_on = selection_split(cfg, load_or_make_split(cfg, extraction))  # without the validation side, if any
    return label_prior(extraction, fitted_on, bins).tolist()


def read_probe(folder: Path) -> tuple[dict, dict]:
    """(state dict, probe.json) of a single-layer probe folder (contract 1), checked."""
    meta = json.loads((folder / "probe.json").read_text())
    if meta.get("multi_layer", "none") != "none" or len(meta.get("layers", [])) != 1:
        raise UserError(f"'{folder}' is a multi-layer probe ({meta.get('multi_layer')} of layers {meta.get('layers')}) but TRAIL's format holds one layer's probe; export a single-layer probe with export.layer=L")
    try:
        state = load_file(folder / "probe.safetensors")
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read '{folder / 'probe.safetensors'}' ({str(e)[:100]}); train the probe again") from None
    where = str(folder / "probe.safetensors")
    state = fold_standardization(state)  # a standardizing probe leaves as TRAIL's plain four tensors
    check_probe_weights(state, int(meta["input_dim"]), int(meta["hidden_dim"]), int(meta["num_labels"]), where)
    model = meta.get("model", {})
    layer = meta["layers"][0]
    if model.get("num_layers") is not None and layer >= model["num_layers"]:
        raise UserError(f"'{folder}' claims layer {layer} of a {model['num_layers']}-layer model; its probe.json is inconsistent, retrain it")
    if model.get("hidden_size") is not None and input_width(input_of(meta), model["hidden_size"]) != meta["input_dim"]:
        raise UserError(f"'{folder}' has input_dim {meta['input_dim']} but its input '{input_of(meta)}' of its model's "
                        f"hidden size {model['hidden_size']} is {input_width(input_of(meta), model['hidden_size'])} wide; "
                        "TRAIL's format needs one layer's states; retrain it")
    return state, meta


def check_baseline(folder: Path, bins: Bins) -> None:
    """Refuse a missing baseline or one over other bins than the probe's."""
    config = folder / CONFIG_FILE
    if not config.is_file() or not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"no BERT baseline in '{folder}' (needs config.json and model weights); run 'trail-probe train-baseline' or set export.include_baseline=false")
    data = json.loads(config.read_text())
    if not isinstance(data.get("max_len"), int):
        raise UserError(f"the BERT baseline in '{folder}' has no integer max_len in its config.json; retrain it with 'trail-probe train-baseline'")
    num_labels = len(data.get("id2label") or {}) or data.get("num_labels", 2)  # HF stores the labels, not their count
    bins.check_matches({"num_bins": num_labels, "max_len": data["max_len"]}, f"the BERT baseline in '{folder}'")


def _baseline_metrics(folder: Path) -> dict:
    record = folder / "baseline.json"
    return json.loads(record.read_text()).get("metrics", {}) if record.is_file() else {}
