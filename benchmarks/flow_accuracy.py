"""How well our face + flow stages recover KNOWN facial motion: the demo's synthetic micro-expressions.

The demo (``preprocess/demo.py``) warps a face photograph by a class-specific displacement field of
micro-expression size (1-2 px at a ~100 px face) whose every pixel we know. This script makes demo pairs
in memory, runs them through the preprocessing stages themselves (``FaceStage``: MTCNN face box, the same
crop of onset and apex at the working size; then the flow algorithm: Farneback, EPIR's, and TV-L1, the
MEGC2019 composite's, side by side on the same pairs), maps the TRUE field through the same crop and
resize, and prints per class and algorithm, over the pixels where the true motion is at least 20 % of its
maximum:

- direction error: the angle (degrees) between the mean estimated and the mean true flow vector there,
  and the mean per-pixel angle;
- magnitude ratio: mean |estimated| / mean |true| there (1 = right size);
- time per pair: the flow computation alone, in milliseconds.

The flow stage is a documented, versioned choice (Farneback and TV-L1 parameters, working size, strain
formula: ``preprocess.frames``; recorded in every shard's metadata): run this before and after changing it.
How close our TV-L1 comes to the composite's own flows cannot be measured: no onset/apex frames of the
composite are public, and its working size is not published.

    uv run python benchmarks/flow_accuracy.py                    # 3 subjects x 3 classes x 4 samples
    uv run python benchmarks/flow_accuracy.py --working-size 96 --flow tvl1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocess.demo import DEMO_CLASSES, _subject_view, base_photo, landmarks, motion_field, warp
from preprocess.frames import FARNEBACK_PARAMS, FLOW_ALGORITHMS, TVL1_PARAMS, crop_grey, optical_flow
from preprocess.pipeline import PIPELINE_VERSION, FaceStage, PreprocessConfig


def true_flow_in_face(dx: np.ndarray, dy: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The true displacement (image pixels) cropped to the face box and resized to the working size, in
    working-size pixels: (size, size, 2) [u, v]."""
    x1, y1, x2, y2 = box
    scale = size / max(x2 - x1, y2 - y1)
    field = np.stack([dx[y1:y2, x1:x2], dy[y1:y2, x1:x2]], axis=-1).astype(np.float32)
    return cv2.resize(field, (size, size), interpolation=cv2.INTER_AREA) * scale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--samples", type=int, default=4, help="samples per class and subject")
    p.add_argument("--working-size", type=int, default=PreprocessConfig.working_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flow", default=",".join(FLOW_ALGORITHMS), help="comma-separated algorithms (default: both)")
    args = p.parse_args(argv)
    algorithms = [a.strip() for a in args.flow.split(",") if a.strip()]
    bad = [a for a in algorithms if a not in FLOW_ALGORITHMS]
    if bad:
        p.error(f"--flow: unknown {bad}; choose from {', '.join(FLOW_ALGORITHMS)}")
    cfg = PreprocessConfig(working_size=args.working_size)
    stage = FaceStage(dataclasses.asdict(cfg))
    rng = np.random.default_rng(args.seed)
    img, start = base_photo(), time.perf_counter()
    pts = landmarks(img)
    stats = {(c, a): {"mean_angle": [], "pixel_angle": [], "ratio": [], "true_px": [], "ms": []}
             for c in DEMO_CLASSES for a in algorithms}
    for _ in range(args.subjects):
        view, vpts = _subject_view(img, pts, rng)
        box, _ = stage.face_box(view)
        for label in DEMO_CLASSES:
            for _ in range(args.samples):
                dx, dy = motion_field(view.shape[:2], vpts, label, amplitude=rng.uniform(1.0, 2.0))
                apex = warp(view, dx, dy)
                onset_face, apex_face = crop_grey(view, box, cfg.working_size), crop_grey(apex, box, cfg.working_size)
                true = true_flow_in_face(dx, dy, box, cfg.working_size)
                mag = np.linalg.norm(true, axis=-1)
                m = mag >= 0.2 * mag.max()
                for a in algorithms:
                    t0 = time.perf_counter()
                    est = optical_flow(onset_face, apex_face, a)
                    s = stats[(label, a)]
                    s["ms"].append((time.perf_counter() - t0) * 1000)
                    t, e = true[m], est[m]
                    mt, me = t.mean(0), e.mean(0)
                    cos = float(mt @ me / (np.linalg.norm(mt) * np.linalg.norm(me) + 1e-12))
                    s["mean_angle"].append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
                    pc = (t * e).sum(1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(e, axis=1) + 1e-12)
                    s["pixel_angle"].append(float(np.degrees(np.arccos(np.clip(pc, -1, 1))).mean()))
                    s["ratio"].append(float(np.linalg.norm(e, axis=1).mean() / np.linalg.norm(t, axis=1).mean()))
                    s["true_px"].append(float(mag[m].mean()))
    print(f"flow stage: Farneback {FARNEBACK_PARAMS}; TV-L1 {TVL1_PARAMS}; working size {cfg.working_size} px, "
          f"pipeline version {PIPELINE_VERSION}; {args.subjects} subjects x {args.samples} samples per class; "
          f"{time.perf_counter() - start:.1f} s")
    print(f"{'class':<10} {'flow':<10} {'samples':>7} {'true |flow| px':>15} {'mean-vector angle':>18} {'pixel angle':>12} "
          f"{'|est| / |true|':>15} {'ms / pair':>10}")
    for (label, a), s in stats.items():
        print(f"{label:<10} {a:<10} {len(s['ratio']):>7} {np.mean(s['true_px']):>15.2f} {np.mean(s['mean_angle']):>16.1f} deg "
              f"{np.mean(s['pixel_angle']):>8.1f} deg {np.mean(s['ratio']):>10.2f} +- {np.std(s['ratio']):.2f} "
              f"{np.mean(s['ms']):>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
