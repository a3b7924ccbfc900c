"""Run the serving model over prompts; record answer lengths and hidden states (`trail-probe extract`).

    trail-probe extract recipes/smollm2_alpaca.yaml
    trail-probe extract recipes/smollm2_alpaca.yaml prompts.num_prompts=64 extract.out_dir=data/try

The generation and capture are `trail_probe.offline.generation.generate_with_capture` (continuous
refill, slot KV cache, forward hooks during generation); the on-disk format is
`trail_probe.offline.store`'s. This stage writes a resumable, worker-aware extraction folder
(`cfg.paths.data`): shards are written atomically as requests finish, Ctrl-C keeps what finished,
and the same command again continues where it stopped.

Python API: `run_extract(cfg)`; `trail_probe.offline.store.Extraction` reads the folder back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from trail_probe.atomic import atomic_write_json
from trail_probe.config import RecipeConfig, config_to_dict, resolve_layers, save_config
from trail_probe.errors import UserError
from trail_probe.offline.generation import (
    SampledLengths,
    generate_with_capture,
    prepare_prompts,
    sample_lengths,
    validate_generation,
)
from trail_probe.offline.prompts import load_prompts, select_prompts, worker_slice
from trail_probe.offline.store import (
    FORMAT,
    LAYER_NUMBERING,
    OLD_INPUTS,
    config_fingerprint,
    model_fingerprint,
    stored_inputs,
    verify_shard,
)
from trail_probe.offline.worker_shards import WorkerShards
from trail_probe.progress import progress_bar
from trail_probe.runtime.models import dtype_of, load_causal_lm

HELP = "Generate answers with the serving model and dump per-layer hidden states + lengths."


EXAMPLES = """examples:
  trail-probe extract recipes/smollm2_alpaca.yaml
  trail-probe extract recipes/smollm2_alpaca.yaml prompts.num_prompts=64 extract.out_dir=data/small
  trail-probe extract recipes/smollm2_alpaca.yaml extract.decode_layers=10-15 extract.decode_stride=4
  # 8 GPUs, one worker each (same out_dir; read back as one dataset):
  for i in 0 1 2 3 4 5 6 7; do CUDA_VISIBLE_DEVICES=$i trail-probe extract recipes/llama3_8b_alpaca.yaml \\
      --num-workers 8 --worker-index $i & done; wait
  # the same on a Ray cluster (one task per GPU, any number of nodes sharing the folder):
  trail-probe extract recipes/llama3_8b_alpaca.yaml --ray              # $RAY_ADDRESS, else a local cluster
  trail-probe extract recipes/llama3_8b_alpaca.yaml --ray ray://head:10001 --num-workers 16
Interrupt at any time (Ctrl-C or kill) and run the same command again to resume."""


def add_arguments(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an extraction made with a different config")
    parser.add_argument("--num-workers", type=int, default=None, help="split the prompts over N independent workers")
    parser.add_argument("--worker-index", type=int, default=None, help="which worker this is (0..N-1)")
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="run the workers as Ray tasks (one per GPU, or per --cpus-per-worker CPUs) on the Ray "
                             "cluster at ADDRESS (default: $RAY_ADDRESS, else a local one)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="with --ray and no GPUs: CPUs per worker")
    parser.add_argument("--verify", action="store_true",
                        help="check every shard of the extraction (readable, checksum, finite) and exit; changes nothing")


# --------------------------------------------------------------------------------------------
# The resumable extraction folder
# --------------------------------------------------------------------------------------------
# What older folders' identities lack, as they were. Written only where a run differs from them, so the
# manifest of an extraction that stores what older ones did stays as it was (and so does its hash, which
# every probe and baseline trained on it records).
IDENTITY_DEFAULTS = {"engine": "hf", "inputs": OLD_INPUTS}


# Settings that change what is extracted; a folder made with other values is refused.
def _identity(cfg: RecipeConfig, model_info: dict, prompt_layers, decode_layers, num_workers) -> dict:
    gen = config_to_dict(cfg.generation)
    gen.pop("batch_size")  # batching changes speed, not results
    added = {"inputs": stored_inputs(cfg.extract.inputs, cfg.extract.entropy, cfg.train.prompt_input,
                                     cfg.train.decode_input)}
    return {
        "model": {k: model_info[k] for k in ("name_or_path", "weights_sha256", "dtype")},
        "engine": model_info["engine"],
        "prompts": {k: v for k, v in config_to_dict(cfg.prompts).items()},
        "generation": gen,
        "prompt_layers": prompt_layers,
        "decode_layers": decode_layers,
        "decode_stride": cfg.extract.decode_stride,
        "storage_dtype": cfg.extract.storage_dtype,
        "num_workers": num_workers,
        **{key: value for key, value in added.items() if value != IDENTITY_DEFAULTS[key]},
    }


def _estimate_bytes(n: int, d: int, n_prompt_layers: int, n_decode_layers: int, stride: int,
                    max_new: int, itemsize: int, inputs: dict) -> tuple[int, int]:
    """Disk for `n` requests: every stored prompt input, and every stored decode input at most (every
    answer at the cap), per layer."""
    prompt_bytes = n * n_prompt_layers * d * itemsize * len(inputs["prompt"])
    per_request_max = (max_new + stride - 1) // stride
    return prompt_bytes, n * per_request_max * n_decode_layers * d * itemsize * len(inputs["decode"])


def run_extract(cfg: RecipeConfig, overwrite: bool = False, num_workers: int | None = None,
                worker_index: int | None = None, show_progress: bool = True) -> Path:
    """Extract into `cfg.paths.data` (resuming what is already there); return the folder."""
    num_workers = cfg.extract.num_workers if num_workers is None else num_workers
    worker_index = cfg.extract.worker_index if worker_index is None else worker_index
    out = cfg.paths.data
    validate_generation(cfg.generation, cfg.extract.decode_stride)
    if cfg.extract.num_samples < 0:
        raise UserError(f"extract.num_samples = {cfg.extract.num_samples} must be >= 0 (sampled answers per prompt)")
    _check_writable(out)
    prompts, bad_rows = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.skip_bad_rows)
    selected = select_prompts(prompts, cfg.prompts.num_prompts, cfg.prompts.seed)
    mine = worker_slice(selected, num_workers, worker_index)
    storage_dtype = dtype_of(cfg.extract.storage_dtype)
    serving = _load_serving_model(cfg)
    model_info = serving["info"]
    prompt_layers = resolve_layers(cfg.extract.prompt_layers, model_info["num_layers"], "prompt layer")
    decode_layers = resolve_layers(cfg.extract.decode_layers, model_info["num_layers"], "decode layer")
    identity = _identity(cfg, model_info, prompt_layers, decode_layers, num_workers)
    inputs = {**IDENTITY_DEFAULTS, **identity}["inputs"]
    _open_folder(out, identity, overwrite)
    ready, too_long = prepare_prompts(mine, serving["tokenizer"], cfg.generation.max_new_tokens,
                                      model_info["max_position_embeddings"], cfg.prompts.too_long)
    if mine and not ready:  # nothing could be extracted: not a "complete" extraction that train then blames
        raise UserError(f"all {len(mine)} prompts are too long for the model's {model_info['max_position_embeddings']}-token "
                        f"context with generation.max_new_tokens = {cfg.generation.max_new_tokens}; set "
                        "prompts.too_long=truncate or lower generation.max_new_tokens")
    if not (out / "manifest.json").is_file():  # a resumed run keeps its first run's (whose hash every probe records)
        atomic_write_json(out / "manifest.json", {
            "format": FORMAT, "identity": identity, "model": model_info, "layer_numbering": LAYER_NUMBERING,
            "prompt_layers": prompt_layers, "decode_layers": decode_layers, "decode_stride": cfg.extract.decode_stride,
            "storage_dtype": cfg.extract.storage_dtype, "generation": config_to_dict(cfg.generation),
            "prompts": {"source": cfg.prompts.source, "num_available": len(prompts), "num_selected": len(selected),
                        "bad_rows_skipped": bad_rows, "seed": cfg.prompts.seed},
            "num_workers": num_workers, "config": config_to_dict(cfg),
            # the probe inputs stored besides TRAIL's states (absent: TRAIL's only; the sampled answers: samples/)
            **({"inputs": identity["inputs"]} if "inputs" in identity else {}),
        })
    save_config(cfg, out)

    d = model_info["hidden_size"]
    shards = WorkerShards(out, worker_index, (len(prompt_layers), len(decode_layers), d, storage_dtype))
    shards.resume()
    todo = [item for item in ready if item[0].id not in shards.done_ids]
    sample_todo = []
    if cfg.extract.num_samples:
        shards.resume_samples({"num_samples": cfg.extract.num_samples, "temperature": cfg.generation.temperature,
                               "top_p": cfg.generation.top_p, "seed": cfg.generation.seed})
        sample_todo = [item for item in ready if item[0].id not in shards.samples]
    shards.start(expected=len(ready), skipped_too_long=len(too_long), truncated=sum(t for _, _, t in ready))
    prompt_bytes, decode_bytes = _estimate_bytes(len(todo), d, len(prompt_layers), len(decode_layers),
                                                 cfg.extract.decode_stride, cfg.generation.max_new_tokens,
                                                 torch.finfo(storage_dtype).bits // 8, inputs)
    print(f"extract: worker {worker_index}/{num_workers}: {len(ready)} requests ({len(shards.done_ids)} already done, "
          f"{len(too_long)} too long skipped, {bad_rows} bad rows skipped) -> {out}")
    print(f"extract: expected disk: {prompt_bytes / 1e6:.1f} MB of prompt states + at most "
          f"{decode_bytes / 1e9:.2f} GB of decode states (if every answer hits the {cfg.generation.max_new_tokens}-token cap)",
          flush=True)

    start = time.time()
    useful_tokens, sampled = _generate_into(shards, cfg, serving, (todo, sample_todo), (prompt_layers, decode_layers),
                                            storage_dtype, inputs, show_progress)
    elapsed = time.time() - start
    shards.complete(len(ready), elapsed, useful_tokens)
    also = (f"; {sampled[0]} prompts' {cfg.extract.num_samples} sampled answers, {sampled[1]} tokens "
            f"({(useful_tokens + sampled[1]) / max(elapsed, 1e-9):.1f} tok/s in all)") if sampled[0] else ""
    print(f"extract: worker {worker_index} complete: {len(todo)} requests, {useful_tokens} tokens in {elapsed:.0f}s "
          f"({useful_tokens / max(elapsed, 1e-9):.1f} useful tok/s){also}")
    return out


def _load_serving_model(cfg: RecipeConfig) -> dict:
    """The serving model as the chosen engine needs it: {"info" (its fingerprint), "tokenizer", and
    "model" (transformers) or "folder", "eos" (vLLM loads the weights in its own worker)}."""
    if cfg.extract.engine == "vllm":
        from trail_probe.offline.vllm_generation import load_for_vllm

        folder, tokenizer, config, eos = load_for_vllm(cfg.model)
        return {"info": config_fingerprint(cfg.model, config, engine="vllm"), "tokenizer": tokenizer,
                "folder": folder, "eos": eos}
    model, tokenizer = load_causal_lm(cfg.model)
    return {"info": model_fingerprint(cfg.model, model), "tokenizer": tokenizer, "model": model}


def _open_folder(out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse an extraction folder made with another identity (or, with --overwrite, remove it)."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return
    old = {**IDENTITY_DEFAULTS, **(json.loads(manifest_path.read_text()).get("identity") or {})}
    if old != {**IDENTITY_DEFAULTS, **identity}:
        if not overwrite:
            diff = _describe_difference(old, {**IDENTITY_DEFAULTS, **identity})
            raise UserError(
                f"'{out}' holds an extraction made with a different config ({diff}); "
                "use another extract.out_dir, or pass --overwrite to replace it"
            )
        shutil.rmtree(out)


def _generate_into(shards: WorkerShards, cfg: RecipeConfig, serving: dict, todo: tuple[list, list], layers: tuple,
                   storage_dtype: torch.dtype, inputs: dict, show_progress: bool) -> tuple[int, tuple[int, int]]:
    """Run the engine over `todo` (the requests to extract, the prompts to sample answers of), writing
    finished requests into shards and sampled lengths beside them as they come; finished ones are kept
    on Ctrl-C too. Returns the answer tokens generated for the extraction, and (prompts, tokens) of the
    sampled answers."""
    requests, samples = todo
    bar = progress_bar(cfg.progress, total=len(requests) + len(samples), desc="extract", unit="req",
                       disable=not show_progress)
    streams, useful_tokens, sampled_prompts, sampled_tokens, start = [], 0, 0, 0, time.time()
    try:
        streams = _streams(cfg, serving, requests, samples, layers, storage_dtype, inputs, bar)
        for stream in streams:
            for item in stream:
                if isinstance(item, SampledLengths):
                    shards.add_samples(item.id, item.lengths, cfg.extract.shard_size)
                    sampled_prompts, sampled_tokens = sampled_prompts + 1, sampled_tokens + sum(item.lengths)
                    continue
                useful_tokens += item.record["output_tokens"]
                bar.set_postfix(tok_s=f"{useful_tokens / max(time.time() - start, 1e-9):.0f}", refresh=False)
                shards.add(item, cfg.extract.shard_size)
    finally:
        for stream in streams:
            stream.close()  # the engine (vLLM's processes) stops here, also on Ctrl-C
        shards.flush()  # finished requests are kept even on Ctrl-C
        bar.close()
    return useful_tokens, (sampled_prompts, sampled_tokens)


def _streams(cfg: RecipeConfig, serving: dict, requests: list, samples: list, layers: tuple, storage_dtype: torch.dtype,
             inputs: dict, bar) -> list:
    """The engine's streams of finished requests and of `SampledLengths` (vLLM: one stream of both)."""
    prompt_layers, decode_layers = layers
    if cfg.extract.engine == "vllm":
        from trail_probe.offline.vllm_generation import generate_with_vllm

        return [generate_with_vllm(serving["folder"], serving["tokenizer"], serving["eos"], requests, cfg.generation,
                                   prompt_layers, decode_layers, cfg.extract.decode_stride, storage_dtype,
                                   dtype=cfg.model.dtype, kv_cache_gb=cfg.extract.vllm_kv_cache_gb,
                                   max_batch_tokens=cfg.extract.vllm_max_batch_tokens,
                                   fetch_every=cfg.extract.shard_size, progress=bar, inputs=inputs,
                                   samples=(samples, cfg.extract.num_samples), compiled=cfg.extract.vllm_compile)]
    streams = [generate_with_capture(serving["model"], serving["tokenizer"], requests, cfg.generation, prompt_layers,
                                     decode_layers, cfg.extract.decode_stride, storage_dtype, progress=bar, inputs=inputs)]
    if samples:
        streams.append(sample_lengths(serving["model"], serving["tokenizer"], samples, cfg.generation,
                                      cfg.extract.num_samples, progress=bar))
    return streams


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{id(out)}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder '{out}' is not writable ({e.strerror}); set extract.out_dir to a writable folder") from None


def _describe_difference(old: dict, new: dict) -> str:
    """What differs between two extraction identities, the serving model first (another model also
    changes what "all" layers means, which would otherwise be named instead)."""
    a, b = old.get("model") or {}, new.get("model") or {}
    if a != b:
        def name(m: dict) -> str:
            return f"{m.get('name_or_path')!r} (weights {str(m.get('weights_sha256'))[:12]}..., {m.get('dtype')})"
        return f"the model: {name(a)} there, {name(b)} now"
    return _first_difference(old, new)


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} there, {b!r} now"
    return ""


def verify_extraction(cfg: RecipeConfig) -> int:
    """`extract --verify`: check every shard (readable, the checksum its worker recorded, tensors that
    match the records, finite states); print the damaged ones; change nothing. Returns the shards checked."""
    out = cfg.paths.data
    if not (out / "manifest.json").is_file():
        raise UserError(f"no extraction at '{out}' (manifest.json missing); run 'trail-probe extract' first")
    checksums: dict[str, str] = {}
    for status in sorted((out / "workers").glob("worker-*.json")):
        checksums.update(json.loads(status.read_text()).get("shards") or {})
    shards = sorted((out / "shards").glob("shard-w*.safetensors"))
    damaged = []
    with progress_bar(cfg.progress, total=len(shards), desc="verify", unit="shard") as bar:
        for shard in shards:
            reason = verify_shard(shard, checksums.get(shard.name))
            if reason is not None:
                damaged.append((shard, reason))
            bar.update(1)
    for shard, reason in damaged:  # the result, on stdout, after the progress
        print(f"extract --verify: {shard} is damaged: {reason}")
    unchecked = sum(s.name not in checksums for s in shards)
    print(f"extract --verify: {len(shards)} shards in {out}, {len(damaged)} damaged"
          + (f"; {unchecked} written before checksums were recorded (read, not checksummed)" if unchecked else ""))
    if damaged:
        raise UserError(f"{len(damaged)} of {len(shards)} shards are damaged (listed above); run the same 'trail-probe extract' "
                        "command without --verify to set them aside and extract their requests again")
    return len(shards)


# --------------------------------------------------------------------------------------------
# Many workers on a Ray cluster
# --------------------------------------------------------------------------------------------
def _ray_worker(cfg: RecipeConfig, num_workers: int, worker_index: int, threads: int, cwd: str) -> dict:
    """One Ray task: worker `worker_index` of `num_workers`, resuming its own shards like any worker;
    run in the driver's folder, so the recipe's relative paths mean the same on every node."""
    os.chdir(cwd)
    if threads:
        torch.set_num_threads(threads)
    try:
        run_extract(cfg, num_workers=num_workers, worker_index=worker_index, show_progress=False)
    except UserError as e:  # crosses back to the driver as a plain message, not a remote traceback
        return {"worker_index": worker_index, "error": str(e)}
    return json.loads((cfg.paths.data / "workers" / f"worker-{worker_index}.json").read_text())


def run_extract_ray(cfg: RecipeConfig, address: str | None = "auto", num_workers: int | None = None,
                    cpus_per_worker: int = 1, overwrite: bool = False) -> Path:
    """Extract with one Ray task per worker (a GPU each, else `cpus_per_worker` CPUs) into one folder,
    which every node must see (a shared file system). Each task is an ordinary `--worker-index` worker:
    its own slice of the prompts, shards and status file, resumed where it stopped, so every prompt is
    extracted exactly once; Ray re-runs a task whose node dies (it resumes), and the same command
    again finishes what an interrupted run left."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'ray>=2.40' (bash scripts/install.sh installs it), "
                        "or run the workers yourself with --num-workers N --worker-index i") from None
    if overwrite and cfg.paths.data.exists():
        shutil.rmtree(cfg.paths.data)
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        address = None  # no cluster named: start a local one
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        num_workers = num_workers or (gpus or max(1, int(resources.get("CPU", 1)) // cpus_per_worker))
        options = {"num_gpus": 1} if gpus else {"num_cpus": cpus_per_worker}
        task = ray.remote(max_retries=3, **options)(_ray_worker)
        print(f"extract: {num_workers} Ray workers ({'1 GPU' if gpus else f'{cpus_per_worker} CPU'} each) "
              f"on {ray.get_runtime_context().gcs_address} -> {cfg.paths.data}")
        start = time.time()
        pending = [task.remote(cfg, num_workers, i, 0 if gpus else cpus_per_worker, os.getcwd())
                   for i in range(num_workers)]
        statuses = []
        prompts, _ = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.skip_bad_rows)
        total = len(select_prompts(prompts, cfg.prompts.num_prompts, cfg.prompts.seed))
        with progress_bar(cfg.progress, total=total, desc="extract (ray)", unit="req") as bar:
            while pending:
                ready, pending = ray.wait(pending, timeout=5.0)
                statuses += ray.get(ready)
                done = sum(json.loads(f.read_text()).get("done", 0)
                           for f in (cfg.paths.data / "workers").glob("worker-*.json")) if cfg.paths.data.exists() else 0
                bar.update(done - bar.n)
    finally:
        ray.shutdown()
    errors = [st for st in statuses if "error" in st]
    if errors:
        raise UserError(f"worker {errors[0]['worker_index']}: {errors[0]['error']}")
    tokens = sum(st.get("useful_tokens_this_run", 0) for st in statuses)
    elapsed = time.time() - start
    print(f"extract: {num_workers} Ray workers complete: {sum(st['expected'] for st in statuses)} requests, "
          f"{tokens} new tokens in {elapsed:.0f}s ({tokens / max(elapsed, 1e-9):.1f} useful tok/s)")
    return cfg.paths.data


def run(cfg: RecipeConfig, args) -> None:
    if getattr(args, "verify", False):
        verify_extraction(cfg)
        return
    if getattr(args, "ray", None):
        run_extract_ray(cfg, args.ray, args.num_workers, args.cpus_per_worker, args.overwrite)
        return
    run_extract(cfg, overwrite=args.overwrite, num_workers=args.num_workers, worker_index=args.worker_index)
