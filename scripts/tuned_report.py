"""Issue 14's selection report for recipes/smollm2_alpaca_tuned.yaml (run by scripts/tuned_run.sh).

    python scripts/tuned_report.py --best-bert              # the BERT grid's best point (validation): its folder
    python scripts/tuned_report.py --best-bert-overrides    # ... as baseline.lr=... baseline.epochs=...
    python scripts/tuned_report.py --rows --layer 19       # refinement rows on validation (runs eval)
    python scripts/tuned_report.py                         # reports/smollm2_alpaca_tuned/selection.{md,json}

Every choice is read from a validation score (the sweep's, the BERT grid's, the rows'); the held-out
numbers come from the `eval` runs of scripts/tuned_run.sh's final and seeds steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from trail_probe.atomic import atomic_write_json, atomic_write_text
from trail_probe.config import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/smollm2_alpaca_tuned.yaml"
CK = REPO / "checkpoints/smollm2_alpaca_tuned"
OUT = REPO / "reports/smollm2_alpaca_tuned"
ROWS = {  # name -> (what changes against the tuned recipe's refinement, overrides)
    "prior_corrected": ("the recipe: prior-corrected update, prompt-probe prior, every 8 tokens", []),
    "trail_rule": ("TRAIL's update rule (the probe's output as the likelihood)", ["refine.likelihood=posterior"]),
    "prior_bert": ("BERT's distribution as the prior (the initial estimate from BERT)", ["refine.prior=bert"]),
    "prior_none": ("no prior: the first step's distribution as it is", ["refine.prior=none"]),
    "prior_last_token": ("TRAIL's release: the decode probe on the last prompt token's state as the prior",
                         ["refine.prior=last_token"]),
    "trail_rule+prior_bert": ("TRAIL's rule with BERT's prior", ["refine.likelihood=posterior", "refine.prior=bert"]),
    "interval16": ("refine every 16 tokens", ["refine.interval=16"]),
    "global": ("TRAIL's release cadence: every 8 passes of the batch, prior advanced by T^8 (phase 0: stride 8)",
               ["refine.cadence=global"]),
    "global_interval16": ("the release's cadence every 16 passes (phases 0 and 8)", ["refine.cadence=global", "refine.interval=16"]),
}


def grid() -> list[dict]:
    rows = []
    for folder in sorted((CK / "bert_grid").iterdir() if (CK / "bert_grid").is_dir() else []):
        meta_file = folder / "baseline.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            rows.append({"lr": meta["config"]["lr"], "epochs": meta["config"]["epochs"], "val_mae": meta["metrics"]["val/mae"],
                         "best_epoch": meta["metrics"].get("best_epoch"), "selected_on": meta.get("selected_on", {}).get("side"),
                         "folder": str(folder.relative_to(REPO))})
    return rows


def best_bert() -> dict:
    rows = [r for r in grid() if r["selected_on"] == "validation"]
    if not rows:
        raise SystemExit(f"no BERT grid point chosen on validation in {CK / 'bert_grid'}; run scripts/tuned_run.sh bert")
    return min(rows, key=lambda r: r["val_mae"])


def run_rows(layer: int) -> list[dict]:
    from trail_probe.stages.evaluate import evaluate

    bert = REPO / best_bert()["folder"]
    out = []
    for name, (what, overrides) in ROWS.items():
        cfg = load_recipe(RECIPE, ["eval.split=validation", f"eval.layer={layer}", f"baseline.out_dir={bert}",
                                   f"eval.out_dir={CK / 'eval_validation' / name}", *overrides])
        report = evaluate(cfg, ["python", "scripts/tuned_report.py", "--rows", "--layer", str(layer)])
        m = report["methods"]
        out.append({"row": name, "change": what, "overrides": overrides, "layer": layer,
                    "refined_mae": m["refined"]["remaining"]["mae"], "per_step_mae": m["per_step"]["remaining"]["mae"],
                    "bert_mae": m["bert"]["remaining"]["mae"], "refined_tau": m["refined"]["remaining"].get("kendall_tau"),
                    "requests": report["held_out"]["requests"]})
        print(f"{name:<24} refined {out[-1]['refined_mae']:.1f}  per-step {out[-1]['per_step_mae']:.1f}", flush=True)
    atomic_write_json(CK / "eval_validation" / "rows.json", {"layer": layer, "rows": out})
    return out


def heldout(folder: Path) -> dict | None:
    f = folder / "report.json"
    if not f.is_file():
        return None
    r = json.loads(f.read_text())
    m = r["methods"]
    g = lambda k, side: (m.get(k) or {}).get(side, {}).get("mae")  # noqa: E731
    return {"layer": r["layer"], "bert_remaining": g("bert", "remaining"), "bert_total": g("bert", "total"),
            "prompt_probe_total": g("prompt_probe", "total"), "per_step": g("per_step", "remaining"),
            "refined": g("refined", "remaining"), "refined_tau": (m.get("refined") or {}).get("remaining", {}).get("kendall_tau"),
            "refined_tau_same_step": (m.get("refined") or {}).get("remaining", {}).get("kendall_tau_same_step"),
            "bert_tau_same_step": (m.get("bert") or {}).get("remaining", {}).get("kendall_tau_same_step"),
            "ratio": r["headline"]["bert_over_refined_decode"], "step0_ratio": r["headline"]["bert_over_prompt_probe_step0"],
            "requests": r["held_out"]["requests"], "selection": r["split"]["selection"]["side"], "command": r["command"]}


def report() -> None:
    sweep = json.loads((CK / "sweep" / "layer_sweep.json").read_text())
    bert_rows, best = grid(), best_bert()
    rows = [{**r, "change": ROWS.get(r["row"], (r["change"],))[0]}
            for r in json.loads((CK / "eval_validation" / "rows.json").read_text())["rows"]]
    final = {"tuned": heldout(CK / "eval"), "paper_recipe": heldout(CK / "paper_recipe" / "eval")}
    seeds = {"0": final["tuned"], **{s: heldout(CK / f"seed{s}" / "eval") for s in ("1", "2")}}
    result = {"sweep_best_layer": sweep.get("best_layer"), "bert_grid": bert_rows, "bert_chosen": best,
              "refine_rows": rows, "held_out": final, "split_seeds": seeds}
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "selection.json", result)
    f1 = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    tau = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["# smollm2_alpaca_tuned: chosen on validation, scored once on the held-out 25%", "",
             "Recipe: `recipes/smollm2_alpaca_tuned.yaml` (the paper recipe plus input standardization and lr 0.001; "
             "validation = 20% of the training side). Reproduce: `bash scripts/tuned_run.sh && python scripts/tuned_report.py`.", "",
             "## Choices (validation side)", "",
             f"- Layer: decode {sweep['best_layer'].get('decode')}, prompt {sweep['best_layer'].get('prompt')} "
             "(the sweep's best validation MAE; `checkpoints/smollm2_alpaca_tuned/sweep/layer_sweep.json`).",
             "- BERT (all-MiniLM-L6-v2; linear decay to 0 over the epochs; the best epoch on validation):", "",
             "| lr | epochs | val MAE (total length) | best epoch (0-based) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['lr']:g}{' (chosen)' if r['folder'] == best['folder'] else ''} | {r['epochs']} | {f1(r['val_mae'])} | {r['best_epoch']} |"
              for r in bert_rows]
    lines += ["", f"- Refinement at layer {rows[0]['layer']} (validation, {rows[0]['requests']} requests; MAE of the remaining length over decode steps):", "",
              "| row | change | refined | per-step | BERT counted down | Kendall tau (refined, all steps) |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['row']} | {r['change']} | {f1(r['refined_mae'])} | {f1(r['per_step_mae'])} | {f1(r['bert_mae'])} | "
              f"{tau(r['refined_tau'])} |" for r in rows]
    lines += ["", "## Held-out 25% (scored once)", "",
              "| run | layer | BERT (remaining) | prompt probe (total) | BERT (total) | per-step | refined | BERT / refined | step 0: BERT / prompt probe | Kendall tau among requests at the same step: BERT, refined |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, h in {**final, **{f"tuned, split seed {s}": seeds[s] for s in ("1", "2")}}.items():
        if h is not None:
            lines.append(f"| {name} | {h['layer']} | {f1(h['bert_remaining'])} | {f1(h['prompt_probe_total'])} | {f1(h['bert_total'])} | "
                         f"{f1(h['per_step'])} | {f1(h['refined'])} | {h['ratio']:.2f}x | {h['step0_ratio']:.2f}x | "
                         f"{tau(h['bert_tau_same_step'])}, {tau(h['refined_tau_same_step'])} |")
    ratios = [h["ratio"] for h in seeds.values() if h is not None]
    if len(ratios) > 1:
        spread = (max(ratios) - min(ratios)) / min(ratios)
        lines += ["", f"Split seeds 0/1/2: BERT / refined = {', '.join(f'{r:.2f}x' for r in ratios)} (spread {spread:.0%})."]
    atomic_write_text(OUT / "selection.md", "\n".join(lines) + "\n")
    if (CK / "eval" / "report.md").is_file():  # the tuned run's own eval report and pictures
        for f in (CK / "eval").iterdir():
            if f.suffix in (".md", ".png") or f.name == "report.json":
                shutil.copy2(f, OUT / f.name)
    print(f"wrote {OUT / 'selection.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--best-bert", action="store_true")
    ap.add_argument("--best-bert-overrides", action="store_true")
    ap.add_argument("--rows", action="store_true")
    ap.add_argument("--layer", type=int)
    args = ap.parse_args()
    if args.best_bert:
        print(best_bert()["folder"])
    elif args.best_bert_overrides:
        b = best_bert()
        print(f"baseline.lr={b['lr']} baseline.epochs={b['epochs']}")
    elif args.rows:
        run_rows(args.layer)
    else:
        report()


if __name__ == "__main__":
    main()
