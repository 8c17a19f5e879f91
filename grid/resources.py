"""What a grid run asks of the cluster: connect to Ray, resolve the profile, size a trial (CPUs, GPU share, folds
per trial), and refuse a trial no node could hold instead of waiting for it forever."""

from __future__ import annotations

from dataclasses import dataclass

from preprocess.runtime import init_ray

from .config import GridConfig


def check_fit(resources_per_node: list[dict], bundles: list[dict]) -> None:
    """Refuse a placement group the cluster can never hold (instead of waiting for it forever).

    Args:
        resources_per_node: total resources of each alive node (``ray.nodes()``'s ``Resources``).
        bundles: the trial's bundles.

    Raises:
        ValueError: the bundles' sum exceeds the cluster, or one bundle fits on no node.
    """
    for key in ("CPU", "GPU"):
        need = sum(b.get(key, 0) for b in bundles)
        have = sum(n.get(key, 0) for n in resources_per_node)
        if need > have + 1e-9:
            raise ValueError(f"a trial reserves {need:g} {key} ({len(bundles)} bundles) but the cluster has {have:g}: "
                             "lower --cpus-per-trial / --gpus-per-trial (search: --fold-parallel)")
    for b in bundles:
        if not any(all(n.get(k, 0) + 1e-9 >= v for k, v in b.items()) for n in resources_per_node):
            raise ValueError(f"no node can hold a fold bundle {b}")


@dataclass
class Resources:
    """What the cluster offers and what one trial asks for."""

    profile: str
    has_gpu: bool
    cpus: float
    gpus: float


def plan_resources(cfg: GridConfig, log=print) -> Resources:
    """Connect to Ray, resolve the profile, size a trial, and refuse a trial no node could hold (it would
    wait forever).

    Raises:
        ValueError: a trial larger than any node.
    """
    ray = init_ray(py_modules=[str(f) for f in cfg.model_files])  # a user's model files reach every worker
    have = ray.cluster_resources()
    has_gpu = have.get("GPU", 0) > 0
    packs = cfg.fold_pack != 1 and has_gpu  # a pack of folds on a GPU takes the whole device by default
    gpus = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else ((1.0 if packs else 0.25) if has_gpu else 0.0)
    res = Resources(cfg.resolved_profile(has_gpu), has_gpu, cfg.cpus_per_trial, gpus)
    log(f"Ray: {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs; profile {res.profile}; each trial asks for "
        f"{res.cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "") + f"; {pack_text(cfg, has_gpu)}")
    check_fit([n["Resources"] for n in ray.nodes() if n["Alive"]], [{"CPU": res.cpus, "GPU": gpus}])
    return res


def pack_text(cfg: GridConfig, has_gpu: bool) -> str:
    """How folds are grouped into trials, in words."""
    size = cfg.fold_pack or (0 if has_gpu else 1)
    return "one fold per trial" if size == 1 else \
        ("every fold of a cell in one batched trial" if size == 0 else f"up to {size} folds per batched trial")


