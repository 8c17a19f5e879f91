"""Trials per hour on a local multi-node Ray cluster with one worker node and with two, and their ratio.

Starts a ``ray.cluster_utils.Cluster`` (a head without CPUs, worker nodes of ``--cpus`` CPUs that
advertise one GPU each), runs the same grid cell (the N largest subjects' folds of the REAL MEGC2019
composite, CDE) through ``grid.runner.run_grid`` with one worker, then again, from scratch, with two,
and prints the folds per hour of each (first fold start to last fold end) and the ratio. On one
machine the "nodes" share its cores, so the ideal ratio is 2 only with at least 2 x --cpus cores.

    uv run python benchmarks/multinode.py --folds 12 --set epochs=10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from grid.config import DatasetSpec, GridConfig  # noqa: E402
from grid.values import parse_overrides  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "megc2019_composite"


def one(workers: int, args, overrides: dict) -> tuple[float, int]:
    import ray
    from ray.cluster_utils import Cluster

    from grid import tracking
    from grid.runner import run_grid

    scratch = Path(tempfile.mkdtemp(prefix=f"multinode-{workers}-"))
    os.chdir(scratch)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    for _ in range(workers):
        cluster.add_node(num_cpus=args.cpus, num_gpus=1)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        cfg = GridConfig(datasets=[DatasetSpec("megc2019", args.data, protocols=["CDE"])], presets=["epir"],
                         profile="cpu", overrides=overrides, experiment="bench", folds=args.folds,
                         cpus_per_trial=args.cpus, gpus_per_trial=0.5, fold_pack=1, work_dir=scratch / "work",
                         results_dir=scratch / "results")
        outcome = run_grid(cfg, log=lambda m: print(f"  [{workers} worker(s)] {m}", flush=True))
        client, exp_id = tracking.setup("bench")
        folds = list(tracking.finished_folds(client, exp_id, outcome.cells[0].cell_id).values())
        span = max(f.finished for f in folds) - min(f.started for f in folds)
        return len(folds) / span * 3600, len({f.node for f in folds})
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it; the next run has its own store


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--folds", type=int, default=12)
    p.add_argument("--cpus", type=int, default=1, help="CPUs per worker node and per fold (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if not (args.data / "combined_3class_gt.csv").is_file():
        print(f"real MEGC2019 composite absent: {args.data}", file=sys.stderr)
        return 2
    overrides = parse_overrides(args.set)
    rate1, n1 = one(1, args, overrides)
    rate2, n2 = one(2, args, overrides)
    print(f"\n{args.folds} folds of epir (cpu profile {overrides or ''}), {args.cpus} CPU per worker node and per fold, "
          f"{os.cpu_count()} cores on this machine")
    print(f"  1 worker : {rate1:8.1f} folds (trials) per hour   (folds ran on {n1} node)")
    print(f"  2 workers: {rate2:8.1f} folds (trials) per hour   (folds ran on {n2} nodes)")
    print(f"  ratio 2/1: {rate2 / rate1:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
