"""Scheduling with length predictions: the policies (SPRPT with limited preemption), the
engine-agnostic TRAIL runtime, the transformers continuous-batching integration, and the simulator
with its cost model. Builds on `trail_probe.runtime`; nothing here imports the offline pipeline."""
