"""`trail-probe simulate`'s comparisons, tables and plots: the ablation ladder (fcfs -> sjf ->
+ limited preemption -> + refinement -> oracle), TRAIL against FCFS, latency and TTFT by rate, and
the aging curves (mean against p99 latency as aging A grows) when a policy runs with several `~A`."""

from __future__ import annotations

import math
from pathlib import Path

from trail_probe.atomic import atomic_path

ABLATION = [  # (policy, what it adds), the paper's ablation order
    ("fcfs", "baseline"),
    ("sjf_bert", "ordering (SJF on BERT)"),
    ("trail_bert", "+ limited preemption (BERT, counted down)"),
    ("trail", "+ refinement (probe)"),
    ("oracle", "exact lengths (TRAIL+)"),
]


def comparisons(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per arrival setting: the ablation ladder (fcfs -> sjf -> + preemption -> + refinement -> oracle)
    and TRAIL against FCFS and the oracle (the issue's targets)."""
    ablation, targets = [], []
    for setting in dict.fromkeys((r["mode"], r["rate"], r["load"]) for r in rows):
        at = {r["policy"]: r for r in rows if (r["mode"], r["rate"], r["load"]) == setting}
        mode, rate, load = setting
        base = at.get("fcfs")
        steps = []
        for name, ingredient in ABLATION:
            if name in at:
                m = at[name]
                steps.append({"policy": name, "ingredient": ingredient, "mean_latency_s": m["mean_latency_s"],
                              "mean_ttft_s": m["mean_ttft_s"],
                              "latency_speedup_vs_fcfs": base["mean_latency_s"] / m["mean_latency_s"] if base else None,
                              "ttft_speedup_vs_fcfs": base["mean_ttft_s"] / m["mean_ttft_s"] if base else None})
        ablation.append({"mode": mode, "rate": rate, "load": load, "steps": steps})
        if base and "trail" in at:
            trail = at["trail"]
            row = {"mode": mode, "rate": rate, "load": load,
                   "latency_speedup": base["mean_latency_s"] / trail["mean_latency_s"],
                   "ttft_speedup": base["mean_ttft_s"] / trail["mean_ttft_s"]}
            if "oracle" in at:
                row["trail_over_oracle_latency"] = trail["mean_latency_s"] / at["oracle"]["mean_latency_s"]
            row["in_target_band"] = load is not None and 0.8 <= load <= 0.9
            row["meets"] = {"latency_2x": row["latency_speedup"] >= 2.0, "ttft_1.76x": row["ttft_speedup"] >= 1.76,
                            "within_15pct_of_oracle": row.get("trail_over_oracle_latency", math.inf) <= 1.15}
            targets.append(row)
    return ablation, targets


def format_table(rows: list[dict]) -> str:
    head = (f"{'policy':<14}{'load':>6}{'rate/s':>9}{'mean lat':>10}{'p50 lat':>9}{'p99 lat':>9}"
            f"{'mean TTFT':>10}{'p99 TTFT':>10}{'req/s':>8}{'preempt':>9}{'recomp':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        load = "burst" if r["mode"] == "burst" else f"{r['load']:.2f}"
        rate = "inf" if r["mode"] == "burst" else f"{r['rate']:.3g}"
        lines.append(f"{r['policy']:<14}{load:>6}{rate:>9}{r['mean_latency_s']:>10.3g}{r['median_latency_s']:>9.3g}"
                     f"{r['p99_latency_s']:>9.3g}{r['mean_ttft_s']:>10.3g}{r['p99_ttft_s']:>10.3g}"
                     f"{r['throughput_rps']:>8.3g}{r['preemptions']:>9}{r['recomputes']:>8}")
    return "\n".join(lines)


def format_ablation(ablation: list[dict]) -> str:
    """Mean latency and mean TTFT speedups over FCFS, one row per arrival setting, one column per step."""
    names = [name for name, _ in ABLATION if any(s["policy"] == name for a in ablation for s in a["steps"])]
    head = f"{'load':>6}" + "".join(f"{name:>18}" for name in names)
    lines = ["speedup over FCFS in mean latency / mean TTFT "
             "(sjf_bert: ordering; trail_bert: + limited preemption; trail: + refinement; oracle: exact)", head]
    for a in ablation:
        steps = {s["policy"]: s for s in a["steps"]}
        cells = [f"{steps[n]['latency_speedup_vs_fcfs']:.2f}x / {steps[n]['ttft_speedup_vs_fcfs']:.2f}x"
                 if n in steps and steps[n]["latency_speedup_vs_fcfs"] else "-" for n in names]
        load = "burst" if a["mode"] == "burst" else f"{a['load']:.2f}"
        lines.append(f"{load:>6}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def plot_rates(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    poisson = [r for r in rows if r["mode"] == "poisson"]
    for metric, label, name in (("mean_latency_s", "mean latency (s)", "latency_vs_rate.png"),
                                ("mean_ttft_s", "mean time to first token (s)", "ttft_vs_rate.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in dict.fromkeys(r["policy"] for r in poisson):
            pts = sorted((r["rate"], r[metric]) for r in poisson if r["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def aging_curves(rows: list[dict]) -> list[dict]:
    """Per arrival setting and policy run with several aging values (`trail`, `trail~1`, ...): mean,
    p99 and max latency by A, next to FCFS's, sorted by A."""
    curves = []
    for setting in dict.fromkeys((r["mode"], r["rate"], r["load"]) for r in rows):
        at = [r for r in rows if (r["mode"], r["rate"], r["load"]) == setting]
        fcfs = next((r for r in at if r["policy"] == "fcfs"), None)
        for policy in dict.fromkeys(r["policy"].split("~")[0] for r in at):
            runs = sorted((r for r in at if r["policy"].split("~")[0] == policy), key=lambda r: r.get("aging", 0.0))
            if len(runs) < 2:
                continue
            mode, rate, load = setting
            curves.append({"mode": mode, "rate": rate, "load": load, "policy": policy,
                           "fcfs": None if fcfs is None else {k: fcfs[k] for k in ("mean_latency_s", "p99_latency_s", "max_latency_s")},
                           "points": [{"aging": r.get("aging", 0.0), "mean_latency_s": r["mean_latency_s"],
                                       "p99_latency_s": r["p99_latency_s"], "max_latency_s": r["max_latency_s"]} for r in runs]})
    return curves


def _where(c: dict) -> str:
    if c["mode"] == "burst":
        return "burst"
    return f"load {c['load']:.2f}" if c["load"] is not None else f"{c['rate']:g} req/s"


def format_aging(curves: list[dict]) -> str:
    lines = ["aging A (tokens per second waited): mean / p99 / max latency (s)"]
    for c in curves:
        where = _where(c)
        cells = [f"A={p['aging']:g}: {p['mean_latency_s']:.3g} / {p['p99_latency_s']:.3g} / {p['max_latency_s']:.3g}"
                 for p in c["points"]]
        f = c["fcfs"]
        fcfs = f"; fcfs {f['mean_latency_s']:.3g} / {f['p99_latency_s']:.3g} / {f['max_latency_s']:.3g}" if f else ""
        lines.append(f"{c['policy']} {where}: " + ", ".join(cells) + fcfs)
    return "\n".join(lines)


def plot_aging(curves: list[dict], out_dir: Path, name: str = "aging_mean_vs_p99.png") -> Path | None:
    """Mean against p99 latency, one line per setting through A = 0 (TRAIL) to the largest A, FCFS as a cross."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for c in curves:
        where = _where(c)
        xs = [p["mean_latency_s"] for p in c["points"]]
        ys = [p["p99_latency_s"] for p in c["points"]]
        line, = ax.plot(xs, ys, marker="o", label=f"{c['policy']}, {where}")
        for p, x, y in zip(c["points"], xs, ys):
            ax.annotate(f"{p['aging']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if c["fcfs"]:
            ax.plot([c["fcfs"]["mean_latency_s"]], [c["fcfs"]["p99_latency_s"]], marker="x", ms=9, color=line.get_color(), ls="")
    ax.set_xlabel("mean latency (s)")
    ax.set_ylabel("p99 latency (s)")
    ax.set_title("aging A (labels, tokens/s waited); x: FCFS", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / name
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
