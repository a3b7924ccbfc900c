"""Publish finished serve-bench runs into the repository: reports/<run_name>/<serve folder>/.

    python scripts/publish_serve.py checkpoints/smollm2_alpaca/serve checkpoints/smollm2_alpaca/serve_rate0.25

Copies each folder's report.md, summary.json, serve_bench.png and config.yaml, and writes
requests.csv (per policy and request: arrival, first token, finish, prompt and output tokens) from
the per-policy files, which stay behind because they also hold every token and engine step (MBs).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("report.md", "summary.json", "serve_bench.png", "config.yaml")


def publish(folder: Path) -> Path:
    summary = json.loads((folder / "summary.json").read_text())
    out = REPO / "reports" / summary["config"]["run_name"] / folder.name
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copy2(folder / name, out / name)
    with open(out / "requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "id", "arrival_s", "first_token_s", "finish_s", "prompt_tokens", "output_tokens"])
        for policy in summary["summary"]:
            run = json.loads((folder / f"{policy}.json").read_text())
            for r in run["requests"]:
                w.writerow([policy, r["id"], f"{r['arrival']:.4f}", f"{r['first_token']:.4f}", f"{r['finish']:.4f}",
                            r["prompt_tokens"], r["output_tokens"]])
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/publish_serve.py SERVE_FOLDER [SERVE_FOLDER ...]")
    for arg in sys.argv[1:]:
        print(f"published {arg} -> {publish(Path(arg)).relative_to(REPO)}")
