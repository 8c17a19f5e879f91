"""The runtime shared by preprocessing and the grid: connecting to Ray, the package versions that shape
results, and how much of the libraries' own logging reaches the console.

By default (:func:`quiet_libraries` with ``verbose=False``) the console shows our progress lines and real
problems only, set through each library's own logging settings, not by filtering text:

- Ray: ``ray.init(logging_level=ERROR)`` (its token-authentication notice and other start-up WARNINGs),
  ``RAY_BACKEND_LOG_LEVEL=fatal`` for its C++ core workers (e.g. ``core_worker.cc ... has constructor
  arguments in the object store and max_restarts > 0``, which some runs print in red), the ``ray.data``
  logger at ERROR (its "no available CPUs ... will hang" warning while Tune holds the CPUs, and "progress
  bars disabled"), ``RAY_AIR_NEW_OUTPUT=0`` with Tune's ``verbose=0`` (no configuration box, no TensorBoard
  hint) and ``TUNE_WARN_THRESHOLD_S`` (Tune's "operation took 1.7 s" warnings) at 60 s;
- MLflow: ``MLFLOW_LOGGING_LEVEL=ERROR`` and the ``mlflow`` logger at ERROR (its INFO lines on creating a
  store, and "Failed to resolve installed pip version" when a model is saved in a uv environment without
  pip).

With ``verbose=True`` (``-v`` / ``--verbose`` of ``grid/run_all.py`` and ``python -m preprocess``) every
library keeps its defaults. Settings the user made (an environment variable already set) are kept.
"""

from __future__ import annotations

import logging
import os
import platform
from importlib import metadata
from pathlib import Path

# environment settings of the libraries' own, applied unless the user set them; read when Ray starts
QUIET_ENV = {"RAY_BACKEND_LOG_LEVEL": "fatal", "RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_THRESHOLD_S": "60",
             "MLFLOW_LOGGING_LEVEL": "ERROR"}
QUIET_LOGGERS = {"ray": logging.ERROR, "ray.data": logging.ERROR, "ray.tune": logging.ERROR, "mlflow": logging.ERROR}
_VERBOSE = {"on": False}


def quiet_libraries(verbose: bool = False) -> None:
    """Set how much of Ray's and MLflow's logging reaches the console (see the module docstring); call it
    before Ray starts. ``verbose=True`` leaves every library at its defaults."""
    _VERBOSE["on"] = verbose
    if verbose:
        return
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def is_verbose() -> bool:
    """Whether :func:`quiet_libraries` was asked for everything."""
    return _VERBOSE["on"]


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the shards (``absent`` when not installed)."""
    out = {"python": platform.python_version()}
    for pkg in ("epir-grid", "ray", "torch", "opencv-contrib-python-headless", "facenet-pytorch", "numpy", "pyarrow", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def init_ray(py_modules: list[str] | None = None):
    """Connect to ``RAY_ADDRESS``, or to the cluster of the node this runs on (``ray start`` writes
    ``/tmp/ray/ray_current_cluster``, e.g. on the head after ``ray up``), else start a local Ray; quiet
    Ray Data's console logs (and, unless verbose, Ray's start-up warnings: :func:`quiet_libraries`). Used by
    preprocessing and by the grid.

    Args:
        py_modules: local ``.py`` files (a user's ``--model-file``) that Ray ships to every worker of this job
            (its runtime environment's ``py_modules``), importable there by their stem. Only the first call of a
            process connects: a later call returns the connection it made.

    Returns:
        the ``ray`` module, initialised.

    Raises:
        ConnectionError: no cluster at ``RAY_ADDRESS``, or one whose token authentication (Ray 2.59+)
            refuses this client (the message says where the token goes).
    """
    # Ray's `uv run` hook would package the working tree and start every worker through uv (seconds
    # each); the environment is already complete here and on a cluster installed by cluster.yaml.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

    import ray
    import ray.data  # configures Ray Data's logging on import

    # Ray Data logs every execution at INFO on the console; our one line per shard is enough there (its
    # session log file keeps everything); without --verbose its warnings too (quiet_libraries)
    level = logging.DEBUG if is_verbose() else QUIET_LOGGERS["ray.data"]
    for h in logging.getLogger("ray.data").handlers:
        if h.get_name() == "console":
            h.setLevel(max(level, logging.WARNING))

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address is None and Path("/tmp/ray/ray_current_cluster").exists():
        address = "auto"
    kwargs = dict(log_to_driver=False, configure_logging=True, logging_level="WARNING" if is_verbose() else "ERROR")
    if py_modules:
        kwargs["runtime_env"] = {"py_modules": [str(p) for p in py_modules]}
    try:
        ray.init(address=address, **kwargs)
    except ray.exceptions.AuthenticationError as e:
        raise ConnectionError(
            f"the Ray cluster at {address} uses token authentication and refused this client: put the "
            "cluster's token in ~/.ray/auth_token (cluster.yaml copies yours to every node), or set "
            f"RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH ({e})") from e
    except ConnectionError:
        if address != "auto":  # a stale address file: no cluster is running on this node after all
            raise
        ray.init(**kwargs)
    return ray
