"""A published model's per-subject weights, evaluated through OUR data path: a check of the whole
evaluation around the models (flow data as loaded, channel order and scale, LOSO split, pooling, UF1/UAR).

The dataset goes through the real preprocessing pipeline into Parquet shards (``python -m preprocess``;
finished shards are reused), its CDE arrays are loaded as the grid loads them
(``grid.data.load_protocol``), and for every LOSO fold the model of that fold's test subject
(``WEIGHTS/<subject>.pth``, a state dict loaded unchanged with ``weights_only=True``) predicts that subject
in eval mode, its input converted to the convention the preset declares (``epir.inputs``). The predictions
are pooled over folds and scored with ``epir.metrics.score``, overall and per source dataset.

With STSTNet's published weights (github christy1206/STSTNet, ``STSTNet_Weights/``) on the MEGC2019
composite it must print Full UF1 0.7209, UAR 0.7250, the figures its authors publish:

    uv run python benchmarks/published_weights.py --weights ../shared/data/ststnet_weights
    uv run python benchmarks/published_weights.py --weights ../shared/data/ststnet_weights --wrong-order
                                  # the same weights on [u, v, strain] as stored: what a channel mix-up costs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from epir.inputs import FLOW_CHANNELS, InputConvention, convert, data_convention
from epir.metrics import score
from epir.presets import PRESETS, build_model, make_config
from epir.train import predict, to_tensor

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "megc2019_composite"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="folder of <subject>.pth state dicts, one per LOSO fold")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"MEGC2019 composite root (default {DEFAULT_DATA})")
    p.add_argument("--preset", default="ststnet", choices=[k for k, v in PRESETS.items() if v.family != "epir"],
                   help="the peer the weights belong to (default ststnet)")
    p.add_argument("--work-dir", type=Path, default=Path("work_dirs"), help="shards go to WORK_DIR/shards (reused)")
    p.add_argument("--wrong-order", action="store_true",
                   help="feed the flows as stored ([u, v, strain], same scale) instead of the model's convention")
    args = p.parse_args(argv)
    if not (args.data / "combined_3class_gt.csv").is_file():
        print(f"real MEGC2019 composite absent: {args.data}/combined_3class_gt.csv not found", file=sys.stderr)
        return 2
    if not args.weights.is_dir():
        print(f"weights folder absent: {args.weights}", file=sys.stderr)
        return 2

    from grid.config import DatasetSpec
    from grid.data import load_protocol, preprocess

    start = time.perf_counter()
    folder = preprocess(DatasetSpec("megc2019", args.data), (args.work_dir / "shards").resolve(),
                        progress=lambda m: print("  " + m, file=sys.stderr))
    d = load_protocol(folder, "CDE")
    missing = [s for s in d.fold_subjects if not (args.weights / f"{s}.pth").is_file()]
    if missing:
        print(f"no weights for {len(missing)} fold(s): {', '.join(missing)} (expected {args.weights}/<subject>.pth)",
              file=sys.stderr)
        return 2
    config = make_config(args.preset, num_classes=len(d.classes))
    model_in = config.input_convention
    if args.wrong_order:  # the stored channel order, on the model's scale: a deliberate mistake
        model_in = InputConvention(FLOW_CHANNELS, model_in.value_range, model_in.scale)
    print(f"{args.preset}: {len(d.fold_subjects)} LOSO folds of {d.key} ({len(d.labels)} samples, shards {d.config_id}); "
          f"model input {model_in.describe()}, data [{', '.join(FLOW_CHANNELS)}] {d.flow_range}"
          + (" -- WRONG ORDER on purpose" if args.wrong_order else ""))
    y_pred = np.full(len(d.labels), -1)
    for s in d.fold_subjects:
        test = d.subjects == s
        model = build_model(config)
        model.load_state_dict(torch.load(args.weights / f"{s}.pth", map_location="cpu", weights_only=True))
        x = convert(to_tensor(d.flows[test]), data_convention(d.flow_range), model_in)
        y_pred[test] = predict(model, x).argmax(-1)
    assert (y_pred >= 0).all()
    scores = score(d.labels, y_pred, len(d.classes), d.groups)
    published = PRESETS[args.preset].figure("CDE", "full")
    for name in ["all", *sorted(k for k in scores if k != "all")]:
        s = scores[name]
        print(f"  {'Full' if name == 'all' else name:<7} ({s['n']:3d} samples): UF1 {s['uf1']:.4f}  UAR {s['uar']:.4f}")
    if published:
        print(f"published: UF1 {published.uf1:.4f}  UAR {published.uar:.4f} ({published.source})")
    print(f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
