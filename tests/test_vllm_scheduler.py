"""TRAIL's vLLM scheduler driven through vLLM's own `Scheduler` (its real `schedule` and
`update_from_output`, its KV cache manager and prefix cache), with a stand-in model output
(`trail_probe.serving.vllm_dry_run`): these fail when the plugin and vLLM disagree."""

import math

import pytest
import torch

pytest.importorskip("vllm")

from conftest import trail_weights, write_trail_dir  # noqa: E402

from trail_probe.serving.trail_settings import TrailSettings  # noqa: E402
from trail_probe.serving.vllm_dry_run import (  # noqa: E402
    StandInModel,
    dry_request,
    dry_scheduler,
    fixed_state,
)

WIDTH, MAX_LEN, BLOCK = 128, 64, 16


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """Only a config: the dry-run scheduler never runs the model."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("cfg-llama")
    LlamaConfig(vocab_size=64, hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    """A decode probe on layer 1 with its prompt probe (layer 0) bundled, over 10 bins of [0, 64]."""
    folder = write_trail_dir(tmp_path_factory.mktemp("pred") / "p", trail_weights(d=WIDTH), hidden_size=WIDTH,
                             probe_layer_idx=1, max_len=MAX_LEN, device="cpu")
    write_trail_dir(folder / "prompt", trail_weights(d=WIDTH, seed=3), hidden_size=WIDTH, probe_layer_idx=0,
                    max_len=MAX_LEN, device="cpu")
    return folder


def settings(predictor, **changes) -> TrailSettings:
    """Refinements at every k tokens (refine_when=always) unless a test asks otherwise: most tests here
    check how refinements are made, with or without a queue."""
    return TrailSettings(predictor=str(predictor), **{"refine_interval": 4, "record": True, "refine_when": "always",
                                                      **changes})


def run(folder, s, requests, lengths, async_scheduling=False, **kwargs):
    sched = dry_scheduler(folder, s, async_scheduling=async_scheduling, **kwargs)
    for r in requests:
        sched.add_request(r)
    model = StandInModel(sched, lengths, width=WIDTH, async_scheduling=async_scheduling)
    model.drain(5000)
    assert not sched.has_requests()
    return sched, model


def burst(n=8, prompt=20, max_tokens=60, shared=0):
    reqs, lengths = [], {}
    for i in range(n):
        ids = list(range(3, 3 + shared)) + [10 + (i * 7 + j) % 50 for j in range(prompt + i)]
        reqs.append(dry_request(f"r{i}", ids, max_tokens=max_tokens, arrival=float(i)))
        lengths[f"r{i}"] = 3 + (11 * i) % 40
    return reqs, lengths


def test_a_burst_is_prefilled_first_then_at_most_max_running_decode(model_folder, predictor):
    reqs, lengths = burst()
    s, model = run(model_folder, settings(predictor, max_running=2), reqs, lengths, max_num_seqs=8)
    log = s.log()
    assert log["live"]["finished_scored"] == len(reqs) and log["live"]["pauses"] > 0
    assert log["trail"]["paused_past_limit"] == 0 and log["live"]["fallback_steps"] == 0
    # every request's first step (its prefill) came before any request decoded for the third time
    first = {rid: next(i for i, b in enumerate(model.batches) if rid in b) for rid in lengths}
    assert max(first.values()) <= 3, first
    # once all are prefilled and ranked, no step decodes more than max_running requests
    decoding = [len(b) for b in model.batches[max(first.values()) + 2:]]
    assert decoding and max(decoding) <= 2, decoding
    # no per-request state outlives its request
    q = s.trail
    assert not (q.views or q.unstarted or q.awaiting or len(q.paused) or len(q.queued) or q.ran or len(q.prompt_sums))
    assert len(s.runtime.tracker) == 0


@pytest.mark.parametrize("order", ["shortest", "arrival"])
def test_a_burst_starts_its_prefills_shortest_prompt_first_or_in_arrival_order(model_folder, predictor, order):
    """The later a request arrives here the shorter its prompt; the token budget fits about two prompts a step."""
    reqs, lengths = [], {}
    for i in range(6):
        reqs.append(dry_request(f"r{i}", [10 + (i * 5 + j) % 50 for j in range(40 - 5 * i)], max_tokens=30,
                                arrival=float(i)))
        lengths[f"r{i}"] = 5 + 3 * i
    s, model = run(model_folder, settings(predictor, prefill_order=order), reqs, lengths, max_num_batched_tokens=64)
    assert s.log()["live"]["finished_scored"] == len(reqs)
    first = [next(i for i, b in enumerate(model.batches) if rid in b) for rid in lengths]
    if order == "shortest":  # each step the oldest waiting prompt, then the shortest that fit: r0 + r5, r1 + r4, r2 + r3
        assert first == [0, 1, 2, 2, 1, 0], first
    else:
        assert first == sorted(first) and first[-1] > first[0], first


@pytest.mark.parametrize("alone, async_scheduling", [(True, False), (False, False), (True, True)])
def test_a_bursts_prefills_run_alone_while_they_fill_the_prefill_budget(model_folder, predictor, alone, async_scheduling):
    """prefills_alone: while the new requests' prompts fill a step's prefill budget (about three 20-token
    prompts here), the step prefills and nothing decodes; without it the running requests decode beside them."""
    reqs, lengths = burst(n=10)
    budget = 64
    s, model = run(model_folder, settings(predictor, prefills_alone=alone, max_prefill_tokens=budget), reqs, lengths,
                   async_scheduling=async_scheduling, max_num_batched_tokens=budget)
    log = s.log()
    assert log["live"]["finished_scored"] == len(reqs) and log["live"]["fallback_steps"] == 0
    first = {rid: next(i for i, b in enumerate(model.batches) if rid in b) for rid in lengths}
    # the steps that started new requests while the waiting prompts still filled the budget
    prompt = {r.request_id: r.num_prompt_tokens for r in reqs}
    full = [b for b in range(len(model.batches))
            if sum(prompt[rid] for rid in lengths if first[rid] >= b) >= budget and any(first[rid] == b for rid in lengths)]
    decoding = [[rid for rid in model.batches[b] if first[rid] < b] for b in full]
    assert full and (log["live"]["prefill_steps"] > 0) == alone, log["live"]
    if alone:
        assert not any(decoding), decoding
        assert log["live"]["prefill_steps"] == len(full)
    else:
        assert any(decoding), decoding


def test_a_trickle_of_arrivals_never_holds_the_decodes(model_folder, predictor):
    """One new prompt at a time never fills the prefill budget: no step runs prefills alone."""
    reqs, lengths = burst(n=6)
    sched = dry_scheduler(model_folder, settings(predictor))
    model = StandInModel(sched, lengths, width=WIDTH)
    for r in reqs:
        sched.add_request(r)
        for _ in range(3):
            model.step()
    model.drain(5000)
    log = sched.log()
    assert log["live"]["finished_scored"] == len(reqs) and log["live"]["prefill_steps"] == 0


@pytest.mark.parametrize("when, max_running, refined", [("waiting", 0, False), ("always", 0, True),
                                                        ("waiting", 2, True)])
def test_refinements_are_made_only_while_requests_wait_for_a_slot(model_folder, predictor, when, max_running, refined):
    """refine_when=waiting: with every request running (no queue) no state leaves the worker but the
    prefills' and no probe runs but the prompt probe; with more requests than slots the running ones
    are refined (and the ranking pauses some). refine_when=always refines either way."""
    reqs, lengths = burst(n=6)
    s, model = run(model_folder, settings(predictor, refine_when=when, max_running=max_running), reqs, lengths)
    log = s.log()
    assert log["live"]["finished_scored"] == len(reqs) and set(log["initial_estimates"]) == set(lengths)
    assert (log["trail"]["refinements"] > 0) == refined, log["trail"]
    assert (log["live"]["pauses"] > 0) == (max_running == 2), log["live"]
    assert (model.states_asked > 0) == refined, model.states_asked


@pytest.mark.parametrize("grammar_call", [True, False])
def test_a_pass_refines_during_the_next_pass_at_the_output_count_of_its_states(model_folder, predictor, grammar_call):
    """States arrive with a pass's output and refine in the scheduler's get_grammar_bitmask of the next
    step (vLLM calls it while the worker runs that pass); a step that skips the call refines at the
    start of the step after. Either way at the output count the states were computed at."""
    reqs, lengths = burst(n=4, max_tokens=60)
    s = dry_scheduler(model_folder, settings(predictor, refine_interval=1))
    for r in reqs:
        s.add_request(r)
    model = StandInModel(s, {rid: 40 for rid in lengths}, width=WIDTH, grammar_call=grammar_call)
    while not s.trail.deferred:
        model.step()
    (step, ids, _, gens), = s.trail.deferred
    before, traced = s.runtime.refinements, {rid: len(s.runtime.trace.get(rid, [])) for rid in ids}
    assert ids and all(s.requests[rid].num_output_tokens == g + 1 for rid, g in zip(ids, gens))  # tokens applied since
    model.step()
    waiting = [d[0] for d in s.trail.deferred]  # this step's own states wait in their turn
    assert (step in waiting) != grammar_call  # made in this step's get_grammar_bitmask, or still waiting
    if not grammar_call:
        model.step()
        assert step not in [d[0] for d in s.trail.deferred]
    assert s.runtime.refinements >= before + len(ids)
    for rid, g in zip(ids, gens):
        assert s.runtime.trace[rid][traced[rid]][0] == g


def test_a_small_batch_with_chunked_prefills_never_holds_more_than_max_num_seqs(model_folder, predictor):
    """Requests awaiting their estimate keep their slots: ranking others into the same batch made vLLM's
    own check (len(running) <= max_num_seqs) kill the engine."""
    reqs, lengths = burst(n=10, prompt=20)
    s, model = run(model_folder, settings(predictor), reqs, lengths, max_num_seqs=3, max_num_batched_tokens=16)
    assert s.log()["live"]["finished_scored"] == len(reqs) and s.log()["live"]["fallback_steps"] == 0
    assert max(len(b) for b in model.batches) <= 3


class _Compiling:
    """A structured-output request's grammar, compiled after `reads` looks; then the request runs as a
    plain one (the stand-in model applies no grammar)."""

    def __init__(self, request, reads: int):
        self.request, self.reads = request, reads

    @property
    def grammar(self):
        self.reads -= 1
        if self.reads > 0:
            return None
        self.request.structured_output_request = None
        return "compiled"


def test_a_request_whose_grammar_compiles_later_is_started_and_never_admitted_twice(model_folder, predictor):
    """vLLM promotes such a request only when its admission loop reaches it; TRAIL caps that loop at its
    own choice, so it promotes ready ones itself, and never counts a waiting one as running."""
    from vllm.v1.request import RequestStatus

    reqs, lengths = burst(n=6)
    late = reqs[2]
    late.status = RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    late.structured_output_request = _Compiling(late, reads=3)
    for policy_settings in (settings(predictor), settings(predictor, initial="none")):
        s, model = run(model_folder, policy_settings, reqs, lengths, max_num_seqs=8)
        assert s.log()["live"]["finished_scored"] == len(reqs) and s.log()["live"]["fallback_steps"] == 0
        first = [i for i, b in enumerate(model.batches) if late.request_id in b]
        assert first and first[0] <= 6, first
        reqs, lengths = burst(n=6)
        late = reqs[2]
        late.status = RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
        late.structured_output_request = _Compiling(late, reads=3)


def test_a_request_with_no_finite_estimate_ranks_at_its_budget_and_is_counted(model_folder, predictor, monkeypatch, caplog):
    reqs, lengths = burst(n=8)
    sched = dry_scheduler(model_folder, settings(predictor, max_running=2), max_num_seqs=8)
    plain = sched.runtime.tracker.estimates
    monkeypatch.setattr(sched.runtime.tracker, "estimates",
                        lambda ids, generated: torch.where(torch.tensor([i == "r3" for i in ids]), math.nan,
                                                           plain(ids, generated)))
    for r in reqs:
        sched.add_request(r)
    StandInModel(sched, lengths, width=WIDTH).drain(5000)
    assert not sched.has_requests() and sched.log()["live"]["fallback_steps"] == 0
    assert sched.runtime.unestimable > 0 and "r3 has no finite length estimate" in caplog.text


def test_without_a_queue_every_request_runs_and_nothing_is_paused(model_folder, predictor):
    reqs, lengths = burst(n=4)
    s, model = run(model_folder, settings(predictor), reqs, lengths, max_num_seqs=8)
    assert s.log()["live"]["pauses"] == 0
    assert all(len(b) == len(reqs) for b in model.batches[1:3])  # all four decode side by side (r0 ends at 3)


def test_prompt_probe_estimate_is_the_mean_over_every_prompt_token_even_after_a_prefix_cache_hit(model_folder, predictor):
    """Requests sharing two full KV blocks of prompt: the later ones start after them (vLLM's prefix
    cache), and their estimate is still the prompt probe on the mean over all their prompt tokens."""
    from trail_probe.runtime import LengthPredictor

    reqs, lengths = burst(n=4, shared=2 * BLOCK)
    sched = dry_scheduler(model_folder, settings(predictor), max_num_seqs=2, max_num_batched_tokens=64)
    model = StandInModel(sched, lengths, width=WIDTH)
    for r in reqs:  # one at a time, so each later request finds the shared blocks cached
        sched.add_request(r)
        model.step()
    model.drain(5000)
    log = sched.log()
    prompt = LengthPredictor.from_pretrained(predictor / "prompt", device="cpu")
    bins = prompt.bins
    for r in reqs:
        ids = r.prompt_token_ids
        mean = torch.stack([fixed_state(ids[: p + 1], WIDTH) for p in range(len(ids))]).mean(0)
        expected = float(bins.expectation(prompt.probs(mean[None]).double())[0])
        assert log["initial_estimates"][r.request_id] == pytest.approx(min(expected, r.max_tokens), abs=1e-3)
    assert log["live"]["incomplete_prompt_means"] == 0
    assert len({round(e, 3) for e in log["initial_estimates"].values()}) > 1


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_last_token_prompt_probe_estimates_from_the_last_prompt_tokens_state(model_folder, predictor, tmp_path,
                                                                                async_scheduling):
    """A prompt probe trained on the last prompt token's state (train.prompt_input=last) is served:
    each request's initial estimate is that probe on its last prompt token's state, also after a
    prefix-cache hit and with chunked prefills, and no prompt sums are kept."""
    import json
    import shutil

    from trail_probe.runtime import LengthPredictor

    last = tmp_path / "last"
    shutil.copytree(predictor, last)
    (last / "prompt" / "trail_probe.json").write_text(json.dumps({"task": "prompt", "input": "last"}))
    reqs, lengths = burst(n=4, shared=2 * BLOCK)
    sched = dry_scheduler(model_folder, settings(last), max_num_seqs=2, max_num_batched_tokens=24,
                          async_scheduling=async_scheduling)
    assert sched.trail.prompt_sums is None
    model = StandInModel(sched, lengths, width=WIDTH, async_scheduling=async_scheduling)
    for r in reqs:
        sched.add_request(r)
        model.step()
    model.drain(5000)
    log = sched.log()
    prompt = LengthPredictor.from_pretrained(last / "prompt", device="cpu")
    assert prompt.input == "last"
    for r in reqs:
        state = fixed_state(r.prompt_token_ids, WIDTH)
        expected = float(prompt.bins.expectation(prompt.probs(state[None]).double())[0])
        assert log["initial_estimates"][r.request_id] == pytest.approx(min(expected, r.max_tokens), abs=1e-3)
    assert log["live"]["unestimated"] == 0 and log["live"]["finished_scored"] == len(reqs)


def test_async_scheduling_refines_at_the_same_points_with_the_same_estimates(model_folder, predictor):
    reqs, lengths = burst(n=6)
    logs = []
    for async_mode in (False, True):
        reqs, lengths = burst(n=6)
        s, _ = run(model_folder, settings(predictor, max_running=3), reqs, lengths, async_scheduling=async_mode,
                   max_num_seqs=8)
        assert type(s).__name__ == ("AsyncTrailVLLMScheduler" if async_mode else "TrailVLLMScheduler")
        logs.append(s.log())
    sync, asyn = logs
    assert sync["trace"] and sync["initial_estimates"] == pytest.approx(asyn["initial_estimates"])
    for rid, points in sync["trace"].items():
        assert [g for g, _ in points] == [g for g, _ in asyn["trace"][rid]]
        assert [g for g, _ in points] == list(range(1, len(points) * 4, 4))  # k = 4 from the first decode step
        # the same states; only float32 rounding of a differently composed batch may differ
        assert [e for _, e in points] == pytest.approx([e for _, e in asyn["trace"][rid]], rel=1e-5)


def test_each_request_ranks_within_its_own_max_tokens(model_folder, predictor):
    reqs, lengths = burst(n=4)
    reqs[0] = dry_request("r0", list(range(5, 30)), max_tokens=3)
    reqs[1] = dry_request("r1", list(range(6, 31)), max_tokens=300)  # beyond the probe's 64-token range
    lengths.update(r0=10, r1=100)
    s, _ = run(model_folder, settings(predictor), reqs, lengths, max_num_seqs=8)
    est = s.log()["initial_estimates"]
    assert est["r0"] <= 3 and est["r1"] <= MAX_LEN
    # r0 was cut at its own 3 tokens: how long its answer would have been is unknown, so it is not scored
    assert s.log()["live"]["finished_scored"] == len(reqs) - 1


def test_client_inputs_are_ignored_unless_allowed_and_well_formed(model_folder, predictor):
    from trail_probe.serving.vllm_scheduler import EXACT_LENGTH_KEY, INITIAL_PROBS_KEY, PROMPT_TEXT_KEY

    bad = [{INITIAL_PROBS_KEY: [1.0]}, {INITIAL_PROBS_KEY: "long"}, {INITIAL_PROBS_KEY: [0.0] * 10},
           {INITIAL_PROBS_KEY: [float("nan")] + [0.1] * 9}, {INITIAL_PROBS_KEY: [True] * 10},
           {EXACT_LENGTH_KEY: "7"}, {EXACT_LENGTH_KEY: -1}, {EXACT_LENGTH_KEY: 2.5}, {PROMPT_TEXT_KEY: 12}]
    good = {INITIAL_PROBS_KEY: [1.0] + [0.0] * 9}
    for allowed in (False, True):
        reqs, lengths = burst(n=len(bad) + 1)
        reqs = [dry_request(r.request_id, r.prompt_token_ids, 60, extra_args=x) for r, x in zip(reqs, bad + [good])]
        s, _ = run(model_folder, settings(predictor, client_estimates=allowed), reqs, lengths, max_num_seqs=16)
        live = s.log()["live"]
        assert live["ignored_client_inputs"] == (len(bad) + 1 if not allowed else len(bad))
        assert live["fallback_steps"] == 0 and live["finished_scored"] == len(reqs)
        assert all(math.isfinite(e) for e in s.log()["initial_estimates"].values())


def test_kv_pressure_takes_blocks_from_paused_requests_not_from_better_ranked_ones(model_folder, predictor):
    reqs, lengths = burst(n=10, prompt=40, max_tokens=60)
    for rid in lengths:
        lengths[rid] = 60
    s, model = run(model_folder, settings(predictor, max_running=2), reqs, lengths, max_num_seqs=10, num_blocks=24)
    live = s.log()["live"]
    assert live["finished_scored"] == len(reqs) and live["fallback_steps"] == 0
    assert live["kv_preemptions"] > 0  # paused requests gave their blocks back, then ran again (recomputed)


def test_a_failing_trail_step_falls_back_to_vllms_own_step_and_loses_no_request(model_folder, predictor, monkeypatch):
    reqs, lengths = burst(n=8)
    sched = dry_scheduler(model_folder, settings(predictor, max_running=2), max_num_seqs=8)
    real = sched.trail.before_step
    calls = [0]

    def sometimes_broken():
        calls[0] += 1
        if calls[0] % 3 == 0:
            raise RuntimeError("a bug in TRAIL's ranking")
        return real()

    monkeypatch.setattr(sched.trail, "before_step", sometimes_broken)
    for r in reqs:
        sched.add_request(r)
    model = StandInModel(sched, lengths, width=WIDTH)
    model.drain(5000)
    live = sched.log()["live"]
    assert live["fallback_steps"] > 0 and live["finished_scored"] == len(reqs)
    produced = {}
    for batch in model.batches:
        for rid in batch:
            produced[rid] = produced.get(rid, 0) + 1
    assert set(produced) == set(lengths)


def test_settings_refuse_unknown_keys_and_bad_values(predictor):
    from trail_probe.errors import UserError

    s = settings(predictor)
    assert TrailSettings.from_dict(s.additional_config()["trail_probe"]) == s
    with pytest.raises(UserError, match="unknown trail_probe setting.*refine_intervall"):
        TrailSettings.from_dict({"predictor": str(predictor), "refine_intervall": 8})
    with pytest.raises(UserError, match="predictor is required"):
        TrailSettings.from_dict({})
    for bad, match in ((dict(max_running=-1), "max_running"), (dict(initial="magic"), "initial"),
                       (dict(preemption_c=2.0), "preemption limit C"), (dict(policy="lifo"), "unknown scheduling policy"),
                       (dict(refine_interval=0), "refine_interval"), (dict(policy="oracle"), "client_estimates"),
                       (dict(initial="bert"), "client_estimates")):
        with pytest.raises(UserError, match=match):
            TrailSettings(predictor=str(predictor), **bad)
    with pytest.raises(UserError, match="needs a prompt probe"):
        TrailSettings(predictor=str(predictor), prompt_predictor="/nowhere").prompt_predictor_path()


def test_a_probe_that_reads_an_entropy_pool_is_refused_and_a_mean_pool_is_served(predictor, tmp_path):
    import json
    import shutil

    from trail_probe.errors import UserError
    from trail_probe.serving.trail_state import build_state

    pooled = tmp_path / "pooled"
    shutil.copytree(predictor, pooled)
    (pooled / "trail_probe.json").write_text(json.dumps({"task": "decode", "input": "entropy"}))
    with pytest.raises(UserError, match="decode probe .* reads 'entropy', which the serving engines do not compute"):
        build_state(TrailSettings(predictor=str(pooled), initial="none"))
    (pooled / "trail_probe.json").write_text(json.dumps({"task": "decode", "input": "mean"}))
    assert build_state(TrailSettings(predictor=str(pooled), initial="none")).pools is not None  # the generated tokens' mean
    (pooled / "trail_probe.json").unlink()
    (pooled / "prompt" / "trail_probe.json").write_text(json.dumps({"task": "prompt", "input": "entropy"}))
    with pytest.raises(UserError, match="prompt probe .* reads 'entropy'.*train.prompt_input=mean"):
        build_state(TrailSettings(predictor=str(pooled)))
    build_state(TrailSettings(predictor=str(predictor), initial="none"))  # TRAIL's inputs: served
    (pooled / "prompt" / "trail_probe.json").write_text(json.dumps({"task": "prompt", "input": "last"}))
    assert build_state(TrailSettings(predictor=str(pooled))).prompt_input == "last"  # the last prompt token: served


def test_a_current_plus_mean_probe_reads_two_states_of_the_models_width(tmp_path):
    """Its config.json's hidden_size is twice the model's: the engine's shape check and the worker's
    attach read the input from trail_probe.json."""
    import json

    from trail_probe.errors import UserError
    from trail_probe.serving.vllm_checks import check_model_shape, decode_input_of

    folder = write_trail_dir(tmp_path / "p", trail_weights(d=2 * WIDTH), hidden_size=2 * WIDTH, probe_layer_idx=1,
                             max_len=MAX_LEN, device="cpu")
    s = TrailSettings(predictor=str(folder), initial="none")
    with pytest.raises(UserError, match=f"width {2 * WIDTH} but the model's are {WIDTH}"):
        check_model_shape(s, 4, WIDTH)  # read as the current state alone: the wrong width
    (folder / "trail_probe.json").write_text(json.dumps({"task": "decode", "input": "current+mean"}))
    check_model_shape(s, 4, WIDTH)
    assert decode_input_of(s) == "current+mean"


def test_a_pooled_probe_in_the_scheduler_refines_from_the_inputs_the_worker_sends(model_folder, tmp_path):
    """The scheduler hands a current+mean probe's inputs (twice the model's width) to the tracker as they
    come from the worker, without pooling them again (`observe(pooled=True)`)."""
    import json

    folder = write_trail_dir(tmp_path / "p", trail_weights(d=2 * WIDTH), hidden_size=2 * WIDTH, probe_layer_idx=1,
                             max_len=MAX_LEN, device="cpu")
    (folder / "trail_probe.json").write_text(json.dumps({"task": "decode", "input": "current+mean"}))
    reqs, lengths = burst(n=6)
    sched, model = run(model_folder, settings(folder, initial="none", record_states=True), reqs, lengths)
    observed = list(sched.observed)
    assert sched.runtime.refinements > 0 and observed and all(len(s) == 2 * WIDTH for _, _, s in observed)
    assert sched.runtime.unestimable == 0 and len(sched.runtime.pools) == 0  # the runtime's own pools unused


def test_engine_checks_refuse_what_the_plugin_cannot_serve(model_folder, predictor, tmp_path):
    from trail_probe.errors import UserError
    from trail_probe.serving.vllm_checks import check_engine
    from trail_probe.serving.vllm_dry_run import dry_config

    s = settings(predictor)
    config = dry_config(model_folder, s)
    check_engine(s, config)
    deep = write_trail_dir(tmp_path / "deep", trail_weights(d=WIDTH), hidden_size=WIDTH, probe_layer_idx=7, device="cpu")
    with pytest.raises(UserError, match="layers 0..2"):
        check_engine(TrailSettings(predictor=str(deep), initial="none"), config)
    narrow = write_trail_dir(tmp_path / "narrow", trail_weights(d=64), hidden_size=64, probe_layer_idx=1, device="cpu")
    with pytest.raises(UserError, match="width 64 but the model's are 128"):
        check_engine(TrailSettings(predictor=str(narrow), initial="none"), config)
    config.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(UserError, match="pipeline parallelism"):
        check_engine(s, config)
    config.parallel_config.pipeline_parallel_size = 1
    config.scheduler_config.policy = "priority"
    with pytest.raises(UserError, match="scheduling-policy priority"):
        check_engine(s, config)
    config.scheduler_config.policy = "fcfs"
    config.speculative_config = object()  # any speculative setup: the probe would read draft rows
    with pytest.raises(UserError, match="speculative decoding"):
        check_engine(s, config)
    config.speculative_config = None
    # the plain `vllm serve` path: the scheduler's constructor makes the same checks before any request
    with pytest.raises(UserError, match="width 64 but the model's are 128"):
        dry_scheduler(model_folder, TrailSettings(predictor=str(narrow), initial="none"))
