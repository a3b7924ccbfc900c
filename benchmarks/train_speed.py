"""How fast `trail-probe train` trains one probe: the issue's target is 30 epochs of the decode task on
2,000 requests x 16 samples at d=576 (SmolLM2's width) in under 2 minutes on this 2-core machine.

    python benchmarks/train_speed.py                    # 30 epochs, torch threads 1 and 2
    python benchmarks/train_speed.py --epochs 3 --threads 1

The data is synthetic but has the real shape, and goes through the real path: the split, the
in-memory batch feed, `ProbeModule` and Lightning's Trainer (progress bar, CSV logger, best/last
checkpoints, probe export), via `trail_probe.stages.train.fit_probe`. Prints a table and writes
benchmarks/results/train_speed.json. The 1-minute load average before each run is recorded; with
another job on the machine ("background_load": true) wall times are pessimistic, and the process's
CPU seconds ("process_cpu_s") are the better guide to what a quiet machine does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from results_file import run_facts, write_results

from trail_probe.config import load_recipe
from trail_probe.offline.probe_module import TensorRows
from trail_probe.offline.split import make_split
from trail_probe.offline.synthetic import LengthSignal
from trail_probe.runtime.bins import Bins
from trail_probe.stages.train import ProbeData, ProbeSpec, fit_probe

RESULTS = Path(__file__).parent / "results" / "train_speed.json"


def synthetic_decode_data(num_requests: int, per_request: int, dim: int, train_fraction: float, seed: int = 0):
    """Decode-task tensors of the benchmark's shape; the remaining length is linear in one direction."""
    signal = LengthSignal(dim, 512, noise=0.1, generator=torch.Generator().manual_seed(seed))  # the tests' rule
    request = torch.arange(num_requests).repeat_interleave(per_request)
    remaining = torch.randint(0, 512, (len(request),), generator=signal.generator)
    x = signal.states(remaining)[0]  # learnable, so val MAE shows the run is sane
    bins = Bins()
    rows = (x, bins.label(remaining), remaining.float(), torch.full((len(request),), 512.0))
    ids = [f"bench-{i}" for i in range(num_requests)]
    train_ids = set(make_split(ids, train_fraction, seed)[0])
    is_train = torch.tensor([i in train_ids for i in ids])[request]
    train, val = torch.nonzero(is_train).squeeze(1), torch.nonzero(~is_train).squeeze(1)
    return ProbeData(train=TensorRows(*(t[train] for t in rows)), val=TensorRows(*(t[val] for t in rows)),
                     train_groups=request[train], input_dim=dim, num_train_requests=len(train_ids),
                     num_val_requests=num_requests - len(train_ids))


class EpochTimer:
    """Wall time of each training epoch (its batches plus its validation)."""

    def __init__(self):
        import lightning as L

        class _Timer(L.Callback):
            def on_train_epoch_start(cb, trainer, module):
                cb.start = time.perf_counter()

            def on_train_epoch_end(cb, trainer, module):
                self.times.append(time.perf_counter() - cb.start)

        self.times: list[float] = []
        self.callback = _Timer()


def run_one(epochs: int, threads: int, num_requests: int, per_request: int, dim: int) -> dict:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe(None, [f"train.out_dir={tmp}", f"train.epochs={epochs}", "train.loggers=[csv]"])
        data = synthetic_decode_data(num_requests, per_request, dim, cfg.train.train_fraction)
        context = {"bins": Bins().to_dict(), "model": {"name_or_path": "benchmark"},
                   "extraction": {"path": "synthetic", "manifest_sha256": "-"}, "split": {"path": "-", "sha256": "-"},
                   "selected_on": {"side": "held-out", "path": "-", "requests": 500, "sha256": "-"},
                   "config_sha256": "-", "layer_numbering": "-"}
        timer = EpochTimer()
        start, cpu_start = time.perf_counter(), time.process_time()
        meta = fit_probe(cfg, ProbeSpec("decode", (11,)), data, context, callbacks=(timer.callback,))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    samples = len(data.train) * epochs
    return {"torch_threads": threads, "epochs": epochs, "train_samples_per_epoch": len(data.train),
            "val_samples": len(data.val), "steps_per_epoch": -(-len(data.train) // cfg.train.batch_size),
            "wall_s": round(wall, 2), "process_cpu_s": round(cpu, 2), "samples_per_s": round(samples / wall, 1),
            "epoch_s_median": round(sorted(timer.times)[len(timer.times) // 2], 3),
            "val_mae_best": round(meta["metrics"]["val/mae"], 2), "loadavg_1min_before": round(load_before, 2),
            "background_load": load_before >= 1.0, "under_2_min": wall < 120}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to try")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--per-request", type=int, default=16)
    parser.add_argument("--dim", type=int, default=576)
    args = parser.parse_args(argv)
    runs = [run_one(args.epochs, int(n), args.requests, args.per_request, args.dim) for n in args.threads.split(",")]
    print(f"\n{'threads':>7} {'epochs':>6} {'wall s':>8} {'cpu s':>7} {'samples/s':>10} {'epoch s':>8} "
          f"{'val MAE':>8} {'load':>5}")
    for r in runs:
        print(f"{r['torch_threads']:>7} {r['epochs']:>6} {r['wall_s']:>8.1f} {r['process_cpu_s']:>7.1f} "
              f"{r['samples_per_s']:>10.0f} {r['epoch_s_median']:>8.2f} {r['val_mae_best']:>8.1f} "
              f"{r['loadavg_1min_before']:>5.1f}")
    result = {"benchmark": "train_speed", "task": "decode", "requests": args.requests, "samples_per_request":
              args.per_request, "hidden_size": args.dim, "batch_size": 32,
              "background_load": any(r["background_load"] for r in runs), "runs": runs, **run_facts(argv)}
    write_results(RESULTS, result)


if __name__ == "__main__":
    main()
