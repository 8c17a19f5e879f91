"""The Ray Data preprocessing pipeline (the driver): samples -> face stage -> flow stage -> Parquet shards.

    adapter records --(from_pandas)--> map_batches(FaceStage: actor pool, MTCNN; a GPU fraction per
    actor when the cluster has GPUs) --> map_batches(FlowStage: actor pool, Farneback or TV-L1, strain,
    resize) --> write_parquet

The stages are :mod:`preprocess.stages`, the shard format and its cache key :mod:`preprocess.shards`.
The samples are cut into groups of ``shard_size``; each group runs through Ray Data into a hidden
staging folder that is renamed into place only when complete, so a reader never sees half a shard,
and a re-run with the same configuration skips every finished shard. ``manifest.json`` marks a
complete dataset: :func:`preprocess.shards.read_shards` refuses a folder without it. Streaming: only one
group's small post-flow rows (about 10 KB a sample) are held at a time; frames stream through the actors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .adapters import REJECT_COLUMNS, AdapterResult, DatasetError
from .runtime import init_ray

# the stages and the shard format, re-exported: this module was their home before they were split out
from .shards import (  # noqa: F401
    FLOW_CHANNELS,
    PIPELINE_VERSION,
    PreprocessConfig,
    check_files,
    group_hash,
    missing_reason,
    read_shards,
    shard_names,
    to_table,
)
from .stages import FaceStage, FlowStage, flow_row, flow_stage, precomputed_stage, shard_meta  # noqa: F401

# A worker is one CPU: its face actor reserves 0.75 and its flow actor 0.25. Actors that reserved
# whole CPUs would leave the flow stage none and the pipeline would wait forever on a small machine;
# the flow stage (Farneback on 128 px faces) costs a few ms a sample against MTCNN's tens of ms.
FACE_CPUS, FLOW_CPUS = 0.75, 0.25


def build_dataset(samples: pd.DataFrame, cfg: PreprocessConfig, workers: int, precomputed: bool,
                  gpu_per_actor: float | None = None, batch_size: int = 8, face_cls=None, flow_fn=None):
    """The lazy Ray Dataset of one group: samples -> face stage (actor pool) -> flow stage.

    Rows come out in the shard schema (:func:`preprocess.shards.to_table`), accepted and rejected alike (``status``).
    Each stage's actor pool has ``workers`` actors, or one per sample when the group is smaller.
    ``face_cls`` / ``flow_fn`` replace :class:`FaceStage` / :func:`flow_stage` (the benchmark wraps
    them with timers).
    """
    face_cls, flow_fn = face_cls or FaceStage, flow_fn or flow_stage
    workers = max(1, min(workers, len(samples)))  # an actor with no sample to take would only load its model
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
    out_dir = _output_folder(Path(out) / dataset_name / cfg.config_id(precomputed), force)
    stage, written, reused = _run_shards(adapted, samples, cfg, out_dir, workers, shard_size, precomputed,
                                         gpu_per_actor, progress)
    rej = pd.concat([adapted.rejects.reindex(columns=REJECT_COLUMNS), absent, stage], ignore_index=True)
    rej.to_csv(out_dir / "rejects.csv", index=False)
    stage_keys = set(zip(stage["subject"].astype(str), stage["sample_id"].astype(str)))
    accepted = samples[[(str(s), str(i)) not in stage_keys for s, i in zip(samples["subject"], samples["sample_id"])]]
    if accepted.empty:
        reasons = rej["reason"].value_counts().to_dict()
        hint = (f"; the frames may be tight face crops: try --precropped (the whole frame is the face) or a larger "
                f"--face-pad (now {cfg.face_pad:g})" if reasons.get("no_face", 0) > len(rej) / 2 else "")
        raise DatasetError(f"no sample of {dataset_name} survived preprocessing; reasons: {reasons} "
                           f"(see {out_dir / 'rejects.csv'}){hint}")
    summary = _summary(dataset_name, out_dir, accepted, rej, written, reused, time.perf_counter() - start, cfg)
    _write_manifest(out_dir, summary, adapted, cfg, precomputed)
    return summary


def _output_folder(out_dir: Path, force: bool) -> Path:
    """The dataset's output folder, made ready: emptied with ``force``, stale staging folders and the
    manifest (rewritten at the end) removed."""
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    return out_dir


def _run_shards(adapted: AdapterResult, samples: pd.DataFrame, cfg: PreprocessConfig, out_dir: Path, workers: int,
                shard_size: int, precomputed: bool, gpu_per_actor: float | None, progress) -> tuple[pd.DataFrame, int, int]:
    """Every shard not finished earlier (:func:`run_group`), the others reused; shards of an earlier sample
    list removed. Returns (the stages' rejects, shards written, shards reused)."""
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
    return stage, written, reused


def _summary(dataset_name: str, out_dir: Path, accepted: pd.DataFrame, rej: pd.DataFrame, written: int, reused: int,
             seconds: float, cfg: PreprocessConfig) -> RunSummary:
    """What a run did: counts, label counts, repairs, face sources."""
    labels = {
        "SDE": accepted["sde_class"].dropna().value_counts().sort_index().to_dict(),
        "CDE": accepted["cde_class"].dropna().value_counts().sort_index().to_dict(),
    }
    repaired = accepted["note"][accepted["note"] != ""].str.split(" -> ").str[0].str.replace(r"\d+", "N", regex=True)
    sources = pd.concat([pq.read_table(f, columns=["face_source"]).to_pandas() for f in sorted(out_dir.glob("shard-*/*.parquet"))]
                        or [pd.DataFrame(columns=["face_source"])])["face_source"].value_counts().to_dict()
    return RunSummary(dataset_name, out_dir, len(accepted), len(rej), rej["reason"].value_counts().to_dict(),
                      repaired.value_counts().to_dict(), labels, written, reused, seconds, rej, sources, cfg.face_pad)


def _write_manifest(out_dir: Path, summary: RunSummary, adapted: AdapterResult, cfg: PreprocessConfig,
                    precomputed: bool) -> None:
    """``manifest.json``, written last and renamed into place: it marks a complete dataset."""
    manifest = {
        **shard_meta(dataclasses.asdict(cfg), precomputed),
        "dataset": summary.dataset, "config_id": cfg.config_id(precomputed), "classes": adapted.classes,
        **({"subset_of": adapted.subset_of} if adapted.subset_of else {}), "accepted": summary.accepted, "rejected": summary.rejected, "reject_reasons": summary.reasons,
        "repaired": summary.repaired, "face_sources": summary.face_sources, "labels": summary.labels,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, out_dir / "manifest.json")
