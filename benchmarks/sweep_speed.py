"""How fast the layer sweep trains: one probe per layer, or the layers stacked into one batched model.

    python benchmarks/sweep_speed.py                       # step times, then the sweep's projected wall time
    python benchmarks/sweep_speed.py --stacks 1,5,30 --threads 1,2 --steps 300

Part 1 times one training step (forward, cross-entropy, backward, fused AdamW, batch 32, d=576,
hidden 512, 10 bins: the recipe's probe) of a `ProbeStack` of n layers against n separate
`LengthProbe` steps, in plain PyTorch (no Lightning), for each torch thread count: what the hardware
allows. Part 2 (`--sweep`) runs the real `trail-probe train` code path (`fit_probe` / `fit_stack`,
Lightning, checkpoints, probe folders) for one epoch of a 30-layer decode sweep on synthetic data of
the recipe's shape (1,500 training requests x 16 samples, 500 validation) and projects the
30-layer x 2-task, 30-epoch sweep from it. Prints tables and writes benchmarks/results/sweep_speed.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results_file import run_facts, write_results

from trail_probe.offline.probe_stack import ProbeStack
from trail_probe.runtime.probe import LengthProbe

RESULTS = Path(__file__).parent / "results" / "sweep_speed.json"


def step_time(n: int, stacked: bool, threads: int, steps: int, dim: int = 576, batch: int = 32) -> float:
    """Seconds per training step of n probes (stacked, or n separate steps)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch * 8, n, dim).half()
    labels = torch.randint(0, 10, (batch * 8,))
    if stacked:
        models = [ProbeStack.of(LengthProbe(dim, 512, 10), n)]
    else:
        models = [LengthProbe(dim, 512, 10) for _ in range(n)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in models]

    def one(i: int) -> None:
        rows = slice((i % 8) * batch, (i % 8 + 1) * batch)
        for k, (m, opt) in enumerate(zip(models, opts)):
            xb = x[rows] if stacked else x[rows, k]
            logits = m(xb.float())
            loss = F.cross_entropy(logits.reshape(-1, 10), labels[rows].repeat_interleave(n if stacked else 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for i in range(10):  # warm-up
        one(i)
    start = time.perf_counter()
    for i in range(steps):
        one(i)
    return (time.perf_counter() - start) / steps


def sweep_epoch(stack: int, threads: int, layers: int = 30, precision: str = "32-true") -> dict:
    """One epoch of a `layers`-layer decode sweep through train's real code (synthetic data), at
    Lightning precision `precision` (train.precision)."""
    from train_speed import EpochTimer, synthetic_decode_data

    from trail_probe.config import load_recipe
    from trail_probe.offline.epoch_progress import EpochProgress
    from trail_probe.offline.probe_module import TensorRows
    from trail_probe.progress import progress_bar
    from trail_probe.runtime.bins import Bins
    from trail_probe.stages.train import ProbeData, ProbeSpec, fit_probe, fit_stack

    torch.set_num_threads(threads)
    one = synthetic_decode_data(2000, 16, 576, 0.75)

    def stacked(n: int) -> ProbeData:  # the same rows at every layer (a sweep's layers share them), fp16 as stored
        train = TensorRows(one.train.tensors[0].half()[:, None].expand(-1, n, -1).contiguous(), *one.train.tensors[1:])
        val = TensorRows(one.val.tensors[0].half()[:, None].expand(-1, n, -1).contiguous(), *one.val.tensors[1:])
        return ProbeData(train, val, one.train_groups, 576, one.num_train_requests, one.num_val_requests)
    context = {"bins": Bins().to_dict(), "model": {"name_or_path": "benchmark"},
               "extraction": {"path": "synthetic", "manifest_sha256": "-"}, "split": {"path": "-", "sha256": "-"},
               "selected_on": {"side": "held-out", "path": "-", "requests": 500, "sha256": "-"},
               "config_sha256": "-", "layer_numbering": "-"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe(None, [f"train.out_dir={tmp}", "train.epochs=1", "train.loggers=[csv]",
                                 f"train.precision={precision}"])
        timer = EpochTimer()
        start = time.perf_counter()
        with progress_bar(cfg.progress, total=layers, desc="sweep", unit="epoch", disable=True) as bar:
            for first in range(0, layers, stack):
                group = tuple(range(first, min(first + stack, layers)))
                progress = EpochProgress(bar, "bench", probes=len(group))
                if len(group) == 1:
                    fit_probe(cfg, ProbeSpec("decode", group), one, context, callbacks=(timer.callback,), progress=progress)
                else:
                    fit_stack(cfg, ProbeSpec("decode", group, "stack"), stacked(len(group)), context,
                              callbacks=(timer.callback,), progress=progress)
        wall = time.perf_counter() - start
    return {"stack_layers": stack, "torch_threads": threads, "precision": precision, "layers": layers,
            "epoch_wall_s": round(wall, 2),
            "train_samples": len(one.train), "val_samples": len(one.val)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", default="1,2,4,8,15,30", help="layers per stack to time")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sweep", default="", help="real sweep epochs to run, each STACK[@THREADS[@PRECISION]], e.g. 1@1,5@2,5@2@bf16-mixed "
                        "(stack 0 or 1: one probe at a time)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    steps = []
    for threads in map(int, args.threads.split(",")):
        for n in map(int, args.stacks.split(",")):
            separate = step_time(n, False, threads, args.steps)
            stacked = step_time(n, True, threads, args.steps)
            steps.append({"torch_threads": threads, "layers": n, "separate_ms": round(separate * 1e3, 3),
                          "stacked_ms": round(stacked * 1e3, 3), "stacked_ms_per_layer": round(stacked * 1e3 / n, 3),
                          "speedup": round(separate / stacked, 2)})
    print(f"\n{'threads':>7} {'layers':>6} {'separate ms':>12} {'stacked ms':>11} {'ms/layer':>9} {'speed-up':>9}")
    for r in steps:
        print(f"{r['torch_threads']:>7} {r['layers']:>6} {r['separate_ms']:>12.2f} {r['stacked_ms']:>11.2f} "
              f"{r['stacked_ms_per_layer']:>9.3f} {r['speedup']:>8.2f}x")
    sweeps = []
    for spec in filter(None, args.sweep.split(",")):
        parts = spec.split("@")
        stack, threads, precision = parts[0], (parts[1:] or ["1"])[0], (parts[2:] or ["32-true"])[0]
        sweeps.append(sweep_epoch(max(1, int(stack)), int(threads or 1), precision=precision))
    if sweeps:
        print(f"\n{'stack':>5} {'threads':>7} {'precision':>10} {'1 epoch, 30 layers s':>21} {'projected sweep min':>20}")
        for r in sweeps:
            # 30 epochs; the prompt task has ~1/16 of the decode task's samples per epoch
            r["projected_sweep_min"] = round(r["epoch_wall_s"] * 30 * (1 + 1 / 16) / 60, 1)
            print(f"{r['stack_layers']:>5} {r['torch_threads']:>7} {r['precision']:>10} {r['epoch_wall_s']:>21.1f} {r['projected_sweep_min']:>20.1f}")
    result = {"benchmark": "sweep_speed", "batch_size": 32, "hidden_size": 576, "probe_hidden": 512, "bins": 10,
              "loadavg_1min_before": round(load_before, 2), "steps": steps, "sweep_epochs": sweeps, **run_facts(argv)}
    write_results(RESULTS, result)


if __name__ == "__main__":
    main()
