"""TRAIL inside transformers' continuous-batching engine, on a tiny random Llama (CPU, seconds)."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import trail_weights, write_trail_dir

from trail_probe.errors import UserError
from trail_probe.runtime import LengthPredictor
from trail_probe.runtime.models import encode_prompt
from trail_probe.serving.hf_engine import (
    ServeEngine,
    TrailState,
    check_transformers,
    serve,
)
from trail_probe.serving.trail_state import RequestView

BUDGET = 96  # max new tokens
LAYER = 1
TEXTS = [f"Tell me fact number {i} about {'cats' if i % 2 else 'the sea'}." for i in range(12)]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


def make_predictor(folder, favour_bin: int | None = None) -> LengthPredictor:
    """A probe over the tiny Llama's layer 1 (d = 64); `favour_bin` makes it predict that bin always."""
    w = trail_weights(d=64)
    if favour_bin is not None:
        w["fc2.weight"].zero_()
        w["fc2.bias"].zero_()
        w["fc2.bias"][favour_bin] = 30.0
    return LengthPredictor.from_pretrained(write_trail_dir(folder, w, hidden_size=64, probe_layer_idx=LAYER,
                                                           max_len=BUDGET, device="cpu"))


class StubBert:
    """Stands in for the BERT predictor: a fixed bin per prompt text (bin 0 unless told)."""

    def __init__(self, bins, bin_of: dict[str, int]):
        self.bins, self.bin_of = bins, bin_of

    def probs(self, texts):
        out = torch.full((len(texts), self.bins.num_bins), 1e-6)
        for i, t in enumerate(texts):
            out[i, self.bin_of.get(t, 0)] = 1.0
        return out


def runtime(predictor, policy="trail", bin_of=None, c=0.8, k=8):
    return TrailState(policy, record=True, predictor=predictor, text_predictor=StubBert(predictor.bins, bin_of or {}),
                        initial="bert", max_new_tokens=BUDGET, refine_interval=k, preemption_c=c)


def engine(llm, policy, rt=None, max_batch=3):
    model, tok = llm
    return ServeEngine(model, policy, runtime=rt, max_batch=max_batch, max_new_tokens=BUDGET,
                       eos_token_id=tok.eos_token_id, page_size=16, num_blocks=512, max_batch_tokens=64)


def requests(tok, texts=TEXTS):
    return [(f"r{i}", encode_prompt(tok, t), t) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def fifo_run(llm):
    with engine(llm, "fifo") as eng:
        results, _ = serve(eng, requests(llm[1]), [0.0] * len(TEXTS))
        steps = list(eng.scheduler.steps)
    return {r.request_id: r for r in results}, steps


def test_fifo_scheduler_logs_every_step(fifo_run):
    results, steps = fifo_run
    assert len(results) == len(TEXTS)
    lengths = [len(r.tokens) for r in results.values()]
    assert min(lengths) < BUDGET // 2 and max(lengths) == BUDGET  # varied answers, some hit the cap
    # one token per request per step once prefilled: steps >= the longest answer, batches <= 3
    assert len(steps) >= max(lengths) and max(s.requests for s in steps) == 3
    assert all(r.arrival <= r.first_token <= r.finish for r in results.values())


def count_steps(eng, n: int) -> threading.Event:
    """An event the engine's scheduler sets when it logs its n-th step (install before the engine starts)."""
    reached, base = threading.Event(), eng.factory.cls

    class Counting(base):
        def _log_step(self, *args, **kwargs):
            super()._log_step(*args, **kwargs)
            if len(self.steps) >= n:
                reached.set()

    eng.factory.cls = Counting
    return reached


def check_engine_can_still_deliver(eng, idle_before: bool) -> bool:
    """Fail at once when the engine has stopped, or has had no work left at two checks in a row
    (requests taken from its input queue are briefly in neither place); return whether it is idle now."""
    manager = eng.manager
    assert manager.is_running() and manager.background_thread_status.fatal_error is None, "the engine stopped"
    s = eng.scheduler
    idle = manager.input_queue.empty() and (s is None or not (s.active_requests or s.waiting_requests))
    assert not (idle and idle_before), "the engine has nothing left to do, so what the test waits for never comes"
    return idle


def wait_for(event: threading.Event, eng) -> None:
    """Until `event` is set; the engine's own state, not a deadline, decides that it never will be."""
    idle = False
    while not event.wait(0.2):  # how often the engine is looked at, not a limit
        idle = check_engine_can_still_deliver(eng, idle)


def collect(eng, n: int) -> dict:
    """`n` finished requests, failing (not hanging) when the engine stops or loses one."""
    done, idle = {}, False
    while len(done) < n:
        r = eng.result(timeout=0.2)
        if r is None:
            idle = check_engine_can_still_deliver(eng, idle)
            continue
        idle = False
        done[r.request_id] = r
    return done


def test_trail_gives_every_request_the_same_tokens_as_fifo(llm, fifo_run, tmp_path):
    # BERT says the six longest answers are long; the other six, predicted short, arrive once those
    # are decoding and preempt them; the probe then calls everything long, so requests are paused and
    # resumed back and forth: the cache of a paused request must come back intact.
    fifo, _ = fifo_run
    by_length = sorted(fifo, key=lambda k: -len(fifo[k].tokens))
    text = {f"r{i}": t for i, t in enumerate(TEXTS)}
    rt = runtime(make_predictor(tmp_path / "p", favour_bin=9),
                 bin_of={text[k]: (9 if i < 6 else 0) for i, k in enumerate(by_length)})
    reqs = {rid: (ids, t) for rid, ids, t in requests(llm[1])}
    eng = engine(llm, "trail", rt)
    decoding = count_steps(eng, 5)
    with eng:
        for rid in by_length[:6]:
            eng.submit(rid, *reqs[rid])
        wait_for(decoding, eng)  # the long six are decoding (the shortest of them has >= 5 tokens left)
        for rid in by_length[6:]:
            eng.submit(rid, *reqs[rid])
        results = collect(eng, len(TEXTS))
    assert min(len(fifo[k].tokens) for k in by_length[:6]) > 8
    assert {k: r.tokens for k, r in results.items()} == {k: r.tokens for k, r in fifo.items()}
    assert rt.refinements > 0 and rt.preemptions > 0 and rt.paused_past_limit == 0
    assert len(rt.tracker) == 0  # every finished request left the tracker


@pytest.mark.parametrize("decode_input", ["current", "mean", "current+mean"])
def test_refinement_reads_each_requests_own_input_from_the_packed_batch(llm, tmp_path, decode_input):
    """The input the tracker is given at every refinement equals `probe_inputs.decode_input` over a
    teacher-forced forward pass of that request alone: TRAIL's current state, and (issue 27's parity
    check) the generated tokens' running mean the runtime pools online, alone or beside it."""
    import json

    from trail_probe.runtime.probe_inputs import decode_input as offline_input

    model, tok = llm
    width = 64 * (2 if "+" in decode_input else 1)
    folder = write_trail_dir(tmp_path / "p", trail_weights(d=width), hidden_size=width, probe_layer_idx=LAYER,
                             max_len=BUDGET, device="cpu")
    (folder / "trail_probe.json").write_text(json.dumps({"task": "decode", "input": decode_input}))
    rt = runtime(LengthPredictor.from_pretrained(folder), k=4)
    assert (rt.pools is None) == (decode_input == "current")
    seen = []
    observe = rt.tracker.observe

    def spy(ids, states, generated, **kw):
        seen.extend(zip(ids, states.clone(), list(generated)))
        return observe(ids, states, generated, **kw)

    rt.tracker.observe = spy
    reqs = requests(tok, TEXTS[:5])
    with engine(llm, "trail", rt) as eng:
        results, _ = serve(eng, reqs, [0.0, 0.0, 0.01, 0.02, 0.02])
    tokens = {r.request_id: r.tokens for r in results}
    prompts = {rid: ids for rid, ids, _ in reqs}
    assert {g for _, _, g in seen} >= {1, 5, 9} and all((g - 1) % 4 == 0 for _, _, g in seen)
    assert all(s.shape == (width,) for _, s, _ in seen)
    for rid, state, g in seen[::3]:
        with torch.no_grad():
            h = model(torch.tensor([prompts[rid] + tokens[rid][:g]]), output_hidden_states=True).hidden_states[LAYER + 1][0]
        generated = h[len(prompts[rid]):]  # positions P - 1 + j, j = 1 .. g
        assert len(generated) == g
        ref = offline_input(decode_input, h[-1], sum_h=generated.sum(0), count=g)
        assert torch.allclose(state, ref, atol=1e-4), (rid, g)
    assert rt.pools is None or len(rt.pools) == 0  # every finished request's pool was freed


def test_last_token_initial_refuses_a_pooled_decode_probe(tmp_path):
    import json

    folder = write_trail_dir(tmp_path / "p", trail_weights(d=128), hidden_size=128, probe_layer_idx=LAYER,
                             max_len=BUDGET, device="cpu")
    (folder / "trail_probe.json").write_text(json.dumps({"task": "decode", "input": "current+mean"}))
    with pytest.raises(UserError, match="last_token.*current\\+mean"):
        TrailState("trail", predictor=LengthPredictor.from_pretrained(folder), initial="last_token", max_new_tokens=BUDGET)


@pytest.mark.parametrize("prompt_input", ["mean", "last"])
def test_the_prompt_probe_reads_its_own_layer_and_input(llm, tmp_path, prompt_input):
    """A prompt probe on another layer than the decode probe's (layer 0 here, the decode probe's 1):
    each request's initial estimate is that probe on its own layer's prompt states, pooled as it was
    trained (the mean, or the last prompt token's state), from a teacher-forced pass of the prompt alone."""
    import json

    model, tok = llm
    predictor = make_predictor(tmp_path / "p")
    folder = write_trail_dir(tmp_path / "prompt", trail_weights(d=64, seed=5), hidden_size=64, probe_layer_idx=0,
                             max_len=BUDGET, device="cpu")
    (folder / "trail_probe.json").write_text(json.dumps({"task": "prompt", "input": prompt_input}))
    prompt = LengthPredictor.from_pretrained(folder)
    rt = TrailState("trail", record=True, predictor=predictor, prompt_predictor=prompt, initial="prompt_probe",
                    max_new_tokens=BUDGET, refine_interval=4)
    assert rt.state_layers == [0, LAYER] and rt.prompt_input == prompt_input
    reqs = requests(tok, TEXTS[:3])  # prefilled together: no prompt starts from another's cached blocks
    with ServeEngine(model, "trail", runtime=rt, max_batch=3, max_new_tokens=BUDGET, eos_token_id=tok.eos_token_id,
                     page_size=16, num_blocks=512, max_batch_tokens=256) as eng:
        serve(eng, reqs, [0.0, 0.0, 0.0])
    for rid, ids, _ in reqs:
        with torch.no_grad():
            states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        pooled = states.mean(0) if prompt_input == "mean" else states[-1]
        expected = float(prompt.bins.expectation(prompt.probs(pooled[None]).double())[0])
        assert rt.initial_estimates[rid] == pytest.approx(expected, abs=1e-2), rid


def _two_requests(llm, fifo_run, policy, rt, bins: tuple[int, int]):
    """A long answer arrives first; once it has produced a few tokens a short one arrives. One
    request per batch, so the second waits unless the first is paused."""
    model, tok = llm
    fifo, _ = fifo_run
    long_id = max(fifo, key=lambda k: len(fifo[k].tokens))
    short_id = min(fifo, key=lambda k: len(fifo[k].tokens))
    text = {f"r{i}": t for i, t in enumerate(TEXTS)}
    if rt is not None:
        rt.text_predictor.bin_of.update({text[long_id]: bins[0], text[short_id]: bins[1]})
    eng = engine(llm, policy, rt, max_batch=1)
    decoding = count_steps(eng, 5)
    with eng:
        eng.submit(long_id, encode_prompt(tok, text[long_id]), text[long_id])
        wait_for(decoding, eng)
        eng.submit(short_id, encode_prompt(tok, text[short_id]), text[short_id])
        done = collect(eng, 2)
    assert done[long_id].tokens == fifo[long_id].tokens and done[short_id].tokens == fifo[short_id].tokens
    return done[long_id], done[short_id]


def test_a_short_request_arriving_after_a_long_one_finishes_first(llm, fifo_run, tmp_path):
    long_r, short_r = _two_requests(llm, fifo_run, "fifo", None, (0, 0))
    assert short_r.finish > long_r.finish  # FIFO: the short one waits for the whole long answer
    rt = runtime(make_predictor(tmp_path / "p", favour_bin=9), policy="trail_bert")
    long_r, short_r = _two_requests(llm, fifo_run, "trail_bert", rt, (9, 0))
    assert short_r.finish < long_r.finish and rt.preemptions >= 1 and rt.paused_past_limit == 0


def test_a_request_past_its_preemption_limit_is_never_paused(llm, fifo_run, tmp_path):
    # BERT says the first request is short (bin 0: ~5 tokens, so C * 5 = 4 tokens), the probe then
    # says it is long; the short second request ranks better but the first is past its limit.
    rt = runtime(make_predictor(tmp_path / "p", favour_bin=9), policy="trail")
    long_r, short_r = _two_requests(llm, fifo_run, "trail", rt, (0, 0))
    assert short_r.first_token > long_r.finish
    assert rt.preemptions == 0 and rt.paused_past_limit == 0
    assert rt.trace[long_r.request_id][0][1] > 50  # the probe did rank it long


def test_bad_setups_fail_in_one_line(llm, tmp_path, monkeypatch):
    predictor = make_predictor(tmp_path / "p")
    with pytest.raises(UserError, match="needs a TrailState"):
        engine(llm, "trail")
    with pytest.raises(UserError, match="not one of fifo, trail"):
        engine(llm, "lifo")
    with pytest.raises(UserError, match="text_predictor"):
        TrailState("trail", predictor=predictor, initial="bert")
    with pytest.raises(UserError, match="ranks by the initial estimate alone"):
        TrailState("sjf_bert", predictor=predictor, initial="none")
    with pytest.raises(UserError, match="engine's own scheduler"):
        TrailState("fcfs", predictor=predictor, initial="none")
    wide = LengthPredictor.from_pretrained(write_trail_dir(tmp_path / "w", trail_weights(d=64), hidden_size=64,
                                                           probe_layer_idx=7, max_len=BUDGET, device="cpu"))
    with pytest.raises(UserError, match="layers 0..2"):
        with engine(llm, "trail", TrailState("trail", predictor=wide, initial="none")):
            pass
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.30.0")
    with pytest.raises(UserError, match=r"pip install 'transformers>=5.19,<5.25'"):
        check_transformers()


class ReplayClock:
    """The client's time in `serve`, moved only by its waits: the replay is checked exactly, at once."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return False  # never stopped


class RecordingEngine:
    """Stands in for ServeEngine: notes when (by the replay's clock) and in what order requests are
    submitted, and finishes each at once."""

    def __init__(self, clock: ReplayClock):
        self.clock, self.submitted, self.done = clock, [], queue.Queue()

    def submit(self, rid, ids, text):
        self.submitted.append((rid, self.clock.now))
        self.done.put(SimpleNamespace(request_id=rid, error=None))

    def result(self, timeout=None):
        try:
            return self.done.get(timeout=timeout)
        except queue.Empty:
            return None


def test_serve_replays_arrival_times():
    """Each request is handed over at its planned time (after t0), in order, and every result is collected."""
    clock = ReplayClock()
    engine = RecordingEngine(clock)
    reqs = [(f"r{i}", [1, 2], f"text {i}") for i in range(4)]
    results, t0 = serve(engine, reqs, [0.0, 0.25, 0.25, 1.5], clock=clock, wait=clock.wait)
    assert t0 == 100.0 and engine.submitted == [("r0", 100.0), ("r1", 100.25), ("r2", 100.25), ("r3", 101.5)]
    assert sorted(r.request_id for r in results) == ["r0", "r1", "r2", "r3"]
    with pytest.raises(UserError, match="3 requests but 2 arrival times"):
        serve(engine, reqs[:3], [0.0, 0.1])


def test_the_oracle_ranks_by_exact_lengths_counted_down():
    rt = TrailState("oracle", max_new_tokens=BUDGET, record=True)
    assert not rt.needs_states and rt.layer is None
    rt.exact_lengths.update({"a": 30, "b": 5, "c": 10 * BUDGET})
    rt.admit(["a", "b", "c"])
    views = [RequestView("a", 0, 0.0, generated=10), RequestView("b", 1, 0.0, generated=7), RequestView("c", 2, 0.0)]
    rt.estimate(views)
    assert [(v.initial_estimate, v.remaining_estimate) for v in views] == [(30.0, 20.0), (5.0, 0.0), (BUDGET, BUDGET)]
    rt.remove("a")
    assert not rt.tracks("a") and "a" not in rt.exact_lengths
    with pytest.raises(UserError, match="exact output length; none was given for d"):
        rt.admit(["d"])
