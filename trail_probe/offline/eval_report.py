"""The eval report: headline ratios, figures (PNG) and Markdown, from `evaluate`'s results.

`trail_probe.stages.evaluate` computes every number; this module only presents them: the paper's Figure 3
(MAE by layer), MAE against tokens generated, the true-vs-predicted bin heatmap (Figure 5), and
report.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from trail_probe.atomic import atomic_path
from trail_probe.config import RecipeConfig, format_config
from trail_probe.runtime.probe_inputs import DEFAULT_INPUT, describe

METHODS = ("bert", "prompt_probe", "per_step", "refined")


LABELS = {"bert": "(a) BERT on the prompt text", "prompt_probe": "(b) probe on the mean prompt state",
          "per_step": "(c) decode probe, each step alone", "refined": "(d) decode probe, refined"}


def method_label(method: str, metrics: dict | None = None) -> str:
    """The method's row name, naming the input its probe read where it is not TRAIL's."""
    kind = ((metrics or {}).get(method) or {}).get("input")
    if method == "prompt_probe" and kind and kind != DEFAULT_INPUT["prompt"]:
        return f"(b) probe on the {describe('prompt', kind)}"
    if method in ("per_step", "refined") and kind and kind != DEFAULT_INPUT["decode"]:
        return LABELS[method].replace("decode probe", f"decode probe on the {describe('decode', kind)}")
    return LABELS[method]


def inputs_line(metrics: dict) -> str:
    """What each probe read, in a sentence."""
    prompt, decode = ((metrics.get(m) or {}).get("input") for m in ("prompt_probe", "refined"))
    parts = ([f"the prompt probe read the {describe('prompt', prompt)} (`{prompt}`)"] if prompt else []) + \
            ([f"the decode probe the {describe('decode', decode)} (`{decode}`)"] if decode else [])
    return ("Inputs: " + ", ".join(parts) + " (runtime/probe_inputs.py).") if parts else ""


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b and not math.isnan(a) and not math.isnan(b) else None


def metric(metrics: dict, method: str, target: str, key: str = "mae") -> float | None:
    entry = (metrics.get(method) or {}).get(target)
    return None if entry is None else entry.get(key)


def headline_ratios(m: dict) -> dict:
    refined = metric(m, "refined", "remaining")
    return {
        # The paper's 2.66x: BERT against refined embedding predictions. Same decode steps, BERT counted down.
        "bert_over_refined_decode": ratio(metric(m, "bert", "remaining"), refined),
        # As the two validation MAEs are usually quoted side by side (the release's 46.1 vs 33.9):
        # BERT's total-length MAE against the refined remaining-length MAE.
        "bert_total_over_refined_decode": ratio(metric(m, "bert", "total"), refined),
        # At step 0 both read only the prompt: text (BERT) against the model's own prompt state.
        "bert_over_prompt_probe_step0": ratio(metric(m, "bert", "total"), metric(m, "prompt_probe", "total")),
        "per_step_over_refined_decode": ratio(metric(m, "per_step", "remaining"), refined),
    }


def layer_maes(m: dict) -> dict:
    return {"prompt_probe": metric(m, "prompt_probe", "total"), "per_step": metric(m, "per_step", "remaining"),
            "refined": metric(m, "refined", "remaining")}


COLORS = {"bert": "tab:gray", "prompt_probe": "tab:blue", "per_step": "tab:orange", "refined": "tab:green"}


def write_figures(out: Path, report: dict, results: dict, held, bins, bert_probs, chosen) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = sorted(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, target in (("prompt_probe", "total"), ("per_step", "remaining"), ("refined", "remaining")):
        ys = [metric(results[L], method, target) for L in layers]
        if any(y is not None for y in ys):
            ax.plot(layers, [math.nan if y is None else y for y in ys], "o-", color=COLORS[method],
                    label=f"{method_label(method, report['methods'])} ({target})")
    bert = results[report["layer"]]["bert"]
    if bert:
        ax.axhline(bert["total"]["mae"], color=COLORS["bert"], label=f"{LABELS['bert']} (total)")
        if "remaining" in bert:
            ax.axhline(bert["remaining"]["mae"], color=COLORS["bert"], linestyle="--",
                       label="(a) BERT counted down (remaining)")
    ax.set(xlabel="layer (residual after decoder layer L)", ylabel="MAE (tokens)",
           title=f"MAE by layer, {report['held_out']['requests']} held-out requests")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    _save_png(fig, out / "mae_by_layer.png")

    curve = report["curve"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in METHODS:
        ys = curve.get(method)
        if ys and any(y is not None for y in ys):
            ax.plot(curve["tokens"], [math.nan if y is None else y for y in ys], "o--" if method == "per_step" else "o-",
                    markersize=3, color=COLORS[method], label=method_label(method, report["methods"]))
    ax.set(xlabel="tokens generated so far", ylabel="MAE of remaining length (tokens)",
           title=f"Layer {report['layer']}, refined every {report['refine_interval']} tokens")
    ax.legend(fontsize=7)
    _save_png(fig, out / "mae_vs_generated.png")

    panels = [(m, report["confusion"][m]) for m in ("bert", "prompt_probe", "refined") if m in report["confusion"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (method, counts) in zip(axes[0], panels):
        c = torch.tensor(counts, dtype=torch.float64)
        share = c / c.sum(1, keepdim=True).clamp_min(1)
        ax.imshow(share.numpy(), origin="lower", cmap="viridis", vmin=0, vmax=1)
        for i in range(bins.num_bins):
            for j in range(bins.num_bins):
                if c[i, j]:
                    ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] < 0.6 else "black")
        target = "remaining" if method == "refined" else "total"
        ax.set(title=f"{method_label(method, report['methods'])}\n({target} length)", xlabel="predicted bin", ylabel="true bin",
               xticks=range(bins.num_bins), yticks=range(bins.num_bins))
        ax.title.set_fontsize(8)
    _save_png(fig, out / "bin_heatmap.png")


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# -- the Markdown report --------------------------------------------------------------------------
def fmt(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def headline_lines(report: dict) -> list[str]:
    h, m = report["headline"], report["methods"]
    lines = []
    if h["bert_over_refined_decode"] is not None:
        lines.append(f"BERT MAE / refined-probe MAE over decode steps: {h['bert_over_refined_decode']:.2f}x "
                     f"({fmt(metric(m, 'bert', 'remaining'))} vs {fmt(metric(m, 'refined', 'remaining'))} tokens; "
                     "the paper reports 2.66x)")
    if h["bert_over_prompt_probe_step0"] is not None:
        lines.append(f"BERT MAE / prompt-probe MAE at step 0: {h['bert_over_prompt_probe_step0']:.2f}x "
                     f"({fmt(metric(m, 'bert', 'total'))} vs {fmt(metric(m, 'prompt_probe', 'total'))} tokens)")
    if not lines:
        lines.append("no ratio against BERT: " + (report["notes"][0] if report["notes"] else "nothing to compare"))
    return lines


def render_markdown(r: dict, cfg: RecipeConfig) -> str:
    m, h = r["methods"], r["headline"]
    lines = [
        f"# trail-probe eval: layer {r['layer']} against BERT",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Held-out requests: {r['held_out']['requests']} (decode steps: {r['held_out']['decode_steps']}, stored every "
        f"{r['decode_stride']} tokens). Layer {r['layer']} ({r['layer_source']}). Refinement every "
        f"{r['refine_interval']} tokens, prior: {(m.get('refined') or {}).get('prior', '–')}, per-step likelihood: "
        f"{(m.get('refined') or {}).get('likelihood', '–')}. "
        f"Bins: {r['bins']['num_bins']} over [0, {r['bins']['max_len']}]; max_new_tokens {r['max_new_tokens']}. "
        + inputs_line(m),
        "",
        "## Headline",
        "",
        *[f"- {line}" for line in headline_lines(r)],
        f"- BERT total-length MAE / refined remaining-length MAE (how validation MAEs are usually quoted side by "
        f"side): {fmt(h['bert_total_over_refined_decode'], 2)}x",
        f"- per-step MAE / refined MAE over decode steps (what refinement adds): {fmt(h['per_step_over_refined_decode'], 2)}x",
        "",
        "## Methods at the chosen layer",
        "",
        "| method | total length: MAE | acc | tau | remaining over decode steps: MAE | acc | tau | tau, same step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        lines.append(f"| {method_label(method, m)} | {fmt(metric(m, method, 'total'))} | {fmt(metric(m, method, 'total', 'acc'), 3)} "
                     f"| {fmt(metric(m, method, 'total', 'kendall_tau'), 3)} "
                     f"| {fmt(metric(m, method, 'remaining'))} | {fmt(metric(m, method, 'remaining', 'acc'), 3)} "
                     f"| {fmt(metric(m, method, 'remaining', 'kendall_tau'), 3)} "
                     f"| {fmt(metric(m, method, 'remaining', 'kendall_tau_same_step'), 3)} |")
    lines += ["", "MAE in tokens. BERT and the prompt probe are scored on the decode steps as well, their estimate "
              "counted down by the tokens generated (no accuracy there: no distribution is re-predicted). tau: "
              "Kendall's tau-b of predicted against true lengths (the order a scheduler runs requests in), over all "
              "estimates and, last column, among those made at the same decode step, weighted by their number.", ""]
    if len(r["layers"]) > 1:
        lines += ["## MAE by layer", "", "![MAE by layer](mae_by_layer.png)", "",
                  "| layer | (b) prompt probe (total) | (c) per step (remaining) | (d) refined (remaining) |",
                  "|---|---|---|---|"]
        for L in r["layers"]:
            maes = layer_maes(r["by_layer"][str(L)])
            lines.append(f"| {L} | {fmt(maes['prompt_probe'])} | {fmt(maes['per_step'])} | {fmt(maes['refined'])} |")
        lines.append("")
    else:
        lines += ["![MAE by layer](mae_by_layer.png)", ""]
    c = r["curve"]
    lines += ["## MAE against tokens generated", "", "![MAE vs tokens generated](mae_vs_generated.png)", "",
              "Requests still generating at t; BERT and the prompt probe counted down by t; the decode probe's "
              "estimates from the latest refinement at or before t, counted down since (none at t = 0, where the "
              "refined method's prior is the prompt probe).", "",
              "| tokens generated | requests | " + " | ".join(method_label(x, m) for x in METHODS) + " |",
              "|---|---|" + "---|" * len(METHODS)]
    for i, t in enumerate(c["tokens"]):
        cells = [fmt(c[x][i]) if x in c else "–" for x in METHODS]
        lines.append(f"| {t} | {c['requests'][i]} | " + " | ".join(cells) + " |")
    lines += ["", "## True against predicted bin", "", "![bin heatmap](bin_heatmap.png)", "",
              "Rows: true bin; columns: most likely predicted bin; shares per row (counts in report.json).", ""]
    if r["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in r["notes"]], ""]
    lines += ["## Provenance", "", f"- extraction `{r['extraction']['path']}`, model `{r['extraction']['model']['name_or_path']}`, "
              f"manifest sha256 `{r['hashes']['extraction_manifest']}`",
              f"- split `{r['split']['path']}` ({r['split']['train']} train / {r['split']['held_out']} held out), "
              f"sha256 `{r['hashes']['split']}`"]
    lines += [f"- probe `{path}` sha256 `{sha}`" for path, sha in r["hashes"]["probes"].items()]
    if r["hashes"]["baseline_weights"]:
        lines += [f"- baseline ({r['baseline']['base_model']}) `{name}` sha256 `{sha}`"
                  for name, sha in r["hashes"]["baseline_weights"].items()]
    lines += [f"- finished in {r['elapsed_s']} s", "", "## Resolved config", "", "```yaml", format_config(cfg), "```", ""]
    return "\n".join(lines)
