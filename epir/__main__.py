"""Command line of the model library: ``python -m epir info --preset NAME [--json]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .complexity import PAPER_MACS, PAPER_PARAMS, measure
from .presets import FAMILIES, PRESETS, build_model, config_to_dict, family_fields, make_config


def _add_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("architecture overrides (default: the preset's configuration); each applies to "
                             "the presets whose family has the field")
    seen: dict[str, str] = {}
    for family, fam in FAMILIES.items():
        for f in dataclasses.fields(fam.config):
            kind = {"int": int, "float": float, "float | None": float}.get(str(f.type), f.type)
            if f.name in seen or kind not in (int, float):
                continue
            seen[f.name] = family
            g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None)


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
        description="Complexity of one forward pass of one sample. Presets: the ablation ladder of EPIR "
        "Table 4 and peer models: " + ", ".join(PRESETS) + ". The paper's Table 1 gives 'epir' "
        f"{PAPER_PARAMS / 1e6:.2f} M parameters and {PAPER_MACS / 1e6:.2f} M 'FLOPs' (multiply-accumulates as thop "
        "counts them); 'epir' at the paper configuration prints its own count beside them (torch's FlopCounterMode over every matrix product, "
        "DTSM's rollout and the merges included). Patch size 4 (--patch-size 4: 49 patches, SPT shift 2) with "
        "--merge-k 2 or 3 merges 24 or 37 % of the patch tokens over 6 integration blocks.",
    )
    info.add_argument("--preset", default="epir", choices=list(PRESETS), help="preset (default: epir)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_overrides(info)
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    given = {k: v for k, v in vars(args).items() if k not in ("command", "preset", "json") and v is not None}
    foreign = sorted(set(given) - family_fields(preset.family))
    if foreign:
        parser.error(f"--{', --'.join(f.replace('_', '-') for f in foreign)} do(es) not apply to {args.preset} "
                     f"({preset.family} family)")
    try:
        config = make_config(args.preset, **given)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    c = measure(build_model(config))
    if args.json:
        print(json.dumps({"preset": args.preset, "config": config_to_dict(config), **c.to_dict()}))
        return 0
    print(f"preset            {args.preset} ({preset.family} family; {preset.source})")
    print(f"input             {config.in_chans} x {config.img_size} x {config.img_size} "
          f"{config.input_convention.describe()}, {config.num_classes} classes"
          + (f", {config.num_patches} patches of {config.patch_size} px + class token" if preset.family == "epir" else ""))
    paper = args.preset == "epir"
    print(f"parameters        {c.params:,}  ({c.params / 1e6:.2f} M" + (f"; paper epir: {PAPER_PARAMS / 1e6:.2f} M)" if paper else ")"))
    print(f"MACs / sample     {c.macs:,}  ({c.macs / 1e6:.2f} M" + (f"; paper epir: {PAPER_MACS / 1e6:.2f} M)" if paper else ")"))
    print(f"FLOPs / sample    {c.flops:,}  ({c.flops / 1e6:.2f} M = 2 x MACs)")
    if c.tokens_in:
        print("tokens per block  " + "  ".join(f"{i}:{a}->{b}" if a != b else f"{i}:{a}"
                                                for i, (a, b) in enumerate(zip(c.tokens_in, c.tokens_out))))
    if preset.recipe:
        print(f"own recipe        {', '.join(f'{k}={v}' for k, v in preset.recipe.items())}")
    for pub in preset.published:
        peeks = {True: "peeks at the test subject", False: "honest", None: "whether it peeks: unknown"}[pub.peeks]
        uar = f", UAR {pub.uar:.4f}" if pub.uar is not None else ""
        print(f"published         {pub.protocol} {pub.dataset}: UF1 {pub.uf1:.4f}{uar} ({peeks}; {pub.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
