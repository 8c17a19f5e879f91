"""``python -m preprocess``: turn a micro-expression dataset into Parquet shards with Ray Data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .adapters import ADAPTERS, DatasetError, dataset_name
from .frames import FLOW_ALGORITHMS
from .runtime import quiet_libraries

EPILOG = """\
datasets and the --root each expects:
  casme2    folder with CASME2_RAW_selected/ (or the pre-cropped Cropped/) and CASME2-coding-*.xlsx
  samm      folder with SAMM/<subject>/<clip>/ and SAMM_Micro_FACS_Codes_v2.xlsx
  smic      folder with HS/s<n>/micro/<class>/<clip>/ (an *apex*.xlsx list gives the apex)
  casme3    folder with part_A/<Subject>/<Filename>/color/ and cas(me)3_part_A_ME_label*.xlsx
  megc2019  the MEGC2019 composite: combined_3class_gt.csv + flow/*.png (flow stages skipped)
  manifest  a CSV with header subject,sample_id,onset_path,apex_path,label (paths absolute or
            relative to the CSV; extra columns kept as metadata)

Output: OUT/<dataset>/<config id>/shard-*/ (Parquet), rejects.csv (every rejected sample and its
reason) and manifest.json (configuration, package versions, counts), written last. A re-run with the
same configuration reuses finished shards. Connects to RAY_ADDRESS, or the cluster of this node, else
starts a local Ray.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m preprocess`` (its ``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m preprocess",
        description="Preprocess a micro-expression dataset: MTCNN face crop of onset and apex (same box), "
        "Farneback optical flow (u, v) and optical strain, resized to the model input, written as "
        "Parquet shards by Ray Data. Bad samples go to a rejects table with their reason.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=list(ADAPTERS), help="dataset format")
    p.add_argument("--root", required=True, type=Path, help="dataset root (for manifest: the CSV file)")
    p.add_argument("--out", required=True, type=Path, help="output root for shards")
    p.add_argument("--annotations", type=Path, help="annotation sheet, when not found in the root")
    p.add_argument("--name", help="output dataset name (default: the dataset format; a manifest's file stem)")
    p.add_argument("--workers", type=int, default=2, help="face actors and flow actors, one CPU each (default 2)")
    p.add_argument("--shard-size", type=int, default=512, help="samples per shard (default 512)")
    p.add_argument("--flow", choices=list(FLOW_ALGORITHMS), default="farneback",
                   help="optical flow onset -> apex: farneback (EPIR's, default) or tvl1 (TV-L1 from OpenCV's contrib "
                   "module, as the published MEGC2019 composite; parameters in preprocess/frames.py TVL1_PARAMS)")
    p.add_argument("--working-size", type=int, default=128, help="face side the flow is computed on, px (default 128)")
    p.add_argument("--output-size", type=int, default=28, help="stored flow side, px (default 28)")
    p.add_argument("--normalize", choices=["minmax", "none"], default="minmax",
                   help="per-sample per-channel scaling of u, v, strain (default minmax, as STSTNet/HTNet)")
    p.add_argument("--face-margin", type=float, default=0.1, help="margin added to each side of the face box, "
                   "as a fraction of its side (default 0.1)")
    p.add_argument("--min-face-prob", type=float, default=0.9, help="MTCNN detection threshold (default 0.9)")
    p.add_argument("--face-pad", type=float, default=0.25,
                   help="when MTCNN finds no face, try again on the frame padded by this fraction of its size on "
                   "each side, edges repeated (tight face crops need it; 0 = no second try; default 0.25)")
    p.add_argument("--precropped", action="store_true",
                   help="manifest frames are tight face crops: use the whole frame as the face box")
    p.add_argument("--classes", help="manifest: comma-separated class names in label order (default: sorted)")
    p.add_argument("--gpu-per-actor", type=float, help="GPU fraction per face actor (default: 1/workers when "
                   "the cluster has GPUs)")
    p.add_argument("--force", action="store_true", help="redo every shard even when finished")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's and Ray Data's own console output too (default: our progress and real problems)")
    return p


def prepare(args) -> tuple:
    """(adapted dataset, output name, PreprocessConfig) of parsed arguments: everything that decides the
    shards' content (their cache key, ``preprocess.pipeline.shard_names``), before anything runs.

    Raises:
        ValueError: a bad option. DatasetError: a wrong root or annotations.
    """
    from .pipeline import PreprocessConfig

    cfg = PreprocessConfig(args.working_size, args.output_size, args.normalize, args.face_margin, args.min_face_prob,
                           args.face_pad, args.flow)
    if args.workers < 1 or args.shard_size < 1:
        raise ValueError("--workers and --shard-size must be >= 1")
    if not args.root.exists():
        raise DatasetError(f"--root {args.root} does not exist")
    kwargs = {}
    if args.dataset == "manifest":
        kwargs = dict(precropped=args.precropped,
                      classes=[c.strip() for c in args.classes.split(",")] if args.classes else None)
    adapted = ADAPTERS[args.dataset](args.root, args.annotations, **kwargs)
    return adapted, dataset_name(args.dataset, adapted, args.name), cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 for a wrong root, bad options or no surviving sample."""
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)  # before Ray starts
    from .pipeline import run

    try:
        print(f"reading {args.dataset} annotations from {args.root} ...", flush=True)
        adapted, name, cfg = prepare(args)
        print(f"{len(adapted.samples)} samples to process, {len(adapted.rejects)} rejected from the annotations", flush=True)
        summary = run(adapted, name, args.out, cfg, workers=args.workers, shard_size=args.shard_size,
                      precomputed=args.dataset == "megc2019", force=args.force,
                      progress=lambda m: print(m, flush=True), gpu_per_actor=args.gpu_per_actor)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
