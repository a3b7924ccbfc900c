"""Prompt sources: a hub dataset, a local Alpaca-format JSON/JSONL, a JSONL of {"id", "prompt"}, or a
prompt set (`.ids`): a list of prompt ids and the sources that hold their texts, tried in order.

A prompt is the Alpaca instruction, plus a blank line and the input when there is one (TRAIL's
format). Ids are kept when the source has them, else `alpaca-<12 hex of sha1(prompt)>` as in the
shared file, so the same prompt gets the same id from every source. That is what lets a prompt set
(`recipes/alpaca_2000.ids`) take the same prompts, in its own order, from the local shared file where
it exists and from `tatsu-lab/alpaca` on the hub elsewhere; it prints one line saying which it used.
A set file holds no prompt text: `#` comments, `source: <file or hub dataset id>` lines (paths are
relative to the working directory, as in recipes), then one id a line.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from trail_probe.errors import UserError


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def prompt_id(text: str) -> str:
    return "alpaca-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _row_to_prompt(row: object, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not a JSON object")
    if "prompt" in row:
        text = row["prompt"]
    elif "instruction" in row:
        instruction, extra = row["instruction"], row.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise ValueError(f"{where} has a non-text instruction or input")
        text = instruction + ("\n\n" + extra if extra.strip() else "")
    else:
        raise ValueError(f"{where} has neither 'prompt' nor 'instruction'")
    if not isinstance(text, str):
        raise ValueError(f"{where} has a prompt that is not text")
    if not text.strip():
        raise ValueError(f"{where} has an empty prompt")
    pid = row.get("id")
    return Prompt(id=str(pid) if pid is not None else prompt_id(text), text=text)


def _read_rows(path: Path) -> list[tuple[str, object]]:
    """(location, parsed-or-error) for every row of a .jsonl or .json file."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file '{path}' ({e.__class__.__name__}); check the path and permissions") from None
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"prompt file '{path}' is not valid JSON (line {e.lineno}); fix it or convert it to JSONL") from None
        if not isinstance(data, list):
            raise UserError(f"prompt file '{path}' must hold a JSON list of rows")
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(data)]
    rows = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError:
            rows.append((f"{path} line {lineno}", ValueError(f"{path} line {lineno} is not valid JSON")))
    return rows


class _Unreachable(Exception):
    """A prompt source that cannot be read here (a missing file, a hub dataset out of reach); its reason."""


def _is_file_source(source: str) -> bool:
    path = Path(source)
    return path.suffix in (".json", ".jsonl") or path.exists()


def _source_rows(source: str, split: str) -> list[tuple[str, object]]:
    """(location, row) of every row of a file or hub dataset; `_Unreachable` when it cannot be had here."""
    if _is_file_source(source):
        if not Path(source).is_file():
            raise _Unreachable("not found")
        return _read_rows(Path(source))
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # the hub raises many kinds; all mean "cannot get this dataset"
        raise _Unreachable(e.__class__.__name__) from None
    return [(f"{source}[{split}] row {i}", row) for i, row in enumerate(ds)]


def load_prompts(source: str, split: str = "train", skip_bad_rows: bool = False) -> tuple[list[Prompt], int]:
    """All prompts of a source, in source order, and the number of bad rows skipped.

    A `.ids` file is a prompt set (`load_prompt_set`). A local path (or anything ending in .json/.jsonl)
    is read as a file; anything else is treated as a hub dataset id and loaded with
    `datasets.load_dataset(source, split=split)`.
    """
    if Path(source).suffix == ".ids":
        return load_prompt_set(source, split)
    try:
        rows = _source_rows(source, split)
    except _Unreachable as e:
        if _is_file_source(source):
            raise UserError(f"prompt file '{source}' not found; set prompts.source to a .jsonl/.json file or a hub dataset id") from None
        raise UserError(f"cannot load prompts '{source}' from the hub ({e}); check the dataset id and network, "
                        "or point prompts.source at a local JSONL") from None
    return _prompts_of(rows, source, skip_bad_rows)


def _prompts_of(rows: list[tuple[str, object]], source: str, skip_bad_rows: bool) -> tuple[list[Prompt], int]:
    prompts, skipped, seen = [], 0, set()
    for where, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            p = _row_to_prompt(row, where)
        except ValueError as e:
            if skip_bad_rows:
                skipped += 1
                continue
            raise UserError(f"{e}; fix the row or set prompts.skip_bad_rows=true to skip such rows") from None
        if p.id in seen:  # Alpaca has a few duplicate prompts; one request per distinct prompt
            continue
        seen.add(p.id)
        prompts.append(p)
    if not prompts:
        raise UserError(f"prompt source '{source}' has no usable prompts; check the file")
    return prompts, skipped


def read_prompt_set(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, sources) of a `.ids` prompt set file."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt set '{path}' ({e.__class__.__name__}); check prompts.source") from None
    lines = [line for line in lines if line and not line.startswith("#")]
    sources = [line.removeprefix("source:").strip() for line in lines if line.startswith("source:")]
    ids = [line for line in lines if not line.startswith("source:")]
    if not sources or not ids or len(set(ids)) != len(ids):
        raise UserError(f"prompt set '{path}' needs 'source: ...' lines and distinct ids, one a line; fix the file")
    return ids, sources


def load_prompt_set(path: str | Path, split: str = "train") -> tuple[list[Prompt], int]:
    """The prompts of a `.ids` set, in its order, from the first of its sources that can be read here
    (a bad row of a source is skipped: only a missing id matters); (prompts, 0). Prints the source used."""
    ids, sources = read_prompt_set(path)
    passed = []
    for source in sources:
        try:
            rows = _source_rows(source, split)
        except _Unreachable as e:
            passed.append(f"{'' if _is_file_source(source) else 'hub dataset '}'{source}': {e}")
            continue
        by_id = {p.id: p for p in _prompts_of(rows, source, skip_bad_rows=True)[0]}
        missing = [i for i in ids if i not in by_id]
        if missing:
            fix = "restore the file, or move it away to use the set's next source" if _is_file_source(source) \
                else "check the set's source line"
            raise UserError(f"'{source}' lacks {len(missing)} of the {len(ids)} prompts of '{path}' (first: {missing[0]}), "
                            f"so it holds other data; {fix}")
        kind = "the local file" if _is_file_source(source) else f"the hub dataset ({split} split)"
        print(f"prompts: {len(ids)} of the prompt set '{path}' from {kind} '{source}'"
              + (f" ({'; '.join(passed)})" if passed else ""), flush=True)
        return [by_id[i] for i in ids], 0
    raise UserError(f"no source of the prompt set '{path}' can be read here ({'; '.join(passed)}); put the file "
                    "there, or give this machine hub access (pip install datasets; HF_HUB_OFFLINE unset), "
                    "or set prompts.source to a JSONL of your own")


def select_prompts(prompts: list[Prompt], num_prompts: int | None, seed: int) -> list[Prompt]:
    """A deterministic sample of `num_prompts` (source order kept); all of them when None."""
    if num_prompts is None or num_prompts >= len(prompts):
        return list(prompts)
    if num_prompts <= 0:
        raise UserError(f"prompts.num_prompts = {num_prompts} must be positive (or null for all)")
    keep = sorted(random.Random(seed).sample(range(len(prompts)), num_prompts))
    return [prompts[i] for i in keep]


def worker_slice(prompts: list[Prompt], num_workers: int, worker_index: int) -> list[Prompt]:
    """The disjoint slice of prompts that worker `worker_index` of `num_workers` handles."""
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise UserError(
            f"worker index {worker_index} is not in 0..{num_workers - 1}; pass --worker-index i with 0 <= i < --num-workers"
        )
    return prompts[worker_index::num_workers]
