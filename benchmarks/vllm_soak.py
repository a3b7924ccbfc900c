"""Long uptime in the server people run: thousands of short requests, some dropped by their client mid-stream,
against `trail-probe serve`, with the engine-core process's resident memory from start to end.

    python benchmarks/vllm_soak.py                                   # 5,000 requests, 15% aborted mid-stream
    python benchmarks/vllm_soak.py --requests 500 --out /tmp/soak.json   # a quick look

The server is `trail-probe serve RECIPE` at vLLM's defaults (the recipe's predictor and prompt probe).
The client (aiohttp, `--concurrency` requests in flight) sends chat requests over the recipe's held-out
prompts: `max_tokens` drawn from 1..32, every other one streamed, a share of the streamed ones closed by
the client after their first chunk (vLLM aborts them), every 100th with n = 2 (sampled) and every 100th a
request vLLM must refuse with HTTP 400 (n = 2 with greedy sampling). Resident memory (RSS)
of the engine-core process (where TRAIL's scheduler keeps its per-request state) and of the model
worker is read after a warm-up and then every 500 requests; the growth from the first reading to the
last is what the target (under 50 MB) is about. Every request must end complete (HTTP 200, a finish
reason), aborted by its own client, or (the bad ones) refused with HTTP 400; anything else is a failure.
Results: benchmarks/results/vllm_soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import run_facts, write_results  # noqa: E402
from vllm_serve_client import stop, wait_ready  # noqa: E402

RESULTS = HERE / "results" / "vllm_soak.json"
MB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/smollm2_alpaca.yaml")
    p.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for the server")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--abort-share", type=float, default=0.15, help="share of the streamed requests dropped mid-stream")
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--warmup", type=int, default=200, help="requests before the first memory reading")
    p.add_argument("--port", type=int, default=8390)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def processes(server_pid: int) -> dict:
    """The server's engine-core and worker processes (vLLM names them in their process titles)."""
    import psutil

    found = {}
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            title = " ".join(child.cmdline()) + " " + child.name()
        except psutil.Error:
            continue
        if "EngineCore" in title and "engine_core" not in found:
            found["engine_core"] = child
        elif ("Worker" in title or "VllmWorker" in title) and "worker" not in found:
            found["worker"] = child
    return found


def rss_mb(procs: dict) -> dict:
    return {name: round(p.memory_info().rss / MB, 1) for name, p in procs.items()}


async def one_request(session, url: str, i: int, prompt: str, rng: random.Random, abort_share: float) -> str:
    stream = i % 2 == 1
    abort = stream and rng.random() < abort_share
    n = 2 if i % 50 == 0 else 1  # i even: never streamed
    bad = i % 100 == 50  # a request vLLM must refuse: n = 2 with greedy sampling
    sampled = (i % 3 == 0 or n == 2) and not bad
    body = {"model": "model", "messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(1, 32),
            "temperature": 0.8 if sampled else 0.0, "stream": stream, "n": n}
    async with session.post(url, json=body) as resp:
        if bad:
            return "refused_400" if resp.status == 400 else f"bad_request_got_http_{resp.status}"
        if resp.status != 200:
            return f"http_{resp.status}"
        if not stream:
            data = await resp.json()
            return "completed" if all(c.get("finish_reason") for c in data["choices"]) else "no_finish_reason"
        async for line in resp.content:
            if abort:
                return "aborted"  # leaving the block closes the connection: vLLM aborts the request
            if line.startswith(b"data: [DONE]"):
                return "completed"
    return "stream_ended_early"


async def drive(args, prompts: list[str], procs: dict, readings: list) -> dict:
    import aiohttp

    rng = random.Random(args.seed)
    url = f"http://127.0.0.1:{args.port}/v1/chat/completions"
    outcomes: dict[str, int] = {}
    todo = iter(range(args.requests))
    done = 0
    t0 = time.time()

    async def worker(session):
        nonlocal done
        for i in todo:
            try:
                got = await one_request(session, url, i, prompts[i % len(prompts)], rng, args.abort_share)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                got = f"client_error_{type(e).__name__}"
            outcomes[got] = outcomes.get(got, 0) + 1
            done += 1
            if done == args.warmup or (done > args.warmup and done % 500 == 0) or done == args.requests:
                readings.append({"requests": done, "seconds": round(time.time() - t0, 1), **rss_mb(procs)})
                print(f"{done:>6} requests {time.time() - t0:>7.1f} s  RSS {readings[-1]}  {outcomes}", flush=True)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
    return outcomes


def main(argv=None) -> None:
    args = parse_args(argv)
    from trail_probe.config import load_recipe
    from trail_probe.stages.serve_bench import held_out_prompts

    prompts = [p.text for p in held_out_prompts(load_recipe(args.recipe, args.overrides))]
    log = Path(tempfile.mkdtemp(prefix="vllm_soak_")) / "server.log"
    cmd = ["trail-probe", "serve", args.recipe, *args.overrides, "--", "--port", str(args.port), "--served-model-name", "model"]
    with open(log, "w") as f:
        server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    readings: list[dict] = []
    try:
        wait_ready(args.port, server)
        procs = processes(server.pid)
        if "engine_core" not in procs:
            raise SystemExit(f"no engine-core process found under the server (pid {server.pid}); see {log}")
        readings.append({"requests": 0, "seconds": 0.0, **rss_mb(procs)})
        t0 = time.time()
        outcomes = asyncio.run(drive(args, prompts, procs, readings))
        seconds = time.time() - t0
        alive = server.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=10) as r:
            healthy = r.status == 200
    finally:
        stop(server)
    after_warmup = next(r for r in readings if r["requests"] >= min(args.warmup, args.requests))
    growth = {k: round(readings[-1][k] - after_warmup[k], 1) for k in ("engine_core", "worker") if k in after_warmup}
    failures = sum(n for k, n in outcomes.items() if k not in ("completed", "aborted", "refused_400"))
    result = {"facts": run_facts(argv), "recipe": args.recipe, "overrides": args.overrides, "requests": args.requests,
              "concurrency": args.concurrency, "outcomes": outcomes, "failures": failures, "seconds": round(seconds, 1),
              "server_alive_at_end": alive, "healthy_at_end": healthy, "rss_mb": readings,
              "rss_growth_mb_after_warmup": growth, "target_growth_mb": 50, "server_log": str(log)}
    write_results(Path(args.out), result)
    print(f"{args.requests} requests in {seconds:.0f} s: {outcomes}; failures {failures}; "
          f"RSS growth after warm-up {growth} MB (target < 50); server healthy at the end: {healthy}")


if __name__ == "__main__":
    main()
