"""Shared fixtures. Real data is read from ../shared/data (never copied into the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EPIR_SHARED_DATA", REPO.parent / "shared" / "data"))
COMPOSITE = SHARED_DATA / "megc2019_composite"
ANNOTATIONS = SHARED_DATA / "annotations"


@pytest.fixture(scope="session")
def composite_root() -> Path:
    """The real MEGC2019 composite, or a skip that says where it was looked for."""
    if not (COMPOSITE / "combined_3class_gt.csv").is_file():
        pytest.skip(f"real MEGC2019 composite absent: {COMPOSITE}/combined_3class_gt.csv not found "
                    "(set EPIR_SHARED_DATA to the folder holding megc2019_composite/)")
    return COMPOSITE


def run_grid_cli(args, cwd, env=None, timeout=900):
    """Run ``python grid/run_all.py ARGS`` in ``cwd`` with the embedded MLflow store and, unless ``env``
    says otherwise, a fresh local Ray (never a cluster left running). Returns the CompletedProcess."""
    import subprocess
    import sys

    full = {**os.environ, "RAY_ADDRESS": "local", **(env or {})}
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(REPO / "grid" / "run_all.py"), *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def finished_fold_tags(db: Path, tag: str) -> list[str]:
    """Value of ``tag`` (e.g. ``epir.fold``, ``epir.node``) of each FINISHED fold run in a grid's SQLite
    MLflow store, read-only and without MLflow's machinery, so a test can poll it while a driver writes.
    Empty when the store does not exist yet or is locked."""
    import sqlite3

    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return [r[0] for r in con.execute(
                "select t2.value from runs r join tags t1 on t1.run_uuid = r.run_uuid and t1.key = 'epir.kind' "
                "and t1.value = 'fold' join tags t2 on t2.run_uuid = r.run_uuid and t2.key = ? "
                "where r.status = 'FINISHED'", (tag,))]
    except sqlite3.Error:
        return []
