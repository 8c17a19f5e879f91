"""Scores of an experiment's finished cells on a subset of their folds, read back from MLflow.

For a check that a choice did not look at some subjects: e.g. the settings an earlier session chose on
the 6 largest subjects' TEST folds (results/README.md) are scored here on the other subjects only.
Pools each cell's fold predictions (``fold.json`` of its child runs) over the kept subjects and prints
UF1 / UAR, honest and best-test-epoch (PEEKS), and for an ensemble each member alone.

    uv run python benchmarks/cell_subsets.py --experiment megc2019-cde --exclude s03,sub17,s20,011,s04,s08
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grid.cells import member_scores, pooled_scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment (store: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--exclude", default="", help="comma-separated test subjects to leave out")
    args = p.parse_args(argv)
    from grid import tracking

    client, exp_id = tracking.setup(args.experiment, create=False)
    if exp_id is None:
        print(f"no MLflow experiment '{args.experiment}' in {tracking.tracking_uri()}", file=sys.stderr)
        return 2
    drop = {s.strip() for s in args.exclude.split(",") if s.strip()}
    print(f"experiment {args.experiment}: folds of every finished cell except {sorted(drop) or 'none'}")
    print(f"{'cell':<44} {'folds':>5} {'samples':>7} {'UF1':>7} {'UAR':>7} {'PEEKS UF1':>10} {'members UF1':>18}")
    for r in sorted(tracking.finished_cells(client, exp_id), key=lambda r: r.info.run_name):
        folds = tracking.finished_folds(client, exp_id, r.data.tags[tracking.TAG_CELL])
        # the grid's own pooling, over the kept folds only (a cell's subjects and classes are all it reads)
        cell = SimpleNamespace(subjects=[s for s in folds if s not in drop], classes=r.data.params["classes"].split(","))
        if not cell.subjects:
            continue
        honest, peek = pooled_scores(cell, folds)["all"], pooled_scores(cell, folds, best_test_epoch=True)
        members = member_scores(cell, folds)
        m = [x["all"]["uf1"] for x in members] if members else []
        print(f"{r.info.run_name:<44} {len(cell.subjects):>5} {honest['n']:>7} {honest['uf1']:7.4f} "
              f"{honest['uar']:7.4f} {peek['all']['uf1'] if peek else float('nan'):10.4f} "
              f"{f'{np.mean(m):.4f} ± {np.std(m, ddof=1):.4f}' if len(m) > 1 else '':>18}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
