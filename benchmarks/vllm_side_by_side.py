"""Where a server's step time goes, several servers side by side: the worker's forward pass, its sampling, and
the engine core's part between passes, compared at equal batch size in the same minutes (immune to the drift
that end-to-end runs on this machine suffer: each server's speed is read against the others' in windows
a few seconds apart, never in runs minutes apart).

    python benchmarks/vllm_side_by_side.py                                  # fcfs,aux,trail; 8 and 16 in flight
    python benchmarks/vllm_side_by_side.py --servers fcfs,trail,trailfree --reps 3
    python benchmarks/vllm_side_by_side.py --servers fcfs,trail --load open --reps 2   # 0.8x, vLLM's client

Servers (all started first, each with `--gpu-memory-utilization 0.45/len(servers)` so they fit together;
the KV cache's size does not change a step's cost at these batch sizes):
- `fcfs`, `aux`: as in vllm_cost_bisect.py (vLLM's defaults; + the probe layers' auxiliary outputs);
- `trail`: `trail-probe serve RECIPE`; `trailfree`: the same with TRAIL_PROBE_VLLM_PIN=0 (the engine core
  left where the OS puts it, as vLLM does).
Load: windows of `--window` seconds, each on one server, rotating over the servers (the order reversed
every second rep), at each `--levels` count of requests in flight (closed loop, streamed chat
completions of 128 tokens, EOS ignored, greedy), a pause between windows so the idle servers' workers
stop spinning. `--load open`: instead, vLLM's own client (as in vllm_serve_client.py) sends the recipe's
200 held-out prompts at `--rate` req/s (0.8x of the saturation vllm_serve_client.py measured) to each
server in turn, the same servers throughout: end-to-end latency without a fresh server per run. Every pass of every worker is timed (worker_step_timer/sitecustomize.py); per server and
per batch size (decode-only passes) the median forward pass, sampling and gap, then each server's
difference from the first, averaged over the batch sizes all servers ran. Results:
benchmarks/results/vllm_side_by_side.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vllm_cost_bisect as bisect  # noqa: E402
import vllm_serve_client as v  # noqa: E402
from results_file import run_facts, write_results  # noqa: E402

PARTS = ("forward", "sample", "gap", "step")


def command(kind: str, args, model: Path, port: int, share: float, timer_out: str) -> tuple[list[str], dict]:
    args.port = port
    cmd, env = bisect.command("trail" if kind == "trailfree" else kind, args, model)
    if kind in ("trail", "trailfree"):
        env["TRAIL_PROBE_VLLM_PIN"] = "0" if kind == "trailfree" else "1"
    if "--gpu-memory-utilization" in cmd:
        cmd[cmd.index("--gpu-memory-utilization") + 1] = f"{share:.3f}"
    else:
        cmd += ["--gpu-memory-utilization", f"{share:.3f}"]
    env.update(PYTHONPATH=os.pathsep.join(p for p in [str(HERE / "worker_step_timer"), env.get("PYTHONPATH", "")] if p),
               TRAIL_STEP_TIMER_OUT=timer_out)
    return cmd, env


async def window(session, port: int, in_flight: int, seconds: float, prompts: list[str], rng: random.Random) -> int:
    """`in_flight` closed-loop clients on one server for `seconds`; returns the requests completed."""
    url, end = f"http://127.0.0.1:{port}/v1/chat/completions", time.perf_counter() + seconds

    async def client() -> int:
        done = 0
        while time.perf_counter() < end:
            body = {"model": "model", "messages": [{"role": "user", "content": rng.choice(prompts)}], "max_tokens": 128,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            async with session.post(url, json=body) as r:
                r.raise_for_status()
                async for _ in r.content:
                    pass
            done += 1
        return done

    return sum(await asyncio.gather(*[client() for _ in range(in_flight)]))


async def drive(ports: dict, a, prompts: list[str]) -> list[dict]:
    import aiohttp

    rng, windows = random.Random(0), []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for rep in range(a.reps):
            for in_flight in a.levels:
                for kind in (list(ports) if rep % 2 == 0 else list(ports)[::-1]):
                    t0 = time.perf_counter()
                    done = await window(session, ports[kind], in_flight, a.window, prompts, rng)
                    windows.append({"server": kind, "rep": rep, "in_flight": in_flight, "t0": t0, "t1": time.perf_counter(),
                                    "requests": done})
                    print(f"  rep {rep} {in_flight:>3} in flight {kind:<10} {done} requests", flush=True)
                    await asyncio.sleep(2.5)  # the next server's worker alone on its core
    return windows


def drive_open(ports: dict, a, args, model: Path, dataset: Path, folder: Path) -> list[dict]:
    """vLLM's client at `--rate` on each server in turn (the order reversed every second rep)."""
    windows = []
    for rep in range(a.reps):
        for kind in (list(ports) if rep % 2 == 0 else list(ports)[::-1]):
            tag, t0 = f"open_{rep}_{kind}", time.perf_counter()
            client = v.open_loop_client(ports[kind], model, dataset, folder, tag, a.rate)
            subprocess.run(client, check=True, stdout=subprocess.DEVNULL, stderr=open(folder / f"{tag}.client.log", "w"))
            r = json.loads((folder / f"{tag}.json").read_text())
            windows.append({"server": kind, "rep": rep, "in_flight": "open", "t0": t0, "t1": time.perf_counter(),
                            **{k: r.get(k) for k in bisect.FIELDS}})
            print(f"  rep {rep} {kind:<10} mean latency {r['mean_e2el_ms'] / 1e3:.2f} s, TTFT {r['mean_ttft_ms']:.0f} ms, "
                  f"ITL {r['mean_itl_ms']:.1f} ms", flush=True)
            time.sleep(2.5)
    return windows


def load_rows(folder: Path, prefix: str) -> list[list]:
    """Every timed pass of the server whose timer files start with `prefix` (one file per worker process)."""
    rows = []
    for f in sorted(folder.glob(f"{prefix}_*.json")):
        rows += json.loads(f.read_text())
    return rows


def medians_by_batch(rows: list[list], windows: list[dict]) -> dict[int, dict[str, float]]:
    """Per batch size: the median of each part over the decode-only passes that ran inside `windows`."""
    spans = [(w["t0"], w["t1"] + 1.0) for w in windows]
    by_n: dict[int, list] = {}
    for start, fwd, smp, gap, n, tokens in rows:
        if tokens == n and gap is not None and any(lo <= start <= hi for lo, hi in spans):
            by_n.setdefault(int(n), []).append((fwd, smp, gap, fwd + smp + gap))
    return {n: {p: statistics.median(x[i] for x in xs) for i, p in enumerate(PARTS)} for n, xs in by_n.items() if len(xs) >= 8}


def compare(rows: dict[str, list], windows: list[dict], rep: int | None) -> dict:
    """Each server's median parts (mean over the batch sizes every server ran) and its difference from the first."""
    med = {k: medians_by_batch(r, [w for w in windows if w["server"] == k and (rep is None or w["rep"] == rep)])
           for k, r in rows.items()}
    common = sorted(set.intersection(*(set(m) for m in med.values())))
    first = next(iter(med))
    out = {}
    for k, m in med.items():
        out[k] = {"batch_sizes": len(common), **{f"{p}_ms": statistics.mean(m[n][p] for n in common) for p in PARTS},
                  **{f"{p}_diff_ms": statistics.mean(m[n][p] - med[first][n][p] for n in common) for p in PARTS},
                  "step_diff_pct": 100 * statistics.mean(m[n]["step"] / med[first][n]["step"] - 1 for n in common)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="fcfs,aux,trail")
    p.add_argument("--levels", default="8,16", help="requests in flight, one window per server at each")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--window", type=float, default=20.0, help="seconds of load per window")
    p.add_argument("--load", choices=("closed", "open"), default="closed")
    p.add_argument("--rate", default="1.0612", help="--load open: requests/s (0.8x of the last measured saturation, 1.327)")
    p.add_argument("--out", default=str(HERE / "results" / "vllm_side_by_side.json"))
    a = p.parse_args(argv)
    a.levels = [int(x) for x in a.levels.split(",")]
    kinds = a.servers.split(",")
    args = v.parse_args(["--num-prompts", "200"])
    model, folder, dataset, _, _ = v.prepare(args, "vllm_side_by_side_")
    prompts = [json.loads(line)["prompt"] for line in dataset.read_text().splitlines()]
    ports = {k: 8401 + i for i, k in enumerate(kinds)}
    procs = {}
    try:
        for kind in kinds:
            cmd, env = command(kind, args, model, ports[kind], 0.45 / len(kinds), str(folder / f"steps_{kind}"))
            with open(folder / f"{kind}.server.log", "w") as log:
                procs[kind] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            v.wait_ready(ports[kind], procs[kind])
            print(f"{kind} ready on port {ports[kind]}", flush=True)
        windows = asyncio.run(drive(ports, a, prompts)) if a.load == "closed" else \
            drive_open(ports, a, args, model, dataset, folder)
        time.sleep(7)  # the workers' last rows
    finally:
        for proc in procs.values():
            v.stop(proc)
    rows = {k: load_rows(folder, f"steps_{k}") for k in kinds}
    per_rep = [compare(rows, windows, r) for r in range(a.reps)]
    overall = compare(rows, windows, None)
    print(f"{'server':<11}{'forward ms':>11}{'sample ms':>10}{'gap ms':>8}{'step ms':>9}{'step vs ' + kinds[0]:>16}   per rep")
    for k, s in overall.items():
        reps = ", ".join(f"{r[k]['step_diff_pct']:+.1f}%" for r in per_rep)
        print(f"{k:<11}{s['forward_ms']:>11.2f}{s['sample_ms']:>10.2f}{s['gap_ms']:>8.2f}{s['step_ms']:>9.2f}"
              f"{s['step_diff_ms']:>+10.2f} ms{s['step_diff_pct']:>+6.1f}%   {reps}")
    if a.load == "open":
        for rep in range(a.reps):
            runs = {w["server"]: w for w in windows if w["rep"] == rep}
            print(f"rep {rep}: " + ", ".join(f"{k} / {kinds[0]} mean latency {runs[k]['mean_e2el_ms'] / runs[kinds[0]]['mean_e2el_ms']:.3f}"
                                             for k in kinds[1:]))
    write_results(Path(a.out), {"servers": kinds, "load": a.load, "rate": a.rate if a.load == "open" else None, "levels": a.levels, "reps": a.reps, "window_s": a.window,
                                "overall": overall, "per_rep": per_rep, "windows": windows,
                                "facts": run_facts(argv), "logs": str(folder)})


if __name__ == "__main__":
    main()
