"""`extract.engine=vllm`: the same extraction as the transformers path (the reference), from vLLM's
default multiprocess engine (slow: a vLLM engine takes about 30 s to start on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_prompts

from trail_probe.config import load_recipe
from trail_probe.offline.store import Extraction
from trail_probe.stages.extract import run_extract


def _cfg(model, prompts, out, engine, *extra):
    return load_recipe(None, [
        f"model.name_or_path={model}", f"prompts.source={prompts}", f"extract.out_dir={out}", f"extract.engine={engine}",
        "generation.max_new_tokens=40", "generation.batch_size=4", "extract.decode_stride=3", "extract.shard_size=3",
        "extract.storage_dtype=float32", "extract.vllm_kv_cache_gb=0.125", *extra,
    ])


def _by_request(ex: Extraction, layers) -> dict:
    out = {}
    for layer in layers:
        dec = ex.decode(layer)
        prompt = ex.prompt_states(layer)
        for i, record in enumerate(ex.records):
            rows = dec.request == i
            out.setdefault(record["id"], {"record": record})[layer] = (prompt[i], dec.generated[rows], dec.states[rows])
    return out


@pytest.mark.slow
def test_vllm_extraction_equals_the_transformers_extraction(vllm_llama, tmp_path):
    """Records identical (tokens, lengths, responses), prompt means and decode states equal to fp32
    tolerance, with prefills split into 16-token chunks and requests joining and leaving vLLM's batch."""
    rows = [{"id": f"p{i}", "prompt": f"Tell me fact number {i} about " + "the very deep blue sea " * (i % 4)}
            for i in range(11)]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows=rows)
    hf = run_extract(_cfg(vllm_llama, prompts, tmp_path / "hf", "hf"), show_progress=False)
    vl = run_extract(_cfg(vllm_llama, prompts, tmp_path / "vllm", "vllm", "extract.vllm_max_batch_tokens=16"),
                     show_progress=False)
    a, b = Extraction(hf), Extraction(vl)
    assert a.manifest["model"]["engine"] == "hf" and b.manifest["model"]["engine"] == "vllm"
    assert b.manifest["identity"]["engine"] == "vllm" and b.manifest["model"]["dtype"] == "float32"
    layers = a.decode_layers
    assert layers == b.decode_layers == [0, 1, 2] and a.prompt_layers == b.prompt_layers
    ref, got = _by_request(a, layers), _by_request(b, layers)
    assert sorted(ref) == sorted(got) == sorted(r["id"] for r in rows)
    lengths = [ref[k]["record"]["output_tokens"] for k in ref]
    assert len(set(lengths)) > 3 and max(lengths) > 10, lengths  # varied answers, several decode samples
    assert max(ref[k]["record"]["prompt_tokens"] for k in ref) > 16  # some prompts take more than one chunk
    for rid in ref:
        assert got[rid]["record"] == ref[rid]["record"], rid
        for layer in layers:
            (p_ref, g_ref, s_ref), (p_got, g_got, s_got) = ref[rid][layer], got[rid][layer]
            torch.testing.assert_close(p_got, p_ref, atol=1e-4, rtol=1e-4)
            assert g_got.tolist() == g_ref.tolist(), (rid, layer)
            torch.testing.assert_close(s_got, s_ref, atol=1e-4, rtol=1e-4)
    # Resumable like the transformers path: a finished extraction is left as it is.
    stamp = sorted(p.stat().st_mtime_ns for p in (vl / "shards").iterdir())
    run_extract(_cfg(vllm_llama, prompts, tmp_path / "vllm", "vllm", "extract.vllm_max_batch_tokens=16"),
                show_progress=False)
    assert sorted(p.stat().st_mtime_ns for p in (vl / "shards").iterdir()) == stamp
    status = json.loads((vl / "workers" / "worker-0.json").read_text())
    assert status["complete"] and status["done"] == len(rows)
