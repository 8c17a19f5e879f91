"""Command line of the model library: ``python -m epir info --preset NAME [--json]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .complexity import PAPER_MACS, PAPER_PARAMS, measure
from .model import EPIR, EPIRConfig, PRESETS, make_config


def _add_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("architecture overrides (default: the preset's paper configuration)")
    for f in dataclasses.fields(EPIRConfig):
        if f.type in ("int", int):
            g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=int, default=None)
        elif f.type in ("float", float, "float | None"):
            g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=float, default=None)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m epir``; returns the exit code (2 for a bad option)."""
    parser = argparse.ArgumentParser(
        prog="python -m epir",
        description="EPIR model library (arXiv 2604.08106). 'info' reports the complexity of one forward pass.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info",
        help="parameters, multiply-accumulates (MACs), FLOPs = 2 x MACs and tokens per block for ONE sample",
        description="Complexity of one forward pass of one sample. Presets are the ablation ladder of EPIR "
        "Table 4: " + ", ".join(PRESETS) + ". At the paper configuration 'epir' should give the paper's "
        "Table 1 figures: 7.03 M parameters and 84.03 M MACs.",
    )
    info.add_argument("--preset", default="epir", choices=list(PRESETS), help="ablation preset (default: epir)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_overrides(info)
    args = parser.parse_args(argv)

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(EPIRConfig)
                 if getattr(args, f.name, None) is not None}
    try:
        config = make_config(args.preset, **overrides)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    c = measure(EPIR(config))
    if args.json:
        print(json.dumps({"preset": args.preset, "config": dataclasses.asdict(config), **c.to_dict()}))
        return 0
    print(f"preset            {args.preset}")
    print(f"input             {config.in_chans} x {config.img_size} x {config.img_size}, "
          f"{config.num_patches} patches of {config.patch_size} px + class token, {config.num_classes} classes")
    print(f"parameters        {c.params:,}  ({c.params / 1e6:.2f} M; paper epir: {PAPER_PARAMS / 1e6:.2f} M)")
    print(f"MACs / sample     {c.macs:,}  ({c.macs / 1e6:.2f} M; paper epir: {PAPER_MACS / 1e6:.2f} M)")
    print(f"FLOPs / sample    {c.flops:,}  ({c.flops / 1e6:.2f} M = 2 x MACs)")
    print("tokens per block  " + "  ".join(f"{i}:{a}->{b}" if a != b else f"{i}:{a}"
                                            for i, (a, b) in enumerate(zip(c.tokens_in, c.tokens_out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
