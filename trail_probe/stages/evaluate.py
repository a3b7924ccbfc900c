"""`trail-probe eval`: does the probe beat BERT, and by how much? Scored on the held-out requests.

    trail-probe eval recipes/smollm2_alpaca.yaml
    trail-probe eval recipes/smollm2_alpaca.yaml eval.all_layers=true refine.interval=16

Every method is scored on the same held-out requests (the val side of `<checkpoint_dir>/split.json`):
  (a) bert          the fine-tuned encoder on the prompt text (total length; skipped with a note
                    when no baseline was trained)
  (b) prompt_probe  the probe on the layer's prompt input (total length): the mean prompt state, or
                    the input the probe was trained on (runtime/probe_inputs.py; probe.json's `input`)
  (c) per_step      the decode probe at every stored decode step, each on its own (remaining length),
                    on its input (the current token's state, or a pool of the generated tokens so far)
  (d) refined       the decode probe refined by Bayes over the steps (TRAIL_NOTES section 2, via
                    trail_probe.runtime.refine): refined every k = refine.interval tokens, starting from
                    the prompt probe's distribution (refine.prior: or BERT's, none, or last_token:
                    the decode probe on the last prompt token's state, TRAIL's release at prefill,
                    recomputed with the serving model by offline.prefill_states), and counted down
                    by one per token in between, as TRAIL's runtime does. refine.cadence=global scores TRAIL's
                    release instead: every k passes of the batch, each request at its own phase
                    (`phase_of`), its prior advanced by T^k at each refinement.
An estimate is the expectation over bin midpoints, clamped to [0, max_new_tokens - generated]. MAE
is in tokens, averaged over requests for total length and over stored decode steps for remaining
length, and Kendall's tau beside it for every method; accuracy is the most likely bin against the true bin (for (d) between refinements: the
posterior moved forward by T^tokens). (a) and (b) are also scored on the decode steps, counted
down by the tokens generated, as a scheduler without refinement would use them.

The layer is eval.layer, else the decode sweep's best layer (`sweep/layer_sweep.json`), else the
first of train.layers; eval.all_layers=true scores every layer with trained probes as well.
Outputs in `<checkpoint_dir>/eval/`: report.md and report.json (every number, the resolved config,
hashes of the extraction manifest, split, probe and baseline weights, the command), predictions.json
(the chosen layer's estimates per held-out request, replayed by `trail-probe simulate`), and the
pictures mae_by_layer.png (paper Figure 3), mae_vs_generated.png and bin_heatmap.png (Figure 5).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trail_probe.atomic import atomic_write_json, atomic_write_text
from trail_probe.choices import Task, options
from trail_probe.config import RecipeConfig, config_to_dict, save_config
from trail_probe.errors import UserError
from trail_probe.model_files import file_sha256
from trail_probe.offline.artifacts import (
    best_layer,
    check_artifact,
    input_of,
    load_probe,
    probe_name,
    trained_layers,
)
from trail_probe.offline.artifacts import label_prior as artifact_label_prior
from trail_probe.offline.eval_report import (
    METHODS,
    fmt,
    headline_lines,
    headline_ratios,
    layer_maes,
    render_markdown,
    write_figures,
)
from trail_probe.offline.metrics import confusion, summary
from trail_probe.offline.refine_scoring import DecodeResult, phase_of, progress_curve, refine_decode
from trail_probe.offline.split import (
    load_or_make_split,
    manifest_sha256,
    selection_split,
)
from trail_probe.offline.store import Extraction
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.estimates import count_down, estimate
from trail_probe.runtime.predictor import BertLengthPredictor

HELP = "score BERT, the prompt probe and the decode probe (per step and refined) on the held-out requests"
EXAMPLES = """examples:
  trail-probe eval recipes/smollm2_alpaca.yaml
  trail-probe eval recipes/smollm2_alpaca.yaml eval.layer=11 refine.interval=1     # refine every token (needs decode_stride 1)
  trail-probe eval recipes/smollm2_alpaca.yaml eval.all_layers=true                     # MAE by layer, paper Figure 3
"""


def run(cfg: RecipeConfig, args) -> None:
    report = evaluate(cfg)
    out = Path(report["out_dir"])
    for line in headline_lines(report):
        print(f"eval: {line}")
    print(f"eval: report in {out / 'report.md'}")


# -- inputs ---------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """The held-out requests, in the order of split.json's val_ids."""

    rows: torch.Tensor  # [n] index into Extraction.records
    ids: list[str]
    output_tokens: torch.Tensor  # [n]


def held_out_requests(split: dict, extraction: Extraction, where: Path) -> HeldOut:
    """The val side of a split, refused when it is empty, overlaps training or names unknown requests."""
    val, train = list(split["val_ids"]), set(split["train_ids"])
    if not val:
        raise UserError(f"the held-out side of '{where}' is empty, so there is nothing to score; delete it and "
                        "run 'trail-probe train' again with train.train_fraction below 1")
    overlap = [i for i in val if i in train]
    if overlap:
        raise UserError(f"'{where}' puts {len(overlap)} requests (e.g. '{overlap[0]}') in both training and held-out, "
                        "which would inflate every score; delete it and run 'trail-probe train' again")
    position = {rid: i for i, rid in enumerate(extraction.ids)}
    missing = [i for i in val if i not in position]
    if missing:
        raise UserError(f"'{where}' holds request '{missing[0]}' (and {len(missing) - 1} more) that extraction "
                        f"'{extraction.root}' does not; evaluate with the extraction the split was made from")
    rows = torch.tensor([position[i] for i in val])
    return HeldOut(rows, val, extraction.output_tokens[rows])


def scored_side(cfg: RecipeConfig, split: dict, chosen_on: dict) -> dict:
    """What eval scores: the held-out side of split.json, or (eval.split=validation) the validation
    side that `selection_split` carved out of the training side, as {"train_ids", "val_ids", "path"}."""
    if cfg.eval.split == "held_out":
        return {**split, "path": str(cfg.paths.split)}
    if chosen_on["side"] != "validation":
        raise UserError("eval.split=validation scores the validation side, but train.validation_fraction is 0; set it to "
                        "the fraction the probes and the baseline were trained with (e.g. train.validation_fraction=0.2)")
    return chosen_on


def check_unseen(meta: dict, what: str, validation: dict | None) -> None:
    """Refuse to score a probe or baseline on validation requests it was fitted on: one trained without
    this validation split (train.validation_fraction = 0, or another fraction or seed) saw them.
    `validation`: {"path", "sha256"} of the scored validation split, None when scoring the held-out
    side (check_artifact's split check covers that)."""
    if validation is None:
        return
    if (meta.get("selected_on") or {}).get("sha256") != validation["sha256"]:
        raise UserError(f"{what} was not trained with this validation split ('{validation['path']}'), so it may "
                        "have been fitted on the requests scored here; retrain it with the same train.validation_fraction")


def choose_layer(cfg: RecipeConfig) -> tuple[int, str]:
    """(layer, where the choice came from): eval.layer, else `artifacts.best_layer` for decode."""
    if cfg.eval.layer is not None:
        return cfg.eval.layer, "eval.layer"
    return best_layer(cfg, "decode")


# -- predictions ----------------------------------------------------------------------------------
@torch.no_grad()
def probe_probs(probe: torch.nn.Module, states: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    return torch.cat([torch.softmax(probe(states[i:i + batch]).float(), -1) for i in range(0, len(states), batch)]
                     or [torch.zeros(0, probe.num_labels)])


# -- the whole evaluation -------------------------------------------------------------------------
@dataclass
class _Inputs:
    """What every method is scored against, read and checked once: the extraction, the split and the
    side scored, the bins, the layer(s), and the notes and hashes the report collects on the way."""

    extraction: Extraction
    split: dict  # split.json
    chosen_on: dict  # the side that chose the probes' epochs and the layer (selection_split)
    held: HeldOut  # the scored requests
    bins: Bins
    max_new: int
    manifest_sha: str
    split_sha: str
    layer: int
    layer_source: str
    layers: list[int]
    validation: dict | None  # {"path", "sha256"} of the scored validation side; None on the held-out side
    notes: list[str]
    hashes: dict


def evaluate(cfg: RecipeConfig, command: list[str] | None = None) -> dict:
    """Score every method, write report.{md,json}, predictions.json and the pictures; return the report."""
    started = time.time()
    run = _inputs(cfg)
    bins, held, max_new = run.bins, run.held, run.max_new
    # The bin frequencies the decode probe was trained on (its fit side), for the prior-corrected update.
    label_prior = (artifact_label_prior(run.extraction, run.chosen_on, bins)
                   if cfg.refine.likelihood == "prior_corrected" else None)
    bert_probs, bert_meta = _bert(cfg, run)
    totals = {}
    if bert_probs is not None:
        totals["bert"] = estimate(bert_probs, bins, max_new)
    last_states = _last_token_states(cfg, run) if cfg.refine.prior == "last_token" else {}
    results, details = {}, {}
    bundled = _bundled_prompt_layer(cfg, run)
    for L in run.layers:
        results[L], details[L] = _evaluate_layer(cfg, L, run, bert_probs, label_prior, last_states.get(L), bundled if L == run.layer else L)
        print(f"eval: layer {L}: " + ", ".join(f"{m} {fmt(v)}" for m, v in layer_maes(results[L]).items()), flush=True)
    chosen = details[run.layer]
    if chosen["prompt_probs"] is not None:
        totals["prompt_probe"] = estimate(chosen["prompt_probs"], bins, max_new)
    report = _report(cfg, run, results, held, chosen, bert_probs, bert_meta, command)
    report["curve"] = progress_curve(held.output_tokens, max_new, cfg.eval.curve_step, totals, chosen["decode"])
    out = cfg.paths.eval
    out.mkdir(parents=True, exist_ok=True)
    write_figures(out, report, results, held, bins, bert_probs, chosen)
    report["elapsed_s"] = round(time.time() - started, 2)
    atomic_write_json(out / "predictions.json", _predictions(held, run.extraction, bins, cfg.refine.interval, max_new,
                                                               run.layer, totals, chosen["decode"]))
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report, cfg))
    save_config(cfg, out)
    return report


def _inputs(cfg: RecipeConfig) -> _Inputs:
    """Read and check what eval scores against (refusing a bad setting or a missing split in one line)."""
    e, refine = cfg.eval, cfg.refine
    if e.curve_step < 1:
        raise UserError(f"eval.curve_step = {e.curve_step} must be a positive number of tokens, e.g. 32")
    extraction = Extraction(cfg.paths.data)
    extraction.check_model(cfg.model.name_or_path)
    stride = extraction.decode_stride
    if refine.interval % stride:
        raise UserError(f"refine.interval = {refine.interval} must be a multiple of the extraction's decode_stride "
                        f"{stride} (decode states exist only every {stride} tokens); use {stride}, {2 * stride}, ...")
    split_file = cfg.paths.split
    if not split_file.is_file():
        raise UserError(f"no split in '{split_file}', so no probe was trained for this run; run 'trail-probe train' first")
    split = load_or_make_split(cfg, extraction)
    chosen_on = selection_split(cfg, split)
    scored = scored_side(cfg, split, chosen_on)
    held = held_out_requests(scored, extraction, Path(scored["path"]))
    layer, layer_source = choose_layer(cfg)
    if not any((cfg.paths.probe(task, probe_name((layer,))) / "probe.json").is_file() for task in options(Task)):
        raise UserError(f"no trained probe for layer {layer} in '{cfg.paths.probes}' (layer chosen by "
                        f"{layer_source}); train it ('trail-probe train ... train.layers={layer}') or set eval.layer")
    if e.split == "validation":
        notes = [f"scored on the {len(held.ids)} validation requests ({chosen_on['path']}), which chose the probes' "
                 "epochs: for choosing settings; the held-out side is not read (eval.split=held_out scores it)."]
    else:
        notes = [f"epochs and layer chosen on the {chosen_on['side']} side ({len(chosen_on['val_ids'])} requests, "
                 f"{chosen_on['path']}); scored here on the {len(split['val_ids'])} held-out requests"
                 + (" (the same ones: train.validation_fraction=0)." if chosen_on["side"] == "held-out" else ", once.")]
    manifest_sha, split_sha = manifest_sha256(extraction), file_sha256(split_file)
    return _Inputs(
        extraction, split, chosen_on, held, Bins.from_config(cfg.bins),
        int(extraction.manifest["generation"]["max_new_tokens"]), manifest_sha, split_sha, layer, layer_source,
        sorted(set(trained_layers(cfg)) | {layer}) if e.all_layers else [layer],
        None if e.split == "held_out" else {"path": chosen_on["path"], "sha256": file_sha256(Path(chosen_on["path"]))},
        notes, {"extraction_manifest": manifest_sha, "split": split_sha, "probes": {}, "baseline_weights": None})


def _last_token_states(cfg: RecipeConfig, run: _Inputs) -> dict[int, torch.Tensor]:
    """refine.prior=last_token, TRAIL's release at prefill: the last prompt token's states, stored by
    extractions with the pooled inputs; recomputed for older ones (offline.prefill_states)."""
    from trail_probe.offline.prefill_states import last_prompt_states

    extraction = run.extraction
    if "last" in extraction.inputs["prompt"]:
        run.notes.append("refine.prior=last_token: the last prompt token's states as the extraction stored them.")
        return {L: extraction.prompt_states(L, "last")[run.held.rows] for L in run.layers}
    states = last_prompt_states(cfg.model, [extraction.records[i] for i in run.held.rows], run.layers, cfg.progress)
    run.notes.append(f"refine.prior=last_token: the last prompt token's states recomputed by transformers in "
                     f"{cfg.model.dtype} (the extraction: {extraction.model.get('engine', 'hf')}, "
                     f"{extraction.model.get('dtype', cfg.model.dtype)}).")
    return states


def _report(cfg: RecipeConfig, run: _Inputs, results: dict, held: HeldOut, chosen: dict, bert_probs, bert_meta,
            command: list[str] | None) -> dict:
    """report.json's content (its curve and elapsed time are added by the caller)."""
    extraction, split, chosen_on = run.extraction, run.split, run.chosen_on
    return {
        "format": "trail_probe.eval/1",
        "command": " ".join(shlex.quote(a) for a in ([Path(sys.argv[0]).name] + sys.argv[1:] if command is None else command)),
        "out_dir": str(cfg.paths.eval),
        "layer": run.layer, "layer_source": run.layer_source, "layers": run.layers,
        "refine_interval": cfg.refine.interval, "decode_stride": extraction.decode_stride, "max_new_tokens": run.max_new,
        "bins": run.bins.to_dict(),
        "scored_side": cfg.eval.split,
        "held_out": {"requests": len(held.ids), "decode_steps": _count(chosen["decode"])},
        "methods": results[run.layer],
        "inputs": {task: (results[run.layer].get(method) or {}).get("input")  # what each probe read (probe_inputs.py)
                   for task, method in (("prompt", "prompt_probe"), ("decode", "refined"))},
        "headline": headline_ratios(results[run.layer]),
        "by_layer": {str(L): results[L] for L in run.layers},
        "curve": None,
        "confusion": _confusions(held, run.bins, bert_probs, chosen),
        "baseline": None if bert_meta is None else {k: bert_meta[k] for k in ("base_model", "metrics", "max_length")},
        "hashes": run.hashes,
        "extraction": {"path": str(extraction.root), "model": extraction.model, "layer_numbering": extraction.manifest.get("layer_numbering")},
        "split": {"path": str(cfg.paths.split), "train": len(split["train_ids"]), "held_out": len(split["val_ids"]),
                  "selection": {"side": chosen_on["side"], "path": chosen_on["path"], "requests": len(chosen_on["val_ids"])}},
        "notes": run.notes,
        "config": config_to_dict(cfg),
        "elapsed_s": None,
    }


def _bert(cfg: RecipeConfig, run: _Inputs):
    """(probs [n, K], baseline.json) of the baseline on the held-out prompts, or (None, None) with a note."""
    folder = cfg.paths.baseline
    if not (folder / "baseline.json").is_file():
        run.notes.append(f"BERT baseline skipped: no trained baseline in '{folder}' (run 'trail-probe train-baseline').")
        return None, None
    meta = json.loads((folder / "baseline.json").read_text())
    check_artifact(meta, f"baseline '{folder}'", run.extraction, run.manifest_sha, run.split_sha, run.bins)
    check_unseen(meta, f"baseline '{folder}'", run.validation)
    bert = BertLengthPredictor.from_pretrained(folder, device="cpu")  # the serving runtime's own inference
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    run.hashes["baseline_weights"] = {w.name: file_sha256(w) for w in weights}
    texts = [run.extraction.records[i]["prompt"] for i in run.held.rows.tolist()]
    return bert.probs(texts, batch_size=cfg.eval.batch_size), meta


def _load_checked(cfg: RecipeConfig, task: str, layer: int, run: _Inputs):
    folder = cfg.paths.probe(task, probe_name((layer,)))
    if not (folder / "probe.json").is_file():
        return None
    probe, meta = load_probe(folder)
    what = f"probe '{folder}'"
    if meta["task"] != task or meta["layers"] != [layer] or meta["multi_layer"] != "none":
        raise UserError(f"{what} says it is a {meta['task']} probe of layers {meta['layers']}; retrain it")
    check_artifact(meta, what, run.extraction, run.manifest_sha, run.split_sha, run.bins)
    check_unseen(meta, what, run.validation)
    run.hashes["probes"][str(folder / "probe.safetensors")] = file_sha256(folder / "probe.safetensors")
    return probe, input_of(meta)


def _bundled_prompt_layer(cfg: RecipeConfig, run: _Inputs) -> int:
    """The prompt probe beside the chosen decode layer and its refinements' prior: the one export bundles
    (the sweep's best prompt layer; a layer search may not train the decode layer's), else the layer's own."""
    if cfg.eval.layer is not None or not cfg.paths.sweep_summary.is_file():
        return run.layer
    try:
        layer = best_layer(cfg, "prompt")[0]
    except UserError:  # a search that trained no prompt probe
        return run.layer
    if layer != run.layer and (cfg.paths.probe("prompt", probe_name((layer,))) / "probe.json").is_file():
        run.notes.append(f"row (b) and the refined estimate's prior: layer {layer}'s prompt probe, the sweep's best prompt layer, which export bundles.")
        return layer
    return run.layer


def _evaluate_layer(cfg: RecipeConfig, layer: int, run: _Inputs, bert_probs, label_prior, last_states=None,
                    prompt_layer: int | None = None):
    """(metrics of every method at `layer`, the raw predictions used for curves and pictures); `last_states`
    [held, d]: the last prompt token's states, for refine.prior=last_token; `prompt_layer`: default `layer`."""
    extraction, held, bins, max_new = run.extraction, run.held, run.bins, run.max_new
    prompt_layer = layer if prompt_layer is None else prompt_layer
    prompt_probe, prompt_input = _load_checked(cfg, "prompt", prompt_layer, run) or (None, None)
    decode_probe, decode_input = _load_checked(cfg, "decode", layer, run) or (None, None)
    truth = held.output_tokens
    metrics = {m: None for m in METHODS}
    prompt_probs = decode = None
    totals = {}
    if bert_probs is not None:
        totals["bert"] = bert_probs
    if prompt_probe is not None:
        prompt_probs = probe_probs(prompt_probe, extraction.prompt_states(prompt_layer, prompt_input)[held.rows])
        totals["prompt_probe"] = prompt_probs
    if cfg.refine.prior == "prompt_probe" and prompt_probs is None and decode_probe is not None:
        raise UserError(f"refine.prior=prompt_probe but layer {layer} has no trained prompt probe; train it "
                        "(train.task=both) or set refine.prior=auto or none")
    if decode_probe is not None:
        ds = extraction.decode(layer, decode_input)
        local = torch.full((len(extraction.records),), -1, dtype=torch.long)
        local[held.rows] = torch.arange(len(held.rows))
        keep = local[ds.request] >= 0
        if cfg.refine.prior == "bert" and bert_probs is None:
            raise UserError("refine.prior=bert but there is no trained BERT baseline; run 'trail-probe train-baseline RECIPE' "
                            "or set refine.prior=auto")
        prior = {"none": None, "bert": bert_probs}.get(cfg.refine.prior, prompt_probs)
        if cfg.refine.prior == "last_token":
            if decode_input != "current":
                raise UserError(f"refine.prior=last_token feeds the last prompt token's state to the decode probe, but layer "
                                f"{layer}'s reads '{decode_input}' (a pool of generated tokens, none at the prompt); "
                                "use refine.prior=auto")
            prior = probe_probs(decode_probe, last_states)
        phases = phase_of(held.ids, cfg.refine.interval, extraction.decode_stride) if cfg.refine.cadence == "global" else None
        decode = refine_decode(probe_probs(decode_probe, ds.states[keep]), local[ds.request[keep]],
                               ds.generated[keep], ds.remaining[keep], bins, max_new, cfg.refine.interval, prior,
                               label_prior, phases)
        metrics["per_step"] = {"remaining": summary(decode.step_est, decode.remaining, decode.step_probs, bins,
                                                    decode.generated)}
        metrics["refined"] = {"remaining": summary(decode.refined_est, decode.remaining, decode.refined_probs, bins,
                                                   decode.generated),
                              "prior": "none" if prior is None else (cfg.refine.prior if cfg.refine.prior in ("bert", "last_token")
                                                                     else "prompt_probe"),
                              "likelihood": cfg.refine.likelihood, "cadence": cfg.refine.cadence, "input": decode_input}
        metrics["per_step"]["input"] = decode_input
    else:
        run.notes.append(f"layer {layer}: no trained decode probe, so no per-step or refined predictions.")
    for method, probs in totals.items():
        est = estimate(probs, bins, max_new)
        metrics[method] = {"total": summary(est, truth, probs, bins)}
        if decode is not None:  # the same estimate as a scheduler would use it during decoding
            counted = count_down(est[decode.request], decode.generated, max_new - decode.generated)
            metrics[method]["remaining"] = summary(counted, decode.remaining, groups=decode.generated)
    if prompt_probe is not None:
        metrics["prompt_probe"]["input"] = prompt_input
    return metrics, {"prompt_probs": prompt_probs, "decode": decode}


def _count(decode: DecodeResult | None) -> int:
    return 0 if decode is None else len(decode.generated)


def _confusions(held, bins, bert_probs, chosen) -> dict:
    """Row = true bin, column = most likely bin; total length for BERT and the prompt probe, remaining for refined."""
    out = {}
    if bert_probs is not None:
        out["bert"] = confusion(bert_probs, held.output_tokens, bins).tolist()
    if chosen["prompt_probs"] is not None:
        out["prompt_probe"] = confusion(chosen["prompt_probs"], held.output_tokens, bins).tolist()
    if chosen["decode"] is not None:
        d = chosen["decode"]
        out["refined"] = confusion(d.refined_probs, d.remaining, bins).tolist()
    return out


def _predictions(held, extraction, bins, interval, max_new, layer, totals, decode) -> dict:
    """Contract 4: per held-out request, the estimates a scheduler would have had (refined and per-step
    at each refinement point j = 1, 1+k, ...; the simulator counts down in between)."""
    points: dict[int, list] = {i: [] for i in range(len(held.ids))}
    if decode is not None:
        for row in torch.nonzero(decode.is_refinement).flatten().tolist():
            points[int(decode.request[row])].append(
                (int(decode.generated[row]), float(decode.refined_est[row]), float(decode.step_est[row])))
    requests = []
    for i, row in enumerate(held.rows.tolist()):
        record = extraction.records[row]
        requests.append({
            "id": record["id"], "prompt_tokens": record["prompt_tokens"], "output_tokens": record["output_tokens"],
            "hit_cap": record["hit_cap"],
            "bert_estimate": round(float(totals["bert"][i]), 3) if "bert" in totals else None,
            "prompt_probe_estimate": round(float(totals["prompt_probe"][i]), 3) if "prompt_probe" in totals else None,
            "refined": [[j, round(r, 3)] for j, r, _ in points[i]],
            "per_step": [[j, round(p, 3)] for j, _, p in points[i]],
        })
    return {"bins": bins.to_dict(), "refine_interval": interval, "max_new_tokens": max_new, "layer": layer,
            "requests": requests}


# -- pictures -------------------------------------------------------------------------------------
