"""Serving runtime: load an exported length predictor and track every running request's estimate.

    from trail_probe.runtime import LengthPredictor, LengthTracker, capture_layer

    predictor = LengthPredictor.from_pretrained("checkpoints/smollm2_alpaca/predictor", num_layers=30)
    tracker = LengthTracker(predictor, max_new_tokens=512)
    tracker.add(["a", "b"], prompt_embeddings=prompt_means)        # [2, d]: initial estimate
    tracker.observe(["a", "b"], hidden_states, generated=[8, 8])   # [2, d]: every step or every k
    tracker.estimates(["a", "b"], generated=[11, 11])              # remaining tokens, counted down
    tracker.remove(["a"])

`LengthPredictor.from_pretrained` reads the directory `trail-probe export` writes and also TRAIL's
released predictors (TRAIL_NOTES section 5): `config.json` (hidden_size, hidden_dim, num_labels,
max_len, probe_layer_idx, dtype, optional device) and `model.safetensors` or `model.pt` (a plain
state dict) with keys `fc1.*`/`fc2.*` or `nn.Sequential`'s `0.*`/`2.*`. Everything is checked
against everything else, and a bad directory fails with one sentence, not deep inside a matmul.

`LengthTracker` keeps each request's posterior over remaining-length bins in one tensor and refines
a whole batch per call: one matmul for the probe, one (batched) matmul for the drift T^k and one
elementwise Bayes update (the math is `trail_probe.refine`'s, the bins `trail_probe.bins`'). Python
work per request is a dict lookup. `capture_layer` hooks the probe layer of a Hugging Face model so an
engine built on transformers gets the hidden states the probe needs during generation.

Pure torch + safetensors + json: no Lightning, and transformers only for the BERT predictor.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from trail_probe.bins import Bins
from trail_probe.errors import UserError
from trail_probe.extract import LayerCapture
from trail_probe.models import DTYPES, decoder_layers, file_sha256
from trail_probe.probe import LengthProbe
from trail_probe.refine import TransitionPowers, bayes_update, step_likelihood

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.pt")  # in order of preference
METADATA_FILE = "trail_probe.json"  # our own metadata; TRAIL's released directories have none
PROBE_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
SEQUENTIAL_KEYS = {"0.weight": "fc1.weight", "0.bias": "fc1.bias", "2.weight": "fc2.weight", "2.bias": "fc2.bias"}
REQUIRED_CONFIG = ("hidden_size", "hidden_dim", "num_labels", "max_len", "probe_layer_idx")


# --------------------------------------------------------------------------------------------
# Reading and checking a predictor directory
# --------------------------------------------------------------------------------------------
def read_predictor_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"predictor directory '{folder}' has no {CONFIG_FILE}; point to a folder written by 'trail-probe export' or a TRAIL predictor")
    config = _read_json(path)
    for key in REQUIRED_CONFIG:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (value == 0 and key != "probe_layer_idx"):
            raise UserError(f"'{path}' needs '{key}' as a {'non-negative' if key == 'probe_layer_idx' else 'positive'} integer, got {value!r}; fix or re-export it")
    if config.get("dtype", "float32") not in DTYPES:
        raise UserError(f"'{path}' has dtype {config['dtype']!r}; use one of {', '.join(DTYPES)}")
    return config


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{path}' is not valid JSON ({e}); re-export the predictor") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' must hold a JSON object; re-export the predictor")
    return data


def check_probe_weights(state: dict[str, torch.Tensor], hidden_size: int, hidden_dim: int, num_labels: int,
                        where: str) -> None:
    """Refuse weights whose keys, shapes or values do not make the probe the config describes."""
    if sorted(state) != sorted(PROBE_KEYS):
        raise UserError(f"{where} holds tensors {sorted(state)} but a length probe needs exactly {list(PROBE_KEYS)} (or nn.Sequential's 0.*/2.*)")
    rows = state["fc2.weight"].shape[0]
    if rows != num_labels:
        raise UserError(f"{where} predicts {rows} bins (fc2.weight is {tuple(state['fc2.weight'].shape)}) but its config says num_labels={num_labels}; they must agree")
    expected = {"fc1.weight": (hidden_dim, hidden_size), "fc1.bias": (hidden_dim,),
                "fc2.weight": (num_labels, hidden_dim), "fc2.bias": (num_labels,)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(f"{where}: {key} has shape {tuple(state[key].shape)} but hidden_size={hidden_size}, hidden_dim={hidden_dim}, num_labels={num_labels} need {shape}")
    for key in PROBE_KEYS:
        if not state[key].is_floating_point() or not torch.isfinite(state[key]).all():
            raise UserError(f"{where}: {key} contains NaN/inf or is not floating point; the probe is broken, retrain or re-export it")


def read_probe_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The probe's state dict with `fc1.*`/`fc2.*` names, from model.safetensors or model.pt."""
    path = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if path is None:
        raise UserError(f"predictor directory '{folder}' has no {' or '.join(WEIGHT_FILES)}; export the probe again")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path, device="cpu")
        else:  # weights_only: a state dict of tensors, never arbitrary pickled objects
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"'{path}' holds pickled objects besides tensors; save a plain state_dict() (or use model.safetensors)") from None
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise UserError(f"cannot read '{path}' ({str(e).splitlines()[0][:120]}); it must be a plain state dict of tensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{path}' does not hold a plain state dict of tensors; save the probe's state_dict()")
    if set(state) == set(SEQUENTIAL_KEYS):
        state = {SEQUENTIAL_KEYS[k]: v for k, v in state.items()}
    return state, path


def _pick_device(requested, configured) -> torch.device:
    """The caller's device, else the config's when it exists here (a predictor released for CUDA
    still loads on a CPU-only machine), else CPU."""
    if requested is not None:
        return torch.device(requested)
    if configured and (not str(configured).startswith("cuda") or torch.cuda.is_available()):
        return torch.device(configured)
    return torch.device("cpu")


def _serving_width(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)


# --------------------------------------------------------------------------------------------
# Predictors
# --------------------------------------------------------------------------------------------
class LengthPredictor:
    """The probe of one layer: embeddings [B, d] -> distributions over K length bins."""

    def __init__(self, probe: LengthProbe, bins: Bins, layer: int, metadata: dict | None = None):
        self.probe = probe.eval().requires_grad_(False)
        self.bins = bins
        self.layer = layer  # TRAIL numbering: residual after decoder layer L = HF hidden_states[L + 1]
        self.metadata = metadata or {}
        param = next(probe.parameters())
        self.device, self.dtype = param.device, param.dtype

    @property
    def hidden_size(self) -> int:
        return self.probe.input_dim

    @property
    def label_prior(self) -> torch.Tensor | None:
        """Bin frequencies of the training labels (our exports of decode probes), else None."""
        prior = self.metadata.get("label_prior")
        if prior is None:
            return None
        t = torch.tensor(prior, dtype=torch.float64)
        if t.shape != (self.bins.num_bins,) or (t < 0).any() or t.sum() <= 0:
            raise UserError(f"the predictor's label_prior has {tuple(t.shape)} entries or negative values, for {self.bins.num_bins} bins; export it again")
        return t / t.sum()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        num_layers: int | None = None) -> "LengthPredictor":
        """Load a predictor directory (ours or TRAIL's); `num_layers` of the serving model, when
        given, is checked against `probe_layer_idx`."""
        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"predictor directory '{folder}' does not exist; run 'trail-probe export' first or fix the path")
        config = read_predictor_config(folder)
        state, weights_path = read_probe_weights(folder)
        check_probe_weights(state, config["hidden_size"], config["hidden_dim"], config["num_labels"], str(weights_path))
        bins = Bins(config["num_labels"], config["max_len"])
        metadata = {}
        if (folder / METADATA_FILE).is_file():
            metadata = _read_json(folder / METADATA_FILE)
            if "bins" in metadata:
                bins.check_matches(metadata["bins"], f"'{folder / METADATA_FILE}'")
            if metadata.get("weights_sha256") not in (None, file_sha256(weights_path)):
                raise UserError(f"'{weights_path}' is not the file '{METADATA_FILE}' was written for (hash differs); export the predictor again")
        probe = LengthProbe(config["hidden_size"], config["hidden_dim"], config["num_labels"])
        probe.load_state_dict(state)
        probe.to(device=_pick_device(device, config.get("device")), dtype=DTYPES[config.get("dtype", "float32")])
        predictor = cls(probe, bins, config["probe_layer_idx"], metadata)
        if num_layers is not None:
            predictor.check_serving_model(num_layers)
        return predictor

    def check_serving_model(self, num_layers: int, hidden_size: int | None = None) -> None:
        """Refuse a serving model that has no layer `self.layer` or states of another width."""
        if self.layer >= num_layers:
            raise UserError(f"the predictor reads layer {self.layer} (probe_layer_idx) but the serving model has layers 0..{num_layers - 1}; export a probe for this model")
        if hidden_size is not None and hidden_size != self.hidden_size:
            raise UserError(f"the predictor expects hidden states of width {self.hidden_size} but the serving model's are {hidden_size}; export a probe trained on this model")

    def probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Bin probabilities [..., K] (float32) for embeddings [..., d]."""
        if embeddings.shape[-1] != self.hidden_size:
            raise UserError(f"embeddings have width {embeddings.shape[-1]} but the predictor was trained on width {self.hidden_size}; pass layer {self.layer}'s hidden states of the serving model")
        with torch.no_grad():
            logits = self.probe(embeddings.to(device=self.device, dtype=self.dtype))
        return torch.softmax(logits.float(), dim=-1)

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Expected length [...] (tokens, over bin midpoints) without clamping."""
        return self.bins.expectation(self.probs(embeddings))

    def capture(self, model: nn.Module, on_forward: Callable[[torch.Tensor], None] | None = None) -> "ProbeLayerCapture":
        """Hook this predictor's layer of a Hugging Face model, after checking the model fits."""
        self.check_serving_model(len(decoder_layers(model)), _serving_width(model))
        return capture_layer(model, self.layer, on_forward)


class BertLengthPredictor:
    """The prompt-text predictor (TRAIL's initial estimate): a sequence-classification model over the
    same bins, from a `save_pretrained` directory whose config has `max_len` (TRAIL: `trail_max_len`)."""

    def __init__(self, model: nn.Module, tokenizer, bins: Bins, max_length: int):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.bins = bins
        self.max_length = max_length
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, tokenizer=None,
                        max_length: int | None = None) -> "BertLengthPredictor":
        """`tokenizer` (an object or a path) is needed only when the directory has none of its own
        (TRAIL's release); `max_length` defaults to the one the baseline was trained with."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path)
        if not (folder / CONFIG_FILE).is_file():
            raise UserError(f"BERT predictor directory '{folder}' has no {CONFIG_FILE}; run 'trail-probe train-baseline' or fix the path")
        config = AutoConfig.from_pretrained(folder)
        max_len = getattr(config, "max_len", None) or getattr(config, "trail_max_len", None)
        if not isinstance(max_len, int):
            raise UserError(f"'{folder / CONFIG_FILE}' has no integer 'max_len' (the length the bins span); add it or retrain the baseline")
        bins = Bins(config.num_labels, max_len)
        edges = getattr(config, "bin_edges", None)
        if edges is not None and not torch.allclose(torch.tensor(edges, dtype=torch.float64), bins.edges):
            raise UserError(f"'{folder / CONFIG_FILE}' has bin_edges that are not {config.num_labels} equal bins over [0, {max_len}]; retrain the baseline")
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            source = Path(folder if tokenizer is None else tokenizer)
            # transformers may build an empty-vocabulary tokenizer from a folder without tokenizer
            # files (TRAIL's release ships none), which would silently map every word to [UNK].
            if not any((source / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
                raise UserError(f"no tokenizer found in '{source}'; pass tokenizer= (a tokenizer or its folder)")
            tokenizer = AutoTokenizer.from_pretrained(source)
        if max_length is None:
            max_length = _trained_max_length(folder) or min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512))
        model = AutoModelForSequenceClassification.from_pretrained(folder).to(_pick_device(device, None))
        return cls(model, tokenizer, bins, max_length)

    def probs(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = self.model(**batch.to(self.device)).logits
        return torch.softmax(logits.float(), dim=-1)

    def predict(self, texts: Sequence[str]) -> torch.Tensor:
        return self.bins.expectation(self.probs(texts))


def _trained_max_length(folder: Path) -> int | None:
    """The tokenizer truncation length recorded by our baseline (baseline.json) or TRAIL's release."""
    for name in ("baseline.json", "trail_training_metadata.json"):
        if (folder / name).is_file():
            value = json.loads((folder / name).read_text()).get("max_length")
            if isinstance(value, int):
                return value
    return None


# --------------------------------------------------------------------------------------------
# The batched tracker a scheduler calls
# --------------------------------------------------------------------------------------------
class LengthTracker:
    """Posteriors over remaining-length bins for a changing set of requests.

    A request joins with `add` (optionally with an initial distribution), is refined by `observe`
    with its probe-layer hidden state (every step or every k steps; each request's own k = tokens
    since its last refinement), and leaves with `remove`. A request with no prediction yet is
    estimated at its token budget (`max_new_tokens - generated`), i.e. scheduled as if long.
    """

    def __init__(self, predictor: LengthPredictor, max_new_tokens: int = 512,
                 prompt_predictor: LengthPredictor | None = None,
                 text_predictor: BertLengthPredictor | None = None, capacity: int = 64,
                 likelihood: str = "posterior"):
        for other, what in ((prompt_predictor, "prompt predictor"), (text_predictor, "text predictor")):
            if other is not None:
                predictor.bins.check_matches(other.bins.to_dict(), f"the {what}")
        if likelihood not in ("posterior", "prior_corrected"):
            raise UserError(f"likelihood '{likelihood}' is not one of posterior (TRAIL's rule), prior_corrected")
        self._label_prior = None
        if likelihood == "prior_corrected":
            if predictor.label_prior is None:
                raise UserError("likelihood='prior_corrected' needs the training bin frequencies, which this predictor lacks; "
                                "export it again with the extraction present, or use likelihood='posterior'")
            self._label_prior = predictor.label_prior.to(predictor.device)
        self.likelihood = likelihood
        self.predictor = predictor
        self.prompt_predictor = prompt_predictor or predictor
        self.text_predictor = text_predictor
        self.max_new_tokens = max_new_tokens
        self.device = predictor.device
        self._powers = TransitionPowers(predictor.bins.num_bins, predictor.bins.width)
        self._midpoints = predictor.bins.midpoints.to(self.device, torch.float64)
        self._slot: dict[Hashable, int] = {}
        self._free: list[int] = []
        self._allocate(capacity)

    # -- storage: one row per slot; a removed request's slot is reused by the next one to join --
    def _allocate(self, capacity: int) -> None:
        old = getattr(self, "_post", None)
        k, dev = self.predictor.bins.num_bins, self.device
        grown = {
            "_post": torch.zeros(capacity, k, dtype=torch.float64, device=dev),  # zero row = no prediction yet
            "_initial": torch.zeros(capacity, dtype=torch.float64, device=dev),  # first estimate (limited preemption)
            "_refined_at": torch.zeros(capacity, dtype=torch.long, device=dev),  # generated at last refinement
            "_budget": torch.zeros(capacity, dtype=torch.long, device=dev),  # max_new_tokens per request
            "_has": torch.zeros(capacity, dtype=torch.bool, device=dev),
        }
        used = 0 if old is None else old.shape[0]
        for name, tensor in grown.items():
            if used:
                tensor[:used] = getattr(self, name)
            setattr(self, name, tensor)
        self._free.extend(range(capacity - 1, used - 1, -1))

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._slot

    @property
    def request_ids(self) -> list:
        return list(self._slot)

    def _slots(self, ids: Sequence[Hashable]) -> torch.Tensor:
        try:
            slots = [self._slot[i] for i in ids]
        except KeyError as e:
            raise UserError(f"request {e.args[0]!r} is not tracked; add() it first (or it was removed)") from None
        if len(set(slots)) != len(slots):
            raise UserError("the same request id appears twice in one call; pass each request once")
        return torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)

    def _per_request(self, values, n: int, what: str) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.long).to(self.device)
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise UserError(f"{what} has {tuple(t.shape)} entries for {n} requests; pass one per request")
        if (t < 0).any():
            raise UserError(f"{what} must be >= 0")
        return t

    # -- the scheduler's API --
    def add(self, ids: Sequence[Hashable], *, prompt_embeddings: torch.Tensor | None = None,
            prompt_texts: Sequence[str] | None = None, initial_probs: torch.Tensor | None = None,
            max_new_tokens: int | Sequence[int] | None = None) -> None:
        """Start tracking requests, with at most one source of an initial prediction: mean prompt
        hidden states [B, d] (the prompt predictor, else the main one), prompt texts (the BERT
        predictor) or ready-made distributions [B, K]."""
        ids = list(ids)
        if sum(x is not None for x in (prompt_embeddings, prompt_texts, initial_probs)) > 1:
            raise UserError("give at most one of prompt_embeddings, prompt_texts, initial_probs")
        if len(set(ids)) != len(ids) or any(i in self._slot for i in ids):
            raise UserError("a request id being added is already tracked or repeated; ids must be unique")
        if prompt_texts is not None:
            if self.text_predictor is None:
                raise UserError("prompt_texts need a text predictor; create the tracker with text_predictor=BertLengthPredictor.from_pretrained(...)")
            initial_probs = self.text_predictor.probs(prompt_texts)
        elif prompt_embeddings is not None:
            initial_probs = self.prompt_predictor.probs(prompt_embeddings)
        if initial_probs is not None and tuple(initial_probs.shape) != (len(ids), self.predictor.bins.num_bins):
            raise UserError(f"initial distributions have shape {tuple(initial_probs.shape)} but {len(ids)} requests over {self.predictor.bins.num_bins} bins need ({len(ids)}, {self.predictor.bins.num_bins})")
        budget = self._per_request(self.max_new_tokens if max_new_tokens is None else max_new_tokens, len(ids), "max_new_tokens")
        while len(self._free) < len(ids):
            self._allocate(2 * self._post.shape[0])
        for i in ids:
            self._slot[i] = self._free.pop()
        slots = self._slots(ids)
        self._budget[slots] = budget
        self._refined_at[slots] = 0
        if initial_probs is None:
            self._post[slots] = 0.0
            self._has[slots] = False
            self._initial[slots] = budget.double()
        else:
            q = initial_probs.to(self.device, torch.float64)
            q = q / q.sum(-1, keepdim=True)
            self._post[slots] = q
            self._has[slots] = True
            self._initial[slots] = torch.minimum(q @ self._midpoints, budget.double())

    def observe(self, ids: Sequence[Hashable], hidden_states: torch.Tensor,
                generated: int | Sequence[int] | torch.Tensor) -> None:
        """Refine requests with their probe-layer states [B, d], taken from the forward pass that
        produced token `generated` (tokens generated so far, one per request)."""
        slots = self._slots(ids)
        if hidden_states.dim() != 2 or hidden_states.shape[0] != len(slots):
            raise UserError(f"hidden_states has shape {tuple(hidden_states.shape)} for {len(slots)} requests; pass [batch, hidden_size]")
        gen = self._per_request(generated, len(slots), "generated")
        steps = gen - self._refined_at[slots]
        if (steps < 0).any():
            raise UserError("generated went down for a request since its last refinement; pass tokens generated so far")
        likelihood = step_likelihood(self.predictor.probs(hidden_states).double(), self._label_prior)
        prior = self._powers.advance(self._post[slots], steps)
        # A request with no prediction has a zero prior, which bayes_update replaces by the likelihood.
        post = bayes_update(prior, likelihood)
        self._post[slots] = post
        self._refined_at[slots] = gen
        first = ~self._has[slots]
        if first.any():  # the first prediction of a request that joined without one
            self._initial[slots[first]] = post[first] @ self._midpoints + gen[first]
            self._has[slots] = True

    def estimates(self, ids: Sequence[Hashable], generated: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Remaining tokens [B] (float64, on the predictor's device). With `generated` (tokens so far),
        the estimate counts down by the tokens since the last refinement, as TRAIL's runtime does;
        it is clamped to [0, max_new_tokens - generated]."""
        slots = self._slots(ids)
        at = self._refined_at[slots]
        gen = at if generated is None else self._per_request(generated, len(slots), "generated")
        if (gen < at).any():
            raise UserError("generated is below the count at a request's last refinement; pass tokens generated so far")
        left = (self._budget[slots] - gen).clamp_min(0).double()
        expected = self._post[slots] @ self._midpoints - (gen - at)
        return torch.where(self._has[slots], torch.minimum(expected.clamp_min(0), left), left)

    def initial_estimates(self, ids: Sequence[Hashable]) -> torch.Tensor:
        """Each request's first estimate of its total length (TRAIL's limited preemption allows
        preempting a request only while generated <= C * this)."""
        return self._initial[self._slots(ids)]

    def posteriors(self, ids: Sequence[Hashable]) -> torch.Tensor:
        """Current distributions [B, K] over remaining-length bins (as of the last refinement)."""
        return self._post[self._slots(ids)].clone()

    def remove(self, ids: Sequence[Hashable]) -> None:
        self._slots(ids)  # refuses unknown or repeated ids before anything changes
        for i in ids:
            self._free.append(self._slot.pop(i))


# --------------------------------------------------------------------------------------------
# Capturing the probe layer during Hugging Face generation
# --------------------------------------------------------------------------------------------
class ProbeLayerCapture(LayerCapture):
    """Forward hook on one decoder layer: its output is the residual stream after layer L, i.e. HF
    `hidden_states[L + 1]` before the final norm. `on_forward(states [B, T, d])` runs after every
    forward pass (prefill: T = prompt length; decode: T = 1)."""

    def __init__(self, model: nn.Module, layer_idx: int, on_forward: Callable[[torch.Tensor], None] | None = None):
        num_layers = len(decoder_layers(model))
        if not 0 <= layer_idx < num_layers:
            raise UserError(f"layer {layer_idx} is outside the model, which has layers 0..{num_layers - 1}; use the predictor's probe_layer_idx for this model")
        self.layer_idx = layer_idx
        self._on_forward = on_forward
        super().__init__(model, [layer_idx])

    def _hook(self, layer: int):
        keep = super()._hook(layer)

        def hook(module, inputs, output):
            keep(module, inputs, output)
            if self._on_forward is not None:
                self._on_forward(self.outputs[layer])

        return hook

    @property
    def states(self) -> torch.Tensor:
        """The layer's output of the latest forward pass, [B, T, d]."""
        if self.layer_idx not in self.outputs:
            raise UserError("no forward pass has run since the hook was installed; call the model first")
        return self.outputs[self.layer_idx]

    def last_token(self) -> torch.Tensor:
        """[B, d]: the state of the position just processed (the decode-time probe input)."""
        return self.states[:, -1]

    def prompt_mean(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d]: mean over the prompt's real tokens (the prompt-time probe input); call it right
        after the prefill. Padding (attention_mask == 0) is left out."""
        states = self.states.float()
        if attention_mask is None:
            return states.mean(1)
        mask = attention_mask.to(states.device, states.dtype)[:, -states.shape[1]:, None]
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1)


def capture_layer(model: nn.Module, layer_idx: int,
                  on_forward: Callable[[torch.Tensor], None] | None = None) -> ProbeLayerCapture:
    """Context manager capturing layer `layer_idx` (TRAIL numbering) of `model`; hooks are removed
    on exit, also after an exception."""
    return ProbeLayerCapture(model, layer_idx, on_forward)
