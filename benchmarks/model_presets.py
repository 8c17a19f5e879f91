"""Benchmark of the ablation presets: parameters, MACs and median training-step time.

For every preset of EPIR Table 4 in one run, on this machine: parameters, MACs per sample (torch's
FlopCounterMode), and the median wall time of one full training step (forward, CE + L_con, backward,
Adam) at the given batch size; then the ratio epir / baseline. Token integration exists to make EPIR
cheaper than the plain ViT of the same depth; the target is a ratio <= 0.8 on CPU.

Input: real MEGC2019 composite flows when ``--data`` holds them (default ../shared/data), otherwise
random flows of the same shape (said so in the output; timing does not depend on values).

    uv run python benchmarks/model_presets.py [--batch-size 256] [--steps 7] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epir.complexity import measure
from epir.losses import epir_loss
from epir.presets import LADDER, build_model, make_config
from epir.train import resolve_device, to_tensor

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "megc2019_composite"


def load_batch(data: Path, batch_size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """A batch of real composite flows (N, 28, 28, 3) and labels, or random ones when the data is absent."""
    if (data / "combined_3class_gt.csv").is_file():
        from preprocess.megc2019 import load_composite

        df, flows = load_composite(data)
        idx = np.resize(np.arange(len(flows)), batch_size)  # repeat samples if the batch is larger
        return flows[idx], df["label"].to_numpy()[idx], f"real MEGC2019 composite flows from {data}"
    rng = np.random.default_rng(0)
    return (rng.random((batch_size, 28, 28, 3), dtype=np.float32), rng.integers(0, 3, batch_size),
            f"RANDOM flows: {data} is absent")


class Trainer:
    """One preset's model and optimiser; ``step()`` times one training step in seconds."""

    def __init__(self, preset: str, device: torch.device):
        torch.manual_seed(0)
        self.cfg = make_config(preset)
        self.model = build_model(self.cfg).to(device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=5e-5)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        logits, feats = self.model(x, return_features=True)
        loss = epir_loss(logits, feats, y, alpha=self.cfg.alpha, use_contrastive=self.cfg.contrastive)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sync()
        return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256, help="samples per training step (paper: 256)")
    p.add_argument("--steps", type=int, default=9, help="timed steps per preset (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MEGC2019 composite folder")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    flows, labels, source = load_batch(args.data, args.batch_size)
    x = to_tensor(flows).to(device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({where}); torch {torch.__version__}; {platform.node()}")
    print(f"input: {source}; batch {args.batch_size}; median of {args.steps} steps after {args.warmup} warm-up, presets interleaved")
    # Presets are interleaved, one step each per round, so that drift in the machine's speed
    # (other load, frequency scaling) hits every preset alike and the ratios stay fair.
    trainers = {preset: Trainer(preset, device) for preset in LADDER}
    times: dict[str, list[float]] = {preset: [] for preset in LADDER}
    for r in range(args.warmup + args.steps):
        for preset, trainer in trainers.items():
            t = trainer.step(x, y)
            if r >= args.warmup:
                times[preset].append(t)
        print(f"round {r + 1}/{args.warmup + args.steps} done", file=sys.stderr, flush=True)
    print(f"{'preset':<10} {'params':>12} {'MACs/sample':>14} {'step median s':>14} {'min s':>8} {'max s':>8}")
    rows = {}
    for preset, trainer in trainers.items():
        c = measure(trainer.model)
        t = times[preset]
        rows[preset] = {"params": c.params, "macs": c.macs, "step_median_s": statistics.median(t),
                        "step_min_s": min(t), "step_max_s": max(t)}
        r = rows[preset]
        print(f"{preset:<10} {c.params:>12,} {c.macs:>14,} {r['step_median_s']:>14.4f} {r['step_min_s']:>8.4f} {r['step_max_s']:>8.4f}",
              flush=True)
    ratio = rows["epir"]["step_median_s"] / rows["baseline"]["step_median_s"]
    mac_ratio = rows["epir"]["macs"] / rows["baseline"]["macs"]
    print(f"epir / baseline: step time {ratio:.3f} (target <= 0.8 on CPU), MACs {mac_ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "where": where, "batch_size": args.batch_size,
                                         "input": source, "presets": rows, "epir_over_baseline_step": ratio,
                                         "epir_over_baseline_macs": mac_ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
