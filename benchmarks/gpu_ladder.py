"""The ablation ladder (or any presets) x LOSO folds on the GPU(s) of ONE machine, without Ray or MLflow:
as many folds at once as fit, one record per fold, then ``grid/run_all.py import`` logs them in MLflow
exactly as the grid would have (same cells, same ids: a later grid run reuses them).

Made for a lent GPU machine that has PyTorch but not Ray, MLflow or Optuna. Preprocess the dataset here
(``python -m preprocess ... --out shards``; the shards are small) and carry the shard folder there:

    # on the GPU machine, in the repository root, with its own python3 (not uv):
    PYTHONPATH=. python3 benchmarks/gpu_ladder.py --shards shards/megc2019/precomputed-6284e58656 \\
        --profile paper --workers 8 --out out/ladder
    # back here:
    uv run python grid/run_all.py import out/ladder --experiment megc2019-cde-paper

Each fold is one training (:func:`epir.train.train_fold`) that yields the honest result (last epoch)
and, beside it, the best-test-epoch one (PEEKS); both go into the record. Workers are processes
(``torch.multiprocessing``, spawn), each holding the dataset on its device and taking folds from a
shared queue, largest test subjects first; with several GPUs, worker i uses GPU i mod n. The run prints
each fold, then the wall time, folds per hour and the GPU utilisation (``nvidia-smi``, sampled every
second). Re-running with the same ``--out`` trains only the folds not yet in ``folds.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

_DATA = None  # each worker's ProtocolData (set by _init)


def _init(data, devices, counter, threads):
    """Worker start: keep the dataset, pick this worker's GPU, set its CPU threads."""
    global _DATA
    _DATA = data
    torch.set_num_threads(max(1, threads))
    with counter.get_lock():
        i = counter.value
        counter.value += 1
    if devices:
        torch.cuda.set_device(devices[i % len(devices)])


def _run(task: tuple) -> tuple[str, dict]:
    """One fold in a worker: ``(cell_id, subject, model dict, recipe dict)`` -> (cell_id, fold record)."""
    from epir.presets import config_from_dict
    from epir.train import TrainRecipe, train_fold
    from grid.trainable import fold_record

    cell_id, subject, model, recipe = task
    started = time.time()
    r = train_fold(_DATA.flows, _DATA.labels, _DATA.subjects, subject, config_from_dict(model), TrainRecipe(**recipe))
    return cell_id, fold_record(r, _DATA, started, platform.node())


class GpuSampler:
    """Samples ``nvidia-smi``'s GPU utilisation (%) once a second in a thread; ``mean()`` over the run."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self.available = shutil.which("nvidia-smi") is not None and torch.cuda.is_available()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                vals = [float(v) for v in out.split()]
                if vals:
                    self.samples.append(float(np.mean(vals)))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def mean(self) -> float | None:
        """Mean utilisation in percent, None without a GPU or samples."""
        return float(np.mean(self.samples)) if self.samples else None


def main(argv=None) -> int:
    from epir.presets import LADDER, PRESETS
    from grid.config import PROFILES, GridConfig, parse_overrides
    from grid.data import available_protocols, load_protocol
    from grid.records import append_fold, done_keys, write_cells
    from grid.cells import build_cells, pooled_scores

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="a preprocessed dataset folder (holds manifest.json)")
    p.add_argument("--protocol", choices=["SDE", "CDE"], help="default: the first the dataset allows")
    p.add_argument("--presets", default=",".join(LADDER), help=f"comma-separated (default the ladder; all: {','.join(PRESETS)})")
    p.add_argument("--profile", default="paper", choices=list(PROFILES), help="training profile (default paper)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainRecipe / model field")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one cell each (default 0)")
    p.add_argument("--folds", type=int, default=0, help="only the N largest subjects' folds (a PARTIAL run)")
    p.add_argument("--out", type=Path, required=True, help="records folder (cells.json, folds.jsonl); resumed if present")
    p.add_argument("--workers", type=int, help="folds at once (default: 8 per GPU, else 1)")
    p.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / workers)")
    args = p.parse_args(argv)

    d = None
    protocol = args.protocol or available_protocols(args.shards)[0]
    d = load_protocol(args.shards, protocol)
    try:
        cfg = GridConfig(presets=[s.strip() for s in args.presets.split(",") if s.strip()], profile=args.profile,
                         overrides=parse_overrides(args.set), seeds=[int(s) for s in args.seeds.split(",")],
                         folds=args.folds)
        cells = build_cells(cfg, {d.key: d}, args.profile)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpus = list(range(torch.cuda.device_count()))
    workers = args.workers or (8 * len(gpus) if gpus else 1)
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    where = ", ".join(torch.cuda.get_device_name(i) for i in gpus) if gpus else f"CPU ({os.cpu_count()} cores)"
    meta = {"device": where, "torch": torch.__version__, "host": platform.node(), "workers": workers,
            "threads_per_worker": threads, "command": " ".join(sys.argv), "shards": str(args.shards)}
    write_cells(args.out, cells, meta)
    done = done_keys(args.out)
    order = {s: i for i, s in enumerate(d.fold_subjects)}  # largest test subjects first, cells interleaved
    tasks = sorted(((c.cell_id, s, c.fold_model(s), c.fold_recipe(s)) for c in cells for s in c.subjects
                    if (c.cell_id, s) not in done), key=lambda t: order[t[1]])
    names = {c.cell_id: c.name for c in cells}
    print(f"{len(cells)} cells, {sum(len(c.subjects) for c in cells)} folds of {d.key} ({len(d.labels)} samples): "
          f"{len(done)} recorded earlier, {len(tasks)} to train on {where}, {workers} at once, {threads} thread(s) each",
          flush=True)
    start = time.perf_counter()
    ctx = torch.multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    train_seconds = 0.0
    with GpuSampler() as gpu, ctx.Pool(workers, initializer=_init, initargs=(d, gpus, counter, threads)) as pool:
        for n, (cid, rec) in enumerate(pool.imap_unordered(_run, tasks), 1):
            append_fold(args.out, cid, rec)
            train_seconds += rec["train_seconds"]
            el = time.perf_counter() - start
            acc = float(np.mean(np.asarray(rec["y_true"]) == np.asarray(rec["y_pred"])))
            print(f"[{n}/{len(tasks)} folds, {el / 60:.1f} min, {n / el * 3600:.0f} folds/h] {names[cid]} | fold "
                  f"{rec['subject']}: acc {acc:.3f} on {len(rec['y_true'])}, {rec['train_seconds']:.1f} s", flush=True)
    wall = time.perf_counter() - start
    util = gpu.mean()
    meta.update(wall_seconds=round(wall, 1), folds_trained=len(tasks), folds_per_hour=round(len(tasks) / wall * 3600, 1)
                if tasks else None, gpu_utilisation_percent=None if util is None else round(util, 1),
                train_seconds_sum=round(train_seconds, 1))
    write_cells(args.out, cells, meta)
    print(f"\nwall {wall / 60:.1f} min for {len(tasks)} folds: {meta['folds_per_hour']} folds/hour; "
          f"{train_seconds / 60:.1f} min of training summed over workers; GPU utilisation "
          + (f"{util:.0f} % (mean of {len(gpu.samples)} samples)" if util is not None else "n/a (no GPU)"))
    from grid.records import read_records

    _, _, folds = read_records(args.out)
    for c in cells:
        if len(folds[c.cell_id]) == len(c.subjects):
            h, b = pooled_scores(c, folds[c.cell_id]), pooled_scores(c, folds[c.cell_id], best_test_epoch=True)
            print(f"  {c.name:<36} UF1 {h['all']['uf1']:.4f}  UAR {h['all']['uar']:.4f}   best test epoch (PEEKS): "
                  f"UF1 {b['all']['uf1']:.4f}  UAR {b['all']['uar']:.4f}")
    print(f"records: {args.out}/ -> uv run python grid/run_all.py import {args.out} --experiment NAME")
    return 0


if __name__ == "__main__":
    sys.exit(main())
