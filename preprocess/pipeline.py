"""The Ray Data preprocessing pipeline: samples -> face stage -> flow stage -> Parquet shards.

    adapter records --(from_pandas)--> map_batches(FaceStage: actor pool, MTCNN; a GPU fraction per
    actor when the cluster has GPUs) --> map_batches(FlowStage: actor pool, Farneback, strain,
    resize) --> write_parquet

Output layout, one folder per dataset and preprocessing configuration::

    OUT/<dataset>/<config_id>/
        shard-00000-<hash>/part-*.parquet   accepted samples of one group of samples
        shard-00000-<hash>/rejects.csv      that group's rejected samples and reasons
        rejects.csv                         every rejected sample (adapter + stages), with its reason
        manifest.json                       configuration, package versions, counts; written LAST

The samples are cut into groups of ``shard_size``; each group runs through Ray Data into a hidden
staging folder that is renamed into place only when complete, so a reader never sees half a shard,
and a re-run with the same configuration skips every finished shard. ``manifest.json`` marks a
complete dataset: :func:`read_shards` refuses a folder without it. Streaming: only one group's
small post-flow rows (about 10 KB a sample) are held at a time; frames stream through the actors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .adapters import REJECT_COLUMNS, AdapterResult, DatasetError, frame_number
from .frames import FlowConfig, SampleError, crop_grey, face_box_from_detections, flow_features, read_frame
from .megc2019 import FLOW_IMAGE_SCALE, read_flow_image
from .runtime import init_ray, package_versions

PIPELINE_VERSION = 1
FLOW_CHANNELS = ["u", "v", "strain"]
# A worker is one CPU: its face actor reserves 0.75 and its flow actor 0.25. Actors that reserved
# whole CPUs would leave the flow stage none and the pipeline would wait forever on a small machine;
# the flow stage (Farneback on 128 px faces) costs a few ms a sample against MTCNN's tens of ms.
FACE_CPUS, FLOW_CPUS = 0.75, 0.25


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes the shards' content; its hash names the output folder.

    Attributes:
        working_size, output_size, normalize: see :class:`preprocess.frames.FlowConfig`.
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

    def __post_init__(self):
        FlowConfig(self.working_size, self.output_size, self.normalize)  # validates
        if not 0 <= self.face_margin <= 1 or not 0 < self.min_face_prob <= 1 or not 0 <= self.face_pad <= 2:
            raise ValueError("face_margin must lie in 0..1, min_face_prob in (0, 1] and face_pad in 0..2")

    @property
    def flow(self) -> FlowConfig:
        """The flow-stage part of this configuration."""
        return FlowConfig(self.working_size, self.output_size, self.normalize)

    def config_id(self, precomputed: bool = False) -> str:
        """Short stable name of this configuration (precomputed flows depend on nothing here)."""
        d = {"precomputed": True, "v": PIPELINE_VERSION} if precomputed else {**dataclasses.asdict(self), "v": PIPELINE_VERSION}
        return ("precomputed-" if precomputed else "") + hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# --- stages ---------------------------------------------------------------------------------------

def _missing_reason(path: str, frame_no) -> tuple[str, str]:
    """Tell a frame outside the clip from a missing file."""
    folder = Path(path).parent
    if frame_no is not None and not pd.isna(frame_no) and folder.is_dir():
        numbers = [n for n in (frame_number(f) for f in folder.iterdir()) if n is not None]
        if numbers and not min(numbers) <= int(frame_no) <= max(numbers):
            return "frame_outside_clip", f"frame {int(frame_no)} not in the clip's frames {min(numbers)}..{max(numbers)}"
    return "missing_frame", path


class FaceStage:
    """Ray Data actor: decode onset and apex, find the face on the onset frame, crop both with the same box.

    Input batch (pandas): the adapter's columns. Output: the same plus ``onset_face``, ``apex_face``
    ((working_size, working_size) uint8 grey; zeros for a rejected sample), ``face_box``
    (x1, y1, x2, y2), ``face_source`` (``mtcnn``, ``mtcnn_padded`` when the face was only found on the
    padded frame, or ``precropped``), ``px_scale`` (working-size pixels per source pixel), ``status``
    (``ok`` / ``rejected``), ``reason``, ``detail``.
    """

    def __init__(self, cfg: dict, device: str = "cpu"):
        import cv2
        import torch
        from facenet_pytorch import MTCNN  # its weights ship inside the wheel

        torch.set_num_threads(1)  # one core per actor: the pool scales by actors
        cv2.setNumThreads(1)
        self.cfg = PreprocessConfig(**cfg)
        self.mtcnn = MTCNN(keep_all=True, device=device)

    @staticmethod
    def _read(path: str, frame_no) -> np.ndarray:
        try:
            return read_frame(path)
        except SampleError as e:
            if e.reason == "missing_frame":
                raise SampleError(*_missing_reason(path, frame_no)) from e
            raise

    def _one(self, r) -> dict:
        size = self.cfg.working_size
        onset = self._read(r["onset_path"], r.get("onset_frame"))
        apex = self._read(r["apex_path"], r.get("apex_frame"))
        if onset.shape != apex.shape:
            raise SampleError("size_mismatch", f"onset {onset.shape[1]}x{onset.shape[0]} px ({r['onset_path']}) vs apex "
                                               f"{apex.shape[1]}x{apex.shape[0]} px ({r['apex_path']})")
        h, w = onset.shape[:2]
        if bool(r.get("precropped")):
            box, source = (0, 0, w, h), "precropped"
        else:
            box, source = self.face_box(onset)
        side = max(box[2] - box[0], box[3] - box[1])
        return dict(onset_face=crop_grey(onset, box, size), apex_face=crop_grey(apex, box, size),
                    face_box=np.asarray(box, dtype=np.int32), face_source=source, px_scale=np.float32(size / side),
                    status="ok", reason="", detail="")

    def _detect(self, img: np.ndarray):
        from PIL import Image

        boxes, probs = self.mtcnn.detect(Image.fromarray(img))
        return None if boxes is None else boxes[np.asarray(probs, dtype=float) >= self.cfg.min_face_prob]

    def face_box(self, onset: np.ndarray) -> tuple[tuple[int, int, int, int], str]:
        """The face box (x1, y1, x2, y2) of an RGB onset frame and how it was found: on the frame
        (``mtcnn``) or, failing that, on the frame padded by ``face_pad`` of its size with its edges
        repeated (``mtcnn_padded``; the box is moved back and clipped to the frame).

        Raises:
            SampleError("no_face"): no face either way.
        """
        import cv2

        h, w = onset.shape[:2]
        boxes = self._detect(onset)
        if boxes is not None and len(boxes):
            return face_box_from_detections(boxes, (h, w), self.cfg.face_margin), "mtcnn"
        if self.cfg.face_pad > 0:
            py, px = int(round(self.cfg.face_pad * h)), int(round(self.cfg.face_pad * w))
            boxes = self._detect(cv2.copyMakeBorder(onset, py, py, px, px, cv2.BORDER_REPLICATE))
            if boxes is not None and len(boxes):
                boxes = boxes - np.array([px, py, px, py], dtype=float)
                return face_box_from_detections(boxes, (h, w), self.cfg.face_margin), "mtcnn_padded"
        raise SampleError("no_face", "MTCNN found no face in the onset frame"
                          + (f", nor with {self.cfg.face_pad:g} of its size padded around it" if self.cfg.face_pad else ""))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        size = self.cfg.working_size
        out = []
        for r in batch.to_dict("records"):
            try:
                out.append(self._one(r))
            except SampleError as e:
                out.append(dict(onset_face=np.zeros((size, size), np.uint8), apex_face=np.zeros((size, size), np.uint8),
                                face_box=np.zeros(4, np.int32), face_source="", px_scale=np.float32(0),
                                status="rejected", reason=e.reason, detail=e.detail))
        res = pd.DataFrame(out, index=batch.index)
        return pd.concat([batch, res], axis=1)


_NO_FLOW = dict(flow=None, shape=None, flow_min=None, flow_max=None)


def _flow_row(r: dict, flow_cfg: FlowConfig) -> dict:
    if r["status"] != "ok":
        return _NO_FLOW
    flow, lo, hi = flow_features(np.asarray(r["onset_face"]), np.asarray(r["apex_face"]), flow_cfg)
    return dict(flow=flow.ravel(), shape=list(flow.shape), flow_min=lo, flow_max=hi)


OUTPUT_META = ["dataset", "subject", "sample_id", "emotion", "sde_class", "cde_class", "action_units",
               "onset_path", "apex_path", "flow_path", "note", "meta", "face_source", "status", "reason", "detail"]


def _to_table(batch: pd.DataFrame, rows: list[dict], meta: dict) -> pa.Table:
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


def _shard_meta(cfg: dict, precomputed: bool) -> dict:
    return {"config": cfg, "precomputed": precomputed, "pipeline_version": PIPELINE_VERSION,
            "flow_channels": FLOW_CHANNELS, "versions": package_versions()}


def flow_stage(batch: pd.DataFrame, cfg: dict) -> pa.Table:
    """Grey faces -> [u, v, strain] (output_size^2 x 3) float32 in the shard schema; drops the face images."""
    import cv2

    cv2.setNumThreads(1)
    c = PreprocessConfig(**cfg)
    rows = [_flow_row(r, c.flow) for r in batch.to_dict("records")]
    return _to_table(batch, rows, _shard_meta(cfg, False))


class FlowStage:
    """Ray Data actor running :func:`flow_stage` (or ``fn``, same signature). Actors, not tasks: a task
    pool kept starting fresh worker processes (importing OpenCV, pandas, pyarrow), which on a small
    machine took the CPU from the face actors (2-worker/1-worker ratio 0.69 instead of 1.70)."""

    def __init__(self, cfg: dict, fn=None):
        self.cfg, self.fn = cfg, fn or flow_stage

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        return self.fn(batch, self.cfg)


def precomputed_stage(batch: pd.DataFrame, cfg: dict) -> pa.Table:
    """Ray Data task for MEGC2019 flow images: decode each PNG as [u, v, strain] in 0..1.

    ``flow_min`` / ``flow_max`` record the publishers' scale: 0 and 255 pixel values (the flows
    themselves were min-max scaled per image before publication; their physical units are lost).
    """
    rows, status, reason, detail = [], [], [], []
    for r in batch.to_dict("records"):
        try:
            f = read_flow_image(r["flow_path"])
            rows.append(dict(flow=f.ravel(), shape=list(f.shape), flow_min=np.zeros(3, np.float32),
                             flow_max=np.full(3, FLOW_IMAGE_SCALE, np.float32)))
            status.append("ok"), reason.append(""), detail.append("")
        except (OSError, ValueError) as e:
            rows.append(_NO_FLOW)
            status.append("rejected"), reason.append("unreadable_flow_image" if os.path.exists(r["flow_path"]) else "missing_frame")
            detail.append(str(e))
    batch = batch.assign(status=status, reason=reason, detail=detail, face_source="precomputed")
    return _to_table(batch, rows, _shard_meta(cfg, True))


# --- driver -------------------------------------------------------------------------------------

def _group_hash(df: pd.DataFrame, classes: dict | None = None) -> str:
    """Hash of everything the adapter says of a group's samples (every column: paths, frames, labels,
    ``precropped``, metadata, ...) and of the class lists: any change makes a new shard name, so a
    changed option rebuilds the shard instead of reusing it."""
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    key = json.dumps({"rows": rows, "classes": classes}, sort_keys=True, default=str)
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
    return [f"{cfg.config_id(precomputed)}/shard-{gi:05d}-{_group_hash(g, adapted.classes)}" for gi, g in enumerate(groups)]


def build_dataset(samples: pd.DataFrame, cfg: PreprocessConfig, workers: int, precomputed: bool,
                  gpu_per_actor: float | None = None, batch_size: int = 8, face_cls=None, flow_fn=None):
    """The lazy Ray Dataset of one group: samples -> face stage (actor pool) -> flow stage.

    Rows come out in the shard schema (``_to_table``), accepted and rejected alike (``status``).
    ``face_cls`` / ``flow_fn`` replace :class:`FaceStage` / :func:`flow_stage` (the benchmark wraps
    them with timers).
    """
    face_cls, flow_fn = face_cls or FaceStage, flow_fn or flow_stage
    ray = init_ray()
    # Enough blocks for every worker to have work: one block per chunk (a repartition would need an
    # all-to-all task, which cannot get a CPU once the actor pool holds them).
    plain = samples.astype(object).where(samples.notna(), None)
    blocks = max(1, min(len(plain), max(4 * workers, -(-len(plain) // batch_size))))
    bounds = np.linspace(0, len(plain), blocks + 1).astype(int)
    ds = ray.data.from_pandas([plain.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
    if precomputed:
        return ds.map_batches(precomputed_stage, fn_kwargs=dict(cfg=dataclasses.asdict(cfg)), batch_format="pandas",
                              batch_size=64)
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    frac = gpu_per_actor if gpu_per_actor is not None else (1.0 / max(workers, 1) if gpus else 0.0)
    ds = ds.map_batches(face_cls, fn_constructor_kwargs=dict(cfg=dataclasses.asdict(cfg), device="cuda" if gpus else "cpu"),
                        batch_format="pandas", batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=FACE_CPUS, num_gpus=frac if gpus else 0)
    return ds.map_batches(FlowStage, fn_constructor_kwargs=dict(cfg=dataclasses.asdict(cfg), fn=flow_fn),
                          batch_format="pandas", batch_size=batch_size,
                          compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=FLOW_CPUS)


def run_group(samples: pd.DataFrame, cfg: PreprocessConfig, dest: Path, workers: int, precomputed: bool,
              gpu_per_actor: float | None = None, batch_size: int = 8) -> pd.DataFrame:
    """Run one group of samples through Ray Data and write its shard folder atomically.

    Returns:
        The group's rejects (``REJECT_COLUMNS``).
    """
    ray = init_ray()
    from ray.data.expressions import col

    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    staging = dest.parent / f".staging-{dest.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    ds = build_dataset(samples, cfg, workers, precomputed, gpu_per_actor, batch_size)
    ds = ds.materialize()  # one group's post-flow rows: small
    ok = ds.filter(expr=col("status") == "ok")
    staging.mkdir(parents=True)
    if ok.count():
        ok.write_parquet(str(staging))
    rej = ds.filter(expr=col("status") != "ok").select_columns(REJECT_COLUMNS).to_pandas().reindex(columns=REJECT_COLUMNS)
    rej.to_csv(staging / "rejects.csv", index=False)
    os.replace(staging, dest)  # atomic: a shard folder exists only when whole
    return rej


@dataclass
class RunSummary:
    """What a preprocessing run did. ``out_dir`` holds the shards; ``rejects`` every rejected sample."""

    dataset: str
    out_dir: Path
    accepted: int
    rejected: int
    reasons: dict
    repaired: dict
    labels: dict
    shards_written: int
    shards_reused: int
    seconds: float
    rejects: pd.DataFrame
    face_sources: dict = dataclasses.field(default_factory=dict)
    face_pad: float = 0.0

    def render(self) -> str:
        """The one-screen summary the command prints at the end."""
        lines = [f"preprocess {self.dataset}: {self.accepted} accepted, {self.rejected} rejected "
                 f"({self.seconds:.1f} s; shards: {self.shards_written} written, {self.shards_reused} reused)",
                 f"  output   {self.out_dir}"]
        for k, v in sorted(self.reasons.items()):
            lines.append(f"  rejected {v:5d}  {k}")
        for k, v in sorted(self.repaired.items()):
            lines.append(f"  repaired {v:5d}  {k}")
        if self.face_sources.get("mtcnn_padded"):
            lines.append(f"  padded   {self.face_sources['mtcnn_padded']:5d}  face found only on the frame padded by "
                         f"{self.face_pad:g} (face_source = mtcnn_padded in the shards)")
        total = self.accepted + self.rejected
        if total and self.reasons.get("no_face", 0) > total / 2:
            lines.append(f"  hint     most samples had no face: for tight face crops use --precropped (the whole frame "
                         f"is the face), or a larger --face-pad (now {self.face_pad:g})")
        for proto, counts in self.labels.items():
            if counts:
                lines.append(f"  {proto} labels  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        if self.rejected:
            lines.append(f"  rejects  {self.out_dir / 'rejects.csv'}")
        return "\n".join(lines)


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
                problem = _missing_reason(str(path), r.get(frame_col) if frame_col else None)
                break
        keep.append(problem is None)
        if problem:
            rows.append(dict(dataset=r.get("dataset"), subject=r["subject"], sample_id=r["sample_id"],
                             reason=problem[0], detail=problem[1]))
    return samples[keep].reset_index(drop=True), pd.DataFrame(rows, columns=REJECT_COLUMNS)


def run(adapted: AdapterResult, dataset_name: str, out: Path, cfg: PreprocessConfig | None = None, workers: int = 2,
        shard_size: int = 512, precomputed: bool = False, force: bool = False, progress=print,
        gpu_per_actor: float | None = None) -> RunSummary:
    """Preprocess every sample of an adapted dataset into ``out/<dataset_name>/<config_id>/``.

    Args:
        adapted: the adapter's samples and rejects.
        dataset_name: folder name (the adapter's name, or the manifest's stem).
        out: output root.
        cfg: preprocessing configuration (default :class:`PreprocessConfig`).
        workers: face-stage actors and flow-stage actors (one CPU's worth each).
        shard_size: samples per shard (the unit of re-use after an interruption).
        precomputed: the samples carry flow images (MEGC2019); the face and flow stages are skipped.
        force: redo every shard even if finished.
        progress: callable receiving one-line progress messages.

    Returns:
        :class:`RunSummary`.

    Raises:
        DatasetError: when no sample survives.
    """
    cfg = cfg or PreprocessConfig()
    start = time.perf_counter()
    samples, absent = check_files(adapted.samples.reset_index(drop=True), precomputed)
    if samples.empty:
        rej = pd.concat([adapted.rejects.reindex(columns=REJECT_COLUMNS), absent], ignore_index=True)
        raise DatasetError(f"no sample of {dataset_name} survived; reasons: {rej['reason'].value_counts().to_dict()} "
                           f"(first: {rej.iloc[0]['detail'] if len(rej) else '-'}); nothing was run")
    out_dir = Path(out) / dataset_name / cfg.config_id(precomputed)
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # rewritten at the end
    groups = [samples.iloc[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    wanted, reused, written = set(), 0, 0
    stage_rejects: list[pd.DataFrame] = []  # samples the stages rejected (the adapter's come on top)
    names = shard_names(adapted, cfg, shard_size, precomputed, samples)
    for gi, group in enumerate(groups):
        dest = out_dir / names[gi].split("/")[1]
        wanted.add(dest.name)
        if dest.is_dir():
            reused += 1
            stage_rejects.append(pd.read_csv(dest / "rejects.csv", dtype=str, keep_default_na=False))
            progress(f"shard {gi + 1}/{len(groups)}: finished earlier, reused ({len(group)} samples)")
            continue
        t0 = time.perf_counter()
        stage_rejects.append(run_group(group, cfg, dest, workers, precomputed, gpu_per_actor))
        written += 1
        progress(f"shard {gi + 1}/{len(groups)}: {len(group)} samples in {time.perf_counter() - t0:.1f} s")
    for old in out_dir.glob("shard-*"):  # shards of an earlier sample list that no longer applies
        if old.name not in wanted:
            shutil.rmtree(old)
    stage = pd.concat([r.reindex(columns=REJECT_COLUMNS) for r in stage_rejects] or [pd.DataFrame(columns=REJECT_COLUMNS)],
                      ignore_index=True)
    rej = pd.concat([adapted.rejects.reindex(columns=REJECT_COLUMNS), absent, stage], ignore_index=True)
    rej.to_csv(out_dir / "rejects.csv", index=False)
    stage_keys = set(zip(stage["subject"].astype(str), stage["sample_id"].astype(str)))
    accepted = samples[[(str(s), str(i)) not in stage_keys for s, i in zip(samples["subject"], samples["sample_id"])]]
    n_ok = len(accepted)
    if n_ok == 0:
        reasons = rej["reason"].value_counts().to_dict()
        hint = (f"; the frames may be tight face crops: try --precropped (the whole frame is the face) or a larger "
                f"--face-pad (now {cfg.face_pad:g})" if reasons.get("no_face", 0) > len(rej) / 2 else "")
        raise DatasetError(f"no sample of {dataset_name} survived preprocessing; reasons: {reasons} "
                           f"(see {out_dir / 'rejects.csv'}){hint}")
    labels = {
        "SDE": accepted["sde_class"].dropna().value_counts().sort_index().to_dict(),
        "CDE": accepted["cde_class"].dropna().value_counts().sort_index().to_dict(),
    }
    repaired = accepted["note"][accepted["note"] != ""].str.split(" -> ").str[0].str.replace(r"\d+", "N", regex=True)
    sources = pd.concat([pq.read_table(f, columns=["face_source"]).to_pandas() for f in sorted(out_dir.glob("shard-*/*.parquet"))]
                        or [pd.DataFrame(columns=["face_source"])])["face_source"].value_counts().to_dict()
    summary = RunSummary(dataset_name, out_dir, n_ok, len(rej), rej["reason"].value_counts().to_dict(),
                         repaired.value_counts().to_dict(), labels, written, reused, time.perf_counter() - start, rej,
                         sources, cfg.face_pad)
    manifest = {
        **_shard_meta(dataclasses.asdict(cfg), precomputed),
        "dataset": dataset_name, "config_id": cfg.config_id(precomputed), "classes": adapted.classes,
        "accepted": n_ok, "rejected": len(rej), "reject_reasons": summary.reasons, "repaired": summary.repaired,
        "face_sources": sources,
        "labels": labels, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, out_dir / "manifest.json")
    return summary


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
