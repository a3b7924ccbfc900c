"""Where TRAIL's cost at 0.8x comes from: server variants that add TRAIL's parts one at a time, run one
after another at the same load (FCFS first and last, to bracket this machine's drift).

    python benchmarks/vllm_cost_bisect.py                                  # fcfs,aux,norefine,trail,fcfs
    python benchmarks/vllm_cost_bisect.py --servers rawpin,rawfree,fcfs
    python benchmarks/vllm_cost_bisect.py --load closed    # 32 in flight, no request ends: the per-step cost alone

- `fcfs`: vLLM's defaults (as in vllm_serve_client.py);
- `aux`: the same server asking the model for the probe layers' auxiliary hidden states (the recipe's
  predictor's layers: 16 and 17 for the committed one), the plugin's extraction path: the compiled
  graph's extra outputs, nothing else;
- `trail`: `trail-probe serve RECIPE`; `norefine`: the same with `refine.interval=100000` (no refinement);
- `raw`: `trail-probe serve`'s vLLM command run directly, without the multiprocess metrics the serve stage
  turns on (so without TRAIL's gauges on /metrics); `rawpin` / `rawfree`: the same without refinements,
  `rawfree` also with TRAIL_PROBE_VLLM_PIN=0 (the engine core left where the OS puts it, as at vLLM's
  defaults).
Each run: a fresh server, vLLM's own client over the recipe's 200 held-out prompts at `--rate` req/s
(default 1.2038: 0.8x of the saturation measured by vllm_serve_client.py this session), 512 new tokens,
greedy. Results: benchmarks/results/vllm_cost_bisect.json (appended, each run with its start time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vllm_serve_client as v  # noqa: E402
from results_file import merged_facts, write_results  # noqa: E402

FIELDS = ("completed", "duration", "mean_e2el_ms", "median_e2el_ms", "mean_ttft_ms", "mean_itl_ms", "median_itl_ms", "output_throughput",
          "max_concurrent_requests")


def command(kind: str, args, model: Path) -> tuple[list[str], dict]:
    from trail_probe.config import load_recipe
    from trail_probe.serving import vllm_internals as vi

    env = dict(os.environ)
    common = ["--port", str(args.port), "--served-model-name", "model"]
    if kind in ("fcfs", "aux"):
        from trail_probe.offline.serving_setup import trail_settings
        from trail_probe.serving.vllm_checks import probe_layers

        layers = {vi.EXTRACT_KEY: {"layers": [x for x in probe_layers(trail_settings(load_recipe(args.recipe))) if x is not None]}}
        return v.server_command("fcfs", args, model) + (["--additional-config", json.dumps(layers)] if kind == "aux" else []), env
    if kind in ("trail", "norefine"):
        return ["trail-probe", "serve", args.recipe, *(["refine.interval=100000"] if kind == "norefine" else []), "--", *common], env
    if kind in ("raw", "rawpin", "rawfree"):
        from trail_probe.offline.serving_setup import trail_settings
        from trail_probe.stages.serve import vllm_command

        cfg = load_recipe(args.recipe, [] if kind == "raw" else ["refine.interval=100000"])
        if kind == "rawfree":
            env["TRAIL_PROBE_VLLM_PIN"] = "0"
        return vllm_command(cfg, common, trail_settings(cfg)), env
    raise SystemExit(f"unknown server '{kind}'; use fcfs, aux, trail, norefine, raw, rawpin or rawfree")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="fcfs,aux,norefine,trail,fcfs")
    p.add_argument("--rate", default="1.2038")
    p.add_argument("--load", choices=("open", "closed"), default="open",
                   help="open: 200 prompts arriving at --rate; closed: 128 prompts, 32 in flight, 256 tokens each, EOS "
                        "ignored (no queue for TRAIL to reorder: any difference is its per-step cost, unmagnified)")
    p.add_argument("--out", default=str(HERE / "results" / "vllm_cost_bisect.json"))
    args_in = p.parse_args(argv)
    args = v.parse_args(["--num-prompts", "200"])
    model, folder, dataset, _, _ = v.prepare(args, "vllm_cost_bisect_")
    out = Path(args_in.out)
    state = json.loads(out.read_text()) if out.is_file() else {}
    runs = state.setdefault("runs", [])
    facts = merged_facts(state.get("facts", {}), argv)
    for i, kind in enumerate(args_in.servers.split(",")):
        tag = f"{i}_{kind}"
        cmd, env = command(kind, args, model)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"# {tag} ({started})", flush=True)
        with v.serving(cmd, folder / f"{tag}.server.log", args.port, env):
            if args_in.load == "closed":
                client = v.closed_loop_client(args.port, model, dataset, folder, tag)
            else:
                client = v.open_loop_client(args.port, model, dataset, folder, tag, args_in.rate)
            subprocess.run(client, check=True, stdout=subprocess.DEVNULL, stderr=open(folder / f"{tag}.client.log", "w"))
        result = json.loads((folder / f"{tag}.json").read_text())
        runs.append({"server": kind, "started": started, "load": args_in.load,
                     "rate": args_in.rate if args_in.load == "open" else "closed: 32 in flight",
                     **{k: result.get(k) for k in FIELDS}})
        print(f"  {kind}: mean latency {result['mean_e2el_ms'] / 1000:.2f} s, ITL {result['mean_itl_ms']:.1f} ms", flush=True)
        state.update(facts=facts, logs=str(folder))
        write_results(out, state)


if __name__ == "__main__":
    main()
