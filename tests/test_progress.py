"""One progress bar per stage: tqdm on a terminal, a plain line every few seconds anywhere else."""

import io
import json
import time

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
    assert "left" in fast.getvalue().splitlines()[0]


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


def test_iterating_counts_items(monkeypatch):
    out = io.StringIO()
    assert list(progress_bar(None, [1, 2, 3], desc="verify", unit="shard", file=out)) == [1, 2, 3]


def test_pipeline_timings_keep_the_interrupted_runs(tmp_path, monkeypatch):
    path = tmp_path / "pipeline_timings.json"
    with pytest.raises(KeyboardInterrupt):
        with pipeline._StageClock(path, {}, "train"):
            time.sleep(0.05)
            raise KeyboardInterrupt
    saved = json.loads(path.read_text())["train"]
    assert saved["runs"][0]["interrupted"] and saved["runs"][0]["seconds"] >= 0.05 and "finished" not in saved
    with pipeline._StageClock(path, json.loads(path.read_text()), "train"):
        time.sleep(0.05)
    done = json.loads(path.read_text())["train"]
    assert [r.get("interrupted", False) for r in done["runs"]] == [True, False]
    assert done["seconds"] == pytest.approx(sum(r["seconds"] for r in done["runs"]), abs=0.11) and done["seconds"] >= 0.1


def test_a_killed_stage_leaves_a_heartbeat_that_counts(tmp_path, monkeypatch):
    path = tmp_path / "pipeline_timings.json"
    monkeypatch.setattr(pipeline, "HEARTBEAT_S", 0.02)
    with pipeline._StageClock(path, {}, "extract"):
        time.sleep(0.15)
        assert json.loads(path.read_text())["extract"]["running"]["seconds"] > 0  # what a kill -9 would leave
    path.write_text(json.dumps({"extract": {"runs": [], "running": {"seconds": 7.0}}}))  # killed after 7 s
    with pipeline._StageClock(path, json.loads(path.read_text()), "extract"):
        pass
    done = json.loads(path.read_text())["extract"]
    assert done["runs"][0] == {"seconds": 7.0, "interrupted": True} and 7.0 <= done["seconds"] < 8.0
