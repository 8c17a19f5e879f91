"""What a grid run does: datasets, protocols, presets, the training profile, resources and stores.

A run is configured by an optional TOML file (``--config grid.toml``) and command-line flags; a flag
overrides the file. With neither a file nor a ``--dataset`` flag the grid runs the built-in demo.

    # grid.toml
    experiment = "epir-grid"          # MLflow experiment; results/<experiment>/ holds its tables
    presets = ["baseline", "epir"]    # default: the six rungs of the paper's Table 4; peers: "ststnet"
    profile = "auto"                  # auto | paper | cpu | demo   (see PROFILES)
    seeds = [0, 1, 2]                 # one cell per seed; tables give the mean and spread (default [0])
    model_files = ["mynet.py"]        # models of one's own (docs/extending.md); their names join the presets

    [[datasets]]
    format = "megc2019"               # a preprocess adapter (FORMATS): casme2 samm smic casme3 megc2019 manifest
    root = "../shared/data/megc2019_composite"
    protocols = ["CDE"]               # SDE and/or CDE; default: what the dataset's labels allow

    # [[datasets]]                    # the same raw data again, with TV-L1 flows: separate shards and cells
    # format = "casme2"
    # root = "/data/CASME2"
    # flow = "tvl1"                   # farneback (default, EPIR's) or tvl1 (the published composite's)

    # [[datasets]]                    # a lab's own data
    # format = "manifest"
    # root = "mylab.csv"
    # classes = ["negative", "positive", "surprise"]   # label order; default: the labels found (a class
    #                                                  # that one subject alone has is refused as a typo)

    # or EPIR's composite from the raw releases: their CDE samples pooled into one LOSO cell
    # cde_composite = true
    # [[datasets]]
    # format = "casme2"
    # root = "/data/CASME2"
    # protocols = ["CDE"]
    # (and the same for samm and smic)

    [overrides]                       # any TrainRecipe field, or a model field of a chosen preset's family
    epochs = 60

Profiles size the EPIR ladder (its presets carry no recipe). A peer preset (``ststnet``) keeps the
recipe its authors published whatever the profile; its cells say profile ``published``. Overrides apply
to every preset whose model family has the field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from epir.presets import FAMILIES, LADDER, PRESETS, config_to_dict, family_fields, make_config
from epir.registry import load_model_file
from epir.train import TrainRecipe
from preprocess import FLOW_ALGORITHMS
from preprocess.adapters import ADAPTERS

from .values import check_values

PROTOCOLS = ("SDE", "CDE")
Sampler = Literal["random", "qmc", "grid"]  # a search's candidate samplers (grid.search); none looks at a score
SAMPLERS = get_args(Sampler)
FORMATS = tuple(ADAPTERS)  # the dataset formats: preprocess's adapters, one registry

# Training profiles: model width and recipe overrides on top of each EPIR-ladder preset (EPIRConfig /
# TrainRecipe fields; peers keep their published recipe). ``paper`` is EPIR Sec. 4.2 at the paper width.
# ``cpu`` is a 2-core machine's: width 64 (the earlier profile's), the SPT reference's initialisation and a
# log-parametrised ITALS temperature (both chosen a priori, from the diagnostics in tests/test_learning.py),
# AdamW with a 3-epoch warm-up and cosine decay, and the values of the strict search
# megc2019-CDE-epir-cpu-strict (results/megc2019-search/) best on ALL its validation groups. That makes it
# a choice made with every subject of the MEGC2019 composite as a validation subject: its cells on that
# dataset are labelled so (PROFILE_CHOSEN_ON); the honest composite result is the search's per-group cell.
# ``demo`` is the built-in demo's minutes-long grid.
PROFILES: dict[str, dict] = {
    "paper": {},
    "cpu": dict(dim=64, dim_head=21, batch_size=64, schedule="cosine", hflip=True, standardize=True, init="spt",
                itals_param="log_scale", optimizer="adamw", warmup_epochs=3, lr=6.187e-4, weight_decay=2.85e-3,
                label_smoothing=0.0509, drop_path=0.0174, translate=1, mixup=0.2, class_weights="none", depth=13,
                integration_blocks=2, epochs=60),
    "demo": dict(dim=32, dim_head=11, depth=5, integration_blocks=2, epochs=30, lr=2e-3, batch_size=32),
}
# profile -> (the data key it was chosen on, how): its cells on that data are labelled as peeking
PROFILE_CHOSEN_ON = {"cpu": ("megc2019/CDE", "search megc2019-CDE-epir-cpu-strict, best on all validation groups")}


def peeking_overrides(study: str, key: str) -> str:
    """Why a search's best-on-all settings (``--overrides <study>.best.json``) are refused on ``key``, its data."""
    return (f"the overrides come from search {study!r}, which chose them with every subject of {key} as a validation "
            f"subject: testing them on {key} would peek. Evaluate the search's per-group choices instead (--choices "
            "<study>.choices.json)")


def expected_keys(spec: "DatasetSpec") -> set[str]:
    """The data keys (``grid.data.ProtocolData.key``) a configured dataset can give, known before preprocessing:
    its name (a manifest's file stem, as the adapter makes it), each protocol, the flow where a key names it."""
    name = spec.name or (re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.root.stem) if spec.format == "manifest" else spec.format)
    if not spec.name and spec.options.get("source"):  # a source dataset of the MEGC2019 composite
        name = f"{spec.format}-{spec.options['source']}"
    flow = spec.options.get("flow", "farneback")
    return {f"{name}/{p}" + ("" if flow == "farneback" else f"/{flow}") for p in (spec.protocols or PROTOCOLS)}


def subset_keys(spec: "DatasetSpec") -> set[str]:
    """The data keys whose samples a configured dataset's are a subset of (known before preprocessing): the
    composite's key for one of its source datasets (``megc2019`` with ``source``), else none. A search's
    choices made there replay on it, and settings chosen there were chosen with its subjects."""
    return {"megc2019/CDE"} if spec.format == "megc2019" and spec.options.get("source") else set()


def model_fields() -> set[str]:
    """Every registered model family's config field names (a user's ``--model-file`` adds families)."""
    return set().union(*(family_fields(f) for f in FAMILIES))


RECIPE_FIELDS = {f.name for f in dataclasses.fields(TrainRecipe)}
PUBLISHED = "published"  # the profile label of a peer's cells: its own published recipe
OWN_RECIPE = "own recipe"  # the profile label of a user's model's cells (--model-file): the recipe it registered


@dataclass
class DatasetSpec:
    """One configured dataset: a preprocess adapter ``format`` and its ``root``.

    Attributes:
        format: one of ``FORMATS``.
        root: dataset root (for ``manifest``, the CSV file).
        name: output name (default: the format; a manifest's file stem).
        protocols: ``SDE``/``CDE``; empty = every protocol its labels allow.
        options: extra adapter options (``annotations``, ``classes``, ``precropped``) and ``flow`` (``farneback``, the
            default, or ``tvl1``: the optical-flow algorithm of its preprocessing; a dataset configured twice with
            two flows gives two shard sets and two sets of cells, named by the flow).
    """

    format: str
    root: Path
    name: str | None = None
    protocols: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"dataset format must be one of {FORMATS}, got {self.format!r}")
        self.root = Path(self.root)
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"unknown protocol(s) {bad}; choose from {PROTOCOLS}")
        if self.options.get("flow", "farneback") not in FLOW_ALGORITHMS:
            raise ValueError(f"dataset {self.name or self.format}: flow must be one of {FLOW_ALGORITHMS}, "
                             f"got {self.options['flow']!r}")
        if self.format == "megc2019" and "flow" in self.options:
            raise ValueError("the megc2019 composite is published as flow images (TV-L1): it has no flow option")


@dataclass
class GridConfig:
    """Everything a grid run needs (see the module docstring for the TOML form).

    Attributes:
        datasets: the datasets to run; empty = the built-in demo.
        presets: presets of ``epir.presets.PRESETS`` (the ablation ladder and peers).
        profile: ``auto`` (``paper`` where the cluster has GPUs, else ``cpu``), or a key of ``PROFILES``.
        overrides: TrainRecipe fields and model fields, applied after the profile (a model field to the
            presets whose family has it).
        seeds: one cell per seed (``TrainRecipe.seed``); the tables report the mean and spread.
        cde_composite: pool the CDE samples of every configured dataset into ONE composite CDE dataset
            (EPIR's CDE from raw CASME II, SAMM and SMIC; ``grid.data.composite``) instead of one CDE
            cell per dataset; SDE cells stay per dataset.
        choices: a search's ``<study>.choices.json`` (``grid.search``): each test subject's fold trains the
            configuration chosen for its validation group, without its labels; for presets of the search's
            model family (a choice made on ``epir`` may be applied to ``baseline``).
        final_model: also train each cell's model on ALL its subjects and log it as an MLflow model (for new
            data: ``grid/run_all.py predict``); None = on for real datasets, off for the demo and for a partial
            grid (``folds``). Cells of a search's per-group choices have none.
        log_fold_models: log each fold's trained weights (``weights/`` of its child run).
        overrides_from: where ``overrides`` came from when it is a search's ``.best.json`` (``study``,
            ``dataset``): a configuration chosen on every subject of that dataset, refused there.
        experiment: MLflow experiment name; tables go to ``results_dir/<experiment>/``.
        folds: run only the first N subjects' folds of each cell (0 = all; a partial grid is labelled).
        fold_pack: folds of one cell (of the same settings) trained as ONE batched model per trial
            (:mod:`epir.pack`): 0 = a cell's folds in one trial where the cluster has GPUs, one fold per trial on
            CPUs; 1 = one fold per trial; N = up to N. Results are the same either way (tested).
        cpus_per_trial, gpus_per_trial: Ray resources of one trial; gpus_per_trial None = 1 for a pack on a GPU,
            0.25 for one fold where the cluster has GPUs, else 0.
        max_failures: retries of a failing fold before it is reported as failed.
        max_concurrent: at most this many folds at once (0 = as many as the resources allow).
        work_dir: shards, demo data and Ray Tune results go here.
        results_dir: where the tables are written.
        demo: True when running the built-in demo.
        model_files: a user's model files (``--model-file``; TOML ``model_files``): each is imported here, on the
            driver, and checked (:func:`epir.registry.load_model_file`); the models it registers are presets.
            Ray ships them to every worker (``py_modules``), where each trial imports them by name.

    Raises:
        ValueError: an unknown preset, profile, override or a value its field refuses, before anything runs.
        epir.registry.ModelInterfaceError: a model of ``model_files`` misses a piece of the interface.
    """

    datasets: list[DatasetSpec] = field(default_factory=list)
    presets: list[str] = field(default_factory=lambda: list(LADDER))
    profile: str = "auto"
    overrides: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    cde_composite: bool = False
    choices: dict | None = None
    final_model: bool | None = None
    log_fold_models: bool = False
    overrides_from: dict | None = None
    experiment: str = "epir-grid"
    folds: int = 0
    fold_pack: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    max_failures: int = 2
    max_concurrent: int = 0
    work_dir: Path = Path("work_dirs")
    results_dir: Path = Path("results")
    demo: bool = False
    model_files: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.model_files = [Path(f).resolve() for f in self.model_files]
        for f in self.model_files:  # a user's models register before the presets are checked
            load_model_file(f)
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise ValueError(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")
        if self.profile != "auto" and self.profile not in PROFILES:
            raise ValueError(f"profile must be auto or one of {list(PROFILES)}, got {self.profile!r}")
        chosen = set().union(*(family_fields(PRESETS[p].family) for p in self.presets)) if self.presets else set()
        bad = set(self.overrides) - chosen - RECIPE_FIELDS
        if bad:
            raise ValueError(f"unknown override(s) {sorted(bad)}: not a TrainRecipe field nor a model field of the "
                             f"chosen presets' families ({', '.join(sorted({PRESETS[p].family for p in self.presets}))})")
        if "seed" in self.overrides:
            raise ValueError("the seed is set by seeds (--seeds 0,1,2), which makes one cell per seed")
        for spec in self.datasets if self.overrides_from else ():  # refused before Ray starts (build_cells checks again)
            if self.overrides_from.get("dataset") in expected_keys(spec) | subset_keys(spec):
                raise ValueError(peeking_overrides(self.overrides_from["study"], self.overrides_from["dataset"]))
        problems = check_values(self.overrides, self.presets)
        if problems:
            raise ValueError("\n".join(problems))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        if self.choices is not None:
            missing = {"study", "dataset", "preset", "groups", "subjects"} - set(self.choices)
            if missing:
                raise ValueError(f"choices: not a search's .choices.json (missing {sorted(missing)})")
            family = PRESETS[self.choices["preset"]].family
            other = [p for p in self.presets if PRESETS[p].family != family]
            if other:
                raise ValueError(f"choices of search {self.choices['study']!r} set {family}-family fields; "
                                 f"{other} are of another family")
        if self.folds < 0 or self.max_failures < 0 or self.cpus_per_trial <= 0 or self.fold_pack < 0:
            raise ValueError("folds, fold_pack and max_failures must be >= 0 and cpus_per_trial > 0")
        self.work_dir, self.results_dir = Path(self.work_dir), Path(self.results_dir)
        # every cell's settings, under every profile this run may resolve to, before anything starts
        for profile in (["paper", "cpu"] if self.profile == "auto" else [self.profile]):
            for preset in self.presets:
                try:
                    self.settings(preset, profile, 3)
                except (ValueError, TypeError) as e:
                    raise ValueError("\n".join(f"preset {preset} under profile {profile}: {self.explain(line, preset, profile)}"
                                               for line in str(e).splitlines())) from None

    def source(self, name: str, preset: str, profile: str) -> str:
        """Where a cell's setting ``name`` comes from: the overrides, the profile, the preset, or the default."""
        p = PRESETS[preset]
        if name in self.overrides:
            return "--set / overrides" if not self.choices else "--set / overrides / the search's base"
        if p.profiled and name in PROFILES[profile]:
            return f"the {profile} profile"
        if name in p.recipe or name in p.model:
            return f"the {preset} preset"
        return "the default"

    def explain(self, message: str, preset: str, profile: str) -> str:
        """``message`` with every ``field=value`` it names followed by where that value came from."""
        def note(m: re.Match) -> str:
            name = m.group(1)
            known = name in RECIPE_FIELDS or name in model_fields()
            return m.group(0) + (f" (from {self.source(name, preset, profile)})" if known else "")

        return re.sub(r"\b([a-z_]+)=('[^']*'|[^\s,;)]+)", note, message)

    @property
    def trains_final_models(self) -> bool:
        """Whether cells train a final model on all subjects: ``final_model``, else on for a full grid of real
        data and off for the demo and for a partial grid (``folds``), whose folds are a sample only."""
        return self.final_model if self.final_model is not None else not (self.demo or self.folds)

    def resolved_profile(self, has_gpu: bool) -> str:
        """The profile actually used: ``auto`` -> ``paper`` with GPUs, else ``cpu``."""
        if self.profile != "auto":
            return self.profile
        return "paper" if has_gpu else "cpu"

    def settings(self, preset: str, profile: str, num_classes: int, seed: int = 0) -> tuple[dict, dict, str]:
        """One cell's settings: preset <- profile (EPIR ladder only) <- overrides, and the seed.

        Returns:
            (model config as :func:`epir.presets.config_to_dict`, TrainRecipe fields, the profile label:
            ``profile`` for the ladder, ``published`` for a peer, which keeps its own recipe, ``own recipe`` for a
            model of a user's ``--model-file``).

        Raises:
            ValueError / TypeError: for an invalid combination.
        """
        p = PRESETS[preset]
        fields = family_fields(p.family)
        merged = {**p.recipe, **(PROFILES[profile] if p.profiled else {}), **self.overrides}
        model = {k: v for k, v in merged.items() if k in fields}
        recipe = {k: v for k, v in merged.items() if k in RECIPE_FIELDS}
        recipe["seed"] = seed
        model["num_classes"] = num_classes
        cfg = make_config(preset, **model)  # validates
        label = profile if p.profiled else (OWN_RECIPE if p.module_file else PUBLISHED)
        return config_to_dict(cfg), dataclasses.asdict(TrainRecipe(**recipe)), label


