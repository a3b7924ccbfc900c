"""The recipe's serving sections as the serving layer's settings: one mapping, used by `trail-probe
serve`, serve-bench and predict.

    settings = trail_settings(cfg)                       # TRAIL with the recipe's predictor
    settings = trail_settings(cfg, policy="oracle", client_estimates=True)

The recipe's `refine:` section (interval, update rule, cadence, C, aging) and `serve:` section (the
initial estimate, predictor folders, TRAIL's running and prefill limits) fill `TrailSettings`; a
keyword argument overrides any field.
"""

from __future__ import annotations

from trail_probe.serving.trail_settings import TrailSettings


def trail_settings(cfg, **overrides) -> TrailSettings:
    sc, refine = cfg.serve, cfg.refine
    fields = {
        "predictor": str(cfg.paths.serve_predictor), "initial": sc.initial, "prompt_predictor": sc.prompt_predictor,
        "bert": str(cfg.paths.serve_bert) if sc.initial == "bert" else "", "refine_interval": refine.interval,
        "likelihood": refine.likelihood, "cadence": refine.cadence, "preemption_c": refine.preemption_c,
        "aging": refine.aging, "max_running": sc.max_running, "max_throughput_loss": sc.max_throughput_loss,
        "max_prefill_tokens": sc.max_prefill_tokens,
        "prefill_order": sc.prefill_order, "prefills_alone": sc.prefills_alone, "refine_when": sc.refine_when,
        "extraction_check": sc.vllm_extraction_check, "client_estimates": sc.initial == "bert",
    }
    return TrailSettings(**{**fields, **overrides})
