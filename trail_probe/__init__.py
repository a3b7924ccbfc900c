"""trail_probe: predict LLM output length from the serving model's own hidden states (TRAIL)."""

__version__ = "0.1.0"
