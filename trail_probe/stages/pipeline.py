"""Run every stage end to end: extract -> train -> train-baseline -> eval -> export -> simulate.

    trail-probe pipeline recipes/smollm2_alpaca.yaml
    trail-probe pipeline recipes/smollm2_alpaca.yaml --from eval      # re-run the later stages only

Each stage is the same code as its own subcommand, with that subcommand's default flags, and
each resumes: extract continues from its shards, train keeps finished probes and continues the
rest from their last checkpoint, the BERT baseline continues from its last finished epoch and is
kept once trained. Stage wall times are written to
`<checkpoint_dir>/pipeline_timings.json` (the report quotes them): per stage the seconds of every
run it took, an interrupted one included (Ctrl-C or an error at once, kill -9 through a heartbeat
written every 30 s), and their sum. Interrupt at any time and run
the same command again.
"""

from __future__ import annotations

import argparse
import importlib
import json
import threading
import time

from trail_probe.atomic import atomic_write_json
from trail_probe.config import RecipeConfig
from trail_probe.stages import COMMANDS, PIPELINE

HELP = "Run extract, train, train-baseline, eval, export and simulate in order, resuming each."
EXAMPLES = """examples:
  trail-probe pipeline recipes/smollm2_alpaca.yaml
  trail-probe pipeline recipes/smollm2_alpaca.yaml --from eval
  trail-probe pipeline recipes/smollm2_alpaca.yaml --skip simulate prompts.num_prompts=200 run_name=small"""


def add_arguments(parser) -> None:
    names = PIPELINE
    parser.add_argument("--from", dest="start", choices=names, default="extract", help="first stage to run")
    parser.add_argument("--skip", nargs="*", choices=names, default=[], help="stages to leave out")


def _stage_args(module, overrides: dict) -> argparse.Namespace:
    """The stage's own defaults (as if run bare from the CLI), then the pipeline's resume flags."""
    parser = argparse.ArgumentParser()
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        if hasattr(args, key):
            setattr(args, key, value)
    return args


HEARTBEAT_S = 30.0  # a running stage's seconds so far reach pipeline_timings.json this often (kill -9 loses at most this)


class _StageClock:
    """Wall time of one stage across interruptions: a run that was stopped (Ctrl-C, an error, or
    kill -9, seen through the heartbeat it left) is kept in the stage's `runs`, and `seconds` is the
    sum of the runs that completed the stage. `clock`: seconds now (tests pass one they move by hand)."""

    def __init__(self, path, timings: dict, name: str, clock=time.time):
        self.path, self.timings, self.name, self.clock = path, timings, name, clock
        entry = timings.get(name) or {}
        # interrupted runs since the stage last completed (a heartbeat left by kill -9 is one of them)
        self.runs = [] if "finished" in entry else [r for r in entry.get("runs", []) if r.get("interrupted")]
        if "running" in entry:
            self.runs.append({**entry["running"], "interrupted": True})
        self.start = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _write(self, running: dict | None = None, done: bool = False, interrupted: bool = False) -> None:
        seconds = round(self.clock() - self.start, 1)
        entry = {"runs": self.runs}
        if running is not None:
            entry["running"] = running
        if interrupted:
            entry["runs"] = self.runs + [{"seconds": seconds, "interrupted": True}]
        if done:
            runs = self.runs + [{"seconds": seconds}]
            entry = {"seconds": round(sum(r["seconds"] for r in runs), 1), "runs": runs,
                     "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.timings[self.name] = entry
        atomic_write_json(self.path, self.timings)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write(running={"seconds": round(self.clock() - self.start, 1)})

    def __enter__(self) -> "_StageClock":
        self._write(running={"seconds": 0.0})
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._write(done=exc_type is None, interrupted=exc_type is not None)


def run(cfg: RecipeConfig, args) -> None:
    timings_path = cfg.paths.timings
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for name in PIPELINE[PIPELINE.index(args.start):]:
        module_name, _, flags = COMMANDS[name]
        if name in args.skip:
            continue
        print(f"\n===== pipeline: {name} =====", flush=True)
        module = importlib.import_module(module_name)
        with _StageClock(timings_path, timings, name):
            module.run(cfg, _stage_args(module, flags))
    print("\npipeline: stage wall times (s): " + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in timings.items()
                                                         if "seconds" in v))
