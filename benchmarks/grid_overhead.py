"""Scheduling overhead of the grid: one cell on the local machine, through the same code as run_all.

Runs one cell (a preset on the real MEGC2019 composite, CDE, the N largest subjects' folds) in a
scratch folder (its own MLflow store and Ray Tune results) and prints
- total wall time of the run (Ray start, shards, MLflow, Tune) and of the Tune phase alone
  (first fold start to last fold end),
- the sum of the trials' training time (``train_fold``'s own clock),
- overhead ratios: Tune-phase wall x slots / training sum (1.0 = no overhead), and total wall / training sum,
- trials per hour, and the most folds that ran at once (with the GPU utilisation where there is a GPU).

    uv run python benchmarks/grid_overhead.py --folds 8 --preset epir --set epochs=10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from grid.config import DatasetSpec, GridConfig  # noqa: E402
from grid.values import parse_overrides  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "megc2019_composite"


def _gpu_util() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out or "n/a"
    except (OSError, subprocess.SubprocessError):
        return "n/a (no GPU)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--preset", default="epir")
    p.add_argument("--folds", type=int, default=8)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float)
    args = p.parse_args(argv)
    if not (args.data / "combined_3class_gt.csv").is_file():
        print(f"real MEGC2019 composite absent: {args.data}", file=sys.stderr)
        return 2
    overrides = parse_overrides(args.set)
    scratch = Path(tempfile.mkdtemp(prefix="grid-bench-"))
    os.chdir(scratch)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from grid.runner import run_grid

    cfg = GridConfig(datasets=[DatasetSpec("megc2019", args.data, protocols=["CDE"])], presets=[args.preset],
                     profile=args.profile, overrides=overrides, experiment="bench", folds=args.folds,
                     cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                     work_dir=scratch / "work", results_dir=scratch / "results")
    util = []
    t0 = time.perf_counter()
    outcome = run_grid(cfg, log=lambda m: (util.append(_gpu_util()) if "fold" in m else None, print(m, flush=True)))
    wall = time.perf_counter() - t0
    from grid import tracking

    client, exp_id = tracking.setup("bench")
    folds = list(tracking.finished_folds(client, exp_id, outcome.cells[0].cell_id).values())
    train = sum(f.train_seconds for f in folds)
    start, end = min(f.started for f in folds), max(f.finished for f in folds)
    events = sorted([(f.started, 1) for f in folds] + [(f.finished, -1) for f in folds])
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    tune_wall = end - start
    print(f"\none cell: {args.preset}, {len(folds)} folds, profile {args.profile} {overrides or ''}")
    print(f"  total wall time          {wall:8.1f} s   (Ray start, shards, MLflow, Tune)")
    print(f"  Tune phase wall time     {tune_wall:8.1f} s   (first fold start -> last fold end)")
    print(f"  sum of training time     {train:8.1f} s   ({train / len(folds):.1f} s per fold)")
    print(f"  folds at once (peak)     {peak:8d}")
    print(f"  overhead: Tune wall x {peak} / training sum = {tune_wall * peak / train:.3f}   "
          f"total wall / training sum = {wall / train:.3f}")
    print(f"  trials per hour          {len(folds) / wall * 3600:8.1f}   (Tune phase only: {len(folds) / tune_wall * 3600:.1f})")
    print(f"  GPU utilisation samples  {', '.join(util[-5:]) if util else 'n/a'}")
    print(f"  scratch: {scratch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
