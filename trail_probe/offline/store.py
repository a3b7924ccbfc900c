"""On-disk format of an extraction, and the reader every later stage uses.

An extraction folder holds
    manifest.json                       model id + weight hash, layer numbering, settings, counts
    config.yaml                         the resolved recipe it was made with
    workers/worker-<i>.json             per worker: requests expected, done, complete flag
    shards/shard-w<i>-<seq>.safetensors fixed-size groups of finished requests

A shard is one safetensors file (written to a temporary name, then renamed, so a half-written
shard never exists under its real name) with tensors
    prompt_states     [Lp, n, d]  mean prompt hidden state per prompt layer (layer-major, so one
                                  layer reads as one contiguous block)
    decode_states     [Ld, m, d]  hidden state at sampled decode positions per decode layer
    decode_request    [m] int64   which request of the shard (0..n-1) each position belongs to
    decode_generated  [m] int64   tokens generated so far, j >= 1 (the state is that of token j-1
                                  fed back in, the forward pass that produces token j)
    decode_remaining  [m] int64   tokens left until EOS: output_tokens - j
and its per-request records (id, prompt, response, token counts, hit_cap) as JSON in the
safetensors metadata. safetensors was chosen because it is mmap-able, safe to load (no pickle), and
lets a reader take one layer's slice without reading the others.

The pooled probe inputs (`runtime/probe_inputs.py` defines them; the manifest's `inputs` lists those
stored, `OLD_INPUTS` for extractions made before them) are more tensors of the same shapes:
    prompt_last, prompt_entropy   [Lp, n, d]  the last prompt token's state, the entropy-weighted pool
    prompt_entropy_sum            [n] float32 sum_t H_t over the prompt (the pool's weight total)
    decode_mean, decode_entropy   [Ld, m, d]  the generated tokens' running mean and entropy-weighted
                                              mean at each sampled position (j = 1 .. generated)
    decode_entropy_sum            [m] float32 sum_j H_{P-1+j}, j = 1 .. generated
    decode_token_entropy          [m] float32 H_{P-1+generated}, the entropy at the sampled position
With `extract.num_samples` = N, `samples/worker-<i>.json` holds each prompt's N sampled answer lengths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trail_probe.choices import ExtractInputs, check_choice
from trail_probe.errors import UserError
from trail_probe.model_files import weights_sha256
from trail_probe.runtime.models import decoder_layers
from trail_probe.runtime.probe_inputs import input_parts

FORMAT = "trail_probe.extraction/1"
LAYER_NUMBERING = (
    "TRAIL runtime numbering: layer L is the residual stream after decoder layer L (0-based), "
    "i.e. Hugging Face hidden_states[L + 1] without the final norm"
)
OLD_INPUTS = {"prompt": ["mean"], "decode": ["current"]}  # what an extraction without `inputs` in its manifest stores
INPUT_TENSORS = {"prompt": {"mean": "prompt_states", "last": "prompt_last", "entropy": "prompt_entropy"},
                 "decode": {"current": "decode_states", "mean": "decode_mean", "entropy": "decode_entropy"}}


def stored_inputs(inputs: str = "all", entropy: bool = True, prompt_input: str = "mean",
                  decode_input: str = "current") -> dict:
    """The inputs an extraction stores (the manifest's `inputs`, `extract.inputs`): TRAIL's two, plus
    with `trained` the parts of the inputs the probes read (`prompt_input`, `decode_input`), with `all`
    the last prompt token and the generated tokens' running mean, and with `entropy` the entropy pools."""
    check_choice(inputs, ExtractInputs, "extract.inputs")
    if inputs == "all":
        extra = ["entropy"] if entropy else []
        return {"prompt": ["mean", "last", *extra], "decode": ["current", "mean", *extra]}
    out = {task: list(kinds) for task, kinds in OLD_INPUTS.items()}
    if inputs == "trained":
        for task, kind in (("prompt", prompt_input), ("decode", decode_input)):
            out[task] += [part for part in input_parts(kind) if part not in out[task]]
        out = {task: [kind for kind in INPUT_TENSORS[task] if kind in kinds] for task, kinds in out.items()}
    return out


def model_fingerprint(cfg, model: torch.nn.Module, engine: str = "hf") -> dict:
    """What identifies the serving model in every output (the manifest's `model`): id, weight-file
    hash, shape, dtype, and the engine that computed its states (hf: transformers; vllm)."""
    return config_fingerprint(cfg, model.config, type(model).__name__, len(decoder_layers(model)), engine)


def config_fingerprint(cfg, config, architecture: str | None = None, num_layers: int | None = None,
                       engine: str = "hf") -> dict:
    """`model_fingerprint` from the model's config alone (an engine that loads the weights itself)."""
    return {
        "name_or_path": cfg.name_or_path,
        "weights_sha256": weights_sha256(cfg.name_or_path) or getattr(config, "_commit_hash", None),
        "architecture": architecture or (getattr(config, "architectures", None) or ["?"])[0],
        "num_layers": int(num_layers if num_layers is not None else
                          getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")),
        "hidden_size": int(config.hidden_size if hasattr(config, "hidden_size") else config.n_embd),
        "max_position_embeddings": int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0) or 0
        ),
        "dtype": cfg.dtype,
        "engine": engine,
    }

@dataclass
class ExtractedRequest:
    """One finished request: its record plus its hidden states (already in storage dtype)."""

    record: dict  # id, prompt, response, prompt_tokens, output_tokens, hit_cap, truncated
    prompt_states: torch.Tensor  # [Lp, d]
    decode_states: torch.Tensor  # [Ld, m, d]
    decode_generated: torch.Tensor  # [m]
    token_ids: list[int] = field(default_factory=list)  # generated ids (EOS included); not stored on disk
    # the pooled inputs by shard tensor name (module docstring): prompt_* [Lp, d] or [], decode_* [Ld, m, d] or [m]
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def decode_remaining(self) -> torch.Tensor:
        return self.record["output_tokens"] - self.decode_generated


def shard_name(worker_index: int, seq: int) -> str:
    return f"shard-w{worker_index:03d}-{seq:06d}.safetensors"


def worker_temp_dir(shard_dir: Path, worker_index: int) -> Path:
    """Where worker `worker_index` writes a shard before renaming it into place: its own folder, so it
    can clear its leftovers (safetensors' own temporary files included) without touching another
    worker's file in flight."""
    return shard_dir / f".tmp-w{worker_index:03d}"


def write_shard(path: Path, requests: list[ExtractedRequest], num_prompt_layers: int,
                num_decode_layers: int, hidden_size: int, dtype: torch.dtype, worker_index: int = 0) -> str:
    """Write finished requests as one shard, atomically; returns the file's sha256."""
    counts = [r.decode_generated.numel() for r in requests]
    if sum(counts):
        decode_states = torch.cat([r.decode_states for r in requests if r.decode_generated.numel()], 1)
    else:
        decode_states = torch.zeros(num_decode_layers, 0, hidden_size, dtype=dtype)
    tensors = {
        "prompt_states": torch.stack([r.prompt_states for r in requests], 1).contiguous(),
        "decode_states": decode_states.contiguous(),
        "decode_request": torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts, dtype=torch.long)),
        "decode_generated": torch.cat([r.decode_generated for r in requests]).long(),
        "decode_remaining": torch.cat([r.decode_remaining for r in requests]).long(),
    }
    for name, first in requests[0].pooled.items():  # every request of a run holds the same ones
        parts = [r.pooled[name] for r in requests]
        if name.startswith("prompt_"):  # [Lp, d] -> [Lp, n, d]; [] -> [n]
            tensors[name] = torch.stack(parts, 1 if first.dim() == 2 else 0).contiguous()
        else:  # [Ld, m, d] -> [Ld, sum m, d]; [m] -> [sum m]
            tensors[name] = torch.cat(parts, 1 if first.dim() == 3 else 0).contiguous()
    metadata = {"format": FORMAT, "records": json.dumps([r.record for r in requests])}
    tmp_dir = worker_temp_dir(path.parent, worker_index)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / path.name
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        digest = file_digest(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # empty unless a write of this worker is in flight
            tmp_dir.rmdir()
    return digest


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DamagedShard(UserError):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"shard '{path}' is damaged ({reason}); run the same 'trail-probe extract' command again: "
                         "it sets damaged shards aside and extracts their requests again")
        self.reason = reason


@contextlib.contextmanager
def open_shard(path: Path):
    """`safe_open` of a shard; a truncated or corrupt file is a one-line `DamagedShard` naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, ValueError, KeyError) as e:  # json errors are ValueErrors
        raise DamagedShard(path, (str(e).splitlines() or [type(e).__name__])[0][:80]) from None


def read_shard_records(path: Path) -> list[dict]:
    with open_shard(path) as f:
        return json.loads(f.metadata()["records"])


def verify_shard(path: Path, sha256: str | None = None) -> str | None:
    """Why the shard at `path` cannot be used (None if it can): unreadable, a checksum other than the
    one its worker recorded, tensors that do not match its records, or non-finite states."""
    try:
        with open_shard(path) as f:
            records = json.loads(f.metadata()["records"])
            n = len(records)
            prompt = f.get_tensor("prompt_states")
            decode = f.get_tensor("decode_states")
            request = f.get_tensor("decode_request")
            if prompt.shape[1] != n or decode.shape[1] != len(request) or (len(request) and int(request.max()) >= n):
                return "its tensors do not match its records"
            bad = set()
            for name in f.keys():  # TRAIL's states and the pooled inputs beside them
                kind = "prompt" if name.startswith("prompt_") else "decode" if name.startswith("decode_") else None
                t = f.get_tensor(name) if kind else None
                if t is None or not t.is_floating_point():
                    continue
                broken = ~torch.isfinite(t).all(-1).all(0) if t.dim() == 3 else ~torch.isfinite(t)  # per request or sample
                rows = torch.nonzero(broken).flatten().tolist()
                bad |= {records[i if kind == "prompt" else int(request[i])]["id"] for i in rows}
            bad = sorted(bad)
            if bad:
                return f"non-finite hidden states for request(s) {', '.join(bad[:5])}"
    except DamagedShard as e:
        return e.reason
    if sha256 is not None and file_digest(path) != sha256:
        return "its checksum differs from the one recorded when it was written"
    return None


@dataclass
class DecodeStates:
    """Decode-time samples of one layer, across the whole extraction."""

    states: torch.Tensor  # [M, d] float32
    request: torch.Tensor  # [M] global request index (into Extraction.records)
    generated: torch.Tensor  # [M] tokens generated so far
    remaining: torch.Tensor  # [M] tokens left until EOS


class Extraction:
    """Read-only view of a complete extraction folder (all workers' shards as one dataset)."""

    def __init__(self, root: str | os.PathLike, require_complete: bool = True):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"no extraction at '{self.root}' (manifest.json missing); run 'trail-probe extract' first")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"'{self.root}' holds format {self.manifest.get('format')!r}, not {FORMAT}; re-run extract")
        self.shards = sorted((self.root / "shards").glob("shard-w*.safetensors"))
        self.records: list[dict] = []
        self._shard_offsets: list[int] = []
        for shard in self.shards:
            self._shard_offsets.append(len(self.records))
            self.records.extend(read_shard_records(shard))
        if require_complete:
            self.check_complete()

    # -- metadata -------------------------------------------------------------------------------
    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def hidden_size(self) -> int:
        return int(self.model["hidden_size"])

    @property
    def prompt_layers(self) -> list[int]:
        return list(self.manifest["prompt_layers"])

    @property
    def decode_layers(self) -> list[int]:
        return list(self.manifest["decode_layers"])

    @property
    def decode_stride(self) -> int:
        return int(self.manifest["decode_stride"])

    @property
    def inputs(self) -> dict[str, list[str]]:
        """The probe inputs stored, per task (`runtime/probe_inputs.py`); TRAIL's two in older extractions."""
        return self.manifest.get("inputs") or OLD_INPUTS

    def check_input(self, task: str, kind: str) -> None:
        """Refuse, in one line, a probe input this extraction does not store."""
        missing = [part for part in input_parts(kind) if part not in self.inputs[task]]
        if missing:
            why = ("made before pooled inputs" if "inputs" not in self.manifest
                   else "the extract.inputs it was made with")
            raise UserError(f"extraction '{self.root}' stores the {task} inputs {', '.join(self.inputs[task])} only ({why}), "
                            f"not '{missing[0]}'; extract again ('trail-probe extract RECIPE --overwrite' with extract.inputs=trained "
                            f"or all, or another extract.out_dir) to train on {task} input '{kind}'")

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    @property
    def output_tokens(self) -> torch.Tensor:
        return torch.tensor([r["output_tokens"] for r in self.records], dtype=torch.long)

    def worker_status(self) -> list[dict]:
        out = []
        for i in range(int(self.manifest["num_workers"])):
            path = self.root / "workers" / f"worker-{i}.json"
            out.append(json.loads(path.read_text()) if path.is_file() else {"worker_index": i, "complete": False})
        return out

    def check_complete(self) -> None:
        missing = [w["worker_index"] for w in self.worker_status() if not w.get("complete")]
        if missing:
            raise UserError(
                f"extraction '{self.root}' is incomplete (worker {missing[0]} has not finished); "
                "run the same 'trail-probe extract' command again to resume it"
            )
        expected = sum(int(w["expected"]) for w in self.worker_status())
        if len(self.records) != expected or len(set(self.ids)) != expected:
            raise UserError(
                f"extraction '{self.root}' holds {len(self.records)} records ({len(set(self.ids))} distinct) "
                f"but its workers expected {expected}; re-run extract with --overwrite"
            )

    def check_model(self, name_or_path: str) -> None:
        """Refuse an extraction made with another serving model than the recipe names."""
        if self.model["name_or_path"] != name_or_path:
            raise UserError(
                f"extraction '{self.root}' was made with model '{self.model['name_or_path']}' but the recipe "
                f"says '{name_or_path}'; point extract.out_dir at the right extraction or fix model.name_or_path"
            )

    def _layer_index(self, layer: int, layers: list[int], kind: str) -> int:
        if layer not in layers:
            raise UserError(
                f"layer {layer} was not extracted for {kind} states (available: {_compact(layers)}); "
                f"pick one of those or re-run extract with extract.{kind}_layers including {layer}"
            )
        return layers.index(layer)

    # -- tensors --------------------------------------------------------------------------------
    def _check_finite(self, states: torch.Tensor, request: torch.Tensor, what: str) -> torch.Tensor:
        bad = ~torch.isfinite(states).all(-1)
        if bool(bad.any()):
            ids = sorted({self.records[int(i)]["id"] for i in request[bad]})
            raise UserError(f"{what} in '{self.root}' hold NaN or inf for {len(ids)} request(s) ({', '.join(ids[:5])}); "
                            "'trail-probe extract RECIPE --verify' lists the shards; extract them again, in float32 "
                            "if the model overflowed")
        return states

    def prompt_states(self, layer: int, kind: str = "mean") -> torch.Tensor:
        """[N, d] float32 prompt input `kind` of `layer` (the mean prompt state unless asked), in `records` order."""
        li = self._layer_index(layer, self.prompt_layers, "prompt")
        self.check_input("prompt", kind)
        parts = []
        for shard in self.shards:
            with open_shard(shard) as f:
                parts.append(f.get_slice(INPUT_TENSORS["prompt"][kind])[li : li + 1][0].float())
        states = torch.cat(parts) if parts else torch.zeros(0, self.hidden_size)
        return self._check_finite(states, torch.arange(len(states)), f"prompt {kind} states of layer {layer}")

    def _samples(self) -> tuple[dict[str, list[int]], set[int]]:
        """(id -> sampled answer lengths, the sample counts of the workers' files)."""
        samples, counts = {}, set()
        for path in sorted((self.root / "samples").glob("worker-*.json")):
            saved = json.loads(path.read_text())
            samples.update(saved.get("lengths") or {})
            counts.add(int(saved.get("num_samples") or 0))
        return samples, counts

    @property
    def num_samples(self) -> int:
        """How many sampled answers per request the extraction holds (0: none, or not for every request)."""
        samples, counts = self._samples()
        return counts.pop() if len(counts) == 1 and all(rid in samples for rid in self.ids) else 0

    def sampled_lengths(self) -> torch.Tensor:
        """[N, S] int64: each request's S sampled answer lengths (extract.num_samples), in `records` order."""
        samples, counts = self._samples()
        missing = [rid for rid in self.ids if rid not in samples]
        if missing or len(counts) != 1:
            raise UserError(f"extraction '{self.root}' holds no sampled answers"
                            + (f" for {len(missing)} request(s) (e.g. '{missing[0]}')" if missing and samples else "")
                            + "; run the same extract command with extract.num_samples=8 (e.g.) to add them "
                            "(the extraction itself is kept) and train on median or soft labels")
        return torch.tensor([samples[rid] for rid in self.ids], dtype=torch.long)

    def decode_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global request index, remaining tokens) of every decode sample, without reading states."""
        request, remaining = [], []
        for shard, offset in zip(self.shards, self._shard_offsets):
            with open_shard(shard) as f:
                request.append(f.get_tensor("decode_request") + offset)
                remaining.append(f.get_tensor("decode_remaining"))
        if not request:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(request), torch.cat(remaining)

    def decode(self, layer: int, kind: str = "current") -> DecodeStates:
        """Decode-step samples of `layer` across all shards, with global request indices; the states are
        the decode input `kind` (the current token's unless asked; two parts side by side for current+pool)."""
        li = self._layer_index(layer, self.decode_layers, "decode")
        self.check_input("decode", kind)
        names = [INPUT_TENSORS["decode"][part] for part in input_parts(kind)]
        states, request, generated, remaining = [], [], [], []
        for shard, offset in zip(self.shards, self._shard_offsets):
            with open_shard(shard) as f:
                read = [f.get_slice(name)[li : li + 1][0].float() for name in names]
                states.append(read[0] if len(read) == 1 else torch.cat(read, -1))
                request.append(f.get_tensor("decode_request") + offset)
                generated.append(f.get_tensor("decode_generated"))
                remaining.append(f.get_tensor("decode_remaining"))
        if not states:
            empty = torch.zeros(0, dtype=torch.long)
            return DecodeStates(torch.zeros(0, self.hidden_size * len(names)), empty, empty, empty)
        out = DecodeStates(torch.cat(states), torch.cat(request), torch.cat(generated), torch.cat(remaining))
        self._check_finite(out.states, out.request, f"decode {kind} states of layer {layer}")
        return out


def _compact(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))
