"""Shared fixtures. Real data is read from ../shared/data (never copied into the repository).

One Ray for the whole run (:func:`ray_head`): a local head started once, which every CLI subprocess and
every in-process caller of ``preprocess.runtime.init_ray`` joins through ``RAY_ADDRESS``; tests that must own
their cluster (a killed driver, Ctrl-C, node loss) start their own, as before.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Ray reads its token-authentication settings once, when this process first imports it (test modules do so
# at collection): the run's own token is set here, before any of them, for the shared head (ray_head), every
# subprocess, and the clusters that tests start in this process
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EPIR_SHARED_DATA", REPO.parent / "shared" / "data"))
COMPOSITE = SHARED_DATA / "megc2019_composite"
ANNOTATIONS = SHARED_DATA / "annotations"


def _free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on 127.0.0.1 now (the OS picks them)."""
    socks = [socket.socket() for _ in range(n)]
    for sk in socks:
        sk.bind(("127.0.0.1", 0))
    ports = [sk.getsockname()[1] for sk in socks]
    for sk in socks:
        sk.close()
    return ports


@pytest.fixture(scope="session", autouse=True)
def ray_head():
    """ONE local Ray head for the whole test run, joined through ``RAY_ADDRESS`` (set for this process and the
    subprocesses it starts, with a token of its own for Ray's token authentication). It cannot disturb a grid running in the background on the same machine: its own
    temp dir (so no ``/tmp/ray/ray_current_cluster`` for ``init_ray`` to join), its own ports, and it is torn
    down by killing its own process group, never by ``ray stop``. Yields its address."""
    from preprocess.runtime import QUIET_ENV

    temp = Path(tempfile.mkdtemp(prefix="epir-test-ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    gcs, agent, metrics = _free_ports(3)
    env = {**os.environ, **QUIET_ENV, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}  # with the run's token (above)
    env.pop("RAY_ADDRESS", None)
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli), "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={temp}", "--num-cpus=2",
           "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}"]
    log = open(temp / "ray-start.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address_file = temp / "ray_current_cluster"
    deadline = time.time() + 120
    while not address_file.is_file() and head.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if not address_file.is_file():
        _stop_group(head)
        raise RuntimeError(f"the tests' Ray head did not start: {(temp / 'ray-start.log').read_text()[-3000:]}")
    address = address_file.read_text().strip()
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before
        disconnect_ray()
        _stop_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        for store in _EMPTY_STORE:
            shutil.rmtree(store.parent, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group ``proc`` leads (``start_new_session``), SIGKILL to what is left after 2 s."""
    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the head is gone; its children may still be stopping
            time.sleep(1)


def disconnect_ray() -> None:
    """Leave the Ray this process joined (the cluster itself keeps running): a test that joins a cluster of its
    own (the node-loss tests) calls it first, since ``init_ray`` keeps a connection it finds. Tests in this
    process otherwise stay joined to the shared head, one Ray job whose workers they reuse."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session")
def demo_first_run(tmp_path_factory, ray_head):
    """The built-in demo run ONCE from nothing, as a new user runs it (``python grid/run_all.py --folds 2
    --presets epir`` in an empty folder: demo data written, preprocessed, 2 folds trained). Returns (its folder,
    the CompletedProcess); ``test_demo_runs_end_to_end`` checks it, and :func:`demo_seeded` copies its data."""
    cwd = tmp_path_factory.mktemp("demo-first-run")
    return cwd, run_grid_cli(["--folds", "2", "--presets", "epir"], cwd, fresh_store=True)


@pytest.fixture
def demo_seeded(demo_first_run, tmp_path) -> Path:
    """``tmp_path`` with the demo's data and shards in its ``work_dirs/``, as the demo run left them in its own
    folder (a demo grid in ``tmp_path`` reuses the shards: their cache key reads the files' contents, not their
    folder). For tests of what comes after preprocessing."""
    work = demo_first_run[0] / "work_dirs"
    assert (work / "shards").is_dir(), demo_first_run[1].stderr[-3000:]
    for part in ("demo_data", "shards"):
        shutil.copytree(work / part, tmp_path / "work_dirs" / part)
    return tmp_path


@pytest.fixture(scope="session")
def composite_root() -> Path:
    """The real MEGC2019 composite, or a skip that says where it was looked for."""
    if not (COMPOSITE / "combined_3class_gt.csv").is_file():
        pytest.skip(f"real MEGC2019 composite absent: {COMPOSITE}/combined_3class_gt.csv not found "
                    "(set EPIR_SHARED_DATA to the folder holding megc2019_composite/)")
    return COMPOSITE


def synthetic_composite(root, per_subject: int = 6):
    """A small composite in the published MEGC2019 layout: 4 subjects of two source datasets, random
    28 x 28 flow images whose red (u) channel leans with the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "flow").mkdir(parents=True)
    rows = []
    for dataset, subject in (("casme2", "sub01"), ("casme2", "sub02"), ("smic", "s01"), ("smic", "s02")):
        for i in range(per_subject):
            label = i % 3
            img = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
            img[..., 0] = np.clip(img[..., 0].astype(int) // 2 + 60 * label, 0, 255)
            name = f"{subject}_{i}"
            Image.fromarray(img).save(root / "flow" / f"{subject}_{name} .png")
            rows.append(f"{dataset},{subject},{name},{label}")
    (root / "combined_3class_gt.csv").write_text("\r\n".join(rows) + "\r\n")
    return root


_EMPTY_STORE: list[Path] = []


def empty_mlflow_store() -> Path:
    """An empty MLflow SQLite store with MLflow's tables made (once per run; 1.6 s of migrations a store), for
    :func:`run_grid_cli` to copy where a test's first run would create one."""
    if not _EMPTY_STORE:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="epir-test-mlflow-"))
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # creates and migrates the tables
        _EMPTY_STORE.append(folder / "mlflow.db")
    return _EMPTY_STORE[0]


def run_grid_cli(args, cwd, env=None, timeout=900, fresh_store=False):
    """Run ``python grid/run_all.py ARGS`` in ``cwd`` with the embedded MLflow store and, unless ``env``
    says otherwise, the tests' shared Ray (:func:`ray_head`). Where ``cwd`` has no store yet, an empty one is
    copied there (:func:`empty_mlflow_store`) unless ``fresh_store``: then the run creates it, as a first run
    does. Returns the CompletedProcess."""
    if not fresh_store and not (Path(cwd) / "mlflow.db").exists():
        shutil.copyfile(empty_mlflow_store(), Path(cwd) / "mlflow.db")
    full = {**os.environ, **(env or {})}
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
