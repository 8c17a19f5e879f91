"""A grid TOML file (``--config``) read into :class:`grid.config.GridConfig` keyword arguments: every key known or
refused, dataset roots and model files relative to the file."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from .config import DatasetSpec, GridConfig

SEARCH_KEYS = {"space"}  # what a grid TOML's [search] table may hold (grid/run_all.py search reads it)


def load_config(path: Path | None) -> dict:
    """Read a grid TOML file into GridConfig keyword arguments.

    Raises:
        FileNotFoundError: the file does not exist. ValueError: a key is unknown (also in ``[search]``).
    """
    if path is None:
        return {}
    path = Path(path)
    with path.open("rb") as f:
        raw = tomllib.load(f)
    known = {f.name for f in dataclasses.fields(GridConfig)} - {"choices", "overrides_from"} | {"search"}
    bad = set(raw) - known
    if bad:
        raise ValueError(f"{path}: unknown key(s) {sorted(bad)}; known: {sorted(known - {'demo'})}")
    out = dict(raw)
    unknown = set(raw.get("search", {})) - SEARCH_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} in [search]; known: {sorted(SEARCH_KEYS)} (the other "
                         "search settings are command-line options: python grid/run_all.py search --help)")
    if "model_files" in raw:  # relative to the TOML file, as dataset roots
        out["model_files"] = [f if Path(f).is_absolute() else (path.parent / f).resolve() for f in raw["model_files"]]
    if "datasets" in raw:
        out["datasets"] = []
        for d in raw["datasets"]:
            d = dict(d)
            root = Path(d.pop("root"))
            if not root.is_absolute():
                root = (path.parent / root).resolve()
            spec_keys = {"format", "name", "protocols"}
            out["datasets"].append(DatasetSpec(root=root, options={k: v for k, v in d.items() if k not in spec_keys},
                                               **{k: v for k, v in d.items() if k in spec_keys}))
    return out
