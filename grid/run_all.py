"""EPIR Grid's main job: every dataset x protocol x LOSO fold x ablation preset, on Ray Tune, recorded
in MLflow, with paper-style tables in results/.

    python grid/run_all.py                                  # no dataset configured: the built-in DEMO
    python grid/run_all.py --dataset megc2019=../shared/data/megc2019_composite --presets epir,baseline
    python grid/run_all.py --config grid.toml               # datasets, presets, profile, overrides
    python grid/run_all.py report --experiment epir-grid    # rewrite results/ from MLflow only
    python grid/run_all.py report --experiment megc2019-ladder --beside results/megc2019-cde/runs.csv:ststnet
    python grid/run_all.py search --dataset manifest=mylab.csv:SDE --trials 30   # strict search, see 'search'
    python grid/run_all.py import out/ladder --experiment megc2019-cde-paper   # folds benchmarks/gpu_ladder.py ran
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Run as a script, Python puts grid/ first on sys.path, where Ray's workers would find this folder's
# modules as top-level names; the repository root replaces it.
sys.path[0] = str(Path(__file__).resolve().parents[1])
# Before Ray is imported: its `uv run` hook would package the working tree and start every worker
# through uv, although the environment is already complete (README, "Notes on Ray").
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from grid.cli import build_parser, make_config  # noqa: E402
from grid.config import GridConfig  # noqa: E402
from grid.tomlfile import load_config  # noqa: E402
from preprocess.runtime import quiet_libraries  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when every fold finished, 1 when some failed, 2 for bad input."""
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)  # before Ray or MLflow start
    try:
        cfg = make_config(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return 2
    report_only = [flag for flag, given in (("--beside", args.beside), ("--pair", args.pair),
                                            ("--leaderboard", args.leaderboard)) if given]
    if report_only and args.command != "report":
        print(f"error: {' and '.join(report_only)} only work with the report command "
              f"(python grid/run_all.py report --experiment {cfg.experiment} ...)", file=sys.stderr)
        return 2
    commands = {"search": _search, "predict": _predict, "import": _import, "report": _report, "run": _run,
                "migrate-ids": _migrate_ids}
    return commands[args.command](args, cfg)


def _predict(args, cfg: GridConfig) -> int:
    """``predict MODEL``: classify new onset/apex pairs with a logged model."""
    from grid import predict  # deferred: MLflow and the face model only for this command

    if args.target is None:
        print("error: predict needs a model: python grid/run_all.py predict MODEL_URI --onset F --apex F", file=sys.stderr)
        return 2
    try:
        table = predict.run(args.target, args.manifest, args.onset, args.apex, args.out, args.precropped,
                            flow=args.flow, allow_flow_mismatch=args.allow_flow_mismatch)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # MLflow's errors for a wrong URI
        print(f"error: cannot load {args.target}: {e}", file=sys.stderr)
        return 2
    return 0 if (table["status"] == "ok").all() else 1


def _import(args, cfg: GridConfig) -> int:
    """``import RECORDS``: log a GPU machine's fold records as the grid would have."""
    from grid.gpu_import import import_records  # deferred: MLflow only for this command

    if args.target is None:
        print("error: import needs the records folder: python grid/run_all.py import FOLDER", file=sys.stderr)
        return 2
    try:
        out = import_records(Path(args.target), cfg.experiment, cfg.results_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if out["complete"] == out["cells"] else 1


def _migrate_ids(args, cfg: GridConfig) -> int:
    """``migrate-ids``: the one-off step after cell ids began to cover the data (id version 3, docs/grid.md):
    the cells this command's options describe are built from the data as it is now, and the runs of a store
    tagged with their version-2 ids are re-tagged with their version-3 ids (:func:`grid.migration.migrate_v2`)."""
    from grid import migration  # deferred: Ray and MLflow only for the commands that need them
    from grid.cells import build_cells
    from grid.resources import plan_resources
    from grid.runner import prepare_data
    from preprocess.adapters import DatasetError

    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        res = plan_resources(cfg, log)
        cells = build_cells(cfg, prepare_data(cfg, log), res.profile)
    except (DatasetError, ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    client, exp_id = _existing_experiment(cfg)
    if exp_id is None:
        return 2
    total = 0
    for c in cells:
        n = migration.migrate_v2(client, exp_id, c)
        total += n
        log(f"{c.name}: {n} run(s) of version-2 id {c.cell_id_v2} re-tagged as cell {c.cell_id} "
            f"(data fingerprint {c.data_fingerprint})")
    log(f"{total} run(s) re-tagged in experiment '{cfg.experiment}'; they are assumed to have trained on this data")
    return 0


def _existing_experiment(cfg: GridConfig):
    """(MLflow client, the id of ``cfg.experiment``), or (client, None) after an error line when the store has no
    such experiment (the commands that read a store and must not create one)."""
    from grid import tracking  # deferred: MLflow only for the commands that need it

    client, exp_id = tracking.setup(cfg.experiment, create=False)
    if exp_id is None:
        print(f"error: no MLflow experiment '{cfg.experiment}' in {tracking.tracking_uri()}", file=sys.stderr)
    return client, exp_id


def _report(args, cfg: GridConfig) -> int:
    """``report``: rewrite results/<experiment>/ from MLflow alone."""
    from grid.kept import read_beside
    from grid.report import write_tables
    from preprocess.adapters import DatasetError

    try:
        beside = [read_beside(Path(path), presets.split(",") if presets else None)
                  for path, _, presets in (b.partition(":") for b in args.beside)]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    client, exp_id = _existing_experiment(cfg)
    if exp_id is None:
        return 2
    try:
        labels = _dataset_labels(cfg) if beside and not cfg.demo else None
        out = write_tables(client, exp_id, cfg.experiment, cfg.results_dir, beside, args.pair, labels)
        if args.leaderboard and out:
            from grid.leaderboard import report_leaderboard

            report_leaderboard(client, exp_id, cfg.experiment, cfg.results_dir, beside, labels)
            print(f"leaderboard written to {out / 'leaderboard.md'}")
    except (DatasetError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tables written to {out}" if out else f"no finished cell in experiment '{cfg.experiment}'")
    _print_paired(out)
    return 0


def _dataset_labels(cfg: GridConfig) -> dict:
    """``report --beside ... --dataset/--config``: (dataset, protocol) -> the configured datasets' true labels
    (:func:`grid.kept.labels_of`; shards in ``--work-dir`` reused, else made), so that rows beside pair where
    this experiment has no own cell of their dataset and protocol."""
    from grid.kept import labels_of
    from grid.runner import prepare_data

    return {(d.dataset, d.protocol): labels_of(d) for d in prepare_data(cfg, log=lambda m: print(m, flush=True)).values()}


def _run(args, cfg: GridConfig) -> int:
    """``run`` (the default): train what is missing, write the tables, print the summary."""
    from grid.runner import run_grid, summary_table  # deferred: Ray only for the commands that train
    from preprocess.adapters import DatasetError

    if cfg.demo:
        print("=" * 78)
        print("DEMO: no dataset configured, so this runs the built-in demo (synthetic 1-2 px facial motion on")
        print("matplotlib's grace_hopper.jpg). Its scores say nothing about micro-expressions. To run real data:")
        print("  python grid/run_all.py --dataset megc2019=PATH/megc2019_composite   (see --help)")
        print("=" * 78, flush=True)
    try:
        outcome = run_grid(cfg, log=lambda m: print(m, flush=True), inject_failure=args.inject_failure)
    except (DatasetError, ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(summary_table(outcome))
    print(f"\nfolds trained now: {outcome.trained} ({outcome.train_seconds / 60:.1f} min of training), "
          f"reused from MLflow: {outcome.reused}; wall time {outcome.wall_seconds / 60:.1f} min")
    _print_paired(outcome.results_dir)
    if outcome.results_dir:
        print(f"tables: {outcome.results_dir}/")
    if outcome.experiment_id:
        from grid.tracking import runs_url, tracking_uri

        print(f"MLflow: {tracking_uri()}; its UI (mlflow ui --backend-store-uri ... --host 127.0.0.1 --port 5000) opens "
              f"the cells with their scores at {runs_url(outcome.experiment_id)}")
    for f in outcome.failures:
        print(f"FAILED  {f['cell']}: {f['error']}")
    if outcome.failures:
        print("re-run the same command to retry the failed folds (finished folds are not redone)")
    return 1 if outcome.failures else 0


def _print_paired(results_dir) -> None:
    """The paired differences the tables hold (rung minus rung before, and minus baseline)."""
    from grid.pairing import paired_lines

    lines = paired_lines(results_dir) if results_dir else []
    if lines:
        print("\npaired differences, row minus row (95 % CI, bootstrap over subjects; * excludes 0):")
        print("\n".join("  " + ln for ln in lines))


def _search(args, cfg: GridConfig) -> int:
    from grid.search import run_search
    from grid.space import SearchConfig, check_space, parse_space
    from preprocess.adapters import DatasetError

    if cfg.demo:
        print("error: search needs a dataset: --dataset FORMAT=ROOT:PROTOCOL (see --help)", file=sys.stderr)
        return 2
    raw = load_config(args.config) if args.config else {}  # read (and checked) once
    toml = raw.get("search", {})
    if args.presets is None and "presets" not in raw:
        cfg.presets = ["epir"]
    if args.experiment is None and "experiment" not in raw:
        cfg.experiment = "epir-search"
    try:
        space = parse_space(args.space or toml.get("space"))
        check_space(space, cfg.settings(cfg.presets[0], cfg.resolved_profile(False), 3)[0])  # before Ray starts
        scfg = SearchConfig(args.trials, space, args.val_groups, args.sampler, args.fold_parallel, args.concurrent_trials,
                            args.study, args.optuna_storage, args.seed, not args.no_evaluate,
                            final_model=args.final_model is not False)
        out = run_search(cfg, scfg, log=lambda m: print(m, flush=True))
    except (DatasetError, ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nstudy {out.study}: {out.completed} trials ({out.ran_now} now); each validation group's choice: "
          f"{out.choices_path}")
    if out.test:
        print(f"test subjects, each trained with its group's choice, reported once: UF1 {out.test['uf1']:.4f}  "
              f"UAR {out.test['uar']:.4f} (mean of {len(out.test['cells'])} seed(s))")
    print(f"best on all groups (for NEW data only): {out.best} with mean inner validation UF1 {out.best_value:.4f} "
          f"-> {out.best_path}")
    if out.model_uri:
        print(f"final model (that candidate trained on all subjects; expected score: the test line above): {out.model_uri}")
    print(f"test the choices again: python grid/run_all.py --choices {out.choices_path} --presets {cfg.presets[0]} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
