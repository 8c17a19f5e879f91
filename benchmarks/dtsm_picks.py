"""What DTSM picks on real data: duplicate picks, distinct tokens, and a bias towards merged tokens.

Trains one LOSO fold of the REAL MEGC2019 composite (the ``cpu`` profile's ``epir`` by default, test
subject ``s03`` held out) once per DTSM reading (``--rules``: EPIRConfig values of ``dtsm_score``,
``dtsm_residual``, ``dtsm_distinct``), forwards all 442 samples through each trained model, and prints
per reading:

- ``dup``: the share of samples in which two heads picked the same token;
- ``distinct``: the mean number of different tokens the last block sees besides the class token;
- ``merged picks`` against ``merged tokens``: the share of picks that are merged tokens (holding 2 or
  more input tokens) against the share of merged tokens among the tokens DTSM chooses from. A size-neutral
  rule keeps the two close; ``bias`` is their ratio.

These are diagnostics of the selection, not scores: no test label is read (the held-out subject's rows are
printed apart only to show that training samples and unseen ones behave alike).

    uv run python benchmarks/dtsm_picks.py                        # the readings below, about 2 min
    uv run python benchmarks/dtsm_picks.py --rules sum mean mean+distinct --set merge_k=2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epir.presets import config_from_dict, make_config
from epir.train import TrainRecipe, fit, to_model_input
from grid.config import GridConfig
from grid.values import parse_overrides
from preprocess.megc2019 import load_composite

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "megc2019_composite"
# a reading: "+"-joined words; "sum" / "mean" set dtsm_score, "residual" and "distinct" switch those fields on
RULES = ["sum", "mean", "mean+residual", "mean+distinct", "mean+residual+distinct"]


def rule_fields(rule: str) -> dict:
    """``"mean+residual"`` -> ``{"dtsm_score": "mean", "dtsm_residual": True, "dtsm_distinct": False}``.

    Raises:
        ValueError: for an unknown word.
    """
    words = rule.split("+")
    bad = set(words) - {"sum", "mean", "residual", "distinct"}
    if bad:
        raise ValueError(f"rule {rule!r}: unknown word(s) {sorted(bad)}; use sum|mean[+residual][+distinct]")
    return {"dtsm_score": "sum" if "sum" in words else "mean", "dtsm_residual": "residual" in words,
            "dtsm_distinct": "distinct" in words}


def pick_stats(picks: torch.Tensor, held: torch.Tensor) -> dict:
    """Statistics of DTSM's picks (B, k) given how many inputs each token holds (B, N); see the module doc."""
    k = picks.shape[1]
    distinct = torch.tensor([len(set(row.tolist())) for row in picks])
    merged_pick = held.gather(1, picks) > 1  # (B, k)
    merged_token = held[:, 1:] > 1  # (B, N-1): the class token is never a candidate
    share_picks, share_tokens = float(merged_pick.float().mean()), float(merged_token.float().mean())
    return {"dup": float((distinct < k).float().mean()), "distinct": float(distinct.float().mean()),
            "merged_picks": share_picks, "merged_tokens": share_tokens,
            "bias": share_picks / share_tokens if share_tokens else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the MEGC2019 composite folder")
    p.add_argument("--preset", default="epir", help="a preset with DTSM (default epir: it merges)")
    p.add_argument("--profile", default="cpu", help="training profile (default cpu)")
    p.add_argument("--test-subject", default="s03", help="the subject held out of training (default s03)")
    p.add_argument("--rules", nargs="+", default=RULES, help=f"readings to train and compare (default {' '.join(RULES)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model / recipe field")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.data / "combined_3class_gt.csv").is_file():
        print(f"real MEGC2019 composite absent: {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    df, flows = load_composite(args.data)
    labels, subjects = df["label"].to_numpy(), df["subject"].astype(str).to_numpy()
    train = subjects != args.test_subject
    overrides = parse_overrides(args.set)
    model_d, recipe_d, _ = GridConfig(presets=[args.preset], profile=args.profile,
                                      overrides=overrides).settings(args.preset, args.profile, 3, args.seed)
    recipe = TrainRecipe(**{**recipe_d, "device": "cpu"})
    base = config_from_dict(model_d)
    print(f"{args.preset} under profile {args.profile} {overrides or ''}: depth {base.depth}, "
          f"{base.integration_blocks} integration blocks x K={base.merge_k}, tokens per block {base.tokens_per_block}; "
          f"trained without {args.test_subject} ({int(train.sum())} samples), {recipe.epochs} epochs; "
          f"all {len(labels)} samples forwarded")
    print(f"{'reading':<26} {'samples':>8} {'dup':>6} {'distinct':>9} {'merged picks':>13} {'merged tokens':>14} {'bias':>6}")
    for rule in args.rules:
        cfg = make_config(args.preset, **{**{k: v for k, v in model_d.items() if k != "family"}, **rule_fields(rule)})
        start = time.perf_counter()
        model, _ = fit(cfg, recipe, flows[train], labels[train])
        model.eval()
        x = to_model_input(flows, cfg, recipe.flow_range)
        picks, held = model.dtsm_picks(x)
        for name, rows in (("all", np.ones(len(x), bool)), (f"held-out {args.test_subject}", ~train)):
            s = pick_stats(picks[torch.from_numpy(rows)], held[torch.from_numpy(rows)])
            print(f"{rule if name == 'all' else '':<26} {int(rows.sum()):>8} {s['dup']:6.1%} {s['distinct']:9.2f} "
                  f"{s['merged_picks']:13.1%} {s['merged_tokens']:14.1%} {s['bias']:6.2f}"
                  + (f"   ({time.perf_counter() - start:.0f} s)" if name == "all" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
