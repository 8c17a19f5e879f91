"""LOSO folds one by one against the same folds as one pack (epir/pack.py), in one run, same threads.

Trains K folds of the REAL MEGC2019 composite (the largest subjects first) with one preset and profile,
first each alone (:func:`epir.train.train_fold`), then all together as one batched model
(:func:`epir.pack.train_folds`), and prints both wall times, their ratio and the largest difference of
the two runs' test probabilities (the same trainings: it should be below 1e-4). On a CPU the batching
costs (vmap's batched kernels are no faster than the loop); on a GPU it is the point (see
``benchmarks/gpu_ladder.py``).

    uv run python benchmarks/fold_pack.py --folds 4 --set epochs=5
    uv run python benchmarks/fold_pack.py --device cuda --folds 68 --profile paper --set precision=bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epir.pack import train_folds
from epir.presets import config_from_dict
from epir.train import TrainRecipe, train_fold
from grid.config import GridConfig
from grid.values import parse_overrides
from preprocess.megc2019 import load_composite

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "megc2019_composite"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the MEGC2019 composite folder")
    p.add_argument("--preset", default="epir")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--folds", type=int, default=4, help="the K largest subjects' folds (default 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model / recipe field")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both runs (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)
    if not (args.data / "combined_3class_gt.csv").is_file():
        print(f"real MEGC2019 composite absent: {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    df, flows = load_composite(args.data)
    labels, subjects = df["label"].to_numpy(), df["subject"].astype(str).to_numpy()
    folds = df["subject"].astype(str).value_counts().index[: args.folds].tolist()
    overrides = parse_overrides(args.set)
    model, recipe, _ = GridConfig(presets=[args.preset], profile=args.profile,
                                  overrides=overrides).settings(args.preset, args.profile, 3)
    config, recipe = config_from_dict(model), TrainRecipe(**{**recipe, "device": args.device})
    print(f"{args.preset} under profile {args.profile} {overrides or ''}: {len(folds)} folds, {recipe.epochs} epochs, "
          f"batch {recipe.batch_size}, {torch.get_num_threads()} thread(s) on {args.device}", flush=True)
    t = time.perf_counter()
    alone = [train_fold(flows, labels, subjects, s, config, recipe) for s in folds]
    seq = time.perf_counter() - t
    t = time.perf_counter()
    pack = train_folds(flows, labels, subjects, folds, config, recipe)
    packed = time.perf_counter() - t
    diff = max(float(np.abs(a.probs - b.probs).max()) for a, b in zip(alone, pack))
    print(f"one by one   {seq:8.1f} s  ({seq / len(folds):.1f} s per fold)")
    print(f"one pack     {packed:8.1f} s  ({packed / len(folds):.1f} s per fold)")
    print(f"pack / one by one = {packed / seq:.2f}; largest difference of the test probabilities {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
