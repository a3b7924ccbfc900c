"""The layer sweep's table, JSON and plot (`trail-probe train` with several layers per task).

    <checkpoint_dir>/sweep/layer_sweep.csv   one row per probe: val MAE, accuracy, loss, best epoch
    <checkpoint_dir>/sweep/layer_sweep.json  the same, plus the best layer per task (what eval and
                                             export choose by, `artifacts.best_layer`) and, after
                                             `train.layers=search`, the search: its rounds and the
                                             layers it trained, per task (`search`; null after a sweep)
    <checkpoint_dir>/sweep/layer_sweep.png   val MAE and accuracy by layer, multi-layer probes beside
"""

from __future__ import annotations

from pathlib import Path

from trail_probe.atomic import atomic_path, atomic_write_json, atomic_write_text
from trail_probe.config import RecipeConfig, config_sha256, save_config
from trail_probe.offline.artifacts import probe_name
from trail_probe.offline.store import LAYER_NUMBERING


def write_sweep(cfg: RecipeConfig, results: list[dict], search: dict | None = None) -> dict:
    """layer_sweep.{csv,json,png} from the trained probes' metadata; the JSON names the best layer per task.
    `search`: task -> what a layer search did (`layer_search.SearchResult.summary`), when it chose the layers."""
    rows = [{"task": m["task"], "probe": probe_name(m["layers"], m["multi_layer"]),
             "layers": m["layers"], "multi_layer": m["multi_layer"], **m["metrics"]} for m in results]
    tasks = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        singles = [r for r in rows if r["task"] == task and r["multi_layer"] == "none"]
        best = min(singles, key=lambda r: r["val/mae"]) if singles else None
        tasks[task] = {"best_layer": best["layers"][0] if best else None, "best": best,
                       "layers": [dict(r, layer=r["layers"][0]) for r in singles],
                       "multi_layer": [r for r in rows if r["task"] == task and r["multi_layer"] != "none"]}
    summary = {"metric": "val/mae", "best_layer": {task: s["best_layer"] for task, s in tasks.items()}, "tasks": tasks,
               "search": search, "layer_numbering": LAYER_NUMBERING, "config_sha256": config_sha256(cfg)}
    out = cfg.paths.sweep
    columns = ["task", "probe", "val/mae", "val/acc", "val/loss", "best_epoch"]
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    atomic_write_text(out / "layer_sweep.csv", "\n".join(lines) + "\n")
    atomic_write_json(cfg.paths.sweep_summary, summary)
    _plot_sweep(tasks, out / "layer_sweep.png", search)
    save_config(cfg, out)
    return summary


def _plot_sweep(tasks: dict, path: Path, search: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "val/mae", "val MAE (tokens)"), (axes[1], "val/acc", "val accuracy")):
        for i, (task, s) in enumerate(tasks.items()):
            color = f"C{i}"
            ax.plot([r["layer"] for r in s["layers"]], [r[key] for r in s["layers"]], "o-", color=color,
                    label=f"{task}: one layer")
            if s["best"]:
                ax.plot([s["best_layer"]], [s["best"][key]], "*", color=color, markersize=14)
            for j, r in enumerate(s["multi_layer"]):
                ax.axhline(r[key], color=color, linestyle=("--", ":")[j % 2], label=f"{task}: {r['probe']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer L (residual after decoder layer L)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    searched = "; ".join(f"{task}: {len(x['trained'])} of {len(x['candidates'])} layers searched"
                         for task, x in (search or {}).items())
    axes[0].set_title("Held-out MAE by layer (star: best layer)" + (f"\n{searched}" if searched else ""))
    axes[1].set_title("Held-out bin accuracy by layer")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def print_results(results: list[dict], summary: dict | None) -> None:
    print(f"\n{'task':<7} {'probe':<20} {'val/mae':>8} {'val/acc':>8} {'best epoch':>10}")
    for m in results:
        name = probe_name(m["layers"], m["multi_layer"])
        best = summary and m["multi_layer"] == "none" and summary["best_layer"].get(m["task"]) == m["layers"][0]
        mark = "  <- best layer" if best else ""
        x = m["metrics"]
        print(f"{m['task']:<7} {name:<20} {x['val/mae']:>8.1f} {x['val/acc']:>8.3f} {x['best_epoch']:>10}{mark}")
    if summary:
        for task, layer in summary["best_layer"].items():
            found = (summary.get("search") or {}).get(task)
            how = f" (layer search: {len(found['trained'])} of {len(found['candidates'])} layers trained, rounds " \
                f"{' -> '.join(','.join(map(str, r)) for r in found['rounds'])})" if found else ""
            print(f"best {task} layer: {layer}{how}")
