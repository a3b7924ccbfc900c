"""`trail-probe`: one console script, one subcommand per pipeline stage.

    trail-probe extract recipes/smollm2_alpaca.yaml prompts.num_prompts=64
    trail-probe train recipes/smollm2_alpaca.yaml train.layers=all

Each subcommand lives in its own module of `trail_probe.stages` (the table is `stages.COMMANDS`), which defines:
    HELP: str                      one line for the command list
    EXAMPLES: str                  shown in the subcommand's --help epilog
    add_arguments(parser)          optional: extra flags (--resume, --overwrite, ...)
    run(cfg: RecipeConfig, args)   the stage itself
Modules are imported only when their subcommand runs, so `extract` never imports Lightning.
A `UserError` is printed as one line and exits with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys

from trail_probe.config import format_config, load_recipe
from trail_probe.errors import UserError
from trail_probe.stages import COMMANDS

OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")  # a dotted key, then =


def _available_commands() -> dict[str, str]:
    return {name: module for name, (module, _, _) in COMMANDS.items() if importlib.util.find_spec(module) is not None}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trail-probe",
        description="Teach an LLM server how long each answer will be (TRAIL, ICLR 2025).",
        epilog="Run 'trail-probe COMMAND --help' for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = _available_commands()
    # Import only the module of the subcommand being run (or all of them for a bare --help).
    wanted = next((a for a in argv if a in commands), None)
    for name, module_name in commands.items():
        module = importlib.import_module(module_name) if name == wanted else None
        p = sub.add_parser(
            name,
            help=getattr(module, "HELP", None) if module else _first_doc_line(module_name),
            epilog=getattr(module, "EXAMPLES", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=getattr(module, "HELP", None),
        )
        p.add_argument("recipe", help="YAML recipe, e.g. recipes/smollm2_alpaca.yaml")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=5")
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _first_doc_line(module_name: str) -> str:
    """The module docstring's first line, read without importing the module."""
    import ast

    spec = importlib.util.find_spec(module_name)
    try:
        with open(spec.origin) as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except OSError:
        return ""
    return doc.splitlines()[0] if doc else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:  # what follows goes to the engine unchanged (trail-probe serve RECIPE -- --port 8001)
        argv, passthrough = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    parser = build_parser(argv)
    # key=value overrides may also follow a command's options (`extract R --ray --num-workers 2 a.b=c`),
    # where argparse has already closed the positional list
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not OVERRIDE.match(a)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.passthrough = passthrough
    if passthrough and not getattr(getattr(args, "_module", None), "TAKES_PASSTHROUGH", False):
        parser.error(f"'{args.command}' takes no arguments after '--' (only 'serve' passes them to vLLM)")
    if args.command is None:
        parser.print_help()
        return 1
    cfg = None
    before: dict = {}
    try:
        # A command that takes free inputs (predict's prompt) gets the arguments that are not key=value
        args.inputs = [a for a in args.overrides if not OVERRIDE.match(a)]
        if args.inputs and not getattr(args._module, "TAKES_INPUTS", False):
            raise UserError(f"override '{args.inputs[0]}' is not of the form key=value, e.g. train.epochs=5")
        cfg = load_recipe(args.recipe, [a for a in args.overrides if OVERRIDE.match(a)])
        before = {p: p.exists() for p in _output_folders(cfg)}
        if not os.environ.get("TRAIL_PROBE_QUIET"):
            print(f"# trail-probe {args.command}: resolved config\n{format_config(cfg)}\n", flush=True)
        args._module.run(cfg, args)
    except UserError as e:
        _remove_empty_new_folders(before)
        print(f"trail-probe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trail-probe {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _output_folders(cfg) -> list:
    p = cfg.paths
    return [p.data, p.checkpoints, p.baseline, p.eval, p.predictor, p.simulate, p.serve]


def _remove_empty_new_folders(before: dict) -> None:
    """A failed command leaves no output folder it created that holds no file."""
    import shutil

    for folder, existed in before.items():
        if not existed and folder.is_dir() and not any(f.is_file() for f in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)


def entry() -> None:
    """The console script: `main`, then Ctrl-C is ignored while the interpreter shuts down (atexit
    handlers of wandb, torch and vLLM would otherwise print a traceback for it)."""
    import signal

    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
