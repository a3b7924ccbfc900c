"""Where a run's stages read and write: declared once, derived from the recipe (`cfg.paths`).

    cfg.paths.data                    the extraction (extract.out_dir, default data/<run_name>)
    cfg.paths.probe("decode", "layer-19")
    cfg.paths.predictions             simulate's input (eval's predictions.json unless overridden)

Every default is derived from `run_name` (so one override moves a whole run) and the sections'
`out_dir` overrides; no stage builds a path of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """Every folder and file the stages read and write, derived once from `run_name` (so one override
    moves a whole run) and the sections' `out_dir` overrides. No stage builds a path of its own."""

    data: Path  # extract: the extraction (extract.out_dir, default data/<run_name>)
    checkpoints: Path  # train and everything after it (train.out_dir, default checkpoints/<run_name>)
    baseline: Path  # train-baseline (baseline.out_dir)
    eval: Path  # eval (eval.out_dir; eval_validation when it scores the validation side)
    predictor: Path  # export (export.out_dir)
    simulate: Path  # simulate (simulate.out_dir)
    predictions: Path  # simulate's input (simulate.predictions, default eval's predictions.json)
    serve: Path  # serve-bench (serve.out_dir)
    serve_predictor: Path  # serve-bench's probe (serve.predictor, default the export)
    serve_bert: Path  # serve-bench's BERT (serve.bert, default the baseline)

    @classmethod
    def of(cls, cfg) -> "RunPaths":
        data = Path(cfg.extract.out_dir or f"data/{cfg.run_name}")
        ck = Path(cfg.train.out_dir or f"checkpoints/{cfg.run_name}")
        baseline = Path(cfg.baseline.out_dir or ck / "baseline")
        eval_dir = Path(cfg.eval.out_dir or ck / ("eval" if cfg.eval.split == "held_out" else "eval_validation"))
        predictor = Path(cfg.export.out_dir or ck / "predictor")
        return cls(data=data, checkpoints=ck, baseline=baseline, eval=eval_dir, predictor=predictor,
                   simulate=Path(cfg.simulate.out_dir or ck / "simulate"),
                   predictions=Path(cfg.simulate.predictions or eval_dir / "predictions.json"),
                   serve=Path(cfg.serve.out_dir or ck / "serve"),
                   serve_predictor=Path(cfg.serve.predictor or predictor), serve_bert=Path(cfg.serve.bert or baseline))

    @property
    def split(self) -> Path:
        return self.checkpoints / "split.json"

    @property
    def probes(self) -> Path:
        return self.checkpoints / "probes"

    def probe(self, task: str, name: str) -> Path:
        """One probe's folder; `name` is `layer-<L>` or `<mode>-<first>-<last>` (train.ProbeSpec)."""
        return self.probes / task / name

    @property
    def logs(self) -> Path:
        return self.checkpoints / "logs"

    @property
    def sweep(self) -> Path:
        return self.checkpoints / "sweep"

    @property
    def sweep_summary(self) -> Path:
        return self.sweep / "layer_sweep.json"

    @property
    def timings(self) -> Path:
        return self.checkpoints / "pipeline_timings.json"
