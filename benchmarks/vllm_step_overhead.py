"""TRAIL's own time per step inside vLLM's engine core, measured in the server, by hook: how much of
each step is TRAIL's and how much vLLM's, at one load. Immune to this machine's drift between runs
(one run, both parts timed in the same steps), unlike end-to-end latency.

    python benchmarks/vllm_step_overhead.py                                      # 0.8x, the recipe's settings
    python benchmarks/vllm_step_overhead.py --overrides serve.refine_when=always  # refinements with no queue too

The server is `trail-probe serve`'s vLLM command with its scheduler class timed
(`step_overhead_scheduler.TimedTrailScheduler`); vLLM's own client sends the recipe's 200 held-out
prompts at `--rate` req/s (default 1.2038: 0.8x of the saturation measured by vllm_serve_client.py),
512 new tokens, greedy. TRAIL's part of `schedule` and `update_from_output` is on the step's critical
path; `get_grammar_bitmask` runs while the worker computes the pass (refinements, the live-accuracy
line). Results are appended to benchmarks/results/vllm_step_overhead.json.
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

CRITICAL = ("schedule", "update_from_output", "add_request", "_free_request")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", default="1.2038")
    p.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for TRAIL's server")
    p.add_argument("--out", default=str(HERE / "results" / "vllm_step_overhead.json"))
    a = p.parse_args(argv)
    args = v.parse_args(["--num-prompts", "200", "--overrides", *a.overrides] if a.overrides else ["--num-prompts", "200"])
    from trail_probe.config import load_recipe
    from trail_probe.offline.serving_setup import trail_settings
    from trail_probe.stages.serve import vllm_command

    cfg = load_recipe(args.recipe, a.overrides)
    model, folder, dataset, _, _ = v.prepare(args, "vllm_step_overhead_")
    cmd = vllm_command(cfg, ["--port", str(args.port), "--served-model-name", "model"], trail_settings(cfg))
    cmd[cmd.index("--scheduler-cls") + 1] = "step_overhead_scheduler.TimedTrailScheduler"
    timings = folder / "hooks.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "TRAIL_STEP_OVERHEAD_OUT": str(timings)}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with v.serving(cmd, folder / "server.log", args.port, env):
        client = v.open_loop_client(args.port, model, dataset, folder, "client", a.rate)
        subprocess.run(client, check=True, stdout=subprocess.DEVNULL, stderr=open(folder / "client.log", "w"))
        time.sleep(3)  # the last step's totals
    hooks = json.loads(timings.read_text())
    result = json.loads((folder / "client.json").read_text())
    steps = hooks["steps"]
    per_step = {n: {"trail_ms": 1e3 * h["trail_s"] / steps, "vllm_ms": 1e3 * h["vllm_s"] / steps, "calls": h["calls"],
                    "worst_trail_ms": h["worst_trail_ms"]} for n, h in hooks["hooks"].items()}
    print(f"{'hook':<22}{'TRAIL ms/step':>15}{'vLLM ms/step':>14}{'calls':>8}{'worst TRAIL ms':>16}")
    for n, h in per_step.items():
        print(f"{n:<22}{h['trail_ms']:>15.3f}{h['vllm_ms']:>14.3f}{h['calls']:>8}{h['worst_trail_ms']:>16.1f}")
    critical = sum(per_step[n]["trail_ms"] for n in CRITICAL)
    print(f"TRAIL on the critical path: {critical:.3f} ms/step over {steps} steps; states asked at "
          f"{hooks['steps_asking_states']} steps ({hooks['states_asked']} rows); mean ITL {result['mean_itl_ms']:.1f} ms")
    out = Path(a.out)
    state = json.loads(out.read_text()) if out.is_file() else {}
    state.setdefault("runs", []).append({
        "started": started, "rate": a.rate, "overrides": a.overrides, "steps": steps,
        "steps_asking_states": hooks["steps_asking_states"], "states_asked": hooks["states_asked"],
        "trail_critical_ms_per_step": critical, "hooks": per_step,
        "live": v.live_stats(folder / "server.log"),
        **{k: result.get(k) for k in ("completed", "mean_e2el_ms", "mean_ttft_ms", "mean_itl_ms", "output_throughput")}})
    state.update(facts=merged_facts(state.get("facts", {}), argv), logs=str(folder))
    write_results(out, state)


if __name__ == "__main__":
    main()
