"""`trail-probe extract --ray`: the workers as Ray tasks on a local cluster (slow: Ray starts in ~10 s)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_prompts

from trail_probe.cli import main
from trail_probe.config import load_recipe
from trail_probe.offline.store import Extraction
from trail_probe.stages.extract import run_extract

pytest.importorskip("ray")


def _overrides(model, prompts, out):
    return [f"model.name_or_path={model}", f"prompts.source={prompts}", f"extract.out_dir={out}",
            "generation.max_new_tokens=24", "generation.batch_size=3", "extract.decode_stride=2", "extract.shard_size=2",
            "extract.storage_dtype=float32"]


@pytest.mark.slow
def test_two_ray_workers_extract_every_prompt_once_as_one_worker_does(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=9)
    one = run_extract(load_recipe("recipes/smollm2_alpaca_hf.yaml", _overrides(tiny_llama, prompts, tmp_path / "one")), show_progress=False)
    out = tmp_path / "ray"
    assert main(["extract", "recipes/smollm2_alpaca_hf.yaml", *_overrides(tiny_llama, prompts, out), "--ray", "--num-workers", "2"]) == 0
    a, b = Extraction(one), Extraction(out)
    assert b.manifest["num_workers"] == 2
    statuses = [json.loads((out / "workers" / f"worker-{i}.json").read_text()) for i in range(2)]
    assert all(st["complete"] for st in statuses) and sum(st["expected"] for st in statuses) == 9
    assert all(st["expected"] > 0 for st in statuses)  # both workers had prompts
    ref = {r["id"]: r for r in a.records}
    assert sorted(r["id"] for r in b.records) == sorted(ref)  # every prompt exactly once
    for r in b.records:
        assert r == ref[r["id"]]
    order = [a.ids.index(rid) for rid in b.ids]
    torch.testing.assert_close(b.prompt_states(1), a.prompt_states(1)[order], atol=1e-5, rtol=1e-5)
    # The same command again: every worker is complete, nothing is extracted twice.
    stamp = sorted(p.stat().st_mtime_ns for p in (out / "shards").iterdir())
    assert main(["extract", "recipes/smollm2_alpaca_hf.yaml", *_overrides(tiny_llama, prompts, out), "--ray", "--num-workers", "2"]) == 0
    assert sorted(p.stat().st_mtime_ns for p in (out / "shards").iterdir()) == stamp
