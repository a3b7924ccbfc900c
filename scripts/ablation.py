"""Issue 14's ablation table, on the validation split only: one change per row against the paper recipe.

    python scripts/ablation.py                       # every row, decode probe on layer 19
    python scripts/ablation.py --layer 11 --rows paper,standardize

Each row trains the decode probe of one layer with `train.validation_fraction` carved out of the
75% training side (the 25% held-out side is not read), into checkpoints/<run>/ablation/<row>/, and
reports the validation MAE of the per-step estimate at the best epoch (what `train` selects on).
A finished row is kept (train --resume semantics). Writes reports/<run>/ablation/ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from trail_probe.atomic import atomic_write_json, atomic_write_text
from trail_probe.config import load_recipe
from trail_probe.stages.train import train

REPO = Path(__file__).resolve().parents[1]
ROWS = {  # name -> (what changes, overrides)
    "paper": ("the paper recipe: AdamW, cosine 0.01 -> 0, 30 epochs, batch 32, CE, 16 samples/request", []),
    "standardize": ("input standardization (folded into fc1 at export)", ["train.standardize=true"]),
    "lr0.001": ("learning rate 0.001", ["train.lr=0.001"]),
    "balanced_ce": ("class-balanced cross-entropy", ["train.loss=balanced_ce"]),
    "smoothing0.1": ("label smoothing 0.1", ["train.label_smoothing=0.1"]),
    "all_samples": ("every stored decode position per request (not 16)", ["train.decode_samples_per_request=0"]),
    "standardize+lr0.001": ("standardization and lr 0.001 together", ["train.standardize=true", "train.lr=0.001"]),
    "bf16": ("bf16 autocast (train.precision=bf16-mixed: a speed lever, here for its effect on the error)",
             ["train.precision=bf16-mixed"]),
    "emd": ("ordinal loss: squared earth mover's distance between predicted and true bin CDFs", ["train.loss=emd"]),
    "standardize+lr0.001+emd": ("the ordinal loss on top of standardization and lr 0.001 (the tuned recipe)",
                                ["train.standardize=true", "train.lr=0.001", "train.loss=emd"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="recipes/smollm2_alpaca_hf.yaml")
    ap.add_argument("--layer", type=int, default=19)
    ap.add_argument("--validation-fraction", type=float, default=0.2)
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    base = load_recipe(REPO / args.recipe)
    out_root = Path(base.paths.checkpoints) / "ablation"
    rows = []
    for name in args.rows.split(","):
        what, overrides = ROWS[name]
        cfg = load_recipe(REPO / args.recipe, ["train.task=decode", f"train.layers={args.layer}", "train.multi_layer=none",
                                               f"train.validation_fraction={args.validation_fraction}",
                                               f"train.out_dir={out_root / name}", *overrides])
        start = time.perf_counter()
        (meta,) = train(cfg, resume=True)
        m = meta["metrics"]
        rows.append({"row": name, "change": what, "overrides": overrides, "layer": args.layer,
                     "val_mae": m["val/mae"], "val_acc": m["val/acc"], "best_epoch": m["best_epoch"],
                     "selected_on": meta["selected_on"], "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name:<22} val MAE {m['val/mae']:6.1f}  acc {m['val/acc']:.3f}  best epoch {m['best_epoch']}", flush=True)
    paper = next((r["val_mae"] for r in rows if r["row"] == "paper"), None)
    out = REPO / "reports" / base.run_name / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ablation.json", {"layer": args.layer, "validation_fraction": args.validation_fraction,
                                              "split": "validation (carved out of the training side); held-out side unread",
                                              "rows": rows})
    lines = [f"# Ablation on the validation split (decode probe, layer {args.layer})", "",
             f"Each row changes one thing against the paper recipe; validation = {args.validation_fraction:.0%} of the "
             "training side, the held-out 25% is not read. MAE of the per-step estimate over decode steps, best epoch.", "",
             "| row | change | val MAE | vs paper | val acc | best epoch |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{paper / r['val_mae']:.2f}x" if paper else "-"
        lines.append(f"| {r['row']} | {r['change']} | {r['val_mae']:.1f} | {ratio} | {r['val_acc']:.3f} | {r['best_epoch']} |")
    lines += ["", f"Reproduce: `python scripts/ablation.py --layer {args.layer} --rows {args.rows}`"]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
