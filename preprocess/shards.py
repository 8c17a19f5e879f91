"""The shard format: the preprocessing configuration and its id, the Parquet schema, the cache key, the
file checks that come before any stage, and the reader. Imports neither OpenCV nor a face model nor Ray,
so that a machine with only NumPy, pandas and PyArrow (a lent GPU machine) reads shards.

Layout, one folder per dataset and preprocessing configuration::

    OUT/<dataset>/<config_id>/
        shard-00000-<hash>/part-*.parquet   accepted samples of one group of samples
        shard-00000-<hash>/rejects.csv      that group's rejected samples and reasons
        rejects.csv                         every rejected sample (adapter + stages), with its reason
        manifest.json                       configuration, package versions, counts; written LAST

The cache key of a shard is ``<config id>/shard-NNNNN-<hash>`` (:func:`shard_names`): the configuration
(:meth:`PreprocessConfig.config_id`) and every field of every sample of its group (:func:`group_hash`), its
files (onset and apex frames, or flow image) by their CONTENT, not by their path: an in-place re-export of a
frame makes a new shard, a dataset folder moved or renamed reuses its shards (which keep the paths they
were made from).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import FLOW_ALGORITHMS, FlowAlgorithm
from .adapters import REJECT_COLUMNS, AdapterResult, frame_number

PIPELINE_VERSION = 1
FLOW_CHANNELS = ["u", "v", "strain"]


@dataclass(frozen=True)
class FlowConfig:
    """Flow-stage settings (they name the shard folder, so changing one makes new shards).

    Attributes:
        working_size: side in pixels of the grey faces the flow is computed on (default 128).
        output_size: side of the stored flow, the model input (default 28).
        normalize: ``minmax`` scales each channel of each sample to 0..1 (as STSTNet/HTNet's published
            flow images), storing the per-sample min and max; ``none`` keeps u, v in pixels of the
            working-size face and strain unscaled.
        flow: the optical-flow algorithm, ``farneback`` (EPIR's, the default) or ``tvl1`` (the MEGC2019
            composite's, :func:`tvl1_flow`).
    """

    working_size: int = 128
    output_size: int = 28
    normalize: str = "minmax"
    flow: FlowAlgorithm = "farneback"

    def __post_init__(self):
        if self.flow not in FLOW_ALGORITHMS:
            raise ValueError(f"flow must be one of {FLOW_ALGORITHMS}, got {self.flow!r}")
        if self.normalize not in ("minmax", "none"):
            raise ValueError(f"normalize must be 'minmax' or 'none', got {self.normalize!r}")
        if self.working_size < 16 or self.output_size < 4:
            raise ValueError("working_size must be >= 16 and output_size >= 4")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes the shards' content; its hash names the output folder.

    Attributes:
        working_size, output_size, normalize, flow: see :class:`preprocess.frames.FlowConfig` (``flow``:
            ``farneback`` or ``tvl1``; the default leaves the configuration id of earlier shards as it was).
        face_margin: fraction of the face box's side added on each side before cropping.
        min_face_prob: MTCNN detections below this probability are ignored.
        face_pad: when MTCNN finds no face, detect again on the frame padded by this fraction of its
            size on each side, edge pixels repeated (tight face crops such as CASME II's ``Cropped/``
            leave MTCNN no context); 0 = no second try. The box found there is moved back and clipped
            to the frame.
    """

    working_size: int = 128
    output_size: int = 28
    normalize: str = "minmax"
    face_margin: float = 0.1
    min_face_prob: float = 0.9
    face_pad: float = 0.25
    flow: str = "farneback"

    def __post_init__(self):
        self.flow_config  # validates
        if not 0 <= self.face_margin <= 1 or not 0 < self.min_face_prob <= 1 or not 0 <= self.face_pad <= 2:
            raise ValueError("face_margin must lie in 0..1, min_face_prob in (0, 1] and face_pad in 0..2")

    @property
    def flow_config(self) -> FlowConfig:
        """The flow-stage part of this configuration."""
        return FlowConfig(self.working_size, self.output_size, self.normalize, self.flow)

    def config_id(self, precomputed: bool = False) -> str:
        """Short stable name of this configuration (precomputed flows depend on nothing here). ``flow`` enters
        the hash only when it is not ``farneback``, so shards made before it existed keep their name."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if not (k == "flow" and v == "farneback")}
        d = {"precomputed": True, "v": PIPELINE_VERSION} if precomputed else {**fields, "v": PIPELINE_VERSION}
        return ("precomputed-" if precomputed else "") + hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def missing_reason(path: str, frame_no) -> tuple[str, str]:
    """Tell a frame outside the clip from a missing file."""
    folder = Path(path).parent
    if frame_no is not None and not pd.isna(frame_no) and folder.is_dir():
        numbers = [n for n in (frame_number(f) for f in folder.iterdir()) if n is not None]
        if numbers and not min(numbers) <= int(frame_no) <= max(numbers):
            return "frame_outside_clip", f"frame {int(frame_no)} not in the clip's frames {min(numbers)}..{max(numbers)}"
    return "missing_frame", path


OUTPUT_META = ["dataset", "subject", "sample_id", "emotion", "sde_class", "cde_class", "action_units",
               "onset_path", "apex_path", "flow_path", "note", "meta", "face_source", "status", "reason", "detail"]


def to_table(batch: pd.DataFrame, rows: list[dict], meta: dict) -> pa.Table:
    """Assemble the shard schema: flows as list<float32> (flattened H x W x 3) plus each row's shape;
    the configuration and package versions go into the Parquet key-value metadata (``epir.preprocess``)."""
    n = len(batch)
    cols = {c: pa.array([None if pd.isna(v) else str(v) for v in batch[c]] if c in batch else [None] * n, pa.string())
            for c in OUTPUT_META}
    for c in ("sde_label", "cde_label", "onset_frame", "apex_frame", "offset_frame"):
        cols[c] = pa.array([None if pd.isna(v) else int(v) for v in batch[c]], pa.int64())
    cols["precropped"] = pa.array([bool(v) for v in batch["precropped"]], pa.bool_())
    cols["face_box"] = pa.array([None if r is None else [int(x) for x in r] for r in batch.get("face_box", [None] * n)],
                                pa.list_(pa.int32()))
    cols["px_scale"] = pa.array([float(v) for v in batch.get("px_scale", [0.0] * n)], pa.float32())
    cols["flow"] = pa.array([r["flow"] for r in rows], pa.list_(pa.float32()))
    cols["flow_shape"] = pa.array([r["shape"] for r in rows], pa.list_(pa.int32()))
    cols["flow_min"] = pa.array([r["flow_min"] for r in rows], pa.list_(pa.float32()))
    cols["flow_max"] = pa.array([r["flow_max"] for r in rows], pa.list_(pa.float32()))
    return pa.table(cols).replace_schema_metadata({"epir.preprocess": json.dumps(meta, default=str)})


PATH_COLUMNS = ("onset_path", "apex_path", "flow_path")  # files whose content, not path, enters the cache key
CACHE_KEY_VERSION = 2  # 2: files by content (2026-12-05); 1 hashed their absolute paths


def file_digest(path) -> str | None:
    """SHA-1 of a file's bytes (None for no path). Hashing every file a dataset's samples use is cheap next to
    preprocessing them (measured on the 2-core machine, files in the page cache: the demo's 108 frames,
    16.6 MB, in 17 ms; the composite's 442 flow images, 0.7 MB, in 21 ms; a cold disk adds its read time), so
    the key reads contents rather than trusting sizes and modification times.

    Raises:
        OSError: the file cannot be read (:func:`check_files` rejects missing files before any key is made).
    """
    if path is None or (not isinstance(path, str) and pd.isna(path)) or path == "":
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def group_hash(df: pd.DataFrame, classes: dict | None = None) -> str:
    """Hash of everything the adapter says of a group's samples (every column: frames, labels, ``precropped``,
    metadata, ...), of their files' contents (:data:`PATH_COLUMNS` by :func:`file_digest`, never by path) and
    of the class lists: any change, a changed option or a re-exported frame, makes a new shard name, so the
    shard is rebuilt instead of reused; the same files under another folder keep the name."""
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    for r in rows:
        for c in PATH_COLUMNS:
            if c in r:
                r[c] = file_digest(r[c])
    key = json.dumps({"v": CACHE_KEY_VERSION, "rows": rows, "classes": classes}, sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def shard_names(adapted: AdapterResult, cfg: "PreprocessConfig", shard_size: int = 512, precomputed: bool = False,
                present: pd.DataFrame | None = None) -> list[str]:
    """``<config id>/shard-NNNNN-<hash>`` of every shard a run would write: the cache key. It covers the
    preprocessing configuration (:meth:`PreprocessConfig.config_id`) and every field of every sample.

    Args:
        present: the samples whose files exist (default: check them, as :func:`run` does).
    """
    samples = present if present is not None else check_files(adapted.samples.reset_index(drop=True), precomputed)[0]
    groups = [samples.iloc[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    return [f"{cfg.config_id(precomputed)}/shard-{gi:05d}-{group_hash(g, adapted.classes)}" for gi, g in enumerate(groups)]


def check_files(samples: pd.DataFrame, precomputed: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reject, before any actor or model starts, the samples whose frames (or flow image) do not exist.

    Returns:
        (the samples whose files exist, the others as rejects (``REJECT_COLUMNS``) with reason
        ``missing_frame``, or ``frame_outside_clip`` when the clip's folder holds other frame numbers).
    """
    rows, keep = [], []
    for r in samples.to_dict("records"):
        paths = [("flow_path", None)] if precomputed else [("onset_path", "onset_frame"), ("apex_path", "apex_frame")]
        problem = None
        for col, frame_col in paths:
            path = r.get(col)
            if not path or not os.path.isfile(path):
                problem = missing_reason(str(path), r.get(frame_col) if frame_col else None)
                break
        keep.append(problem is None)
        if problem:
            rows.append(dict(dataset=r.get("dataset"), subject=r["subject"], sample_id=r["sample_id"],
                             reason=problem[0], detail=problem[1]))
    return samples[keep].reset_index(drop=True), pd.DataFrame(rows, columns=REJECT_COLUMNS)


def read_shards(folder: str | Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Read a COMPLETE preprocessed dataset folder (one holding ``manifest.json``).

    Returns:
        (samples table without the flow column, flows (N, H, W, 3) float32 [u, v, strain], manifest).

    Raises:
        FileNotFoundError: no manifest (the run is unfinished or the folder is wrong).
        ValueError: the shards hold flows of different shapes.
    """
    folder = Path(folder)
    mf = folder / "manifest.json"
    if not mf.is_file():
        raise FileNotFoundError(f"{folder} holds no manifest.json: not a finished preprocessing output")
    manifest = json.loads(mf.read_text())
    files = sorted(folder.glob("shard-*/*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    if table is None or table.num_rows == 0:
        raise FileNotFoundError(f"{folder} holds no shard rows")
    shapes = {tuple(s) for s in table.column("flow_shape").to_pylist()}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: flows of different shapes {sorted(shapes)}; cannot stack them")
    (shape,) = shapes
    flows = np.stack([np.asarray(v, dtype=np.float32) for v in table.column("flow").to_pylist()]).reshape(-1, *shape)
    df = table.drop_columns(["flow"]).to_pandas()
    return df, flows, manifest
