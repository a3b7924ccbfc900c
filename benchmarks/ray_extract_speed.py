"""What Ray extraction buys on this machine: one extractor against N Ray workers on the same prompts.

    python benchmarks/ray_extract_speed.py                      # 48 prompts, 1 worker vs 2 Ray workers x 1 CPU
    python benchmarks/ray_extract_speed.py --num-prompts 96 --engine hf

Runs `trail-probe extract` twice as the user would, each in its own process into a temporary folder:
once as one worker (torch's default threads: every core), once with `--ray --num-workers N
--cpus-per-worker C` on a local Ray cluster. Reports the wall time of each command (model loads and
Ray's start included), the useful tokens per second, whether the two folders hold the same records
(ids, lengths, responses) and each prompt once. Prints a table and writes
benchmarks/results/ray_extract_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import run_facts, write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ray_extract_speed.json"


def extract(out: Path, overrides: list[str], extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "trail_probe.cli", "extract", "recipes/smollm2_alpaca_hf.yaml", *extra,
           f"extract.out_dir={out}", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def records(folder: Path) -> dict[str, tuple]:
    from trail_probe.offline.store import Extraction

    ex = Extraction(folder)
    return {r["id"]: (r["output_tokens"], r["response"]) for r in ex.records}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    overrides = [f"prompts.num_prompts={args.num_prompts}", f"extract.engine={args.engine}", "progress.every_s=600"]
    with tempfile.TemporaryDirectory() as tmp:
        one, ray = Path(tmp) / "one", Path(tmp) / "ray"
        t_one = extract(one, overrides, [])
        t_ray = extract(ray, overrides, ["--ray", "--num-workers", str(args.num_workers),
                                         "--cpus-per-worker", str(args.cpus_per_worker)])
        a, b = records(one), records(ray)
    tokens = sum(n for n, _ in a.values())
    result = {"benchmark": "ray_extract_speed", "engine": args.engine, "prompts": args.num_prompts,
              "useful_tokens": tokens, "one_worker_s": round(t_one, 1),
              "ray_s": round(t_ray, 1), "ray_workers": args.num_workers, "cpus_per_worker": args.cpus_per_worker,
              "one_worker_tok_s": round(tokens / t_one, 1), "ray_tok_s": round(tokens / t_ray, 1),
              "speedup": round(t_one / t_ray, 2), "same_records": a == b, "requests": [len(a), len(b)],
              "loadavg_1min_before": round(load_before, 2), **run_facts(argv)}
    print(f"\n{'run':<28} {'wall s':>7} {'useful tok/s':>13}")
    print(f"{'one worker (all cores)':<28} {t_one:>7.1f} {tokens / t_one:>13.1f}")
    print(f"{f'Ray: {args.num_workers} x {args.cpus_per_worker} CPU':<28} {t_ray:>7.1f} {tokens / t_ray:>13.1f}")
    print(f"speed-up {t_one / t_ray:.2f}x; same records: {a == b} ({len(a)} and {len(b)} requests)")
    write_results(RESULTS, result)
    print(json.dumps({k: result[k] for k in ("speedup", "same_records")}))


if __name__ == "__main__":
    main()
