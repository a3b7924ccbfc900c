"""What every benchmark's JSON records about its run, and the one way it is written."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch


def run_facts(argv=None) -> dict:
    """The machine, the versions and the command that reproduces the run."""
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}


def merged_facts(earlier: dict, argv=None) -> dict:
    """`run_facts` for a results file that earlier invocations also wrote runs into: every command kept."""
    facts = run_facts(argv)
    facts["commands"] = list(dict.fromkeys([*earlier.get("commands", [earlier["command"]] if "command" in earlier else []),
                                            facts["command"]]))
    return {**earlier, **facts}


def write_results(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
