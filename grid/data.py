"""Datasets for the grid: preprocess each configured dataset into Parquet shards (the real pipeline,
reusing finished shards) and turn the shards into the arrays of one protocol.

SDE uses a dataset's own labels (``sde_label``); CDE uses the MEGC2019 three-class labels
(``cde_label``), with the source dataset of each sample (``dataset`` column: casme2, samm, smic) as the
group whose subset scores EPIR Table 1 reports.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from preprocess.shards import read_shards

from .config import DatasetSpec

PUBLISHED_FLOW = "tvl1-published"  # precomputed flow images of the MEGC2019 composite (TV-L1, min-max per image)
UNNAMED_FLOWS = ("farneback", PUBLISHED_FLOW)  # flows that a protocol key and a table label leave unnamed
FINGERPRINT_VERSION = 1  # of :func:`data_fingerprint`'s serialisation; a change makes every cell new


def data_fingerprint(flows: np.ndarray, labels: np.ndarray, subjects: np.ndarray, sample_ids: np.ndarray,
                     groups: np.ndarray, classes: list[str], flow_range: str) -> str:
    """A hash of everything training and scoring read of a dataset under one protocol, in one canonical
    serialisation (the grid's cell ids and ``benchmarks/gpu_ladder.py`` both call this function):

    1. a JSON header ``{"v", "classes", "flow_range", "shape", "dtype": "<f4"}`` (sorted keys);
    2. the samples in a canonical order (by source group, subject, sample id, as strings), so that the order
       in which shards were written does not matter;
    3. the JSON lists of their groups, subjects and sample ids;
    4. their labels as little-endian int64 bytes, then their flows as little-endian float32 bytes, C order.

    Paths and folder names enter nowhere: the same samples under another root give the same fingerprint; one
    changed flow value, label, class name, subject or sample id gives another.

    Args:
        flows: (N, H, W, 3) [u, v, strain] as stored (any float dtype; hashed as float32).
        labels: (N,) class indices; subjects, sample_ids, groups: (N,) strings.
        classes: class names in label order. flow_range: ``unit`` or ``signed``.

    Returns:
        16 hex digits (SHA-256).

    Raises:
        ValueError: the arrays disagree on N.
    """
    n = len(flows)
    if not all(len(a) == n for a in (labels, subjects, sample_ids, groups)):
        raise ValueError(f"data_fingerprint: {n} flows but {len(labels)} labels, {len(subjects)} subjects, "
                         f"{len(sample_ids)} sample ids and {len(groups)} groups")
    texts = [np.asarray(a).astype(str) for a in (groups, subjects, sample_ids)]
    order = np.lexsort(texts[::-1])  # lexsort's last key is the primary one
    h = hashlib.sha256()
    header = {"v": FINGERPRINT_VERSION, "classes": [str(c) for c in classes], "flow_range": flow_range,
              "shape": [int(x) for x in np.shape(flows)[1:]], "dtype": "<f4"}
    h.update(json.dumps(header, sort_keys=True).encode())
    for t in texts:
        h.update(json.dumps(t[order].tolist()).encode())
    h.update(np.ascontiguousarray(np.asarray(labels)[order], dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(np.asarray(flows)[order], dtype="<f4").tobytes())
    return h.hexdigest()[:16]


@dataclass
class ProtocolData:
    """The arrays of one dataset under one protocol.

    Attributes:
        key: ``<dataset>/<protocol>``.
        dataset, protocol, config_id: where the shards came from.
        flows: (N, H, W, 3) float32 [u, v, strain]; labels: (N,) int64 in 0..C-1.
        subjects: (N,) subject strings (the LOSO folds); sample_ids: (N,); groups: (N,) source dataset.
        classes: class names in label order. flow_range: ``unit`` (min-max 0..1) or ``signed``.
        preprocess: how the flows were made (the shards' ``config``, ``precomputed`` and ``flow``): what a model
            trained on them needs done to new onset/apex pairs.
        flow: the flow algorithm (:func:`shard_flow`); a computed flow other than Farneback's names the data key
            (``<dataset>/<protocol>/tvl1``), so that one raw dataset under two flows gives two sets of cells.
        subset_of: the data key whose samples these are a subset of (a source dataset of the MEGC2019 composite,
            ``megc2019/CDE``), else empty: a search's choices made there replay here (:func:`grid.cells.fold_settings`).
        landmarks: (N, 5, 2) float32 landmarks (x, y) of each sample's apex at 28 x 28 px where the shards keep them
            (:mod:`preprocess.landmarks`, HTNet's regions), else None.
    """

    key: str
    dataset: str
    protocol: str
    config_id: str
    flows: np.ndarray
    labels: np.ndarray
    subjects: np.ndarray
    sample_ids: np.ndarray
    groups: np.ndarray
    classes: list[str]
    flow_range: str
    preprocess: dict | None = None
    flow: str = "farneback"
    subset_of: str = ""
    landmarks: np.ndarray | None = None

    @cached_property
    def fingerprint(self) -> str:
        """:func:`data_fingerprint` of these arrays (computed once; about 10 ms for the composite's
        442 x 28 x 28 x 3 flows). It enters every cell id (:func:`grid.ids.cell_id`)."""
        return data_fingerprint(self.flows, self.labels, self.subjects, self.sample_ids, self.groups, self.classes,
                                self.flow_range)

    @cached_property
    def landmarks_digest(self) -> str:
        """SHA-256 (16 hex digits) of the landmarks as float32, or empty without landmarks: it joins the id of a
        cell whose model reads them (:func:`grid.cells.build_cells`)."""
        if self.landmarks is None:
            return ""
        return hashlib.sha256(np.ascontiguousarray(self.landmarks, dtype="<f4").tobytes()).hexdigest()[:16]

    def model_flows(self, config) -> np.ndarray:
        """The flows a model of ``config`` trains and predicts on: HTNet's facial-region tile
        (:func:`epir.regions.tile_regions`) for a config whose ``regions`` is true, else the flows as they are.

        Raises:
            ValueError: such a model, and no landmarks kept with these shards.
        """
        if not getattr(config, "regions", False):
            return self.flows
        if self.landmarks is None:
            raise ValueError(f"a {config.family} model reads facial regions cut around the apex frame's landmarks, and "
                             f"{self.key} keeps none: configure the megc2019 dataset with apex = <HTNet's folder of "
                             "apex crops> (../shared/data/htnet_apex), so that preprocessing finds them once")
        from epir.regions import tile_regions

        return tile_regions(self.flows, self.landmarks)

    @property
    def fold_subjects(self) -> list[str]:
        """Subjects in the order their folds run: most samples first (the longest folds start early)."""
        names, counts = np.unique(self.subjects, return_counts=True)
        return [str(n) for n, _ in sorted(zip(names, counts), key=lambda t: (-t[1], str(t[0])))]


def preprocess(spec: DatasetSpec, shards: Path, progress=print) -> Path:
    """Run the preprocessing pipeline for one dataset (finished shards are reused) and return its
    output folder (``shards/<name>/<config id>/``).

    Raises:
        preprocess.adapters.DatasetError: wrong root, bad annotations, or no surviving sample.
    """
    # deferred: the stages need OpenCV and a face model, which a machine that only reads shards may lack
    from preprocess.adapters import ADAPTERS, DatasetError, dataset_name
    from preprocess.pipeline import PreprocessConfig, run

    if not spec.root.exists():
        raise DatasetError(f"dataset root {spec.root} does not exist")
    opts = dict(spec.options)
    annotations = opts.pop("annotations", None)
    cfg = PreprocessConfig(flow=opts.pop("flow", "farneback"))  # the dataset's own flow options; the rest default
    adapted = ADAPTERS[spec.format](spec.root, Path(annotations) if annotations else None, **opts)
    name = dataset_name(spec.format, adapted, spec.name)
    summary = run(adapted, name, shards, cfg, precomputed=spec.format == "megc2019", progress=progress)
    progress(summary.render())
    if spec.format == "megc2019" and adapted.samples["apex_path"].notna().any():  # HTNet's landmarks, found once
        from preprocess.landmarks import write_landmarks

        write_landmarks(summary.out_dir, adapted.samples[adapted.samples["apex_path"].notna()], progress)
    return summary.out_dir


def protocol_support(folder: Path) -> dict[str, str | None]:
    """For SDE and CDE: None when the preprocessed dataset's labels allow a LOSO cell under it, else why not
    (:func:`label_support` of its shards)."""
    df, _, manifest = read_shards(folder)
    return label_support(df, manifest["classes"])


def label_support(samples, classes: dict) -> dict[str, str | None]:
    """For SDE and CDE: None when the samples' labels allow a LOSO cell, else why not: no classes for the
    protocol, no sample labelled for it, or fewer than two subjects with such labels.

    Args:
        samples: a table with ``subject``, ``sde_label``, ``cde_label`` (missing labels as NA).
        classes: ``{"sde": [...], "cde": [...]}``.
    """
    out: dict[str, str | None] = {}
    for protocol in ("SDE", "CDE"):
        col = f"{protocol.lower()}_label"
        labelled = samples[samples[col].notna()] if col in samples else samples.iloc[:0]
        if not classes.get(protocol.lower()):
            out[protocol] = f"no {protocol} classes"
        elif labelled.empty:
            out[protocol] = f"no sample has a {protocol} label"
        elif labelled["subject"].nunique() < 2:
            out[protocol] = f"only {labelled['subject'].nunique()} subject has {protocol} labels (LOSO needs two)"
        else:
            out[protocol] = None
    return out


def available_protocols(folder: Path) -> list[str]:
    """Protocols the labels of a preprocessed dataset allow (:func:`protocol_support`), SDE first."""
    return [p for p, why in protocol_support(folder).items() if why is None]


def load_protocol(folder: Path, protocol: str) -> ProtocolData:
    """Arrays of a preprocessed dataset folder under ``protocol``; samples without a label there are left
    out (e.g. CASME II sadness has no CDE class; those were already rejected and listed by preprocess).

    Raises:
        ValueError: the dataset has no classes for the protocol, or fewer than two subjects.
    """
    df, flows, manifest = read_shards(folder)
    classes = manifest["classes"].get(protocol.lower()) or []
    if not classes:
        raise ValueError(f"{folder}: no {protocol} classes; available: {available_protocols(folder)}")
    col = "sde_label" if protocol == "SDE" else "cde_label"
    keep = df[col].notna().to_numpy()
    df = df[keep].reset_index(drop=True)
    if df["subject"].nunique() < 2:
        raise ValueError(f"{folder}: {protocol} needs at least two subjects for LOSO")
    name = manifest["dataset"]
    normalize = (manifest.get("config") or {}).get("normalize", "minmax")
    flow = shard_flow(manifest)
    return ProtocolData(
        key=f"{name}/{protocol}" + ("" if flow in UNNAMED_FLOWS else f"/{flow}"), dataset=name,
        protocol=protocol, config_id=manifest["config_id"],
        flows=np.ascontiguousarray(flows[keep]), labels=df[col].to_numpy(dtype=np.int64),
        subjects=df["subject"].astype(str).to_numpy(), sample_ids=df["sample_id"].astype(str).to_numpy(),
        groups=df["dataset"].astype(str).to_numpy(), classes=list(classes),
        flow_range="unit" if manifest.get("precomputed") or normalize == "minmax" else "signed",
        preprocess={"config": manifest.get("config") or {}, "precomputed": bool(manifest.get("precomputed")),
                    "flow": manifest.get("flow") or {"algorithm": flow}},
        flow=flow, subset_of=manifest.get("subset_of", ""), landmarks=_landmarks(folder, df),
    )


def _landmarks(folder: Path, samples) -> np.ndarray | None:
    """(N, 5, 2) landmarks of ``samples`` (their order) from the shard folder's ``landmarks.csv``, or None.

    Raises:
        ValueError: the file lacks a sample.
    """
    from preprocess.landmarks import landmark_array, read_landmarks

    table = read_landmarks(folder)
    if table is None:
        return None
    by_key = table.set_index(["subject", "sample_id"])
    keys = list(zip(samples["subject"].astype(str), samples["sample_id"].astype(str)))
    missing = [k for k in keys if k not in by_key.index]
    if missing:
        raise ValueError(f"{folder}/landmarks.csv lacks {len(missing)} sample(s), e.g. {missing[:2]}")
    return landmark_array(by_key.loc[keys].reset_index())


def shard_flow(manifest: dict) -> str:
    """How a shard set's flows were made: ``farneback``, ``tvl1``, or :data:`PUBLISHED_FLOW` for precomputed flow
    images (the MEGC2019 composite: TV-L1, min-max per image); shards written before the option existed are
    Farneback's."""
    if manifest.get("precomputed"):
        return PUBLISHED_FLOW
    return (manifest.get("config") or {}).get("flow", "farneback")


def composite(parts: list[ProtocolData], name: str = "") -> ProtocolData:
    """One CDE dataset from several (EPIR's composite evaluation from raw CASME II, SAMM and SMIC): their
    samples in one LOSO pool under the MEGC2019 three classes, each subject named ``<dataset>_<subject>``
    so that ids stay distinct across datasets, and the source dataset kept as each sample's group (the
    per-dataset scores are subsets of the composite run, as EPIR Table 1).

    Args:
        parts: CDE :class:`ProtocolData` of the source datasets.
        name: the composite's name (default: the sources joined by ``+``).

    Raises:
        ValueError: fewer than two parts, a part not CDE, or parts whose classes, flow shapes or ranges differ.
    """
    if len(parts) < 2:
        raise ValueError(f"a composite needs at least two CDE datasets, got {[p.key for p in parts]}")
    for p in parts:
        if p.protocol != "CDE" or p.classes != parts[0].classes or p.flow_range != parts[0].flow_range \
                or p.flows.shape[1:] != parts[0].flows.shape[1:] or p.flow != parts[0].flow:
            raise ValueError(f"cannot pool {p.key} with {parts[0].key}: protocol, classes, flow algorithm, range and "
                             "shape must agree (preprocess them with the same options)")
    name = name or "+".join(p.dataset for p in parts)
    flow = parts[0].flow
    return ProtocolData(
        key=f"{name}/CDE" + ("" if flow in UNNAMED_FLOWS else f"/{flow}"), dataset=name, protocol="CDE",
        config_id="+".join(p.config_id for p in parts), flow=flow,
        flows=np.concatenate([p.flows for p in parts]), labels=np.concatenate([p.labels for p in parts]),
        subjects=np.concatenate([np.char.add(f"{p.dataset}_", p.subjects.astype(str)) for p in parts]),
        sample_ids=np.concatenate([p.sample_ids for p in parts]), groups=np.concatenate([p.groups for p in parts]),
        classes=list(parts[0].classes), flow_range=parts[0].flow_range,
        preprocess={p.dataset: p.preprocess for p in parts},
    )
