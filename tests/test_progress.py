"""One progress bar per stage: tqdm on a terminal, a plain line every few seconds anywhere else."""

import io
import json
from types import SimpleNamespace

import pytest

from trail_probe.progress import PlainProgress, progress_bar
from trail_probe.stages import pipeline


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_file_gets_plain_lines_at_most_every_interval_and_one_at_the_end():
    out = io.StringIO()
    bar = progress_bar(None, total=1000, desc="extract", unit="req", file=out)
    assert isinstance(bar, PlainProgress)
    bar.every_s = 3600
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(tok_s="90")
    assert out.getvalue() == ""  # nothing between lines, however many updates
    bar.close()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("extract: 1000/1000 req (100%)") and line.endswith("tok_s=90")
    fast = io.StringIO()
    with progress_bar(None, total=3, desc="x", file=fast) as bar:
        bar.every_s = 0.0
        for _ in range(3):
            bar.update(1)
    assert len(fast.getvalue().splitlines()) == 3  # a line per update when the interval is 0, none doubled at close
    assert "left" in fast.getvalue().splitlines()[1]  # a pace needs two items


def test_the_time_left_is_paced_from_the_first_item_not_the_start(monkeypatch):
    """An extraction's engine starts for ~100 s before its first answer; then answers come every second.
    The ETA after the 11th of 2,000 is the remaining 1,989 at that pace (33 min), not 100 s per answer."""
    now = [0.0]
    monkeypatch.setattr("trail_probe.progress.time.monotonic", lambda: now[0])
    bar = PlainProgress(total=2000, desc="extract", unit="req", every_s=3600, file=io.StringIO())
    now[0] = 100.0
    bar.update(1)
    assert "left" not in bar.line()  # one item: no pace yet
    now[0] = 110.0
    bar.update(10)
    assert bar.line().endswith("01:50 elapsed, 33:09 left")


def test_a_terminal_gets_tqdm_and_a_disabled_bar_writes_nothing():
    from tqdm import tqdm

    bar = progress_bar(None, total=2, desc="x", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = io.StringIO()
    with progress_bar(None, total=2, desc="x", file=quiet, disable=True) as bar:
        bar.update(2)
        bar.write("hello")
    assert quiet.getvalue() == ""


def test_iterating_counts_items_and_ends_with_one_line():
    out = io.StringIO()
    assert list(progress_bar(None, [1, 2, 3], desc="verify", unit="shard", file=out)) == [1, 2, 3]
    (line,) = out.getvalue().splitlines()  # no line between items (30 s interval), one when the loop ends
    assert line.startswith("verify: 3/3 shard (100%), ")
    every = io.StringIO()
    list(progress_bar(SimpleNamespace(every_s=0.0), "abcd", desc="verify", unit="shard", file=every))
    assert [line.split(",")[0] for line in every.getvalue().splitlines()] == [
        "verify: 1/4 shard (25%)", "verify: 2/4 shard (50%)", "verify: 3/4 shard (75%)", "verify: 4/4 shard (100%)"]


class Clock:
    """Seconds now, moved by hand: the stage timings are checked exactly, with no sleep."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class OneBeat:
    """The heartbeat thread's wait: one interval passes, then the stage ends."""

    def __init__(self):
        self.waits = 0

    def wait(self, timeout) -> bool:
        self.waits += 1
        return self.waits > 1


def test_pipeline_timings_keep_the_interrupted_runs(tmp_path):
    path = tmp_path / "pipeline_timings.json"
    clock = Clock()
    with pytest.raises(KeyboardInterrupt):
        with pipeline._StageClock(path, {}, "train", clock=clock):
            clock.now += 0.5
            raise KeyboardInterrupt
    saved = json.loads(path.read_text())["train"]
    assert saved == {"runs": [{"seconds": 0.5, "interrupted": True}]}
    with pipeline._StageClock(path, json.loads(path.read_text()), "train", clock=clock):
        clock.now += 0.3
    done = json.loads(path.read_text())["train"]
    assert done["runs"] == [{"seconds": 0.5, "interrupted": True}, {"seconds": 0.3}]
    assert done["seconds"] == 0.8  # each run once: 0.5 + 0.3
    with pipeline._StageClock(path, done, "train", clock=clock):  # a finished stage run again starts afresh
        clock.now += 2.0
    assert json.loads(path.read_text())["train"]["runs"] == [{"seconds": 2.0}]


def test_a_killed_stage_leaves_a_heartbeat_that_counts(tmp_path):
    path = tmp_path / "pipeline_timings.json"
    clock = Clock()
    stage = pipeline._StageClock(path, {}, "extract", clock=clock)
    stage._stop = OneBeat()
    clock.now += 7.0
    stage._beat()  # the heartbeat thread's loop: one beat after 7 s, then the stage ends
    assert json.loads(path.read_text())["extract"] == {"runs": [], "running": {"seconds": 7.0}}  # what a kill -9 leaves
    with pipeline._StageClock(path, json.loads(path.read_text()), "extract", clock=clock):
        clock.now += 1.5
    done = json.loads(path.read_text())["extract"]
    assert done["runs"] == [{"seconds": 7.0, "interrupted": True}, {"seconds": 1.5}] and done["seconds"] == 8.5
