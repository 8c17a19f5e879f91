"""How fast and how well a training profile runs LOSO folds of the REAL MEGC2019 composite.

Trains the chosen preset on K leave-one-subject-out folds (the K subjects with the most samples, or
every subject with ``--folds 0``) with honest epoch selection (``last``), and prints per-fold wall
time, the pooled UF1 / UAR over those folds, and the projected time of all 68 folds. Use it to size
a CPU profile before a full grid run; a subset of folds is NOT the composite's score.

    uv run python benchmarks/loso_profile.py --preset epir --dim 64 --dim-head 21 --epochs 40 --batch-size 64 \
        --lr 5e-4 --schedule cosine --hflip --standardize --folds 6

It also prints the score with test-time mirroring (the average of the softmax of a test flow and of its
mirror image), for comparison only; the grid does not use it.

The folds it scores are LOSO test folds: a profile chosen by looking at them has seen those subjects'
labels, which is worth saying wherever its full-grid scores appear.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epir.metrics import uar, uf1
from epir.presets import LADDER, make_config
from epir.train import TrainRecipe, fit, mirror, predict, to_model_input
from preprocess.megc2019 import load_composite

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "megc2019_composite"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--preset", default="epir", choices=LADDER)
    p.add_argument("--dim", type=int, default=256, help="token width (paper 256)")
    p.add_argument("--dim-head", type=int, help="width per head (default dim // 3)")
    p.add_argument("--depth", type=int, default=13, help="blocks (paper 13)")
    p.add_argument("--integration-blocks", type=int, default=6, help="token-integration blocks (paper 6)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--folds", type=int, default=4, help="largest K subjects as test folds; 0 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--hflip", action="store_true", help="mirror half of each batch (u -> 1 - u)")
    p.add_argument("--standardize", action="store_true", help="standardise channels with training statistics")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--only", nargs="*", help="these test subjects instead of the largest --folds")
    args = p.parse_args(argv)
    if not (args.data / "combined_3class_gt.csv").is_file():
        print(f"real MEGC2019 composite absent: {args.data}", file=sys.stderr)
        return 2
    df, flows = load_composite(args.data)
    labels, subjects = df["label"].to_numpy(), df["subject"].to_numpy()
    order = df["subject"].value_counts().index.tolist()
    folds = args.only or (order if args.folds == 0 else order[: args.folds])
    cfg = make_config(args.preset, dim=args.dim, dim_head=args.dim_head or max(1, args.dim // 3),
                      depth=args.depth, integration_blocks=min(args.integration_blocks, args.depth - 2))
    recipe = TrainRecipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device="auto",
                         weight_decay=args.weight_decay, hflip=args.hflip,
                         standardize=args.standardize, schedule=args.schedule)
    print(f"preset {args.preset}, dim {cfg.dim}, heads {cfg.heads}x{cfg.dim_head}, {recipe.epochs} epochs, "
          f"batch {recipe.batch_size}, lr {recipe.lr}; folds: {len(folds)} of {len(order)}")
    yt, yp, ym, times = [], [], [], []
    for s in folds:
        test = subjects.astype(str) == str(s)
        start = time.perf_counter()
        model, curve = fit(cfg, recipe, flows[~test], labels[~test])
        x = to_model_input(flows[test], cfg, recipe.flow_range).to(next(model.parameters()).device)
        probs = predict(model, x)
        both = (probs + predict(model, mirror(x, recipe.flow_range))) / 2  # test-time mirroring, for comparison
        times.append(time.perf_counter() - start)
        y = labels[test]
        yt += y.tolist()
        yp += probs.argmax(-1).tolist()
        ym += both.argmax(-1).tolist()
        print(f"  fold {s:>6}: {len(y):3d} test samples, acc {np.mean(y == probs.argmax(-1)):.3f}, "
              f"final train acc {curve[-1]['train_acc']:.3f}, {times[-1]:.1f} s", flush=True)
    print(f"pooled over {len(folds)} folds ({len(yt)} samples): UF1 {uf1(yt, yp):.4f}  UAR {uar(yt, yp):.4f}"
          f"   (with test-time mirroring: UF1 {uf1(yt, ym):.4f}  UAR {uar(yt, ym):.4f})")
    print(f"time per fold {np.mean(times):.1f} s -> all {len(order)} folds ~{np.mean(times) * len(order) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
