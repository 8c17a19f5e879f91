"""EPIR Grid's main job: every dataset x protocol x LOSO fold x ablation, on Ray Tune, recorded in MLflow.

The grid itself is built by a later issue; until then this prints what it will do and checks that
the model library works here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epir.complexity import measure  # noqa: E402
from epir.model import EPIR, PRESETS, make_config  # noqa: E402


def main() -> int:
    print("EPIR Grid (not yet built): python grid/run_all.py will")
    print("  1. preprocess each configured dataset into Parquet shards (preprocess/),")
    print("  2. run every dataset x protocol (SDE, CDE) x LOSO fold x ablation preset as Ray Tune trials,")
    print("  3. record every fold and cell in MLflow and write paper-style tables to results/.")
    print("Ablation presets available now (python -m epir info --preset NAME):")
    for p in PRESETS:
        c = measure(EPIR(make_config(p)))
        print(f"  {p:<9} {c.params / 1e6:5.2f} M params  {c.macs / 1e6:6.2f} M MACs/sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
