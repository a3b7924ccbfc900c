"""Publish a finished run's report into the repository: reports/<run_name>/.

    python scripts/publish_report.py recipes/smollm2_alpaca.yaml      # the default run: reports/smollm2_alpaca_vllm/
    python scripts/publish_report.py recipes/smollm2_alpaca_hf.yaml   # the transformers run: reports/smollm2_alpaca/

Copies the eval report (Markdown, JSON, figures), the layer sweep and the simulation results, and
adds what the eval report does not draw: the output-length distribution of the serving model and
the training curves of the chosen probes, plus the run time of every stage. Everything it writes is
derived from files the pipeline wrote; re-running it after the pipeline gives the same report.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trail_probe.config import load_recipe  # noqa: E402
from trail_probe.offline.store import Extraction  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def length_distribution(ex: Extraction, out: Path) -> dict:
    lengths = ex.output_tokens.float()
    cap = int(ex.manifest["generation"]["max_new_tokens"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths.numpy(), bins=64, range=(0, cap), color="#4477aa")
    ax.set_xlabel("output tokens (greedy, EOS not counted)")
    ax.set_ylabel("requests")
    hit = sum(r["hit_cap"] for r in ex.records)
    ax.set_title(f"{ex.model['name_or_path'].split('/')[-1]}: {len(lengths)} Alpaca prompts, {hit} hit the {cap} cap")
    fig.tight_layout()
    fig.savefig(out / "output_lengths.png", dpi=120)
    plt.close(fig)
    return {"requests": len(lengths), "mean": round(float(lengths.mean()), 1),
            "median": float(lengths.median()), "hit_cap": hit, "cap": cap,
            "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in ex.records) / len(ex.records), 1)}


def training_curves(ckpt: Path, probes: list[tuple[str, str]], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for task, name in probes:
        logs = sorted((ckpt / "logs" / task / name).glob("version_*/metrics.csv"))
        if not logs:
            continue
        rows = list(csv.DictReader(logs[-1].open()))
        for ax, key in zip(axes, ("val/mae", "train/loss")):
            points = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key)]
            if key == "train/loss":  # logged per step and per epoch; keep one point per epoch
                points = list({e: v for e, v in points}.items())
            if points:
                ax.plot(*zip(*points), marker=".", label=f"{task} {name}")
    axes[0].set_ylabel("val MAE (tokens)")
    axes[1].set_ylabel("train loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120)
    plt.close(fig)


def main(recipe: str) -> None:
    cfg = load_recipe(recipe)
    ckpt, out = cfg.paths.checkpoints, REPO / "reports" / cfg.run_name
    out.mkdir(parents=True, exist_ok=True)
    ex = Extraction(cfg.paths.data)
    lengths = length_distribution(ex, out)
    for src in sorted((ckpt / "eval").glob("*")):
        if src.suffix in (".md", ".json", ".png") and src.name != "predictions.json":
            shutil.copy2(src, out / src.name)
    for folder in ("sweep", "simulate"):
        for src in sorted((ckpt / folder).glob("*")):
            if src.suffix in (".csv", ".json", ".png"):
                shutil.copy2(src, out / f"{folder}_{src.name}" if not src.name.startswith(folder) else out / src.name)
    sweep = json.loads((ckpt / "sweep" / "layer_sweep.json").read_text())
    best = sweep.get("best_layer", {})
    training_curves(ckpt, [(task, f"layer-{layer}") for task, layer in best.items()], out)
    timings_file = ckpt / "pipeline_timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    if timings:  # the README links the published copy: it must be this run's, not an earlier one's
        shutil.copy2(timings_file, out / timings_file.name)
    previous = out / "run_summary.json"
    if not timings and previous.is_file():  # stages run by hand: keep the times recorded for them
        timings = json.loads(previous.read_text()).get("stage_seconds", {})
    for status in ex.worker_status():
        timings.setdefault("extract", {"seconds": status.get("seconds_this_run")})
    summary = {"run_name": cfg.run_name, "output_lengths": lengths, "best_layer": best, "stage_seconds": timings}
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"published to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/smollm2_alpaca.yaml")
