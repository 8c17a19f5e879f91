"""The ablation ladder (or any presets) x LOSO folds on the GPU(s) of ONE machine, without Ray or MLflow:
each cell's folds trained as ONE batched model (epir/pack.py), one record per fold, then
``grid/run_all.py import`` logs them in MLflow exactly as the grid would have (same cells, same ids: a
later grid run reuses them).

Made for a lent GPU machine that has PyTorch but not Ray, MLflow, Optuna or pydantic. Preprocess the
dataset here (``python -m preprocess ... --out shards``; the shards are small), copy the shard folder into
a folder of the checkout that git ignores (e.g. ``.gl/``) and carry it there:

    # on the GPU machine, in the repository root, with its own python3 (not uv):
    PYTHONPATH=. python3 benchmarks/gpu_ladder.py --shards .gl/megc2019/precomputed-6284e58656 \\
        --profile paper --set precision=bf16 --out .gl/ladder
    # back here:
    uv run python grid/run_all.py import .gl/ladder --experiment megc2019-cde-paper

A task is a pack: the folds of one cell that train the same settings (a searched cell has one pack per
distinct choice), ``--fold-pack N`` splits them into packs of up to N (1: a fold per task, the folds one
by one). Each fold yields the honest result (last epoch) and, beside it, the best-test-epoch one (PEEKS);
both go into the record. Tasks run in worker processes (``torch.multiprocessing``, spawn; ``--workers``,
default one per GPU), each holding the dataset on its device; with several GPUs, worker i uses GPU
i mod n. A pack that would not fit the free GPU memory is split (epir.pack.train_folds probes it).

Printed per preset: wall time of its packs, folds per hour, the achieved TFLOP/s (2 x 3 x forward MACs x
training samples seen / time: forward and backward, 2 FLOPs per multiply-accumulate) and that as a share
of the device's dense bf16 peak (``--peak-tflops``, 790 as measured on the H200 lent here), and the peak
GPU memory. Re-running with the same ``--out`` trains only the folds not yet in ``folds.jsonl``.
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

import numpy as np
import torch

from epir.complexity import measure
from epir.pack import check_packable, train_folds
from epir.presets import LADDER, PRESETS, build_model, config_from_dict
from epir.train import TrainRecipe, train_fold
from grid.cells import build_cells, fold_packs, pooled_scores
from grid.config import PROFILES, GridConfig
from grid.data import available_protocols, load_protocol
from grid.records import FoldRecord, append_fold, done_keys, read_records, write_cells
from grid.values import parse_overrides

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


def _run(task: tuple) -> tuple[str, list[FoldRecord], dict]:
    """One pack in a worker: ``(cell_id, subjects, model dict, recipe dict)`` -> (cell_id, fold records, figures)."""
    cell_id, subjects, model, recipe = task
    config, rec = config_from_dict(model), TrainRecipe(**recipe)
    cuda = torch.cuda.is_available() and rec.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started, t0 = time.time(), time.perf_counter()
    try:
        check_packable(config, rec)
        results = train_folds(_DATA.model_flows(config), _DATA.labels, _DATA.subjects, subjects, config, rec,
                              log=lambda m: print(f"  {m}", flush=True)) if len(subjects) > 1 else None
    except ValueError:
        results = None
    if results is None:  # one fold, or a model that does not pack: the folds one by one
        results = [train_fold(_DATA.model_flows(config), _DATA.labels, _DATA.subjects, s, config, rec) for s in subjects]
    seconds = time.perf_counter() - t0
    seen = sum(rec.epochs * int((np.asarray(_DATA.subjects) != s).sum()) * rec.ensemble for s in subjects)
    figures = {"seconds": seconds, "samples_seen": seen, "macs": measure(build_model(config)).macs,
               "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0}
    return cell_id, [FoldRecord.from_result(r, _DATA, started, platform.node()) for r in results], figures


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


def plan_packs(cells: list, done: set, size: int) -> list[tuple]:
    """The tasks: each cell's unfinished folds in packs of up to ``size`` (0 = a setting's folds in one), as the
    grid plans its trials (:func:`grid.cells.fold_packs`): ``(cell_id, subjects, model dict, recipe dict)``. A model
    that cannot pack (:func:`epir.pack.check_packable`) gets one task per fold, so that ``--workers`` share them."""
    tasks = []
    for c in cells:
        todo = {s for cid, s in done if cid == c.cell_id}
        try:
            check_packable(config_from_dict(c.fold_model(c.subjects[0])), TrainRecipe(**c.fold_recipe(c.subjects[0])))
            packs = fold_packs(c, todo, size)
        except ValueError:
            packs = fold_packs(c, todo, 1)
        tasks += [(c.cell_id, part, c.fold_model(part[0]), c.fold_recipe(part[0])) for part in packs]
    return tasks


def preset_figures(cells: list, figures: dict[str, list[dict]], peak_tflops: float) -> list[str]:
    """One line per preset: wall time, folds/hour, achieved TFLOP/s and share of the peak, peak memory."""
    lines = []
    for preset in dict.fromkeys(c.preset for c in cells):
        fs = [f for c in cells if c.preset == preset for f in figures.get(c.cell_id, [])]
        if not fs:
            continue
        seconds = sum(f["seconds"] for f in fs)
        folds = sum(f["folds"] for f in fs)
        tflops = sum(6 * f["macs"] * f["samples_seen"] for f in fs) / seconds / 1e12
        peak = max(f["peak_bytes"] for f in fs)
        lines.append(f"  {preset:<9} {seconds / 60:7.2f} min  {folds / seconds * 3600:9.0f} folds/h  {tflops:9.4g} TFLOP/s "
                     f"({tflops / peak_tflops:6.2%} of {peak_tflops:g})  peak GPU memory "
                     + (f"{peak / 2**30:.1f} GiB" if peak else "n/a"))
    return lines


def _parser() -> argparse.ArgumentParser:
    """The command line (unchanged since the GPU issue's prepared command was written against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="a preprocessed dataset folder (holds manifest.json)")
    p.add_argument("--protocol", choices=["SDE", "CDE"], help="default: the first the dataset allows")
    p.add_argument("--presets", default=",".join(LADDER), help=f"comma-separated (default the ladder; all: {','.join(PRESETS)})")
    p.add_argument("--profile", default="paper", choices=list(PROFILES), help="training profile (default paper)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainRecipe / model field")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one cell each (default 0)")
    p.add_argument("--folds", type=int, default=0, help="only the N largest subjects' folds (a PARTIAL run)")
    p.add_argument("--fold-pack", type=int, default=0, help="folds per batched model: 0 = a cell's (default), 1 = one by one")
    p.add_argument("--out", type=Path, required=True, help="records folder (cells.json, folds.jsonl); resumed if present")
    p.add_argument("--workers", type=int, help="packs at once, one process each (default: one per GPU, else 1)")
    p.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / workers)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense bf16 peak (default 790, H200)")
    return p


def _train(args, d, cells: list, tasks: list, meta: dict, gpus: list[int]) -> tuple[dict[str, list[dict]], float | None]:
    """Train the packs in worker processes, each fold's record appended as it ends; (figures per cell, mean GPU
    utilisation)."""
    names, todo = {c.cell_id: c.name for c in cells}, sum(len(t[1]) for t in tasks)
    start = time.perf_counter()
    ctx = torch.multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    figures: dict[str, list[dict]] = {}
    n = 0
    with GpuSampler() as gpu, ctx.Pool(meta["workers"], initializer=_init,
                                        initargs=(d, gpus, counter, meta["threads_per_worker"])) as pool:
        for cid, recs, fig in pool.imap_unordered(_run, tasks):
            for rec in recs:
                append_fold(args.out, cid, rec)
            n += len(recs)
            figures.setdefault(cid, []).append({**fig, "folds": len(recs)})
            el = time.perf_counter() - start
            acc = float(np.mean([r.accuracy for r in recs]))
            print(f"[{n}/{todo} folds, {el / 60:.1f} min, {n / el * 3600:.0f} folds/h] {names[cid]} | pack of "
                  f"{len(recs)} fold(s): mean acc {acc:.3f}, {fig['seconds']:.1f} s", flush=True)
    return figures, gpu.mean()


def _summary(args, cells: list, figures: dict, meta: dict, util: float | None) -> None:
    """The run's figures per preset and every complete cell's honest and PEEKS scores."""
    print(f"\nwall {meta['wall_seconds'] / 60:.1f} min for {meta['folds_trained']} folds: {meta['folds_per_hour']} "
          "folds/hour; GPU utilisation " + (f"{util:.0f} %" if util is not None else "n/a (no GPU)"))
    print("\n".join(preset_figures(cells, figures, args.peak_tflops)))
    _, _, folds = read_records(args.out)
    for c in cells:
        if len(folds[c.cell_id]) == len(c.subjects):
            h, b = pooled_scores(c, folds[c.cell_id]), pooled_scores(c, folds[c.cell_id], best_test_epoch=True)
            print(f"  {c.name:<36} UF1 {h['all']['uf1']:.4f}  UAR {h['all']['uar']:.4f}   best test epoch (PEEKS): "
                  f"UF1 {b['all']['uf1']:.4f}  UAR {b['all']['uar']:.4f}")
    print(f"records: {args.out}/ -> uv run python grid/run_all.py import {args.out} --experiment NAME")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
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
    workers = args.workers or max(1, len(gpus))
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    where = ", ".join(torch.cuda.get_device_name(i) for i in gpus) if gpus else f"CPU ({os.cpu_count()} cores)"
    meta = {"device": where, "torch": torch.__version__, "host": platform.node(), "workers": workers,
            "threads_per_worker": threads, "command": " ".join(sys.argv), "shards": str(args.shards),
            "fold_pack": args.fold_pack}
    write_cells(args.out, cells, meta)
    done = done_keys(args.out)
    tasks = plan_packs(cells, done, args.fold_pack)
    todo = sum(len(t[1]) for t in tasks)
    print(f"{len(cells)} cells, {sum(len(c.subjects) for c in cells)} folds of {d.key} ({len(d.labels)} samples): "
          f"{len(done)} recorded earlier, {todo} to train in {len(tasks)} pack(s) on {where}, {workers} at once, "
          f"{threads} thread(s) each", flush=True)
    start = time.perf_counter()
    figures, util = _train(args, d, cells, tasks, meta, gpus)
    wall = time.perf_counter() - start
    meta.update(wall_seconds=round(wall, 1), folds_trained=todo, folds_per_hour=round(todo / wall * 3600, 1)
                if todo else None, gpu_utilisation_percent=None if util is None else round(util, 1))
    write_cells(args.out, cells, meta)
    _summary(args, cells, figures, meta, util)
    return 0


if __name__ == "__main__":
    sys.exit(main())
