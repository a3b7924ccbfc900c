"""Atomic writes, the one way trail_probe writes a file or a folder: readers (and a resumed run) see
the old content or the complete new one, never half of it.

    with atomic_path(out / "probe.safetensors") as tmp:   # any writer that takes a path
        save_file(weights, str(tmp))
    with atomic_dir(out / "predictor") as tmp:            # a whole folder, swapped in at the end
        ...
    atomic_write_json(out / "report.json", report)

Temporary names are `.<name>.tmp-<pid>` beside the target, so a process can tell its own leftovers
from those of a live writer (another worker) by the pid.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed onto `path` when the block succeeds and
    removed when it fails, so readers see the old file or the complete new one, never half of it.
    Temporary names are `.<name>.tmp-<pid>`: a run can tell its own leftovers from a live writer's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to build a whole folder in; when the block succeeds it
    takes `path`'s place (a previous folder there is moved aside, then deleted), else it is removed."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def temp_files_in(folder: str | os.PathLike) -> Iterator[Path]:
    """Keep every temporary file of this process inside the run's `folder` while the block runs:
    Python's `tempfile` (which Lightning's checkpoint writes go through) and `TMPDIR` for child
    processes point at `folder/.tmp-<host>-<pid>`. Folders left by processes of this host that are
    gone (a kill -9 during a checkpoint write) are removed first; another host's are left alone (on
    a folder shared by several nodes, a pid means nothing here); this one is removed when the block ends."""
    import shutil
    import socket
    import tempfile

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("/", "_")
    for old in root.glob(".tmp-*"):
        owner, dash, pid = old.name.removeprefix(".tmp-").rpartition("-")
        if not dash:  # `.tmp-<pid>`, as written before hosts were recorded: this host's
            owner = host
        if (old.is_dir() and owner == host and pid.isdigit() and int(pid) != os.getpid()
                and not _alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / f".tmp-{host}-{os.getpid()}"
    mine.mkdir(exist_ok=True)
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(mine), str(mine)
    try:
        yield mine
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(mine, ignore_errors=True)
