"""Benchmark of the preprocessing stages on Ray Data: samples per second with 1 and with 2 workers.

The input is the built-in demo dataset (onset/apex pairs made from matplotlib's public-domain
grace_hopper.jpg, 256 x 300 px frames, face ~100 px), the same for both runs. Each run builds the
pipeline ``python -m preprocess`` uses (face actor pool -> flow tasks) and streams its output; the
rate is measured from the first output batch to the last, so Ray's and the actors' start-up
(tens of seconds on a small machine, importing torch and facenet-pytorch) is reported separately and
not counted in samples per second: the stages are wrapped with timers, and the rate counts the
samples whose face batch started after the last face or flow actor began its first batch, over the span from then
to the last flow batch's end. With 2 cores the 2-worker / 1-worker ratio should be >= 1.6.

    uv run python benchmarks/preprocess_workers.py [--samples 432] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocess.adapters import manifest
from preprocess.demo import DEMO_CLASSES, make_demo_dataset
from preprocess.pipeline import FaceStage, PreprocessConfig, build_dataset, flow_stage
from preprocess.runtime import init_ray


class TimedFaceStage(FaceStage):
    """FaceStage that stamps each batch with its start time (wall clock, seconds)."""

    def __call__(self, batch):
        t = time.time()
        return super().__call__(batch).assign(t_start=t, actor=os.getpid())


def timed_flow_stage(batch, cfg):
    """flow_stage plus the batch's face start time and its own end time."""
    t_flow = time.time()
    table = flow_stage(batch, cfg)
    n = table.num_rows
    return (table.append_column("t_start", pa.array(batch["t_start"].astype(float).tolist()))
            .append_column("actor", pa.array(batch["actor"].astype(int).tolist()))
            .append_column("flow_actor", pa.array([os.getpid()] * n))
            .append_column("t_flow", pa.array([t_flow] * n))
            .append_column("t_end", pa.array([time.time()] * n)))


def measure(samples, workers: int, batch_size: int) -> dict:
    """Run the pipeline with ``workers`` and return its steady-state samples per second and start-up time."""
    t0 = time.time()
    ds = build_dataset(samples, PreprocessConfig(), workers, precomputed=False, batch_size=batch_size,
                       face_cls=TimedFaceStage, flow_fn=timed_flow_stage)
    df = ds.select_columns(["status", "t_start", "t_end", "actor", "flow_actor", "t_flow"]).to_pandas()
    # Steady state: from the moment the LAST face or flow actor began its first batch (all actors
    # constructed; construction imports torch and competes for the cores) to the last flow batch's end.
    ready = max(df.groupby("actor")["t_start"].min().max(), df.groupby("flow_actor")["t_flow"].min().max())
    steady = df[df["t_start"] >= ready]
    span = df["t_end"].max() - ready
    return {"workers": workers, "samples": len(df), "ok": int((df["status"] == "ok").sum()),
            "actors": int(df["actor"].nunique()), "startup_s": ready - t0, "steady_n": len(steady),
            "steady_s": span, "samples_per_s": len(steady) / span}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=432, help="demo samples (a multiple of 9; default 432)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8, as the pipeline)")
    args = p.parse_args(argv)
    per_subject = 3 * len(DEMO_CLASSES)
    subjects = max(1, args.samples // per_subject)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_demo_dataset(tmp, subjects=subjects, samples_per_class=3, seed=0)
        samples = manifest(path).samples
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        init_ray()
        print(f"input: {len(samples)} demo samples (grace_hopper.jpg pairs); Ray with {args.cpus} CPUs on "
              f"{os.cpu_count()} cores; face stage = MTCNN on CPU, flow = Farneback 128 px")
        results = [measure(samples, w, args.batch_size) for w in (1, 2)]
        ray.shutdown()
    print(f"{'workers':>7} {'actors':>6} {'samples':>8} {'faces ok':>8} {'start-up s':>11} {'timed':>6} "
          f"{'stages s':>9} {'samples/s':>10}")
    for r in results:
        print(f"{r['workers']:>7} {r['actors']:>6} {r['samples']:>8} {r['ok']:>8} {r['startup_s']:>11.1f} "
              f"{r['steady_n']:>6} {r['steady_s']:>9.1f} {r['samples_per_s']:>10.2f}")
    ratio = results[1]["samples_per_s"] / results[0]["samples_per_s"]
    print(f"2 workers / 1 worker: {ratio:.2f} (target >= 1.6 on 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
