"""Load an exported length predictor (ours or TRAIL's released ones) and the BERT prompt predictor.

    from trail_probe.runtime import LengthPredictor, BertLengthPredictor

    predictor = LengthPredictor.from_pretrained("checkpoints/smollm2_alpaca/predictor", num_layers=30)
    probs = predictor.probs(hidden_states)                  # [B, d] -> [B, K]
    bert = BertLengthPredictor.from_pretrained("checkpoints/smollm2_alpaca/baseline")
    bert.probs(["Give three tips for staying healthy."])    # prompt texts -> [B, K]

`LengthPredictor.from_pretrained` reads the directory `trail-probe export` writes and also TRAIL's
released predictors (TRAIL_NOTES section 5): `config.json` (hidden_size, hidden_dim, num_labels,
max_len, probe_layer_idx, dtype, optional device) and `model.safetensors` or `model.pt` (a plain
state dict) with keys `fc1.*`/`fc2.*` or `nn.Sequential`'s `0.*`/`2.*`. Everything is checked
against everything else, and a bad directory fails with one sentence, not deep inside a matmul.
`BertLengthPredictor.probs` is the one BERT inference path: eval scores it and serving runs it.

Pure torch + safetensors + json: no Lightning, and transformers only for the BERT predictor.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from trail_probe.errors import UserError
from trail_probe.model_files import file_sha256
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.capture import ProbeLayerCapture, capture_layer
from trail_probe.runtime.models import DTYPES, decoder_layers
from trail_probe.runtime.probe import LengthProbe
from trail_probe.runtime.probe_inputs import DEFAULT_INPUT, input_parts

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


def read_predictor_input(folder: Path, task: str) -> str:
    """What the probe in `folder` reads serving as the `task` probe (`LengthPredictor.input_for`), from
    its trail_probe.json alone (a server's worker needs it before, or without, loading the weights)."""
    path = Path(folder) / METADATA_FILE
    return _input_for(_read_json(path) if path.is_file() else {}, task)


def _input_for(metadata: dict, task: str) -> str:
    return metadata.get("input") or DEFAULT_INPUT[task]


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
        """The probe's input width (config.json's hidden_size): the model's, or twice it for current+pool inputs."""
        return self.probe.input_dim

    @property
    def input(self) -> str:
        """What the probe reads (`runtime/probe_inputs.py`): trail_probe.json's `input`; TRAIL's (the
        current token's state; the mean prompt state for a prompt probe) where the export does not say."""
        return self.input_for("prompt" if self.metadata.get("task") == "prompt" else "decode")

    def input_for(self, task: str) -> str:
        """What the probe reads serving as the `task` probe: trail_probe.json's `input`, else TRAIL's for
        that task (a release directory records no task, so the slot it serves in decides)."""
        return _input_for(self.metadata, task)

    @property
    def state_width(self) -> int:
        """The width of one hidden state of the serving model, which the input is built from."""
        return self.hidden_size // len(input_parts(self.input))

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
        if hidden_size is not None and hidden_size != self.state_width:
            raise UserError(f"the predictor expects hidden states of width {self.state_width} but the serving model's are {hidden_size}; export a probe trained on this model")

    def probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Bin probabilities [..., K] (float32) for embeddings [..., d]."""
        if embeddings.shape[-1] != self.hidden_size:
            raise UserError(f"embeddings have width {embeddings.shape[-1]} but the predictor was trained on width {self.hidden_size}; pass its input '{self.input}' of layer {self.layer}'s hidden states of the serving model")
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


def check_trained_on(predictor: LengthPredictor, name_or_path) -> None:
    """Refuse a predictor whose export names other serving-model weights than `name_or_path`'s (the
    weight hash every output records); silent when either side has no hash (a hub id, TRAIL's release)."""
    from trail_probe.model_files import weights_sha256

    trained_on = (predictor.metadata.get("serving_model") or {}).get("weights_sha256")
    served = weights_sha256(name_or_path)
    if trained_on and served and trained_on != served:
        name = (predictor.metadata.get("serving_model") or {}).get("name_or_path")
        raise UserError(f"the predictor was trained on '{name}' (weights sha256 {trained_on[:12]}...) but the serving model "
                        f"is '{name_or_path}' (weights {served[:12]}...); export a predictor trained on this model")


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
        from transformers import (
            AutoConfig,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

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

    def probs(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Bin probabilities [N, K] (float32, on CPU when batched) of the prompt texts, `batch_size` at a
        time (all at once by default); each batch is padded to its own longest text only."""
        texts = list(texts)
        if batch_size is not None and len(texts) > batch_size:
            return torch.cat([self.probs(texts[i:i + batch_size]).cpu() for i in range(0, len(texts), batch_size)])
        if not texts:
            return torch.zeros(0, self.bins.num_bins)
        self.tokenizer.padding_side = "right"
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
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


__all__ = ["LengthPredictor", "BertLengthPredictor", "read_predictor_config", "read_predictor_input", "read_probe_weights",
           "check_probe_weights", "CONFIG_FILE", "METADATA_FILE", "PROBE_KEYS"]
