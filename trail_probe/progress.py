"""Progress of long work, one bar per stage: tqdm on a terminal; anywhere else (a log file, CI) a
plain line every `every_s` seconds and one at the end, instead of a refresh per update.

    with progress_bar(cfg.progress, total=len(todo), desc="extract", unit="req") as bar:
        ...; bar.update(1); bar.set_postfix_str("shard 3")
        bar.write("a message that does not break the bar")

`ProgressConfig` (the recipe's `progress` section) sets the interval and whether Lightning's own
per-epoch bars are shown as well (off: a sweep of 60 probes would print 60 x 30 of them).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable

DEFAULT_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class PlainProgress:
    """tqdm's interface as the toolkit uses it, writing whole lines at most every `every_s` seconds."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 every_s: float = DEFAULT_EVERY_S, file=None, disable: bool = False):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.every_s, self.disable = desc, unit, every_s, disable
        self.file = file or sys.stderr
        self.n, self.postfix = 0, ""
        self._start = self._last = time.monotonic()
        self._shown = -1  # n at the last line written
        self._first: tuple[float, int] | None = None  # (time, n) of the first update: where the ETA's pace starts

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()  # as tqdm does: a finished loop shows its last line

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._first is None and n:
            self._first = (time.monotonic(), self.n)
        self._maybe_show()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        self._maybe_show()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()))

    def write(self, s: str) -> None:
        if not self.disable:
            print(s, file=self.file, flush=True)

    def close(self) -> None:
        if self.n != self._shown:
            self._show()

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        # the pace since the first item, not since the start: a job's start-up (an engine loading and
        # compiling for a minute or two before its first answer) is not its pace, and would predict hours
        if self.total and self._first and self._first[1] < self.n < self.total:
            since, n0 = self._first
            eta = f", {_duration((time.monotonic() - since) / (self.n - n0) * (self.total - self.n))} left"
        rest = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit}{pct}, {_duration(elapsed)} elapsed{eta}{rest}"

    def _maybe_show(self) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._show()

    def _show(self) -> None:
        self._last, self._shown = time.monotonic(), self.n
        self.write(self.line())


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of a distributed run (or not in one): the one that reports."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK"))


def progress_bar(settings=None, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, file=None):
    """A tqdm bar when `file` (stderr by default) is a terminal, else a `PlainProgress`. `settings`: the
    recipe's `progress` section (None: the defaults). Silent on non-zero ranks of a distributed run."""
    file = file or sys.stderr
    disable = disable or not is_rank_zero()
    every_s = getattr(settings, "every_s", DEFAULT_EVERY_S)
    if not disable and hasattr(file, "isatty") and file.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, file=file)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, every_s=every_s, file=file, disable=disable)
