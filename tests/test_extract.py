"""`trail-probe extract` on tiny random models: capture correctness, resume, workers, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_prompts

from trail_probe.cli import main
from trail_probe.config import load_recipe
from trail_probe.errors import UserError
from trail_probe.offline.generation import generate_with_capture, prepare_prompts
from trail_probe.offline.prompts import Prompt
from trail_probe.offline.store import Extraction
from trail_probe.runtime.models import load_causal_lm
from trail_probe.stages import extract as extract_mod
from trail_probe.stages.extract import run_extract


def _cfg(model_dir, prompts, out, *extra):
    return load_recipe(None, [
        f"model.name_or_path={model_dir}", f"prompts.source={prompts}", f"extract.out_dir={out}",
        "generation.max_new_tokens=24", "generation.batch_size=3", "extract.decode_stride=2",
        "extract.shard_size=2", *extra,
    ])


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_captured_states_equal_teacher_forced_pass(arch, request):
    """What we store is what one forward pass over prompt+response computes, for the same tokens,
    and the greedy tokens are those of HF generate, although rows leave and join the batch."""
    model_dir = request.getfixturevalue(arch)
    cfg = _cfg(model_dir, "unused.jsonl", "unused", "generation.max_new_tokens=30")
    model, tokenizer = load_causal_lm(cfg.model)
    prompts = [Prompt(f"p{i}", "Say something " + "long " * (i * 3) + f"number {i}.") for i in range(7)]
    ready, _ = prepare_prompts(prompts, tokenizer, 30, 512, "skip")
    layers = [0, 1, 2]
    requests = list(generate_with_capture(model, tokenizer, ready, cfg.generation, layers, layers, 1, torch.float32))
    assert sorted(r.record["id"] for r in requests) == [p.id for p in prompts]
    ids_of = {p.id: ids for p, ids, _ in ready}
    # HF applies the final norm to the last hidden_states entry; TRAIL's layer L is pre-norm.
    owner, attr = (model.get_decoder(), "norm") if arch == "tiny_llama" else (model.transformer, "ln_f")
    final_norm = getattr(owner, attr)
    with torch.no_grad():
        for req in requests:
            ids, n = ids_of[req.record["id"]], req.record["output_tokens"]
            reference = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
            assert req.token_ids == reference[: len(req.token_ids)]
            full = torch.tensor([ids + req.token_ids[:n]])
            setattr(owner, attr, torch.nn.Identity())
            try:
                hidden = model(full, output_hidden_states=True).hidden_states
            finally:
                setattr(owner, attr, final_norm)
            for li, layer in enumerate(layers):
                ref = hidden[layer + 1][0]
                torch.testing.assert_close(req.prompt_states[li], ref[: len(ids)].mean(0), atol=1e-4, rtol=1e-4)
                positions = len(ids) + req.decode_generated - 1  # token j-1 fed in produces token j
                torch.testing.assert_close(req.decode_states[li], ref[positions], atol=1e-4, rtol=1e-4)
            assert (req.decode_remaining == n - req.decode_generated).all()
    lengths = [r.record["output_tokens"] for r in requests]
    if arch == "tiny_llama":
        assert len(set(lengths)) > 1, "rows must leave the batch at different times for this test to bite"


def teacher_forced(model, ids: list[int], layers: list[int]) -> tuple[dict, torch.Tensor]:
    """One forward pass over `ids`: each layer's residual stream after it (pre-norm, from our own hooks
    on the decoder layers) and the entropy in nats of the next-token distribution at every position."""
    blocks, states, handles = model.get_decoder().layers, {}, []
    for layer in layers:
        handles.append(blocks[layer].register_forward_hook(
            lambda m, i, out, layer=layer: states.__setitem__(layer, (out[0] if isinstance(out, tuple) else out)[0])))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    p = torch.softmax(logits, -1)
    return states, -(p * torch.log_softmax(logits, -1)).sum(-1)


def test_stored_pooled_inputs_equal_their_definitions_on_a_teacher_forced_pass(vllm_llama):
    """The pooled inputs as runtime/probe_inputs.py defines them, rebuilt here from one forward pass over
    prompt + answer: the last prompt token, the entropy-weighted prompt pool, and at every sampled step
    g the generated tokens' running mean and entropy pool over positions P .. P-1+g, with their weights."""
    from trail_probe.offline.store import stored_inputs

    cfg = _cfg(vllm_llama, "unused.jsonl", "unused", "generation.max_new_tokens=30")  # (a tiny Llama with longer answers)
    model, tokenizer = load_causal_lm(cfg.model)
    with torch.no_grad():  # sharper next-token distributions, the same greedy answers: entropies that vary a lot
        model.get_output_embeddings().weight.mul_(30.0)
    prompts = [Prompt(f"p{i}", f"Tell me fact number {i} about " + "the very deep blue sea " * (i % 4)) for i in range(8)]
    ready, _ = prepare_prompts(prompts, tokenizer, 30, 512, "skip")
    layers = [0, 1, 2]
    requests = list(generate_with_capture(model, tokenizer, ready, cfg.generation, layers, layers, 2, torch.float32,
                                          inputs=stored_inputs("all")))
    ids_of = {p.id: ids for p, ids, _ in ready}
    steps, gaps, errors = 0, [], []
    for req in requests:
        ids, n = ids_of[req.record["id"]], req.record["output_tokens"]
        P = len(ids)
        states, H = teacher_forced(model, ids + req.token_ids[:n], layers)
        pooled = req.pooled
        assert sorted(pooled) == ["decode_entropy", "decode_entropy_sum", "decode_mean", "decode_token_entropy",
                                  "prompt_entropy", "prompt_entropy_sum", "prompt_last"]
        torch.testing.assert_close(pooled["prompt_entropy_sum"], H[:P].sum(), atol=1e-4, rtol=1e-5)
        for li, layer in enumerate(layers):
            h = states[layer]
            torch.testing.assert_close(pooled["prompt_last"][li], h[P - 1], atol=1e-4, rtol=1e-4)
            weighted = (H[:P, None] * h[:P]).sum(0) / H[:P].sum()
            torch.testing.assert_close(pooled["prompt_entropy"][li], weighted, atol=1e-4, rtol=1e-4)
            # the stored pool is far closer to its definition than to the plain mean
            gaps.append(float((weighted - h[:P].mean(0)).abs().max()))
            errors.append(float((pooled["prompt_entropy"][li] - weighted).abs().max()))
            for k, g in enumerate(req.decode_generated.tolist()):
                gen = slice(P, P + g)  # positions P - 1 + j, j = 1 .. g
                torch.testing.assert_close(req.decode_states[li, k], h[P - 1 + g], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(pooled["decode_mean"][li, k], h[gen].mean(0), atol=1e-4, rtol=1e-4)
                expected = (H[gen, None] * h[gen]).sum(0) / H[gen].sum()
                torch.testing.assert_close(pooled["decode_entropy"][li, k], expected, atol=1e-4, rtol=1e-4)
                gaps.append(float((expected - h[gen].mean(0)).abs().max()))
                errors.append(float((pooled["decode_entropy"][li, k] - expected).abs().max()))
                if li == 0:
                    torch.testing.assert_close(pooled["decode_entropy_sum"][k], H[gen].sum(), atol=1e-4, rtol=1e-5)
                    torch.testing.assert_close(pooled["decode_token_entropy"][k], H[P - 1 + g], atol=1e-4, rtol=1e-5)
                    steps += 1
    assert steps > 10 and len({r.record["output_tokens"] for r in requests}) > 1, (steps, [r.record["output_tokens"] for r in requests])
    gaps = [g for g in gaps if g > 0]  # (g = 1: a pool of one token is that token, weighted or not)
    assert len(gaps) > 10 and max(errors) < 0.1 * sorted(gaps)[len(gaps) // 2], (max(errors), sorted(gaps)[:5])


def test_extract_end_to_end_and_manifest(tiny_llama, prompts_file, tmp_path, capsys):
    out = tmp_path / "ex"
    code = main(["extract", "recipes/smollm2_alpaca_hf.yaml", f"model.name_or_path={tiny_llama}",
                 f"prompts.source={prompts_file}", f"extract.out_dir={out}", "extract.prompt_layers=all",
                 "extract.decode_layers=1-2", "extract.decode_stride=4", "generation.max_new_tokens=24",
                 "generation.batch_size=4", "extract.shard_size=3"])
    assert code == 0
    assert "expected disk" in capsys.readouterr().out
    ex = Extraction(out)
    assert len(ex.records) == 10 and len(set(ex.ids)) == 10
    assert ex.prompt_layers == [0, 1, 2] and ex.decode_layers == [1, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("model", "layer_numbering", "generation", "prompts", "storage_dtype", "config"):
        assert key in manifest
    assert manifest["model"]["weights_sha256"] and manifest["model"]["num_layers"] == 3
    assert (out / "config.yaml").is_file()
    dec = ex.decode(2)
    assert dec.states.shape == (len(dec.request), 64) and torch.isfinite(dec.states).all()
    assert ((dec.generated - 1) % 4 == 0).all()
    assert (dec.remaining == ex.output_tokens[dec.request] - dec.generated).all()
    assert ex.prompt_states(0).shape == (10, 64)
    for r in ex.records:
        assert r["output_tokens"] <= 24 and r["hit_cap"] == (r["output_tokens"] == 24)


def dies_after(n: int, stream):
    """The generator function `stream`, interrupted (as Ctrl-C would) after its first `n` items."""
    def interrupted(*args, **kwargs):
        for i, item in enumerate(stream(*args, **kwargs)):
            if i == n:
                raise KeyboardInterrupt
            yield item

    return interrupted


def test_interrupted_run_resumes_without_loss_or_duplicates(tiny_llama, prompts_file, tmp_path, monkeypatch):
    reference = Extraction(run_extract(_cfg(tiny_llama, prompts_file, tmp_path / "ref"), show_progress=False))
    out = tmp_path / "ex"
    real = extract_mod.generate_with_capture
    monkeypatch.setattr(extract_mod, "generate_with_capture", dies_after(5, real))
    with pytest.raises(KeyboardInterrupt):
        run_extract(_cfg(tiny_llama, prompts_file, out), show_progress=False)
    partial = Extraction(out, require_complete=False)
    assert len(partial.records) == 5  # finished requests were flushed on the way out
    with pytest.raises(Exception, match="incomplete"):
        Extraction(out)
    (out / "shards" / ".shard-w000-000099.safetensors.tmp-1").write_bytes(b"half a shard")
    monkeypatch.setattr(extract_mod, "generate_with_capture", real)
    run_extract(_cfg(tiny_llama, prompts_file, out), show_progress=False)
    ex = Extraction(out)
    assert sorted(ex.ids) == sorted(reference.ids)
    assert not list((out / "shards").glob(".*tmp*"))
    ours = {r["id"]: r["output_tokens"] for r in ex.records}
    assert ours == {r["id"]: r["output_tokens"] for r in reference.records}


def test_workers_take_disjoint_slices_and_read_back_as_one(tiny_llama, prompts_file, tmp_path):
    out = tmp_path / "ex"
    cfg = _cfg(tiny_llama, prompts_file, out)
    run_extract(cfg, num_workers=2, worker_index=1, show_progress=False)
    with pytest.raises(Exception, match="incomplete"):
        Extraction(out)
    run_extract(cfg, num_workers=2, worker_index=0, show_progress=False)
    ex = Extraction(out)
    assert sorted(ex.ids) == sorted(f"p{i}" for i in range(10))
    by_worker = [json.loads((out / "workers" / f"worker-{i}.json").read_text())["expected"] for i in range(2)]
    assert by_worker == [5, 5]


def _run_cli(capsys, *args):
    code = main(["extract", "recipes/smollm2_alpaca_hf.yaml", *args])
    # HF's weight-loading progress bar also writes to stderr; the error is our own line(s)
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trail-probe")]
    return code, "\n".join(ours)


@pytest.mark.parametrize("rows, match", [
    (['{"id": "a", "prompt": "fine"}', '{"id": "b", "prompt": '], "line 2 is not valid JSON"),
    (['{"id": "a", "prompt": "fine"}', '{"id": "b", "prompt": "  "}'], "line 2 has an empty prompt"),
    (['{"id": "a", "text": "no prompt key"}'], "neither 'prompt' nor 'instruction'"),
])
def test_bad_prompt_rows_are_named(rows, match, tiny_llama, tmp_path, capsys):
    bad = write_prompts(tmp_path / "bad.jsonl", rows=rows)
    code, err = _run_cli(capsys, f"model.name_or_path={tiny_llama}", f"prompts.source={bad}",
                         f"extract.out_dir={tmp_path / 'o'}")
    assert code == 2 and match in err and "skip_bad_rows" in err and len(err.splitlines()) == 1


def test_skip_bad_rows_counts_them(tiny_llama, tmp_path):
    bad = write_prompts(tmp_path / "bad.jsonl", rows=[
        '{"id": "a", "prompt": "fine"}', "{oops", '{"id": "c", "prompt": ""}', '{"instruction": "Hi", "input": "x"}'])
    out = run_extract(_cfg(tiny_llama, bad, tmp_path / "o", "prompts.skip_bad_rows=true"), show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"]["bad_rows_skipped"] == 2 and len(Extraction(out).records) == 2


def test_too_long_prompts_are_skipped_or_truncated(tiny_llama, tmp_path):
    rows = [{"id": "short", "prompt": "hi"}, {"id": "long", "prompt": "word " * 200}]
    prompts = write_prompts(tmp_path / "p.jsonl", rows=rows)
    # the tiny model has a 512-token context; 200 words are ~1000 byte tokens
    out = run_extract(_cfg(tiny_llama, prompts, tmp_path / "skip"), show_progress=False)
    status = json.loads((out / "workers" / "worker-0.json").read_text())
    assert status["skipped_too_long"] == 1 and Extraction(out).ids == ["short"]
    out = run_extract(_cfg(tiny_llama, prompts, tmp_path / "trunc", "prompts.too_long=truncate"), show_progress=False)
    ex = Extraction(out)
    long = next(r for r in ex.records if r["id"] == "long")
    assert long["truncated"] and long["prompt_tokens"] + 24 <= 512


@pytest.mark.parametrize("override, match", [
    ("prompts.source=/nonexistent/prompts.jsonl", "not found"),
    ("extract.decode_layers=7", "layer 7 is outside the model"),
    ("model.name_or_path=/nonexistent/model", "model folder '/nonexistent/model' does not exist"),
    ("extract.out_dir=/proc/version/sub", "not writable"),
    ("extract.decode_stride=0", "decode_stride"),
])
def test_bad_inputs_give_one_line_errors(override, match, tiny_llama, prompts_file, tmp_path, capsys):
    args = [f"model.name_or_path={tiny_llama}", f"prompts.source={prompts_file}",
            f"extract.out_dir={tmp_path / 'o'}", "generation.max_new_tokens=4", override]
    code, err = _run_cli(capsys, *args)
    assert code == 2 and match in err and len(err.splitlines()) == 1, err


def test_not_a_causal_lm_is_refused(tmp_path, prompts_file, capsys):
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50).save_pretrained(tmp_path / "t5")
    code, err = _run_cli(capsys, f"model.name_or_path={tmp_path / 't5'}", f"prompts.source={prompts_file}",
                         f"extract.out_dir={tmp_path / 'o'}")
    assert code == 2 and "decoder-only" in err


def test_incompatible_folder_is_refused_unless_overwrite(tiny_llama, prompts_file, tmp_path, capsys):
    out = tmp_path / "o"
    base = [f"model.name_or_path={tiny_llama}", f"prompts.source={prompts_file}", f"extract.out_dir={out}",
            "generation.max_new_tokens=8", "prompts.num_prompts=3"]
    assert _run_cli(capsys, *base)[0] == 0
    before = sorted(p.name for p in (out / "shards").iterdir())
    code, err = _run_cli(capsys, *base[:-1], "prompts.num_prompts=4")
    assert code == 2 and "different config" in err and "num_prompts" in err
    assert sorted(p.name for p in (out / "shards").iterdir()) == before  # nothing lost
    assert main(["extract", "recipes/smollm2_alpaca_hf.yaml", *base[:-1], "prompts.num_prompts=4", "--overwrite"]) == 0
    assert len(Extraction(out).records) == 4


@pytest.mark.slow
def test_real_smollm2_on_shared_prompts(tmp_path):
    from conftest import SHARED_PROMPTS

    out = run_extract(load_recipe("recipes/smollm2_alpaca_hf.yaml", [
        f"prompts.source={SHARED_PROMPTS}", "prompts.num_prompts=4", "generation.max_new_tokens=48",
        f"extract.out_dir={tmp_path / 'real'}", "extract.decode_layers=10-12"]), show_progress=False)
    ex = Extraction(out)
    assert len(ex.records) == 4 and ex.hidden_size == 576 and ex.model["num_layers"] == 30
    assert all(r["output_tokens"] > 0 and r["response"].strip() for r in ex.records)
    assert torch.isfinite(ex.prompt_states(29)).all() and torch.isfinite(ex.decode(11).states).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["weights_sha256"] and manifest["prompts"]["num_selected"] == 4


def test_packed_gqa_decoding_equals_plain_sdpa_and_is_undone(tiny_llama):
    """The decode attention the extractor switches to (no KV-cache copy for grouped-query heads) gives
    plain SDPA's logits, and the model gets its own attention back afterwards."""
    import copy
    import inspect

    from trail_probe.config import ModelConfig
    from trail_probe.offline.packed_gqa import packed_gqa_attention
    from trail_probe.runtime.models import encode_prompt

    model, tok = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama)))
    assert model.model.layers[0].self_attn.num_key_value_groups == 2 and model.config._attn_implementation == "sdpa"
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([encode_prompt(tok, "Tell me a fact about dogs."), encode_prompt(tok, "Tell me a fact about cats.")])
    with torch.no_grad():
        first = model(ids, use_cache=True)
        step = first.logits[:, -1:].argmax(-1)
        plain = model(step, **{cache_kw: copy.deepcopy(first.past_key_values)}).logits
        with packed_gqa_attention(model):
            packed = model(step, **{cache_kw: first.past_key_values}).logits
    assert torch.allclose(plain, packed, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"


# -- damaged data and concurrent workers (issue 16) --------------------------------------------
def _verify_cli(capsys, cfg_args):
    code = main(["extract", "recipes/smollm2_alpaca_hf.yaml", *cfg_args, "--verify"])
    return code, capsys.readouterr()


def _args(model_dir, prompts, out):
    return [f"model.name_or_path={model_dir}", f"prompts.source={prompts}", f"extract.out_dir={out}",
            "generation.max_new_tokens=16", "generation.batch_size=4", "extract.shard_size=3",
            "extract.decode_layers=1-2", "extract.prompt_layers=all"]


def test_a_damaged_shard_is_named_set_aside_and_extracted_again(tiny_llama, prompts_file, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ex"
    args = _args(tiny_llama, prompts_file, out)
    assert main(["extract", "recipes/smollm2_alpaca_hf.yaml", *args]) == 0
    reference = {r["id"]: r["output_tokens"] for r in Extraction(out).records}
    status = json.loads((out / "workers" / "worker-0.json").read_text())
    shards = sorted((out / "shards").glob("shard-*.safetensors"))
    assert sorted(status["shards"]) == [s.name for s in shards]
    assert _verify_cli(capsys, args)[0] == 0

    # one shard cut short, one with a flipped byte in its data, one whose states hold NaN
    cut, flipped, nan = shards[0], shards[1], shards[2]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF
    flipped.write_bytes(bytes(data))
    tensors = load_file(nan)
    tensors["decode_states"][0, 0, 0] = float("nan")
    from safetensors import safe_open
    with safe_open(str(nan), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(nan), metadata=metadata)
    nan_ids = [r["id"] for r in json.loads(metadata["records"])]

    with pytest.raises(UserError, match=f"shard '{cut}' is damaged"):
        Extraction(out)
    code, captured = _verify_cli(capsys, args)
    assert code == 2 and "3 of 4 shards are damaged" in captured.err
    for shard, why in ((cut, "damaged"), (flipped, "checksum differs"), (nan, "non-finite hidden states")):
        assert any(str(shard) in line and why in line for line in captured.out.splitlines()), (shard, why)
    assert all(s.exists() for s in (cut, flipped, nan))  # --verify changes nothing

    cut.rename(tmp_path / "cut")  # reading NaN states is refused by name at load time
    flipped.rename(tmp_path / "flipped")
    with pytest.raises(UserError, match=f"hold NaN or inf for 1 request.*{nan_ids[int(tensors['decode_request'][0])]}"):
        Extraction(out, require_complete=False).decode(1)
    (tmp_path / "cut").rename(cut)
    (tmp_path / "flipped").rename(flipped)

    assert main(["extract", "recipes/smollm2_alpaca_hf.yaml", *args]) == 0  # resume: set aside, extracted again
    assert len(list((out / "damaged").iterdir())) == 3
    again = Extraction(out)
    assert {r["id"]: r["output_tokens"] for r in again.records} == reference
    assert torch.isfinite(again.decode(1).states).all()
    assert _verify_cli(capsys, args)[0] == 0


def test_a_worker_clears_only_its_own_temporary_files(tiny_llama, prompts_file, tmp_path):
    out = tmp_path / "ex"
    cfg = _cfg(tiny_llama, prompts_file, out)
    run_extract(cfg, num_workers=2, worker_index=1, show_progress=False)
    shard_dir = out / "shards"
    other_in_flight = shard_dir / ".tmp-w001" / "shard-w001-000009.safetensors"
    other_in_flight.parent.mkdir()
    other_in_flight.write_bytes(b"worker 1 is writing this")
    other_legacy = shard_dir / ".shard-w001-000009.safetensors.tmp-77"
    other_legacy.write_bytes(b"and this")
    own_leftover = shard_dir / ".tmp-w000" / "tmpab12cd"  # what a kill -9 inside safetensors' write leaves
    own_leftover.parent.mkdir()
    own_leftover.write_bytes(b"half")
    run_extract(cfg, num_workers=2, worker_index=0, show_progress=False)
    assert other_in_flight.read_bytes() == b"worker 1 is writing this" and other_legacy.exists()
    assert not own_leftover.parent.exists()


def test_another_model_is_named_when_the_folder_is_refused(tiny_llama, tiny_gpt2, prompts_file, tmp_path, capsys):
    out = tmp_path / "o"
    base = [f"prompts.source={prompts_file}", f"extract.out_dir={out}", "generation.max_new_tokens=4",
            "prompts.num_prompts=2"]
    assert _run_cli(capsys, f"model.name_or_path={tiny_llama}", *base)[0] == 0
    code, err = _run_cli(capsys, f"model.name_or_path={tiny_gpt2}", *base)
    assert code == 2 and "the model:" in err and str(tiny_gpt2) in err and "decode_layers" not in err


def test_every_prompt_too_long_is_an_error_not_a_complete_extraction(tiny_llama, tmp_path, capsys):
    long = write_prompts(tmp_path / "long.jsonl", rows=['{"id": "a", "prompt": "' + "word " * 600 + '"}'])
    out = tmp_path / "o"
    code, err = _run_cli(capsys, f"model.name_or_path={tiny_llama}", f"prompts.source={long}",
                         f"extract.out_dir={out}", "generation.max_new_tokens=8")
    assert code == 2 and "all 1 prompts are too long" in err and "too_long=truncate" in err
    assert not out.exists()  # a failed command leaves no empty output folder behind


def test_an_unreachable_hub_id_fails_at_once_in_one_line(prompts_file, tmp_path, capsys, monkeypatch):
    import socket

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, err = _run_cli(capsys, "model.name_or_path=nobody-here/no-such-model", f"prompts.source={prompts_file}",
                         f"extract.out_dir={tmp_path / 'o'}")
    assert code == 2 and "cannot be reached" in err and len(err.splitlines()) == 1


def test_last_prompt_states_use_the_extractions_tokens_and_layer_numbering(tiny_llama, prompts_file, tmp_path):
    """refine.prior=last_token's states (offline.prefill_states): the last position of the same pass
    whose mean over the prompt is the extraction's stored prompt state, layer for layer."""
    from trail_probe.offline.prefill_states import last_prompt_states
    from trail_probe.runtime.models import encode_prompt

    cfg = _cfg(tiny_llama, prompts_file, tmp_path / "ex")
    ex = Extraction(run_extract(cfg, show_progress=False))
    states = last_prompt_states(cfg.model, ex.records[:4], [0, 2], show_progress=False)
    model, tokenizer = load_causal_lm(cfg.model)
    model.get_decoder().norm = torch.nn.Identity()  # hidden_states' last entry is normed; layer L is not
    for i, record in enumerate(ex.records[:4]):
        ids = torch.tensor([encode_prompt(tokenizer, record["prompt"])])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for L in (0, 2):  # 2: the last layer
            torch.testing.assert_close(hidden[L + 1][0].mean(0), ex.prompt_states(L)[i].float(), atol=2e-3, rtol=1e-2)
            torch.testing.assert_close(states[L][i], hidden[L + 1][0, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(states[0], states[2])
    wrong = [{**ex.records[0], "prompt_tokens": ex.records[0]["prompt_tokens"] + 1}]
    with pytest.raises(UserError, match="extraction's own model"):
        last_prompt_states(cfg.model, wrong, [0], show_progress=False)
    with pytest.raises(UserError, match="outside the model"):
        last_prompt_states(cfg.model, ex.records[:1], [3], show_progress=False)
    # eval refine.prior=last_token: the decode probe on those states is the refined method's prior
    from trail_probe.stages.evaluate import evaluate
    from trail_probe.stages.train import train

    common = ("train.epochs=3", "train.layers=0", f"train.out_dir={tmp_path / 'ck'}", "eval.layer=0",
              "bins.max_len=24", "bins.num_bins=4", "train.lr=0.05")
    train(_cfg(tiny_llama, prompts_file, tmp_path / "ex", *common))
    reports = {prior: evaluate(_cfg(tiny_llama, prompts_file, tmp_path / "ex", *common, f"refine.prior={prior}",
                                    f"eval.out_dir={tmp_path / prior}"))["methods"]["refined"]
               for prior in ("last_token", "none")}
    assert reports["last_token"]["prior"] == "last_token"
    assert reports["last_token"]["remaining"]["mae"] != reports["none"]["remaining"]["mae"]
    # Each request's first refined estimate (j = 1), rebuilt here from the states this test computed
    # itself: prior = the decode probe on the last prompt token's state, moved one token (1/w of each
    # bin's mass one bin down), times the probe on the stored state at j = 1, normalised, as an
    # expectation over the bin midpoints capped at the 23 tokens left.
    from trail_probe.offline.artifacts import load_probe, probe_name

    cfg = _cfg(tiny_llama, prompts_file, tmp_path / "ex", *common)
    probe, _ = load_probe(cfg.paths.probe("decode", probe_name((0,))))
    width, mids = 24 / 4, torch.tensor([3.0, 9.0, 15.0, 21.0], dtype=torch.float64)
    decode, row = ex.decode(0), {r["id"]: i for i, r in enumerate(ex.records)}
    predictions = json.loads((tmp_path / "last_token" / "predictions.json").read_text())["requests"]
    assert predictions and all(r["refined"] for r in predictions)
    for request in predictions:
        ids = torch.tensor([encode_prompt(tokenizer, ex.records[row[request["id"]]]["prompt"])])
        with torch.no_grad():
            last = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1]
            prior = torch.softmax(probe(last[None]).float(), -1)[0].double().tolist()
            at_1 = decode.states[(decode.request == row[request["id"]]) & (decode.generated == 1)]
            p1 = torch.softmax(probe(at_1).float(), -1)[0].double()
        moved = [prior[0]] + [0.0] * 3
        for i in range(1, 4):
            moved[i] += prior[i] * (1 - 1 / width)
            moved[i - 1] += prior[i] / width
        post = torch.tensor(moved, dtype=torch.float64) * p1
        expected = min(float((post / post.sum() * mids).sum()), 24 - 1)
        assert request["refined"][0][0] == 1 and request["refined"][0][1] == pytest.approx(expected, abs=2e-3), request["id"]


# -- the pooled inputs and sampled answers (issue 27) ------------------------------------------
def test_sampled_answer_lengths_are_stored_beside_and_a_resumed_run_keeps_them(tiny_llama, prompts_file, tmp_path,
                                                                                monkeypatch):
    out = tmp_path / "ex"
    # extract.inputs=trained (the default): TRAIL's two and what these probes read, nothing else
    cfg = _cfg(tiny_llama, prompts_file, out, "extract.num_samples=3", "generation.temperature=1.5",
               "train.prompt_input=last", "train.decode_input=current+entropy")
    real = extract_mod.sample_lengths
    monkeypatch.setattr(extract_mod, "sample_lengths", dies_after(4, real))
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg, show_progress=False)
    kept = json.loads((out / "samples" / "worker-0.json").read_text())["lengths"]
    assert len(kept) == 4  # written on the way out
    monkeypatch.setattr(extract_mod, "sample_lengths", real)
    run_extract(cfg, show_progress=False)
    ex = Extraction(out)
    sampled = ex.sampled_lengths()
    assert sampled.shape == (10, 3) and int(sampled.max()) <= 24
    assert {rid: sampled[ex.ids.index(rid)].tolist() for rid in kept} == kept  # the first four were not drawn again
    assert (sampled != ex.output_tokens[:, None]).any()  # sampled at temperature 1.5, not the greedy answers
    saved = json.loads((out / "samples" / "worker-0.json").read_text())
    assert (saved["num_samples"], saved["temperature"], saved["top_p"], saved["seed"]) == (3, 1.5, 1.0, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == {"prompt": ["mean", "last"], "decode": ["current", "entropy"]}
    with pytest.raises(UserError, match="holds answers sampled with .*'num_samples': 3.*delete the folder"):
        run_extract(_cfg(tiny_llama, prompts_file, out, "extract.num_samples=5", "generation.temperature=1.5",
                         "train.prompt_input=last", "train.decode_input=current+entropy"), show_progress=False)


def test_sampled_answers_added_later_keep_the_extraction_as_it_was(tiny_llama, prompts_file, tmp_path, capsys):
    out = tmp_path / "ex"
    run_extract(_cfg(tiny_llama, prompts_file, out, "prompts.num_prompts=4"), show_progress=False)
    manifest, shards = (out / "manifest.json").read_bytes(), sorted((out / "shards").iterdir())
    with pytest.raises(UserError, match="holds no sampled answers; run the same extract command with extract.num_samples"):
        Extraction(out).sampled_lengths()
    capsys.readouterr()
    run_extract(_cfg(tiny_llama, prompts_file, out, "prompts.num_prompts=4", "extract.num_samples=2"), show_progress=False)
    assert (out / "manifest.json").read_bytes() == manifest and sorted((out / "shards").iterdir()) == shards
    sampled = Extraction(out).sampled_lengths()
    assert Extraction(out).num_samples == 2 and sampled.shape == (4, 2)
    # the last line counts what this run generated: no extracted requests, the sampled answers and their tokens
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("extract: worker 0 complete: 0 requests, 0 tokens in ")
    assert f"; 4 prompts' 2 sampled answers, {int(sampled.sum())} tokens (" in last


def test_a_folder_from_before_the_pooled_inputs_is_kept_with_them_off(tiny_llama, prompts_file, tmp_path, capsys):
    """An extraction made before issue 27 (no inputs in its manifest, as extract.inputs=trail writes
    it): refused with extract.inputs=all, which stores more, naming what differs; resumed as it is, its
    manifest unchanged, with extract.inputs=trail."""
    out = tmp_path / "ex"
    run_extract(_cfg(tiny_llama, prompts_file, out, "extract.inputs=trail"), show_progress=False)
    before = (out / "manifest.json").read_bytes()
    manifest = json.loads(before)  # with TRAIL's inputs only, the manifest is what older versions wrote
    assert not {"inputs", "num_samples", "samples"} & (set(manifest) | set(manifest["identity"]))
    ex = Extraction(out)
    assert ex.inputs == {"prompt": ["mean"], "decode": ["current"]}
    with pytest.raises(UserError, match="stores the decode inputs current only .made before pooled inputs.*extract again"):
        ex.decode(1, "mean")
    args = [f"model.name_or_path={tiny_llama}", f"prompts.source={prompts_file}", f"extract.out_dir={out}",
            "generation.max_new_tokens=24", "generation.batch_size=3", "extract.decode_stride=2", "extract.shard_size=2"]
    code, err = _run_cli(capsys, *args, "extract.inputs=all")
    assert code == 2 and "different config (inputs.decode: ['current'] there" in err
    assert _run_cli(capsys, *args, "extract.inputs=trail")[0] == 0
    run_extract(_cfg(tiny_llama, prompts_file, out, "extract.inputs=trail"), show_progress=False)
    assert (out / "manifest.json").read_bytes() == before  # so its hash, which every probe records, is kept
