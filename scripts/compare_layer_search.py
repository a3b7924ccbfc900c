"""Does `train.layers=search` choose the full sweep's layer? Compare a search's sweep with a full sweep.

    # the default recipe searches; train every layer into another folder, then compare the two
    trail-probe train recipes/smollm2_alpaca.yaml train.layers=all train.multi_layer=none \
        train.out_dir=checkpoints/smollm2_alpaca_vllm_all
    python scripts/compare_layer_search.py checkpoints/smollm2_alpaca_vllm checkpoints/smollm2_alpaca_vllm_all \
        --out reports/smollm2_alpaca_vllm/layer_search_vs_sweep.json
    # without a search run: replay the search on a full sweep's numbers (train.search_points / search_radius)
    python scripts/compare_layer_search.py --replay reports/smollm2_alpaca/sweep_layer_sweep.json

Each argument is a run's checkpoint folder (its sweep/layer_sweep.json is read) or a layer_sweep.json.
Per task it prints the layer each chose with its validation MAE in the full sweep, the searched layer's
rank there, and how many probes each trained, and how far apart the MAEs of the layers both trained are
(same seed, data and recipe; a layer trained in a stack with other layers than in the sweep can end
up to about 1% apart, float rounding amplified over 30 epochs: 1.1% for decode layer 19 on the
2026-12-07 run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trail_probe.offline.layer_search import search_layers  # noqa: E402


def read_sweep(where: str) -> dict:
    path = Path(where)
    path = path / "sweep" / "layer_sweep.json" if path.is_dir() else path
    if not path.is_file():
        sys.exit(f"no layer sweep at '{path}'; run 'trail-probe train' for that run first")
    return json.loads(path.read_text())


def maes(sweep: dict, task: str) -> dict[int, float]:
    return {row["layer"]: row["val/mae"] for row in sweep["tasks"][task]["layers"]}


def compare(task: str, searched: dict[int, float], chosen: int, full: dict[int, float]) -> dict:
    best = min(full, key=lambda layer: (full[layer], layer))
    ranking = sorted(full, key=lambda layer: (full[layer], layer))
    drift = max(abs(searched[layer] - full[layer]) / full[layer] for layer in searched if layer in full)
    return {"task": task, "search_layer": chosen, "sweep_layer": best, "same_layer": chosen == best,
            "search_layer_mae_in_sweep": round(full[chosen], 2), "sweep_best_mae": round(full[best], 2),
            "mae_cost": round(full[chosen] - full[best], 2), "rank_in_sweep": ranking.index(chosen) + 1,
            "probes_trained": len(searched), "probes_in_sweep": len(full), "max_relative_mae_difference": drift}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="SEARCH FULL (two runs), or FULL with --replay")
    ap.add_argument("--replay", action="store_true", help="replay the search on one full sweep's numbers")
    ap.add_argument("--points", type=int, default=6, help="with --replay: train.search_points")
    ap.add_argument("--radius", type=int, default=2, help="with --replay: train.search_radius")
    ap.add_argument("--out", help="also write the comparison as JSON here")
    args = ap.parse_args()
    if len(args.runs) != (1 if args.replay else 2):
        sys.exit("pass a search run and a full sweep (or one full sweep with --replay)")
    full = read_sweep(args.runs[-1])
    rows = []
    for task in full["tasks"]:
        whole = maes(full, task)
        if args.replay:
            found = search_layers(sorted(whole), args.points, args.radius, lambda todo: {k: whole[k] for k in todo})
            searched, chosen = found.scores, found.best
        else:
            search = read_sweep(args.runs[0])
            if task not in search["tasks"] or not (search.get("search") or {}).get(task):
                sys.exit(f"'{args.runs[0]}' holds no layer search for the {task} task; train it with train.layers=search")
            searched, chosen = maes(search, task), search["best_layer"][task]
        rows.append(compare(task, searched, chosen, whole))
    for r in rows:
        print(f"{r['task']:<7} search: layer {r['search_layer']} ({r['search_layer_mae_in_sweep']}, rank "
              f"{r['rank_in_sweep']} of {r['probes_in_sweep']}, {r['probes_trained']} probes trained); full sweep: "
              f"layer {r['sweep_layer']} ({r['sweep_best_mae']}); {'same layer' if r['same_layer'] else 'another layer'}"
              f", MAE cost {r['mae_cost']}; the layers both trained: MAEs within {100 * r['max_relative_mae_difference']:.1f}% "
              "of each other")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": args.runs, "replay": args.replay, "tasks": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
