"""The offline pipeline's stages: one module per `trail-probe` command, in pipeline order.

Each stage module defines HELP, EXAMPLES, optionally add_arguments(parser), and run(cfg, args). A
stage never imports another stage: what two stages share lives in `trail_probe.offline` (data,
training modules, reports), `trail_probe.runtime` (what a server loads) or `trail_probe.serving`
(schedulers, engines, the simulator). Modules are imported only when their command runs.
"""

# command -> (module, runs in `trail-probe pipeline`, the flags that make it resume instead of start over)
COMMANDS: dict[str, tuple[str, bool, dict]] = {
    "extract": ("trail_probe.stages.extract", True, {}),
    "train": ("trail_probe.stages.train", True, {"resume": True}),
    "train-baseline": ("trail_probe.stages.baseline", True, {"resume": True}),
    "eval": ("trail_probe.stages.evaluate", True, {}),
    "export": ("trail_probe.stages.export", True, {}),
    "simulate": ("trail_probe.stages.simulate", True, {}),
    "serve-bench": ("trail_probe.stages.serve_bench", False, {}),
    "predict": ("trail_probe.stages.predict", False, {}),
    "serve": ("trail_probe.stages.serve", False, {}),
    "pipeline": ("trail_probe.stages.pipeline", False, {}),
}

PIPELINE = [name for name, (_, in_pipeline, _) in COMMANDS.items() if in_pipeline]
