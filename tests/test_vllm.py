"""vLLM as a serving engine: the model folder it loads, and the engine itself on the embedded SmolLM2
(slow: a vLLM engine takes about 30 s to start on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch

from trail_probe.config import load_recipe
from trail_probe.model_files import PLAIN_SOURCE_FILE, file_sha256, plain_hf_folder, resolve_model_path
from trail_probe.runtime.models import encode_prompt


def test_a_plain_folder_or_hub_id_is_used_as_it_is(tiny_llama, tmp_path):
    cfg = load_recipe(None, [f"model.name_or_path={tiny_llama}"])
    assert plain_hf_folder(cfg.model, tmp_path / "cache") == tiny_llama
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_gguf_is_dequantized_once_into_a_plain_folder_that_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_recipe("recipes/smollm2_alpaca.yaml")
    folder = plain_hf_folder(cfg.model, tmp_path)
    where, gguf = resolve_model_path(cfg.model.name_or_path)
    record = json.loads((folder / PLAIN_SOURCE_FILE).read_text())
    assert record["gguf_sha256"] == file_sha256(f"{where}/{gguf}") and folder.name.endswith(record["gguf_sha256"][:16])
    assert (folder / "model.safetensors").is_file() and "quantization_config" not in json.loads((folder / "config.json").read_text())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert plain_hf_folder(cfg.model, tmp_path) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([encode_prompt(tokenizer, "Give three tips for staying healthy.")])
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, original(ids).logits)


# ------------------------------------------------------------------------------------------
# The engine: tiny random Llama with a head size vLLM's CPU attention takes
# ------------------------------------------------------------------------------------------
MAX_NEW = 64
TEXTS = [f"Tell me fact number {i} about {'cats' if i % 2 else 'the sea'}." for i in range(10)]


@pytest.fixture(scope="module")
def vllm_predictor(tmp_path_factory):
    """A probe on layer 1 that calls every answer long (its last bin), so a request BERT calls short
    outranks running ones once they have been refined."""
    from conftest import trail_weights, write_trail_dir

    w = trail_weights(d=128)
    w["fc2.weight"].mul_(0.01)
    w["fc2.bias"].zero_()
    w["fc2.bias"][-1] = 8.0
    return write_trail_dir(tmp_path_factory.mktemp("pred"), w, hidden_size=128, probe_layer_idx=1,
                           max_len=MAX_NEW, device="cpu")


def _requests(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [(f"r{i}", encode_prompt(tok, t), t) for i, t in enumerate(TEXTS)]


def test_bad_setups_fail_in_one_line_before_vllm_starts(vllm_llama, tiny_llama, vllm_predictor, tmp_path, monkeypatch,
                                                        capsys):
    pytest.importorskip("vllm")
    from conftest import trail_weights, write_trail_dir

    from trail_probe.errors import UserError
    from trail_probe.runtime import LengthPredictor
    from trail_probe.serving.trail_settings import TrailSettings
    from trail_probe.serving.vllm_checks import check_predictors, check_vllm
    from trail_probe.serving.vllm_engine import VLLMEngine, engine_kwargs

    def settings(folder, **kw):
        return TrailSettings(predictor=str(folder), initial="none", **kw)

    with pytest.raises(UserError, match="not one of fifo, priority"):
        engine_kwargs(vllm_llama, "lifo", None)
    with pytest.raises(UserError, match="needs TrailSettings"):
        engine_kwargs(vllm_llama, "trail", None)
    deep = write_trail_dir(tmp_path / "deep", trail_weights(d=128), hidden_size=128, probe_layer_idx=7, device="cpu")
    with pytest.raises(UserError, match="layers 0..2"):
        VLLMEngine(vllm_llama, "trail", settings(deep))
    with pytest.raises(UserError, match="width 128 but the model's are 64"):
        VLLMEngine(tiny_llama, "trail", settings(vllm_predictor))
    other = write_trail_dir(tmp_path / "other", trail_weights(d=128), hidden_size=128, probe_layer_idx=1, device="cpu")
    (other / "trail_probe.json").write_text(json.dumps({"serving_model": {"name_or_path": "elsewhere", "weights_sha256": "0" * 64}}))
    with pytest.raises(UserError, match="trained on 'elsewhere'"):
        VLLMEngine(vllm_llama, "trail", settings(other))
    # A probe trained on states transformers computed in fp32, served by vLLM in bf16: refused when asked,
    # else a warning on stderr; one extracted by vLLM in the serving dtype passes silently.
    hf32 = write_trail_dir(tmp_path / "hf32", trail_weights(d=128), hidden_size=128, probe_layer_idx=1, device="cpu")
    (hf32 / "trail_probe.json").write_text(json.dumps({"serving_model": {"name_or_path": "x", "dtype": "float32",
                                                                         "engine": "hf"}}))
    with pytest.raises(UserError, match="transformers computed in float32, but this engine is vLLM in bfloat16"):
        VLLMEngine(vllm_llama, "trail", settings(hf32, extraction_check="refuse"), dtype="bfloat16")
    predictor = LengthPredictor.from_pretrained(hf32, device="cpu")
    check_predictors(settings(hf32), str(vllm_llama), "bfloat16", [predictor])
    assert "extract.engine=vllm model.dtype=bfloat16" in capsys.readouterr().err
    check_predictors(settings(hf32, extraction_check="off"), str(vllm_llama), "bfloat16", [predictor])
    (hf32 / "trail_probe.json").write_text(json.dumps({"serving_model": {"dtype": "bfloat16", "engine": "vllm"}}))
    check_predictors(settings(hf32, extraction_check="refuse"), str(vllm_llama), "bfloat16",
                     [LengthPredictor.from_pretrained(hf32, device="cpu")])
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match="extraction_check = 'maybe' is not one of warn, refuse, off"):
        settings(hf32, extraction_check="maybe")
    for switch in ("prefills_alone", "client_estimates"):  # "false" as a string is not off
        with pytest.raises(UserError, match=f"{switch} = 'false' must be true or false"):
            settings(hf32, **{switch: "false"})
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)
    with pytest.raises(UserError, match="vLLM is not installed"):
        check_vllm()


@pytest.mark.slow
def test_trail_in_vllm_reads_the_layer_hf_computes_and_keeps_fcfs_tokens(vllm_llama, vllm_predictor, tmp_path):
    """vLLM's default multiprocess engine: the states the scheduler receives equal a teacher-forced HF
    forward pass (fp32), TRAIL changes when tokens come, not which, and its estimates are the tracker's."""
    from conftest import make_tiny_bert_predictor
    from transformers import AutoModelForCausalLM

    from trail_probe.runtime import BertLengthPredictor, LengthPredictor, LengthTracker
    from trail_probe.serving.trail_settings import TrailSettings
    from trail_probe.serving.vllm_engine import VLLMEngine

    make_tiny_bert_predictor(tmp_path / "bert", max_len=MAX_NEW)
    bert = BertLengthPredictor.from_pretrained(tmp_path / "bert", device="cpu").predict(TEXTS).tolist()
    # The half BERT calls longer arrives first; the half it calls shorter comes while those decode.
    order = sorted(range(len(TEXTS)), key=lambda i: -bert[i])
    reqs = [_requests(vllm_llama)[i] for i in order]
    arrivals = [0.0] * 5 + [0.05] * 5
    assert bert[order[4]] > bert[order[5]]
    runs = {}
    for policy in ("fifo", "trail"):
        settings = TrailSettings(predictor=str(vllm_predictor), initial="bert", bert=str(tmp_path / "bert"),
                                 client_estimates=True, refine_interval=4, refine_when="always", record=True,
                                 record_states=True) if policy == "trail" else None
        with VLLMEngine(vllm_llama, policy, settings, max_num_seqs=3, dtype="float32", kv_cache_memory_bytes=128 << 20,
                        max_model_len=512, enforce_eager=True) as engine:
            results, _ = engine.replay(reqs, arrivals, max_new_tokens=MAX_NEW)
            runs[policy] = ({r.request_id: r.tokens for r in results}, engine.scheduler_log())
    (fifo, fifo_log), (trail, trail_log) = runs["fifo"], runs["trail"]
    assert trail == fifo and len(fifo) == len(TEXTS)
    assert max(len(t) for t in fifo.values()) > 8  # answers long enough to be refined more than once
    assert all(s["end"] >= s["start"] for s in fifo_log["steps"]) and len(fifo_log["steps"]) > 8
    counters = trail_log["trail"]
    assert counters["refinements"] > 0 and counters["paused_past_limit"] == 0, counters
    assert counters["preemptions"] > 0, counters  # paused requests kept their KV cache and resumed intact
    observed = trail_log["observed"]
    assert {g for _, g, _ in observed} >= {1, 5} and all((g - 1) % 4 == 0 for _, g, _ in observed)
    assert trail_log["live"]["finished_scored"] == len(TEXTS) and trail_log["live"]["refined_points"] > 0
    model = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32).eval()
    prompts = {rid: ids for rid, ids, _ in reqs}
    for rid, g, state in observed[::3]:
        with torch.no_grad():
            ref = model(torch.tensor([prompts[rid] + fifo[rid][:g]]), output_hidden_states=True).hidden_states[2][0, -1]
        assert torch.allclose(torch.tensor(state), ref, atol=1e-4), (rid, g)
    # The same states through a LengthTracker of our own give the estimates the plugin recorded.
    tracker = LengthTracker(LengthPredictor.from_pretrained(vllm_predictor, device="cpu"), max_new_tokens=MAX_NEW,
                            text_predictor=BertLengthPredictor.from_pretrained(tmp_path / "bert", device="cpu"))
    for rid, _, text in reqs:
        tracker.add([rid], prompt_texts=[text])
        assert float(tracker.initial_estimates([rid])[0]) == pytest.approx(trail_log["initial_estimates"][rid], abs=1e-5)
    last = {rid: g for rid, g, _ in observed}  # each request's last observed state
    skipped = 0
    for rid, g, state in observed:
        tracker.observe([rid], torch.tensor([state]), [g])
        expected = float(tracker.estimates([rid], [g])[0])
        points = [e for gg, e in trail_log["trace"][rid] if gg == g]
        if not points and g == last[rid]:  # refinements wait for the next pass: a request that ended first skips its last
            skipped += 1
            continue
        assert points == [pytest.approx(expected, abs=1e-5)]  # float32 batch rounding
    assert skipped < len(last)


@pytest.mark.slow
def test_a_pooled_decode_probe_in_vllm_gets_the_generated_tokens_mean_hf_computes(vllm_llama, tmp_path):
    """Issue 27's parity check on vLLM: a decode probe reading current+mean is sent, at each refinement,
    [the current state, the mean of the generated tokens' states so far] as the worker pooled them
    over the engine's passes, equal to a teacher-forced HF pass and `probe_inputs.decode_input`."""
    from conftest import trail_weights, write_trail_dir
    from transformers import AutoModelForCausalLM

    from trail_probe.runtime.probe_inputs import decode_input
    from trail_probe.serving.trail_settings import TrailSettings
    from trail_probe.serving.vllm_engine import VLLMEngine

    folder = write_trail_dir(tmp_path / "pooled", trail_weights(d=256), hidden_size=256, probe_layer_idx=1,
                             max_len=MAX_NEW, device="cpu")
    (folder / "trail_probe.json").write_text(json.dumps({"task": "decode", "input": "current+mean"}))
    settings = TrailSettings(predictor=str(folder), initial="none", refine_interval=4, refine_when="always",
                             record=True, record_states=True)
    reqs = _requests(vllm_llama)
    with VLLMEngine(vllm_llama, "trail", settings, max_num_seqs=3, dtype="float32", kv_cache_memory_bytes=128 << 20,
                    max_model_len=512, enforce_eager=True) as engine:
        results, _ = engine.replay(reqs, [0.0] * 5 + [0.05] * 5, max_new_tokens=MAX_NEW)
        log = engine.scheduler_log()
    tokens = {r.request_id: r.tokens for r in results}
    observed = log["observed"]
    assert {g for _, g, _ in observed} >= {1, 5, 9} and log["trail"]["refinements"] > 0
    model = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32).eval()
    prompts = {rid: ids for rid, ids, _ in reqs}
    for rid, g, state in observed[::2]:
        with torch.no_grad():
            h = model(torch.tensor([prompts[rid] + tokens[rid][:g]]), output_hidden_states=True).hidden_states[2][0]
        ref = decode_input("current+mean", h[-1], sum_h=h[len(prompts[rid]):].sum(0), count=g)
        assert torch.tensor(state).shape == (256,) and torch.allclose(torch.tensor(state), ref, atol=1e-4), (rid, g)


@pytest.mark.slow
def test_prompt_probe_initial_estimates_in_vllm_are_hf_prompt_means_over_chunked_prefills(vllm_llama, vllm_predictor, tmp_path):
    """initial='prompt_probe': the worker sums each prefill chunk's states at the prompt probe's layer
    (16-token chunks here), and the initial estimate is the prompt probe on the mean, as with HF."""
    from conftest import trail_weights, write_trail_dir
    from transformers import AutoModelForCausalLM

    from trail_probe.runtime import LengthPredictor, LengthTracker
    from trail_probe.serving.trail_settings import TrailSettings
    from trail_probe.serving.vllm_engine import VLLMEngine

    prompt_dir = write_trail_dir(tmp_path / "prompt", trail_weights(d=128, seed=3), hidden_size=128, probe_layer_idx=0,
                                 max_len=MAX_NEW, device="cpu")
    reqs = _requests(vllm_llama)
    assert max(len(ids) for _, ids, _ in reqs) > 16  # some prompts take more than one chunk
    settings = TrailSettings(predictor=str(vllm_predictor), prompt_predictor=str(prompt_dir), record=True, refine_when="always")
    with VLLMEngine(vllm_llama, "trail", settings, max_num_seqs=3, max_num_batched_tokens=16, dtype="float32",
                    kv_cache_memory_bytes=128 << 20, max_model_len=512) as engine:  # vLLM's defaults: compiled
        results, _ = engine.replay(reqs, [0.0] * len(reqs), max_new_tokens=MAX_NEW)  # each request's own budget caps its estimate
        log = engine.scheduler_log()
    assert len(results) == len(reqs)
    model = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32).eval()
    prompt = LengthPredictor.from_pretrained(prompt_dir, device="cpu")
    tracker = LengthTracker(LengthPredictor.from_pretrained(vllm_predictor, device="cpu"), max_new_tokens=MAX_NEW)
    for rid, ids, _ in reqs:
        with torch.no_grad():
            mean = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0].mean(0)
        tracker.add([rid], initial_probs=prompt.probs(mean[None]))
        assert log["initial_estimates"][rid] == pytest.approx(float(tracker.initial_estimates([rid])[0]), abs=1e-3), rid
    assert len({round(e, 3) for e in log["initial_estimates"].values()}) > 1  # not all the budget


@pytest.mark.slow
def test_serve_bench_on_vllm_runs_fcfs_priority_trail_and_oracle(vllm_llama, vllm_predictor, tmp_path):
    from conftest import make_tiny_bert_predictor, write_prompts

    from trail_probe.stages import serve_bench

    prompts = write_prompts(tmp_path / "prompts.jsonl", rows=[
        {"id": f"p{i}", "prompt": f"Tell me fact number {i} about {'cats' if i % 2 else 'the sea'}."} for i in range(40)])
    make_tiny_bert_predictor(tmp_path / "bert", max_len=MAX_NEW)
    cfg = load_recipe(None, [
        f"model.name_or_path={vllm_llama}", f"prompts.source={prompts}", f"generation.max_new_tokens={MAX_NEW}",
        f"train.out_dir={tmp_path / 'ckpt'}", "serve.engine=vllm", "serve.policies=[oracle,priority,trail,fifo]",
        "serve.num_requests=6", "serve.rate=40", "serve.max_batch=2", "serve.max_batch_tokens=256",
        "serve.vllm_dtype=float32", "serve.vllm_kv_cache_gb=0.125", f"serve.predictor={vllm_predictor}",
        f"serve.bert={tmp_path / 'bert'}", "serve.initial=bert", "refine.interval=4"])
    report = serve_bench.run_serve_bench(cfg, verbose=False)
    out = cfg.paths.serve
    for name in ("fifo.json", "priority.json", "trail.json", "oracle.json", "summary.json", "report.md", "serve_bench.png"):
        assert (out / name).is_file(), name
    assert report["settings"]["serve"]["engine"] == "vllm"
    for policy in ("priority", "trail", "oracle"):
        assert report["vs_fifo"][policy]["same_outputs"]["share"] == 1.0
    assert set(report["vs_priority"]) == {"trail", "oracle"}
    fifo, oracle = (json.loads((out / f"{p}.json").read_text()) for p in ("fifo", "oracle"))
    # the oracle ranked by the fifo run's lengths (fifo ran first although listed last)
    assert {r["id"]: r["initial_estimate"] for r in oracle["requests"]} == {r["id"]: float(r["output_tokens"]) for r in fifo["requests"]}
    for policy in ("fifo", "priority", "trail", "oracle"):
        s = report["summary"][policy]
        assert s["steps"] > 0 and 0 < s["busy_fraction"] <= 1.0 + 1e-9 and s["mean_step_s"] > 0
    trail = json.loads((out / "trail.json").read_text())
    assert trail["trail"]["refinements"] > 0 and all(r["initial_estimate"] is not None for r in trail["requests"])
    # BERT ran before the engine (as for priority) and its distribution reached the scheduler intact
    from trail_probe.runtime import BertLengthPredictor

    texts = {p["id"]: p["prompt"] for p in map(json.loads, prompts.read_text().splitlines())}
    bert = BertLengthPredictor.from_pretrained(tmp_path / "bert", device="cpu")
    expected = bert.predict([texts[r["id"]] for r in trail["requests"]]).tolist()
    assert [r["initial_estimate"] for r in trail["requests"]] == pytest.approx(expected, rel=1e-5)
    assert trail["summary"]["bert_before_engine_s_per_request"] > 0  # BERT ran in the client, before the engine
    assert set(report["simulator"]) == {"fifo", "priority", "trail", "oracle"}


@pytest.mark.slow
def test_on_smollm2_the_plugin_reads_layer_19_as_hf_does(tmp_path):
    """The embedded SmolLM2 in vLLM (fp32, multiprocess engine, the plugin loaded by vLLM's general
    plugin hook) against a teacher-forced HF forward pass of the GGUF model, layer 19."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trail_probe.serving.trail_settings import TrailSettings
    from trail_probe.serving.vllm_engine import VLLMEngine

    cfg = load_recipe("recipes/smollm2_alpaca.yaml")
    folder = plain_hf_folder(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["Give three tips for staying healthy.", "What is the capital of France?", "Name a primary color."]
    reqs = [(f"q{i}", encode_prompt(tokenizer, t), t) for i, t in enumerate(texts)]
    settings = TrailSettings(predictor="checkpoints/smollm2_alpaca/predictor", initial="none", record=True,
                             record_states=True, extraction_check="off", refine_when="always")
    # vLLM's defaults (torch.compile): the states come out of the compiled graph as auxiliary outputs
    with VLLMEngine(folder, "trail", settings, max_num_seqs=4, dtype="float32", kv_cache_memory_bytes=256 << 20,
                    max_model_len=1024) as engine:
        results, _ = engine.replay(reqs, [0.0] * 3, max_new_tokens=24)
        observed = engine.scheduler_log()["observed"]
    tokens = {r.request_id: r.tokens for r in results}
    assert {g for _, g, _ in observed} == {1, 9, 17}
    where, gguf = resolve_model_path(cfg.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32).eval()
    prompts = {rid: ids for rid, ids, _ in reqs}
    for rid, g, state in observed:
        with torch.no_grad():
            ref = model(torch.tensor([prompts[rid] + tokens[rid][:g]]), output_hidden_states=True).hidden_states[20][0, -1]
        assert float((torch.tensor(state) - ref).norm() / ref.norm()) < 1e-4, (rid, g)
