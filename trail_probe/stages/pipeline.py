"""Run every stage end to end: extract -> train -> train-baseline -> eval -> export -> simulate.

    trail-probe pipeline recipes/smollm2_alpaca.yaml
    trail-probe pipeline recipes/smollm2_alpaca.yaml --from eval      # re-run the later stages only

Each stage is the same code as its own subcommand, with that subcommand's default flags, and
each resumes: extract continues from its shards, train keeps finished probes and continues the
rest from their last checkpoint, the BERT baseline continues from its last finished epoch and is
kept once trained. Stage wall times are written to
`<checkpoint_dir>/pipeline_timings.json` (the report quotes them). Interrupt at any time and run
the same command again.
"""

from __future__ import annotations

import argparse
import importlib
import json
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


def run(cfg: RecipeConfig, args) -> None:
    timings_path = cfg.paths.timings
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for name in PIPELINE[PIPELINE.index(args.start):]:
        module_name, _, flags = COMMANDS[name]
        if name in args.skip:
            continue
        print(f"\n===== pipeline: {name} =====", flush=True)
        module = importlib.import_module(module_name)
        start = time.time()
        module.run(cfg, _stage_args(module, flags))
        timings[name] = {"seconds": round(time.time() - start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(timings_path, timings)
    print("\npipeline: stage wall times (s): " + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in timings.items()))
