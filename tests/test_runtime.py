"""Serving runtime: loading predictor directories (ours and TRAIL's), the batched tracker, the hook."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys

import pytest
import torch
from conftest import (
    HIDDEN,
    MAX_LEN,
    D,
    K,
    make_tiny_bert_predictor,
    trail_weights,
    write_trail_dir,
)

from trail_probe.errors import UserError
from trail_probe.runtime import (
    BertLengthPredictor,
    LengthPredictor,
    LengthTracker,
    capture_layer,
)
from trail_probe.runtime.refine import TransitionPowers, refine_sequence


def hand_written_estimate(x: torch.Tensor, w: dict, max_len: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reading of the format: MLP, softmax, expectation over linspace midpoints."""
    x = x.double()
    h = (x @ w["fc1.weight"].double().T + w["fc1.bias"].double()).clamp_min(0)
    logits = h @ w["fc2.weight"].double().T + w["fc2.bias"].double()
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    p = e / e.sum(-1, keepdim=True)
    mids = torch.tensor([(i + 0.5) * max_len / k for i in range(k)], dtype=torch.float64)
    return p, (p * mids).sum(-1)


@pytest.mark.parametrize("weights_file", ["model.safetensors", "model.pt"])
@pytest.mark.parametrize("sequential", [False, True])
def test_trail_directory_predicts_what_the_format_says(tmp_path, weights_file, sequential):
    w = trail_weights()
    folder = write_trail_dir(tmp_path / "p", w, weights_file, sequential)
    predictor = LengthPredictor.from_pretrained(folder)
    x = torch.randn(7, D)
    p_ref, est_ref = hand_written_estimate(x, w, MAX_LEN, K)
    assert torch.allclose(predictor.probs(x).double(), p_ref, atol=1e-6)
    assert torch.allclose(predictor.predict(x).double(), est_ref, atol=1e-3)
    assert predictor.layer == 3 and predictor.hidden_size == D
    assert predictor.bins.edges.tolist() == pytest.approx([i * MAX_LEN / K for i in range(K + 1)])
    if not torch.cuda.is_available():  # a predictor released for CUDA still loads here
        assert predictor.device.type == "cpu"


def test_config_dtype_is_applied(tmp_path):
    predictor = LengthPredictor.from_pretrained(write_trail_dir(tmp_path / "p", trail_weights(), dtype="bfloat16"))
    assert predictor.dtype == torch.bfloat16
    assert predictor.probs(torch.randn(2, D)).dtype == torch.float32


def _pickle_an_object(folder):
    torch.save({"fc1.weight": torch.zeros(1), "hyper": {"lr": object()}}, folder / "model.pt")


def _bad(w, key, value):
    w = dict(w)
    w[key] = value
    return w


BAD_DIRECTORIES = {
    "no config": (lambda f: (f / "config.json").unlink(), "has no config.json"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "has no model.safetensors or model.pt"),
    "config without layer": (lambda f: (f / "config.json").write_text(json.dumps({"hidden_size": D, "hidden_dim": HIDDEN, "num_labels": K, "max_len": MAX_LEN})), "'probe_layer_idx'"),
    "config not json": (lambda f: (f / "config.json").write_text("{oops"), "not valid JSON"),
    "bad dtype": (lambda f: write_trail_dir(f, trail_weights(), dtype="int8"), "dtype 'int8'"),
    "hidden size differs": (lambda f: write_trail_dir(f, trail_weights(d=D + 4)), "fc1.weight has shape (16, 16)"),
    "hidden_dim differs": (lambda f: write_trail_dir(f, trail_weights(), hidden_dim=32), "fc1.weight has shape"),
    "num_labels differs": (lambda f: write_trail_dir(f, trail_weights(k=12)), "predicts 12 bins"),
    "nan weights": (lambda f: write_trail_dir(f, _bad(trail_weights(), "fc2.bias", torch.full((K,), math.nan))), "NaN/inf"),
    "inf weights": (lambda f: write_trail_dir(f, _bad(trail_weights(), "fc1.weight", torch.full((HIDDEN, D), math.inf))), "NaN/inf"),
    "unknown keys": (lambda f: write_trail_dir(f, {("net." + k): v for k, v in trail_weights().items()}), "needs exactly"),
    "pickled object": (lambda f: ((f / "model.safetensors").unlink(), _pickle_an_object(f)), "holds pickled objects"),
    "corrupt safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"garbage"), "cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD_DIRECTORIES))
def test_bad_directories_fail_in_one_line(tmp_path, case):
    folder = write_trail_dir(tmp_path / "p", trail_weights())
    damage, message = BAD_DIRECTORIES[case]
    damage(folder)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        LengthPredictor.from_pretrained(folder)
    assert "\n" not in str(err.value)


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        LengthPredictor.from_pretrained(tmp_path / "nowhere")


def test_layer_beyond_the_serving_model_and_wrong_width(tmp_path):
    folder = write_trail_dir(tmp_path / "p", trail_weights(), probe_layer_idx=30)
    with pytest.raises(UserError, match="layers 0..29"):
        LengthPredictor.from_pretrained(folder, num_layers=30)
    predictor = LengthPredictor.from_pretrained(folder, num_layers=31)
    with pytest.raises(UserError, match="width 12 but the serving model.s are 16"):
        predictor.check_serving_model(31, hidden_size=16)
    with pytest.raises(UserError, match="width 13 but the predictor was trained on width 12"):
        predictor.probs(torch.randn(4, D + 1))


def test_tampered_export_is_refused(tmp_path):
    folder = write_trail_dir(tmp_path / "p", trail_weights())
    (folder / "trail_probe.json").write_text(json.dumps({"weights_sha256": "0" * 64}))
    with pytest.raises(UserError, match="hash differs"):
        LengthPredictor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------
# The tracker
# ------------------------------------------------------------------------------------------
@pytest.fixture
def predictor(tmp_path):
    return LengthPredictor.from_pretrained(write_trail_dir(tmp_path / "p", trail_weights()))


def test_tracker_with_joins_leaves_and_uneven_refinement_matches_sequential(predictor):
    """Requests join and leave at random global steps and are refined at irregular own steps;
    every posterior must equal refine_sequence run on that request alone."""
    rng = random.Random(0)
    tracker = LengthTracker(predictor, max_new_tokens=512, capacity=2)  # forces growth
    powers = TransitionPowers(K, MAX_LEN / K)
    history: dict[str, dict] = {}
    live: dict[str, int] = {}  # id -> global step it joined
    serial = 0
    for step in range(60):
        if rng.random() < 0.3 or not live:  # joins, with each kind of initial prediction
            ids = [f"r{serial + i}" for i in range(rng.randint(1, 3))]
            serial += len(ids)
            kind = rng.choice(["embeddings", "probs", "none"])
            initial = None
            if kind == "embeddings":
                emb = torch.randn(len(ids), D)
                tracker.add(ids, prompt_embeddings=emb)
                initial = predictor.probs(emb).double()
            elif kind == "probs":
                initial = torch.softmax(torch.randn(len(ids), K, dtype=torch.float64), -1)
                tracker.add(ids, initial_probs=initial)
            else:
                tracker.add(ids)
            for n, i in enumerate(ids):
                live[i] = step
                history[i] = {"initial": None if initial is None else initial[n], "states": [], "generated": [], "posteriors": []}
        if len(live) > 3 and rng.random() < 0.2:  # a leave, and an id reused later
            gone = rng.choice(sorted(live))
            tracker.remove([gone])
            del live[gone]
        chosen = [i for i in sorted(live) if rng.random() < 0.4 and step > live[i]]
        rng.shuffle(chosen)
        if chosen:
            states = torch.randn(len(chosen), D)
            generated = [step - live[i] for i in chosen]
            tracker.observe(chosen, states, generated)
            posts = tracker.posteriors(chosen)
            for n, i in enumerate(chosen):
                history[i]["states"].append(states[n])
                history[i]["generated"].append(generated[n])
                history[i]["posteriors"].append(posts[n])
    checked = 0
    for i, h in history.items():
        if not h["states"]:
            continue
        step_probs = torch.stack([predictor.probs(s[None])[0] for s in h["states"]])
        expected = refine_sequence(step_probs, h["generated"], powers, initial=h["initial"], initial_generated=0)
        # float32 probe rows computed in a batch vs alone differ in the last bits, hence 1e-6
        assert torch.allclose(torch.stack(h["posteriors"]), expected, atol=1e-6), i
        checked += len(h["states"])
    assert checked > 50 and serial > 15 and len(tracker) == len(live)
    assert set(tracker.request_ids) == set(live)


def test_estimates_count_down_and_are_clamped(predictor):
    tracker = LengthTracker(predictor, max_new_tokens=512)
    one_hot = torch.zeros(2, K, dtype=torch.float64)
    one_hot[:, 3] = 1.0  # bin 3: midpoint 179.2
    tracker.add(["a", "b"], initial_probs=one_hot, max_new_tokens=[512, 100])
    tracker.add(["c"])  # no prediction: estimated at its budget
    assert tracker.estimates(["a", "b", "c"]).tolist() == pytest.approx([179.2, 100.0, 512.0])
    assert tracker.estimates(["a", "b", "c"], generated=[10, 90, 12]).tolist() == pytest.approx([169.2, 10.0, 500.0])
    assert tracker.estimates(["a", "b"], generated=[200, 150]).tolist() == [0.0, 0.0]
    assert tracker.initial_estimates(["a", "b", "c"]).tolist() == pytest.approx([179.2, 100.0, 512.0])
    tracker.observe(["a", "c"], torch.randn(2, D), generated=[16, 16])
    post = tracker.posteriors(["a", "c"])
    mids = predictor.bins.midpoints.double()
    expected = (post @ mids).clamp(0, 496)
    assert torch.allclose(tracker.estimates(["a", "c"]), expected)
    assert torch.allclose(tracker.estimates(["a", "c"], generated=20), (post @ mids - 4).clamp(0, 492))
    assert tracker.initial_estimates(["c"]).item() == pytest.approx((post[1] @ mids).item() + 16)


def test_prior_corrected_refinement_divides_out_the_label_prior(tmp_path, predictor):
    """likelihood='prior_corrected': each refinement multiplies p(bin | h) / prior(bin), as eval does."""
    with pytest.raises(UserError, match="lacks"):
        LengthTracker(predictor, likelihood="prior_corrected")  # a TRAIL directory has no label prior
    with pytest.raises(UserError, match="not one of posterior"):
        LengthTracker(predictor, likelihood="bayes")
    folder = write_trail_dir(tmp_path / "q", trail_weights())
    prior = torch.linspace(1, 3, K, dtype=torch.float64)
    (folder / "trail_probe.json").write_text(json.dumps({"label_prior": prior.tolist()}))
    with_prior = LengthPredictor.from_pretrained(folder)
    assert torch.allclose(with_prior.label_prior, prior / prior.sum())
    plain, corrected = LengthTracker(with_prior), LengthTracker(with_prior, likelihood="prior_corrected")
    x = torch.randn(3, D)
    for tracker in (plain, corrected):
        tracker.add(["a", "b", "c"])
        tracker.observe(["a", "b", "c"], x, generated=1)
    p = with_prior.probs(x).double()
    assert torch.allclose(plain.posteriors(["a", "b", "c"]), p / p.sum(-1, keepdim=True))
    lik = p / (prior / prior.sum())
    assert torch.allclose(corrected.posteriors(["a", "b", "c"]), lik / lik.sum(-1, keepdim=True))
    (folder / "trail_probe.json").write_text(json.dumps({"label_prior": [1.0, -1.0]}))
    with pytest.raises(UserError, match="label_prior"):
        LengthPredictor.from_pretrained(folder).label_prior


def test_tracker_refuses_bad_calls(predictor):
    tracker = LengthTracker(predictor)
    tracker.add([1, 2], prompt_embeddings=torch.randn(2, D))
    tracker.observe([1, 2], torch.randn(2, D), 8)
    cases = [
        (lambda: tracker.observe([1, 3], torch.randn(2, D), 9), "request 3 is not tracked"),
        (lambda: tracker.observe([1, 1], torch.randn(2, D), 9), "appears twice"),
        (lambda: tracker.observe([1, 2], torch.randn(2, D), [9, 4]), "went down"),
        (lambda: tracker.observe([1, 2], torch.randn(3, D), 9), "for 2 requests"),
        (lambda: tracker.observe([1, 2], torch.randn(2, D + 1), 9), "width 13"),
        (lambda: tracker.observe([1, 2], torch.randn(2, D), [9]), "one per request"),
        (lambda: tracker.estimates([1], generated=3), "below the count"),
        (lambda: tracker.add([1]), "already tracked"),
        (lambda: tracker.add([5, 5]), "already tracked or repeated"),
        (lambda: tracker.add([5], prompt_embeddings=torch.randn(1, D + 2)), "width 14"),
        (lambda: tracker.add([5], initial_probs=torch.rand(1, K + 1)), r"need \(1, 10\)"),
        (lambda: tracker.add([5], prompt_texts=["hi"]), "need a text predictor"),
        (lambda: tracker.add([5], prompt_texts=["hi"], initial_probs=torch.rand(1, K)), "at most one"),
        (lambda: tracker.remove([7]), "request 7 is not tracked"),
    ]
    before = tracker.posteriors([1, 2])
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()
    assert torch.equal(tracker.posteriors([1, 2]), before) and len(tracker) == 2


# ------------------------------------------------------------------------------------------
# BERT predictor (a tiny random one built here, no download)
# ------------------------------------------------------------------------------------------
def test_bert_predictor_gives_the_initial_estimate(tmp_path, predictor):
    from transformers import AutoModelForSequenceClassification

    make_tiny_bert_predictor(tmp_path / "bert")
    bert = BertLengthPredictor.from_pretrained(tmp_path / "bert")
    texts = ["write a poem about the sea", "list three"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert").eval()
    batch = bert.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model(**batch).logits, -1)
    assert bert.max_length == 32
    assert torch.allclose(bert.probs(texts), expected, atol=1e-6)
    tracker = LengthTracker(predictor, text_predictor=bert)
    tracker.add(["x", "y"], prompt_texts=texts)
    assert torch.allclose(tracker.estimates(["x", "y"]), bert.predict(texts).double(), atol=1e-4)


def test_bert_predictor_bad_directories(tmp_path, predictor):
    with pytest.raises(UserError, match="has no config.json"):
        BertLengthPredictor.from_pretrained(tmp_path)
    tokenizer = make_tiny_bert_predictor(tmp_path / "bare", with_tokenizer=False)  # TRAIL's release ships none
    with pytest.raises(UserError, match="no tokenizer found"):
        BertLengthPredictor.from_pretrained(tmp_path / "bare")
    assert BertLengthPredictor.from_pretrained(tmp_path / "bare", tokenizer=tokenizer).bins.num_bins == K
    make_tiny_bert_predictor(tmp_path / "other", num_labels=8)
    with pytest.raises(UserError, match="8 bins over"):
        LengthTracker(predictor, text_predictor=BertLengthPredictor.from_pretrained(tmp_path / "other"))


# ------------------------------------------------------------------------------------------
# The forward hook on a tiny random Llama
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def _generate(model, **kwargs):
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in row 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         eos_token_id=None, output_hidden_states=True, return_dict_in_generate=True, **kwargs)
    return out, mask


@pytest.mark.parametrize("layer", [0, 1])
def test_hook_captures_what_output_hidden_states_returns(tiny_llama, layer):
    seen = []
    with capture_layer(tiny_llama, layer, on_forward=lambda s: seen.append(s.clone())) as cap:
        out, mask = _generate(tiny_llama)
        last = cap.last_token()
    assert len(seen) == len(out.hidden_states) == 6
    for ours, theirs in zip(seen, out.hidden_states):
        reference = theirs[layer + 1]
        if layer == 1:  # HF applies the final norm to its last entry; the runtime reads the residual
            ours = tiny_llama.model.norm(ours)
        assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.equal(last, seen[-1][:, -1])
    prompt = out.hidden_states[0][layer + 1] if layer == 0 else seen[0]
    expected = torch.stack([prompt[0, 3:].mean(0), prompt[1].mean(0)])
    with capture_layer(tiny_llama, layer) as cap:
        tiny_llama(out.sequences[:, :7], attention_mask=mask)
        assert torch.allclose(cap.prompt_mean(mask), expected, atol=1e-5)
    assert len(seen) == 6  # the first hook was removed on exit: the later forward did not reach it


def test_hook_drives_the_tracker_during_generate(tiny_llama, tmp_path):
    """The pattern for engines on transformers: prefill -> add, every 2nd decode step -> observe."""
    w = trail_weights(d=64)
    predictor = LengthPredictor.from_pretrained(write_trail_dir(tmp_path / "p", w, hidden_size=64, probe_layer_idx=0))
    tracker = LengthTracker(predictor)
    ids, calls = ["a", "b"], []

    def on_forward(states):
        calls.append(states)
        if len(calls) == 1:
            tracker.add(ids, prompt_embeddings=cap.prompt_mean(mask))
        elif (len(calls) - 1) % 2 == 0:  # forward i >= 1 ran with i tokens generated
            tracker.observe(ids, cap.last_token(), generated=len(calls) - 1)

    with predictor.capture(tiny_llama, on_forward) as cap:
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[0, :3] = 0
        out, _ = _generate(tiny_llama)
    powers = TransitionPowers(K, MAX_LEN / K)
    for row in range(2):
        prompt = out.hidden_states[0][1][row, 3 if row == 0 else 0:].mean(0)
        steps = [2, 4]
        probs = torch.stack([predictor.probs(out.hidden_states[j][1][row, -1][None])[0] for j in steps])
        expected = refine_sequence(probs, steps, powers, initial=predictor.probs(prompt[None])[0].double())
        assert torch.allclose(tracker.posteriors([ids[row]])[0], expected[-1], atol=1e-6)
    with pytest.raises(UserError, match="layers 0..1"):
        LengthPredictor.from_pretrained(write_trail_dir(tmp_path / "q", w, hidden_size=64, probe_layer_idx=2)).capture(tiny_llama)
    with pytest.raises(UserError, match="width 12 but the serving model's are 64"):
        LengthPredictor.from_pretrained(write_trail_dir(tmp_path / "r", trail_weights(), probe_layer_idx=0)).capture(tiny_llama)


def test_runtime_imports_neither_lightning_nor_transformers():
    code = ("import sys, trail_probe.runtime; "
            "print(sorted(m for m in ('lightning', 'transformers', 'trail_probe.stages.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
