"""Issue 27's ablation of what the probes read: each input, label and loss option trained and compared on
the validation split, the chosen combination scored once on the held-out side, for three split seeds.

    python scripts/input_ablation.py                                     # the default recipe, its sweep's decode layer
    python scripts/input_ablation.py --recipe recipes/smollm2_alpaca_hf.yaml --layer 19
    python scripts/input_ablation.py --set train.standardize=true --set train.lr=0.001 --name inputs_tuned
    python scripts/input_ablation.py --report                            # the report from the runs already there

It needs an extraction with every pooled input (`trail-probe extract RECIPE extract.inputs=all`, with
extract.entropy on, its default; the default `trained` stores only what the recipe's probes read) and, for the label rows, sampled answers (extract.num_samples=N);
rows whose inputs or samples the extraction lacks are left out with a note. For each split seed
(train.split_seed; train.validation_fraction carves the validation side out of the training side, so
the held-out 25% is not read until step 3), at one layer L for both probes:

1. prompt rows: the inputs mean, last, entropy (cross-entropy, greedy labels); then the median and
   the soft labels on the best input; then the ranking loss on the best so far. The choice at each
   step: the prompt-time estimate's validation MAE (eval.split=validation, BERT left out).
2. decode rows: the inputs current, mean, entropy, current+mean, current+entropy (cross-entropy);
   then the ranking loss on the best. Each is refined from the chosen prompt probe, with the recipe's
   refine settings; the choice: the refined estimate's validation MAE.
3. held out, once: the chosen combination, and TRAIL's (mean / current, greedy labels, cross-entropy)
   beside it, each with the recipe's BERT trained on the same split: MAE and Kendall's tau of BERT,
   of the prompt-time estimate and of the refined one.

Every run resumes (finished probes and baselines are kept). Writes checkpoints/<run>/<name>/seed<s>/
and reports/<run>/<name>/input_ablation.{md,json} (--name, default inputs: another name for other --set).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from trail_probe.atomic import atomic_write_json, atomic_write_text
from trail_probe.config import load_recipe
from trail_probe.offline.artifacts import best_layer
from trail_probe.offline.store import Extraction
from trail_probe.runtime.accuracy import kendall_tau, mae
from trail_probe.runtime.bins import Bins
from trail_probe.stages.baseline import train_baseline
from trail_probe.stages.evaluate import evaluate
from trail_probe.stages.train import train

REPO = Path(__file__).resolve().parents[1]
PROMPT_INPUTS = ("mean", "last", "entropy")
DECODE_INPUTS = ("current", "mean", "entropy", "current+mean", "current+entropy")
TRAIL = {"prompt": {"input": "mean", "labels": "greedy", "loss": "ce"}, "decode": {"input": "current", "loss": "ce"}}
PROBE_FILES = ("probe.json", "probe.safetensors", "config.yaml")


def settings(task: str, row: dict) -> list[str]:
    """The overrides of a row: {"input", "loss"[, "labels"]}."""
    out = [f"train.{task}_input={row['input']}", f"train.loss={row['loss']}"]
    return out + ([f"train.prompt_labels={row['labels']}"] if task == "prompt" else [])


def options(row: dict) -> dict:
    """A row's options alone (a scored row also carries its results)."""
    return {k: row[k] for k in ("input", "labels", "loss") if k in row}


def row_name(row: dict) -> str:
    return "_".join(v for v in options(row).values() if v not in ("ce", "greedy")).replace("+", "-")


def copy_probe(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in PROBE_FILES:
        shutil.copy2(src / name, dst / name)


class Ablation:
    def __init__(self, args):
        self.recipe, self.sets, self.vf = REPO / args.recipe, list(args.set), args.validation_fraction
        base = load_recipe(self.recipe, self.sets)
        self.layer = args.layer if args.layer is not None else best_layer(base, "decode")[0]
        self.root, self.run_name = Path(base.paths.checkpoints) / args.name, base.run_name
        self.no_bert, self.notes = args.no_bert, []
        self.extraction, self.bins = Extraction(base.paths.data), Bins.from_config(base.bins)
        self.stored, self.samples = self.extraction.inputs, self.extraction.num_samples

    def cfg(self, seed: int, out: Path, *extra: str):
        return load_recipe(self.recipe, [*self.sets, f"train.split_seed={seed}", f"train.validation_fraction={self.vf}",
                                         f"train.out_dir={out}", f"train.layers={self.layer}", "train.multi_layer=none",
                                         f"eval.layer={self.layer}", *extra])

    def usable(self, task: str, row: dict) -> bool:
        missing = [p for p in row["input"].split("+") if p not in self.stored[task]]
        if missing or (row.get("labels", "greedy") != "greedy" and not self.samples):
            self.notes.append(f"{task} row {row_name(row)} left out: the extraction has no "
                              + (f"{task} input {missing[0]}" if missing else "sampled answers (extract.num_samples)"))
            return False
        return True

    def validation_row(self, seed: int, task: str, row: dict, prompt_dir: Path | None = None) -> dict:
        """Train one row on the fit side and score it on validation (no BERT)."""
        out = self.root / f"seed{seed}" / task / row_name(row)
        train(self.cfg(seed, out, f"train.task={task}", *settings(task, row)), resume=True)
        if prompt_dir is not None:  # the refined estimate starts from the chosen prompt probe
            copy_probe(prompt_dir, out / "probes" / "prompt" / f"layer-{self.layer}")
        report = evaluate(self.cfg(seed, out, "eval.split=validation", f"baseline.out_dir={out / 'no-bert'}"),
                          ["python", "scripts/input_ablation.py"])
        m = report["methods"]
        pick = m["prompt_probe"]["total"] if task == "prompt" else m["refined"]["remaining"]
        entry = {**options(row), "name": row_name(row), "dir": str(out), "mae": pick["mae"], "tau": pick["kendall_tau"],
                 "requests": report["held_out"]["requests"]}
        if task == "decode":
            entry["per_step_mae"] = m["per_step"]["remaining"]["mae"]
        print(f"seed {seed} {task:6s} {entry['name']:<22} validation MAE {entry['mae']:6.1f}  tau {entry['tau']:.3f}",
              flush=True)
        return entry

    def best(self, seed: int, task: str, rows: list[dict], done: list[dict], prompt_dir: Path | None = None) -> dict:
        """Score `rows` on validation (adding them to `done`); the best of them."""
        scored = [self.validation_row(seed, task, r, prompt_dir) for r in rows if self.usable(task, r)]
        done += scored
        return min(scored, key=lambda r: r["mae"])

    def choose(self, seed: int) -> dict:
        """Steps 1 and 2 for one seed: every row scored on validation, and the choices."""
        rows = {"prompt": [], "decode": []}
        p = self.best(seed, "prompt", [{**TRAIL["prompt"], "input": k} for k in PROMPT_INPUTS], rows["prompt"])
        p = min([p, *([self.best(seed, "prompt", [{**options(p), "labels": lab} for lab in ("median", "soft")],
                                 rows["prompt"])] if self.samples else [])], key=lambda r: r["mae"])
        p = min(p, self.best(seed, "prompt", [{**options(p), "loss": "rank"}], rows["prompt"]), key=lambda r: r["mae"])
        prompt_dir = Path(p["dir"]) / "probes" / "prompt" / f"layer-{self.layer}"
        d = self.best(seed, "decode", [{**TRAIL["decode"], "input": k} for k in DECODE_INPUTS], rows["decode"], prompt_dir)
        d = min(d, self.best(seed, "decode", [{**options(d), "loss": "rank"}], rows["decode"], prompt_dir),
                key=lambda r: r["mae"])
        trail_prompt = next(r for r in rows["prompt"] if r["name"] == row_name(TRAIL["prompt"]))
        trail_decode = next(r for r in rows["decode"] if r["name"] == row_name(TRAIL["decode"]))
        return {"rows": rows, "chosen": {"prompt": p, "decode": d}, "trail": {"prompt": trail_prompt, "decode": trail_decode}}

    def held_out(self, seed: int, name: str, pair: dict) -> dict:
        """Step 3: a combination's probes with the seed's BERT, scored once on the held-out side."""
        seed_dir = self.root / f"seed{seed}"
        out = seed_dir / "heldout" / name
        first = Path(pair["prompt"]["dir"])
        for f in ("split.json", "validation.json"):  # the same split the rows were trained on
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(first / f, out / f)
        for task in ("prompt", "decode"):
            copy_probe(Path(pair[task]["dir"]) / "probes" / task / f"layer-{self.layer}",
                       out / "probes" / task / f"layer-{self.layer}")
        bert = seed_dir / "baseline"
        if not self.no_bert:
            train_baseline(self.cfg(seed, first, f"baseline.out_dir={bert}"), resume=True)
        r = evaluate(self.cfg(seed, out, f"baseline.out_dir={bert}"), ["python", "scripts/input_ablation.py"])
        m, get = r["methods"], (lambda method, target, key="mae": ((r["methods"].get(method) or {}).get(target) or {}).get(key))
        return {"combination": name, "seed": seed, "inputs": r["inputs"], "requests": r["held_out"]["requests"],
                "labels": pair["prompt"]["labels"], "losses": {t: pair[t]["loss"] for t in ("prompt", "decode")},
                "bert_total": get("bert", "total"), "bert_total_tau": get("bert", "total", "kendall_tau"),
                "bert_remaining": get("bert", "remaining"), "prompt_total": get("prompt_probe", "total"),
                "prompt_total_tau": get("prompt_probe", "total", "kendall_tau"),
                "per_step": get("per_step", "remaining"), "refined": get("refined", "remaining"),
                "refined_tau": get("refined", "remaining", "kendall_tau"),
                "refined_tau_same_step": get("refined", "remaining", "kendall_tau_same_step"),
                "ratio": r["headline"]["bert_over_refined_decode"], "step0_ratio": r["headline"]["bert_over_prompt_probe_step0"],
                "eval": str(out / "eval" / "report.md"), "prior": (m.get("refined") or {}).get("prior")}


def label_noise(extraction, bins) -> dict | None:
    """How far one greedy answer's length is from what the prompt's sampled answers say (ProD's premise:
    one answer is a noisy draw of what the prompt asks for): the greedy length against the median of the
    samples, the samples' own spread around it, and how often greedy and median fall in the same bin.
    The median's MAE against the greedy lengths is what a perfect median-label probe would score on the
    held-out greedy answers. None without samples."""
    if not extraction.num_samples:
        return None
    greedy = extraction.output_tokens.double()
    sampled = extraction.sampled_lengths().double()
    median = sampled.quantile(0.5, dim=1)
    inside = (greedy >= sampled.min(1).values) & (greedy <= sampled.max(1).values)
    share = lambda mask: round(float(mask.double().mean()), 3)  # noqa: E731
    return {"requests": len(greedy), "num_samples": extraction.num_samples,
            "greedy_mean": round(float(greedy.mean()), 1), "samples_mean": round(float(sampled.mean()), 1),
            "greedy_at_cap": share(greedy >= bins.max_len), "samples_at_cap": share(sampled >= bins.max_len),
            "median_mae_vs_greedy": round(mae(median, greedy), 1),
            "sample_mae_vs_median": round(float((sampled - median[:, None]).abs().mean()), 1),
            "same_bin_greedy_and_median": share(bins.label(greedy) == bins.label(median)),
            "greedy_within_sample_range": share(inside),
            "tau_greedy_vs_median": round(kendall_tau(median, greedy), 3),
            "tau_greedy_vs_one_sample": round(kendall_tau(sampled[:, 0], greedy), 3)}


def f1(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def fx(v) -> str:
    return "–" if v is None else f"{v:.2f}x"


def means(held: list[dict]) -> list[str]:
    """Per combination, the mean over the seeds of the held-out ratios and taus."""
    lines = []
    for name in dict.fromkeys(h["combination"] for h in held):
        rows = [h for h in held if h["combination"] == name]
        avg = {k: (sum(h[k] for h in rows) / len(rows) if all(h[k] is not None for h in rows) else None)
               for k in ("ratio", "step0_ratio", "prompt_total_tau", "refined_tau")}
        lines.append(f"- {name}: BERT / refined {fx(avg['ratio'])} (seeds: {', '.join(fx(h['ratio']) for h in rows)}), "
                     f"BERT / prompt-time {fx(avg['step0_ratio'])}, prompt-time tau {f1(avg['prompt_total_tau'], 3)}, "
                     f"refined tau {f1(avg['refined_tau'], 3)} (means over {len(rows)} seeds)")
    return lines


def render(result: dict) -> str:
    """The Markdown report."""
    lines = [f"# What the probes read (issue 27): {result['run_name']}, layer {result['layer']}", "",
             f"Choices on the validation side ({result['validation_fraction']:.0%} of the training side) of each split seed, "
             "the held-out 25% scored once. Reproduce: `" + result["command"] + "`.", "",
             "## Held out, once per seed", "",
             "| seed | combination | prompt input | labels | decode input | losses (prompt, decode) | BERT total MAE / tau | "
             "prompt-time MAE / tau | BERT / prompt-time | per-step MAE | refined MAE / tau | BERT / refined |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in result["held_out"]:
        lines.append(f"| {h['seed']} | {h['combination']} | {h['inputs']['prompt']} | {h['labels']} | {h['inputs']['decode']} | "
                     f"{h['losses']['prompt']}, {h['losses']['decode']} | {f1(h['bert_total'])} / {f1(h['bert_total_tau'], 3)} | "
                     f"{f1(h['prompt_total'])} / {f1(h['prompt_total_tau'], 3)} | {fx(h['step0_ratio'])} | {f1(h['per_step'])} | "
                     f"{f1(h['refined'])} / {f1(h['refined_tau'], 3)} | {fx(h['ratio'])} |")
    lines += ["", *means(result["held_out"]), "", "Targets (issue 27): BERT / refined >= 2.66x on each seed; prompt-time MAE 1.3x below BERT's and "
              "tau >= 0.60. MAE in tokens; refined and per-step over the decode steps (remaining length), BERT and "
              "the prompt-time estimate over the requests (total length).", "", "## Validation rows", ""]
    for seed, s in result["seeds"].items():
        lines += [f"Seed {seed} (chosen: prompt {s['chosen']['prompt']['name']}, decode {s['chosen']['decode']['name']}):", "",
                  "| probe | row | input | labels | loss | validation MAE | tau | per-step MAE |", "|---|---|---|---|---|---|---|---|"]
        for task in ("prompt", "decode"):
            lines += [f"| {task} | {r['name']} | {r['input']} | {r.get('labels', '–')} | {r['loss']} | {f1(r['mae'])} | "
                      f"{f1(r['tau'], 3)} | {f1(r.get('per_step_mae'))} |" for r in s["rows"][task]]
        lines.append("")
    lines += ["Prompt rows: the prompt-time estimate (total length); decode rows: the refined estimate from the "
              "chosen prompt probe (remaining length).", ""]
    noise = result.get("label_noise")
    if noise:
        lines += ["## The sampled answers against the greedy one", "",
                  f"{noise['num_samples']} sampled answers per prompt ({noise['requests']} prompts): mean length "
                  f"{noise['samples_mean']} (greedy {noise['greedy_mean']}), at the cap {noise['samples_at_cap']:.1%} "
                  f"(greedy {noise['greedy_at_cap']:.1%}). The samples' median against the greedy length: MAE "
                  f"{noise['median_mae_vs_greedy']} tokens, the same bin for {noise['same_bin_greedy_and_median']:.1%}, "
                  f"Kendall's tau {noise['tau_greedy_vs_median']} (one sample: {noise['tau_greedy_vs_one_sample']}); "
                  f"the greedy length within the samples' range for {noise['greedy_within_sample_range']:.1%}; a sample "
                  f"lies {noise['sample_mae_vs_median']} tokens from its prompt's median on average. A probe that "
                  "learned the median exactly would score that MAE on the held-out greedy lengths.", ""]
    return "\n".join(lines + ([ "## Notes", "", *[f"- {n}" for n in result["notes"]], ""] if result["notes"] else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="recipes/smollm2_alpaca.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run")
    ap.add_argument("--layer", type=int, help="default: the recipe's sweep's decode layer")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--validation-fraction", type=float, default=0.2)
    ap.add_argument("--no-bert", action="store_true", help="no BERT baseline on the held-out side")
    ap.add_argument("--name", default="inputs", help="the folder under checkpoints/<run>/ and reports/<run>/")
    ap.add_argument("--report", action="store_true", help="only write the report from the runs already there")
    args = ap.parse_args()
    ablation = Ablation(args)
    out = REPO / "reports" / ablation.run_name / args.name
    if args.report:
        result = json.loads((out / "input_ablation.json").read_text())
        if result.get("label_noise") is None:  # a run from before it was recorded, or samples added since
            result["label_noise"] = label_noise(ablation.extraction, ablation.bins)
    else:
        seeds = {s: ablation.choose(int(s)) for s in args.seeds.split(",")}
        held = [ablation.held_out(int(s), name, seeds[s][key]) for s in seeds for name, key in
                (("chosen", "chosen"), ("trail", "trail"))]
        command = "python scripts/input_ablation.py " + " ".join(
            [f"--recipe {args.recipe}", *[f"--set {s}" for s in args.set], f"--layer {ablation.layer}", f"--seeds {args.seeds}",
             f"--name {args.name}",
             *(["--no-bert"] if args.no_bert else [])])
        result = {"run_name": ablation.run_name, "layer": ablation.layer, "validation_fraction": args.validation_fraction,
                  "command": command, "seeds": seeds, "held_out": held, "notes": sorted(set(ablation.notes)),
                  "label_noise": label_noise(ablation.extraction, ablation.bins)}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "input_ablation.json", result)
    atomic_write_text(out / "input_ablation.md", render(result))
    print(f"wrote {out / 'input_ablation.md'}")


if __name__ == "__main__":
    main()
