"""TRAIL's cost per decode step in vLLM's OpenAI server, without any queue to reorder: the same closed-loop
load (32 requests in flight, 256 tokens each, EOS ignored) on fresh servers, one after another.

    python benchmarks/vllm_steady_cost.py                          # fcfs, trail, fcfs+prom, trail
    python benchmarks/vllm_steady_cost.py --servers fcfs,trail,fcfs,trail

`fcfs`: vLLM's defaults; `trail`: `trail-probe serve` with the default recipe; `fcfs+prom`: vLLM's defaults
with PROMETHEUS_MULTIPROC_DIR set, as `trail-probe serve` sets it (multiprocess metrics). With 32 in
flight and TRAIL's running limit above that, TRAIL pauses nobody, so any difference in inter-token
latency is its per-step cost (the probe layers' auxiliary outputs, the worker's row copies, the
refinements, the scheduler's bookkeeping). Results: benchmarks/results/vllm_steady_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vllm_serve_client as v  # noqa: E402
from results_file import run_facts, write_results  # noqa: E402

FIELDS = ("completed", "duration", "mean_itl_ms", "median_itl_ms", "mean_tpot_ms", "output_throughput")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="fcfs,trail,fcfs+prom,trail")
    p.add_argument("--out", default=str(HERE / "results" / "vllm_steady_cost.json"))
    args = p.parse_args(argv)
    sargs = v.parse_args(["--num-prompts", "128"])
    model, folder, dataset, _, _ = v.prepare(sargs, "vllm_steady_cost_")
    runs = []
    for i, kind in enumerate(args.servers.split(",")):
        env = dict(os.environ)
        if kind.endswith("+prom"):
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prom_")
        tag = f"{i}_{kind}"
        cmd = v.server_command("trail" if kind.startswith("trail") else "fcfs", sargs, model)
        with v.serving(cmd, folder / f"{tag}.server.log", sargs.port, env):
            client = v.closed_loop_client(sargs.port, model, dataset, folder, tag)
            subprocess.run(client, check=True, stdout=subprocess.DEVNULL, stderr=open(folder / f"{tag}.client.log", "w"))
        result = json.loads((folder / f"{tag}.json").read_text())
        runs.append({"server": kind, "order": i, **{k: result.get(k) for k in FIELDS}})
        print(f"{kind:>10}: mean ITL {result['mean_itl_ms']:.2f} ms, {result['output_throughput']:.1f} tok/s", flush=True)
        write_results(Path(args.out), {"runs": runs, "facts": run_facts(argv), "logs": str(folder)})


if __name__ == "__main__":
    main()
