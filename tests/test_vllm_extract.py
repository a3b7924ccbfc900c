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
        "extract.storage_dtype=float32", "extract.vllm_kv_cache_gb=0.125", "extract.inputs=all", *extra,
    ])


PROMPT_KINDS, DECODE_KINDS = ("mean", "last", "entropy"), ("current", "mean", "entropy")


def _by_request(ex: Extraction, layers) -> dict:
    """{id: {"record", layer: (prompt inputs [3, d], generated, decode inputs [3, m, d])}} over every
    stored input (runtime/probe_inputs.py)."""
    out = {}
    for layer in layers:
        decs = [ex.decode(layer, kind) for kind in DECODE_KINDS]
        prompt = torch.stack([ex.prompt_states(layer, kind) for kind in PROMPT_KINDS], 1)
        for i, record in enumerate(ex.records):
            rows = decs[0].request == i
            out.setdefault(record["id"], {"record": record})[layer] = (
                prompt[i], decs[0].generated[rows], torch.stack([dec.states[rows] for dec in decs]))
    return out


@pytest.mark.slow
def test_vllm_extraction_equals_the_transformers_extraction(vllm_llama, tmp_path):
    """Records identical (tokens, lengths, responses), every stored input (prompt mean, last token and
    entropy pool; decode state, running mean and entropy pool) equal to fp32 tolerance, with prefills
    split into 16-token chunks and requests joining and leaving vLLM's batch; and each prompt's sampled
    answer lengths (extract.num_samples) stored beside, drawn once."""
    rows = [{"id": f"p{i}", "prompt": f"Tell me fact number {i} about " + "the very deep blue sea " * (i % 4)}
            for i in range(11)]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows=rows)
    hf = run_extract(_cfg(vllm_llama, prompts, tmp_path / "hf", "hf"), show_progress=False)
    vllm_args = ("extract.vllm_max_batch_tokens=16", "extract.num_samples=3", "generation.temperature=0.8")
    vl = run_extract(_cfg(vllm_llama, prompts, tmp_path / "vllm", "vllm", *vllm_args), show_progress=False)
    a, b = Extraction(hf), Extraction(vl)
    assert a.manifest["model"]["engine"] == "hf" and b.manifest["model"]["engine"] == "vllm"
    assert b.manifest["identity"]["engine"] == "vllm" and b.manifest["model"]["dtype"] == "float32"
    layers = a.decode_layers
    assert layers == b.decode_layers == [0, 1, 2] and a.prompt_layers == b.prompt_layers
    assert a.inputs == b.inputs == {"prompt": list(PROMPT_KINDS), "decode": list(DECODE_KINDS)}
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
    sampled = b.sampled_lengths()
    assert sampled.shape == (len(rows), 3) and int(sampled.min()) >= 0 and int(sampled.max()) <= 40
    assert (sampled != b.output_tokens[:, None]).any()  # sampled, not the greedy answer again
    # Resumable like the transformers path: a finished extraction (samples included) is left as it is.
    stamp = sorted(p.stat().st_mtime_ns for p in [*(vl / "shards").iterdir(), *(vl / "samples").iterdir()])
    run_extract(_cfg(vllm_llama, prompts, tmp_path / "vllm", "vllm", *vllm_args), show_progress=False)
    assert sorted(p.stat().st_mtime_ns for p in [*(vl / "shards").iterdir(), *(vl / "samples").iterdir()]) == stamp
    status = json.loads((vl / "workers" / "worker-0.json").read_text())
    assert status["complete"] and status["done"] == len(rows)


@pytest.mark.slow
def test_a_compiled_extraction_reads_the_same_states_as_the_eager_one(vllm_llama, tmp_path):
    """extract.vllm_compile=true: vLLM's compiled graphs, each layer's state read as the model's auxiliary
    output (no forward hooks): the same records, and every stored input equal to fp32 tolerance, as the
    eager extraction's forward hooks give, chunked prefills included."""
    rows = [{"id": f"p{i}", "prompt": f"Say something about number {i} and " + "the quiet green hills " * (i % 3)}
            for i in range(7)]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows=rows)
    common = ("extract.vllm_max_batch_tokens=16",)
    eager = Extraction(run_extract(_cfg(vllm_llama, prompts, tmp_path / "eager", "vllm", *common), show_progress=False))
    compiled = Extraction(run_extract(_cfg(vllm_llama, prompts, tmp_path / "compiled", "vllm", *common,
                                           "extract.vllm_compile=true"), show_progress=False))
    assert eager.manifest["identity"] == compiled.manifest["identity"]  # how the states are read is not what they are
    ref, got = _by_request(eager, eager.decode_layers), _by_request(compiled, compiled.decode_layers)
    assert sorted(ref) == sorted(got) == sorted(r["id"] for r in rows)
    for rid in ref:
        assert got[rid]["record"] == ref[rid]["record"], rid
        for layer in eager.decode_layers:
            (p_ref, g_ref, s_ref), (p_got, g_got, s_got) = ref[rid][layer], got[rid][layer]
            torch.testing.assert_close(p_got, p_ref, atol=1e-4, rtol=1e-4)
            assert g_got.tolist() == g_ref.tolist(), (rid, layer)
            torch.testing.assert_close(s_got, s_ref, atol=1e-4, rtol=1e-4)
