"""The command line of ``grid/run_all.py``: its options, their help (``--help`` explains datasets, cells, presets,
profiles, Ray and MLflow), and the typed :class:`grid.config.GridConfig` they make (a wrong value refused with a
clear message before any work starts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from epir.presets import LADDER, PRESETS
from preprocess import FLOW_ALGORITHMS

from .config import FORMATS, PROFILES, SAMPLERS, DatasetSpec, GridConfig
from .schema import MODEL_URI
from .tomlfile import load_config
from .values import parse_overrides

EPILOG = f"""\
datasets (--dataset FORMAT=ROOT[:PROTOCOLS], repeatable; or [[datasets]] in --config):
  formats: {', '.join(FORMATS)} (the roots `python -m preprocess --help` describes);
  PROTOCOLS: SDE, CDE or SDE+CDE (default: every protocol the labels allow; megc2019 is CDE).
  A source dataset of the composite as its own SDE dataset (megc2019-smic, -casme2, -samm; 3 classes):
  source = "smic" in a [[datasets]] entry of format megc2019 (results/leaderboard/smic-hs.toml).
  Each dataset is preprocessed by the real pipeline into WORK_DIR/shards (finished shards reused).
  With no dataset at all, the grid runs the built-in DEMO (synthetic motion on grace_hopper.jpg).

cells and folds: one cell per dataset x protocol x preset x seed, a full leave-one-subject-out
  evaluation; one Ray Tune trial per fold. UF1 / UAR pool the predictions of all of a cell's folds; the
  tables give the mean and spread over seeds. Every fold predicts with its last epoch (honest); the
  epoch its test subject liked best is recorded beside it (best_test_epoch.*, PEEKS), never instead.

presets: the EPIR ladder ({', '.join(LADDER)}) and peers on their published recipes
  ({', '.join(p for p in PRESETS if p not in LADDER)}).
profiles (model width and recipe of the EPIR ladder; --set KEY=VALUE overrides any TrainRecipe field
  and the model fields of the chosen presets' families):
{chr(10).join(f'  {k:<6} {v or "EPIR Sec. 4.2: width 256, 300 epochs, Adam 5e-5, batch 256"}' for k, v in PROFILES.items())}
  auto   paper where the cluster has GPUs, else cpu

Ray: connects to RAY_ADDRESS, or the cluster this node belongs to, else starts a local Ray.
MLflow: MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db (artifacts in ./mlartifacts). One parent
  run per cell, one child run per fold. View it with:
    mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
Re-running the same command after an interruption trains only the folds not yet FINISHED in MLflow.
A failing fold is retried --max-failures times, then reported; the exit status is then 1.
"""


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n} (leave --folds out for all folds)")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python grid/run_all.py`` (its ``--help``)."""
    p = argparse.ArgumentParser(prog="python grid/run_all.py", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run",
                   choices=["run", "report", "search", "import", "predict", "migrate-ids"],
                   help="run (default): train what is missing and write results/; report: only write results/; "
                   "search: hyper-parameter search on one dataset whose choice for each test subject never sees "
                   "that subject's labels (see 'search options'); import RECORDS: log the folds that "
                   "benchmarks/gpu_ladder.py recorded (no Ray, no MLflow there) as the grid would have; "
                   "predict MODEL: classify new onset/apex pairs with a logged model (see 'predict options'); "
                   "migrate-ids: with a run's own options, re-tag its cells of a store made before cell ids covered "
                   "the data (id version 3), ASSUMING they were trained on the data the options point to now "
                   "(docs/grid.md)")
    p.add_argument("target", nargs="?", help="import: the records folder; predict: a models:/ or runs:/ URI or a "
                   f"local model folder (a cell's final model: tag {MODEL_URI} of its parent run)")
    p.add_argument("--config", type=Path, help="grid TOML file (see grid/config.py and README)")
    _selection_options(p)
    p.add_argument("--cde-composite", action="store_true", default=None,
                   help="pool the CDE samples of all --dataset entries into ONE composite cell (EPIR's CDE from raw "
                   "CASME II + SAMM + SMIC); subjects become <dataset>_<subject>")
    p.add_argument("--profile", choices=["auto", *PROFILES], help="training profile (default auto)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainRecipe field or a model field, e.g. --set epochs=60 --set dim=128")
    p.add_argument("--experiment", help="MLflow experiment and results/ subfolder (default epir-grid; demo: epir-grid-demo)")
    p.add_argument("--folds", type=_positive, help="only the N largest subjects' folds per cell (a PARTIAL grid, labelled)")
    p.add_argument("--fold-pack", type=int, help="folds of a cell trained as ONE batched model per trial: 0 (default) = "
                   "a cell's folds together on a GPU, one per trial on CPUs; 1 = one per trial; N = up to N (same results)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float, help="GPU fraction per fold (default 0.25 with GPUs, else 0)")
    p.add_argument("--max-concurrent", type=int, help="at most N folds at once (default: as resources allow)")
    p.add_argument("--max-failures", type=int, help="retries of a failing fold (default 2)")
    p.add_argument("--final-model", action=argparse.BooleanOptionalAction, default=None,
                   help="train each cell's model on ALL its subjects and log it as an MLflow model, for new data "
                   "(default: on for real datasets, off for the demo and a partial grid, --folds N); see 'predict'")
    p.add_argument("--log-fold-models", action="store_true", help="log each fold's trained weights in its child run")
    p.add_argument("--work-dir", type=Path, help="shards, demo data, Ray Tune results (default work_dirs)")
    p.add_argument("--results", type=Path, help="tables folder (default results)")
    p.add_argument("--overrides", type=Path, metavar="JSON",
                   help="TrainRecipe / model fields from a JSON file, e.g. a search's *.best.json (for OTHER data than "
                   "the search's: it is refused on the dataset it was chosen on)")
    p.add_argument("--choices", type=Path, metavar="JSON",
                   help="a search's *.choices.json: each test subject's fold trains the configuration chosen for its "
                   "validation group without its labels (the honest test of a search)")
    _report_options(p)
    _search_options(p)
    _predict_options(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show every library's console output (Ray, Ray Tune, Ray Data, MLflow); by default only our "
                   "progress lines and real problems")
    p.add_argument("--inject-failure", help=argparse.SUPPRESS)  # tests: SUBJECT or SUBJECT:once
    return p


def _selection_options(p: argparse.ArgumentParser) -> None:
    """What a run trains: datasets, their classes, the models (a user's files too), the seeds."""
    p.add_argument("--dataset", action="append", default=[], metavar="FORMAT=ROOT[:PROTOCOLS]",
                   help="a dataset to run (repeatable); overrides the config file's datasets")
    p.add_argument("--classes", action="append", default=[], metavar="[DATASET=]A,B,...",
                   help="a manifest's class names in label order (repeatable, one per dataset; DATASET = its format or "
                   "name, optional with one dataset); default: the labels found, refusing a class only one subject has")
    p.add_argument("--model-file", action="append", default=[], type=Path, metavar="FILE.py",
                   help="a Python file of one's own that registers models (epir.registry.register_model; repeatable; "
                   "TOML model_files): imported and checked before anything runs, shipped to every Ray worker; its "
                   "models' names join --presets (docs/extending.md)")
    p.add_argument("--presets", help=f"comma-separated presets (default the ladder: {','.join(LADDER)}; "
                   f"all: {','.join(PRESETS)})")
    p.add_argument("--seeds", help="comma-separated seeds, one cell each (default 0), e.g. 0,1,2")


def _report_options(p: argparse.ArgumentParser) -> None:
    """The ``report`` command's options (refused with any other command)."""
    r = p.add_argument_group("report options", "python grid/run_all.py report --experiment E [--beside RUNS_CSV[:PRESETS]] "
                             "[--pair SETTING_A:SETTING_B] [--leaderboard]")
    r.add_argument("--beside", action="append", default=[], metavar="RUNS_CSV[:PRESETS]",
                   help="report: rows of another experiment's results/<experiment>/runs.csv (only PRESETS, "
                        "comma-separated, if given) shown beside this experiment's, labelled; paired like this "
                        "experiment's rows where their predictions/ files were kept beside the runs.csv, else "
                        "'not paired' (repeatable); e.g. results/megc2019-cde/runs.csv:ststnet. The true labels "
                        "come from this experiment's cells of the same dataset and protocol, else from the "
                        "datasets given with --dataset/--config (shards in --work-dir reused). Where several hold the "
                        "same model, --leaderboard shows this experiment's row, else the first --beside's: "
                        "give the newest file first")
    r.add_argument("--pair", action="append", default=[], type=_setting_pair, metavar="SETTING_A:SETTING_B",
                   help="report: also compare these two rows, paired (A minus B, subject bootstrap CI), e.g. two "
                        "search designs' cells; SETTING = a row's 'setting' id in runs.csv (this experiment's or a "
                        "--beside file's); written to paired_comparisons (repeatable)")
    r.add_argument("--leaderboard", action="store_true",
                   help="report: also write leaderboard.md / .csv: one row per model and protocol, each paired with "
                        "epir (95%% subject-bootstrap CI), its PEEKS score and published figure, the softmax ensemble "
                        "of the CPU-trained models, and the models that wait for a GPU (grid/leaderboard.py)")


def _search_options(p: argparse.ArgumentParser) -> None:
    """The ``search`` command's options."""
    s = p.add_argument_group(
        "search options", "python grid/run_all.py search --dataset FORMAT=ROOT:PROTOCOL [--presets epir] --space F=DIST ...\n"
        "Subjects are dealt into --val-groups groups; a trial trains its configuration once per PAIR of groups (on the "
        "others) and predicts both. Candidates come from a sampler that never sees a score; group g's test subjects get "
        "the candidate best on the other groups, each predicted by a model trained without g: no model behind g's "
        "choice saw g. Then an honest LOSO run tests those choices, and the candidate best on all groups is trained on "
        "all subjects and logged as the search's model (--no-final-model: not).")
    s.add_argument("--trials", type=int, default=20, help="Optuna trials the study should hold (default 20); a re-run "
                   "with the same study resumes it, a larger number extends it")
    s.add_argument("--space", action="append", default=[], metavar="FIELD=DIST",
                   help="a searched TrainRecipe or model field (repeatable): uniform:LO:HI, loguniform:LO:HI, int:LO:HI "
                   "or choice:A,B,... (default: alpha=uniform:0:0.8, temperature=loguniform:1:16, merge_k=int:0:2)")
    s.add_argument("--val-groups", type=int, default=5, help="validation groups of subjects (default 5, at least 3; "
                   "k(k-1)/2 trainings per candidate)")
    s.add_argument("--sampler", default="random", choices=list(SAMPLERS),
                   help="how Optuna draws candidates, never from scores (default random; grid: every combination "
                   "of choice spaces; why not TPE: docs/search.md)")
    s.add_argument("--fold-parallel", type=int, default=0, help="trainings of one trial at once (default: what fits)")
    s.add_argument("--concurrent-trials", type=int, default=1, help="Optuna trials at once (default 1)")
    s.add_argument("--study", help="Optuna study name (default DATASET-PROTOCOL-PRESET-PROFILE)")
    s.add_argument("--optuna-storage", help="Optuna storage URL (default sqlite:///$PWD/optuna.db)")
    s.add_argument("--seed", type=int, default=0, help="sampler and validation-group seed (default 0)")
    s.add_argument("--no-evaluate", action="store_true",
                   help="skip the honest LOSO test of the choices at the end")


def _predict_options(p: argparse.ArgumentParser) -> None:
    """The ``predict`` command's options."""
    q = p.add_argument_group("predict options", "python grid/run_all.py predict MODEL (--onset F --apex F | --manifest CSV)")
    q.add_argument("--onset", type=Path, help="onset frame of one pair (bmp, jpg, png)")
    q.add_argument("--apex", type=Path, help="apex frame of the same pair")
    q.add_argument("--manifest", type=Path, help="CSV with sample_id,onset_path,apex_path (paths relative to it)")
    q.add_argument("--out", type=Path, help="write the probabilities as CSV (default: print one line per pair)")
    q.add_argument("--precropped", action="store_true", help="the frames are tight face crops")
    q.add_argument("--flow", choices=list(FLOW_ALGORITHMS),
                   help="the flow algorithm for the new pairs (default: the model's own, which predict prints)")
    q.add_argument("--allow-flow-mismatch", action="store_true",
                   help="accept a --flow that contradicts the model's training flows (another input distribution)")


def parse_dataset(text: str) -> DatasetSpec:
    """``FORMAT=ROOT[:PROTOCOLS]`` -> :class:`DatasetSpec` (PROTOCOLS like ``SDE+CDE``).

    Raises:
        ValueError: malformed text, unknown format or protocol.
    """
    fmt, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ValueError(f"--dataset {text!r}: expected FORMAT=ROOT[:PROTOCOLS]")
    root, protocols = rest, []
    head, _, tail = rest.rpartition(":")
    if head and tail and all(t.upper() in ("SDE", "CDE") for t in tail.split("+")):
        root, protocols = head, [t.upper() for t in tail.split("+")]
    return DatasetSpec(fmt, Path(root), protocols=protocols)


def apply_classes(datasets: list[DatasetSpec], items: list[str]) -> None:
    """``--classes [DATASET=]A,B,...`` items into the datasets' ``classes`` option.

    Raises:
        ValueError: no dataset, an unknown DATASET, or no DATASET= with several datasets.
    """
    for item in items:
        target, sep, names = item.rpartition("=")
        hits = [d for d in datasets if not sep or target in (d.format, d.name)]
        if not datasets or (sep and not hits):
            raise ValueError(f"--classes {item!r}: no configured dataset named {target!r}" if sep else
                             f"--classes {item!r}: no dataset is configured")
        if not sep and len(hits) > 1:
            raise ValueError(f"--classes {item!r}: several datasets are configured; say which: DATASET=A,B,...")
        classes = [c.strip() for c in names.split(",") if c.strip()]
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"--classes {item!r}: expected two or more distinct class names")
        for d in hits:
            d.options["classes"] = classes


def make_config(args) -> GridConfig:
    """GridConfig from the config file, then the flags on top; no dataset anywhere means the demo."""
    kw = load_config(args.config)
    if args.model_file:
        kw["model_files"] = [*kw.get("model_files", []), *args.model_file]
    if args.dataset:
        kw["datasets"] = [parse_dataset(d) for d in args.dataset]
    apply_classes(kw.get("datasets", []), args.classes)
    if args.presets:
        kw["presets"] = [s.strip() for s in args.presets.split(",") if s.strip()]
    if args.seeds:
        try:
            kw["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    kw.pop("search", None)  # the TOML's [search] table: read by the search command
    overrides = dict(kw.get("overrides", {}))
    if args.overrides:
        loaded = json.loads(Path(args.overrides).read_text())
        overrides.update(loaded.get("overrides", loaded))
        if "study" in loaded and "dataset" in loaded:
            kw["overrides_from"] = {"study": loaded["study"], "dataset": loaded["dataset"]}
    overrides.update(parse_overrides(args.set))
    if args.choices:  # the search's base settings come with its choices: the folds train what was validated
        kw["choices"] = json.loads(Path(args.choices).read_text())
        for k, v in kw["choices"].get("base", {}).items():
            if k in overrides and overrides[k] != v:
                raise ValueError(f"--choices: the search validated {k}={v!r}; this run sets {k}={overrides[k]!r}")
            overrides[k] = v
        searched = kw["choices"].get("profile")
        if searched in PROFILES:
            if (args.profile or kw.get("profile", searched)) not in (searched, "auto"):
                raise ValueError(f"--choices: the search ran profile {searched}, this run asks for {args.profile or kw['profile']}")
            kw["profile"] = searched
    kw["overrides"] = overrides
    for flag, key in [("profile", "profile"), ("experiment", "experiment"), ("folds", "folds"), ("fold_pack", "fold_pack"),
                      ("cpus_per_trial", "cpus_per_trial"),
                      ("gpus_per_trial", "gpus_per_trial"), ("max_concurrent", "max_concurrent"),
                      ("max_failures", "max_failures"), ("work_dir", "work_dir"), ("results", "results_dir"),
                      ("final_model", "final_model"), ("cde_composite", "cde_composite")]:
        if getattr(args, flag) is not None:
            kw[key] = getattr(args, flag)
    if args.log_fold_models:
        kw["log_fold_models"] = True
    if not kw.get("datasets"):
        kw["demo"] = True
        kw.setdefault("profile", "demo")
        kw.setdefault("experiment", "epir-grid-demo")
        kw.setdefault("presets", ["baseline", "epir"])
    return GridConfig(**kw)


def _setting_pair(text: str) -> tuple[str, str]:
    """``--pair A:B`` -> ``("A", "B")``; argparse refuses anything else."""
    a, sep, b = text.partition(":")
    if not sep or not a or not b or ":" in b:
        raise argparse.ArgumentTypeError(f"{text!r} is not SETTING_A:SETTING_B (two setting ids of runs.csv)")
    return a, b


