"""One extraction worker's shards and status file: what a run resumes from, and how finished requests
are written, a shard at a time, as they finish.

    shards = WorkerShards(cfg.paths.data, worker_index=0, layout=(len(prompt_layers), len(decode_layers), d, dtype))
    shards.resume()                          # leftovers cleared, damaged shards set aside, done ids read
    shards.start(expected=len(ready))        # workers/worker-0.json: not complete
    for req in stream:
        shards.add(req, shard_size=64)       # a shard (and the status file) once 64 have finished
    shards.flush()                           # what is left, also after Ctrl-C
    shards.add_samples(rid, [57, 130, 512])  # extract.num_samples: a prompt's sampled answer lengths
    shards.complete(seconds=..., useful_tokens=...)

Each shard is written atomically under `shard-w<i>-<seq>` (`store.write_shard`) with its checksum in
the status file, so a run killed at any point leaves only whole shards, and the next run extracts
exactly the requests they do not hold. A prompt's sampled answer lengths (extract.num_samples) go to
`samples/worker-<i>.json` the same way, rewritten atomically as they finish, with the settings they
were sampled with. They sit beside the extraction, not in its identity or manifest: adding them later
keeps the extraction (and every probe trained on it) as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from trail_probe.atomic import atomic_write_json
from trail_probe.errors import UserError
from trail_probe.offline.store import (
    ExtractedRequest,
    read_shard_records,
    shard_name,
    verify_shard,
    worker_temp_dir,
    write_shard,
)


class WorkerShards:
    """Worker `worker_index`'s shards in `root/shards` and its status in `root/workers/worker-<i>.json`.
    `layout`: (prompt layers, decode layers, hidden size, storage dtype) of every shard it writes."""

    def __init__(self, root: Path, worker_index: int, layout: tuple[int, int, int, torch.dtype]):
        self.root, self.worker_index, self.layout = root, worker_index, layout
        self.shard_dir = root / "shards"
        self.status_path = root / "workers" / f"worker-{worker_index}.json"
        self.checksums: dict[str, str] = {}
        self.done_ids: set[str] = set()
        self.status: dict = {}
        self.buffer: list[ExtractedRequest] = []
        self.seq = 0
        self.samples_path = root / "samples" / f"worker-{worker_index}.json"
        self.samples: dict[str, list[int]] = {}  # id -> sampled answer lengths
        self.sampling: dict = {}  # the settings they are sampled with (num_samples, temperature, top_p, seed)
        self._unsaved_samples = 0

    def resume(self) -> None:
        """Clear this worker's leftovers from a killed run (never another worker's file in flight), set
        damaged shards aside (their requests are extracted again) and note what the others hold."""
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(worker_temp_dir(self.shard_dir, self.worker_index), ignore_errors=True)
        for stale in self.shard_dir.glob(f".shard-w{self.worker_index:03d}-*.tmp-*"):  # the layout before per-worker temp folders
            stale.unlink(missing_ok=True)
        old_status = json.loads(self.status_path.read_text()) if self.status_path.is_file() else {}
        self.checksums = dict(old_status.get("shards") or {})
        mine = sorted(self.shard_dir.glob(f"shard-w{self.worker_index:03d}-*.safetensors"))
        for shard in mine:
            reason = verify_shard(shard, self.checksums.get(shard.name))
            if reason is not None:  # set aside, not deleted
                aside = self.root / "damaged" / f"{shard.name}.{int(time.time())}"
                aside.parent.mkdir(exist_ok=True)
                os.replace(shard, aside)
                self.checksums.pop(shard.name, None)
                print(f"extract: {shard.name} is damaged ({reason}); moved to {aside}, its requests will be extracted again")
                continue
            self.done_ids.update(r["id"] for r in read_shard_records(shard))
        self.seq = max((int(p.stem.rsplit("-", 1)[1]) for p in mine), default=-1) + 1

    def start(self, **counts) -> None:
        """The status of a run under way: `counts` (expected, skipped_too_long, truncated) and what is done."""
        self.status = {"worker_index": self.worker_index, **counts, "complete": False}
        atomic_write_json(self.status_path, {**self.status, "done": len(self.done_ids), "shards": self.checksums})

    def add(self, request: ExtractedRequest, shard_size: int) -> None:
        self.buffer.append(request)
        if len(self.buffer) >= shard_size:
            self.flush()

    def resume_samples(self, sampling: dict) -> None:
        """The sampled lengths this worker holds, refused in one line when they were sampled otherwise."""
        self.sampling = dict(sampling)
        if not self.samples_path.is_file():
            return
        saved = json.loads(self.samples_path.read_text())
        held = {key: saved.get(key) for key in sampling}
        if held != self.sampling:
            raise UserError(f"'{self.samples_path}' holds answers sampled with {held}, not {self.sampling}; use those "
                            f"settings, or delete the folder '{self.samples_path.parent}' to sample them again")
        self.samples = dict(saved.get("lengths") or {})

    def add_samples(self, request_id: str, lengths: list[int], every: int = 32) -> None:
        """A prompt's sampled answer lengths; written with the next `every` (and at every flush)."""
        self.samples[request_id] = [int(n) for n in lengths]
        self._unsaved_samples += 1
        if self._unsaved_samples >= every:
            self._save_samples()

    def _save_samples(self) -> None:
        if self._unsaved_samples:
            atomic_write_json(self.samples_path, {"worker_index": self.worker_index, **self.sampling,
                                                  "lengths": self.samples})
            self._unsaved_samples = 0

    def flush(self) -> None:
        """Write the finished requests not yet in a shard as the next shard, and record it (and the
        sampled lengths not yet written)."""
        self._save_samples()
        if not self.buffer:
            return
        name = shard_name(self.worker_index, self.seq)
        self.checksums[name] = write_shard(self.shard_dir / name, self.buffer, *self.layout, self.worker_index)
        self.done_ids.update(r.record["id"] for r in self.buffer)
        atomic_write_json(self.status_path, {**self.status, "done": len(self.done_ids), "shards": self.checksums})
        self.seq += 1
        self.buffer = []

    def complete(self, expected: int, seconds: float, useful_tokens: int) -> None:
        atomic_write_json(self.status_path, {**self.status, "done": expected, "complete": True, "shards": self.checksums,
                                             "seconds_this_run": round(seconds, 1), "useful_tokens_this_run": useful_tokens})
