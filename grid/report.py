"""results/: paper-style tables from the finished cells in MLflow (the grid's record of truth).

Writes, into ``results/<experiment>/``, Markdown and CSV in the layout of EPIR's
- Table 1 (CDE: Full, SAMM, CASME II, SMIC; UF1, UAR) -> ``table1_cde``,
- Tables 2/3 (SDE per dataset) -> ``table2_3_sde``,
- Table 4 (the ablation ladder, and peers, on CDE Full) -> ``table4_ablation``,
with the published numbers beside ours, and ``runs.csv``: one line per cell (seed) with its
configuration, commit, fold count and wall time.

One table row is one setting (dataset, protocol, preset, model, recipe and folds) pooled over its
seeds: the mean UF1 / UAR over seeds, their standard deviation (``sd``, with n - 1; empty for one seed)
and the seeds. Every row holds the honest score (each fold's last epoch) and, in separate columns
marked PEEKS, the best-test-epoch score of the same trainings (the epoch each fold's test subject liked
best, as HTNet's public code) and the gap between the two. Rows of old runs whose own score peeked
(``--epoch-selection best_test_epoch`` before both were recorded), partial grids (``--folds N``) and the
demo are labelled in every row and title they touch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from epir.presets import LADDER, PRESETS
from epir.registry import UNIMPLEMENTED

from . import schema, tracking
from .compare import METRICS, Paired, paired_difference
from .data import UNNAMED_FLOWS
from .predictions import prob_columns

REFERENCE = "epir"  # the row every other model's row is also compared with, paired (when it has one)


def published_cde() -> dict[str, dict[str, tuple]]:
    """Table 1's published rows, from the model registry (the presets' figures that carry a table label, and the
    figures of models the project does not implement): label -> {dataset: (UF1, UAR)}; EPIR's first, then by
    label; each row's ``peeks`` says whether its source chose epochs or settings on the test subjects."""
    figures = [f for p in PRESETS.values() for f in p.published if f.label and f.protocol == "CDE"]
    figures += [f for figs in UNIMPLEMENTED.values() for f in figs if f.protocol == "CDE"]
    rows: dict[str, dict] = {}
    for f in figures:
        rows.setdefault(f.label or "?", {})[f.dataset] = (f.uf1, np.nan if f.uar is None else f.uar)
        rows[f.label or "?"]["peeks"] = PEEKS_TEXT[f.peeks]
    return dict(sorted(rows.items(), key=lambda kv: (not kv[0].startswith("EPIR"), kv[0])))


PEEKS_TEXT = {True: "yes", False: "no", None: "unknown"}  # does a published figure peek at its test subjects?


def paper_sde(dataset: str) -> tuple[float, float]:
    """EPIR's published SDE figure (Tables 2-3) on ``dataset``, from the registry; NaNs where it has none."""
    f = PRESETS[REFERENCE].figure("SDE", dataset)
    return (f.uf1, f.uar) if f else (np.nan, np.nan)


CDE_GROUPS = [("full", "Full"), ("samm", "SAMM"), ("casme2", "CASME II"), ("smic", "SMIC")]
PEEK = tracking.PEEK
KEY = ["dataset", "protocol", "flow", "preset", "profile", "epoch_selection", "folds", "demo"]
# rows that may be paired share these (and then their subjects and seeds, checked on the predictions); a
# ladder's rungs share their flow too, and two flows of one raw dataset are compared rung by rung
PAIR_KEY = ["dataset", "protocol", "profile", "epoch_selection", "folds", "demo"]
# another model than the ladder's (a peer, a user's model) pairs with the ladder's rows of any profile
CROSS_KEY = [k for k in PAIR_KEY if k != "profile"]
PAIRED = "paired_comparisons"  # paired_comparisons.csv / .md in results/<experiment>/
PAIRED_COLUMNS = ["dataset", "protocol", "row", "vs", "against", "metric", "difference", "ci_low", "ci_high",
                  "excludes_zero", "seeds_agree", "seed_pairs", "subjects", "setting"]
# results/<experiment>/predictions/<cell_id>.csv: each cell's pooled predictions WITHOUT the true labels (those
# belong to the dataset's licence holders), so that a later report pairs with the cell after its store is gone.
# Samples are named by a hash of their id: some datasets' sample names spell the label (SMIC's s03_ne_01).
KEPT = "predictions"
KEPT_COLUMNS = ["subject", "sample_hash", "group", "y_pred", "y_pred_best_test_epoch"]


def sample_hash(sample_id: str) -> str:
    """The name a kept prediction file gives a sample: the first 16 hex digits of SHA-256 of its id."""
    return hashlib.sha256(str(sample_id).encode()).hexdigest()[:16]


def _label(row) -> str:
    marks = []
    if isinstance(row.get("provenance"), str) and row["provenance"]:
        marks.append(row["provenance"])
    if row["peeks_at_test"]:
        marks.append("BEST-TEST-EPOCH: peeks at the test subject")
    if row["partial"]:
        marks.append(f"PARTIAL: {row['folds']} folds")
    if row["demo"]:
        marks.append("DEMO data")
    if isinstance(row.get("beside"), str) and row["beside"]:
        pairable = row.get("pairable")
        paired = isinstance(pairable, (bool, np.bool_)) and bool(pairable)
        marks.append(f"from {row['beside']}" + ("" if paired else ", not paired"))
    ens = row.get("ensemble", 1)
    ens = f", softmax ensemble of {int(ens)} seeds" if ens and not pd.isna(ens) and int(ens) > 1 else ""
    flow = named_flow(row.get("flow", "farneback"))
    flow = f", {flow} flow" if flow else ""
    return f"{row['preset']} (ours, {row['profile']}{ens}{flow})" + (f" [{'; '.join(marks)}]" if marks else "")


def _score_columns() -> list[str]:
    names = []
    for prefix in ("", "bte_"):
        for g, _ in CDE_GROUPS:
            suffix = "" if g == "full" else f"_{g}"
            names += [f"{prefix}uf1{suffix}", f"{prefix}uar{suffix}"]
    return names


# configuration columns of a cell row and the MLflow params they come from
CONFIG_PARAMS = {"dim": "model.dim", "depth": "model.depth", "epochs": "recipe.epochs", "lr": "recipe.lr",
                 "batch_size": "recipe.batch_size", "hflip": "recipe.hflip", "schedule": "recipe.schedule",
                 "standardize": "recipe.standardize"}


def _trained_by_folds(client, exp_id: str, cell_id: str) -> dict:
    """The configuration columns of a searched cell as its folds trained them: one value, or the distinct
    values joined by ``/`` with ``(per group)`` when the search's groups chose differently."""
    runs = tracking.search_runs(client, exp_id, f"tags.`{tracking.TAG_KIND}` = 'fold' and "
                                                f"tags.`{tracking.TAG_CELL}` = '{cell_id}'")
    out = {}
    for col, param in CONFIG_PARAMS.items():
        values = sorted({r.data.params[param] for r in runs if param in r.data.params}, key=_num_or_text)
        if values:
            out[col] = values[0] if len(values) == 1 else "/".join(_short(v) for v in values) + " (per group)"
    return out


def _num_or_text(v: str):
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def _short(v: str) -> str:
    try:
        return f"{float(v):.3g}"
    except ValueError:
        return v


def collect(client, exp_id: str) -> pd.DataFrame:
    """One row per finished cell (per seed; the newest of a repeated setting and seed), with its honest
    scores (``uf1``, ``uar``, ``uf1_<group>``, ...), its best-test-epoch scores (``bte_uf1``, ...) and its
    configuration (``CONFIG_PARAMS``; for a cell of a search's choices, what its folds trained)."""
    rows = []
    for r in tracking.finished_cells(client, exp_id):
        t, m, p = r.data.tags, r.data.metrics, r.data.params
        if "uf1" not in m:
            continue
        tags = schema.decode_cell(t)
        row = dict({k: tags[k] for k in ("dataset", "protocol", "preset", "flow", "profile", "epoch_selection",
                                          "peeks_at_test", "demo", "folds", "partial")},
                   seed=tags["seed"] if tags["seed"] is not None else int(p.get("recipe.seed", 0)),
                   setting=tags["setting"],
                   wall_minutes=m.get("wall_seconds", float("nan")) / 60,
                   train_minutes=m.get("train_seconds_sum", float("nan")) / 60,
                   params_M=m.get("params_M"), macs_M=m.get("macs_M"), family=p.get("model.family", "epir"),
                   dim=p.get("model.dim"), depth=p.get("model.depth"), epochs=p.get("recipe.epochs"),
                   lr=p.get("recipe.lr"), batch_size=p.get("recipe.batch_size"), hflip=p.get("recipe.hflip"),
                   schedule=p.get("recipe.schedule", "constant"), standardize=p.get("recipe.standardize", "False"),
                   ensemble=int(p.get("recipe.ensemble", 1)), members_uf1_mean=m.get("members.uf1_mean", np.nan),
                   members_uf1_sd=m.get("members.uf1_sd", np.nan), members_uar_mean=m.get("members.uar_mean", np.nan),
                   commit=tags["commit"], run_id=r.info.run_id, cell_id=tags["cell_id"],
                   data_fingerprint=tags["data_fingerprint"],
                   end_time=pd.Timestamp(r.info.end_time, unit="ms"))
        for name in _score_columns():
            key = f"{PEEK}{name[4:]}" if name.startswith("bte_") else name
            row[name] = m.get(key, np.nan)
        if tags["provenance"]:  # a warning that tables print and no grouping reads (a column only where one has it)
            row["provenance"] = tags["provenance"]
        if tags["search"] is not None:  # the parent holds the search's base; each fold trained its group's choice
            row.update(_trained_by_folds(client, exp_id, row["cell_id"]))
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values("end_time", ascending=False).drop_duplicates(["setting", "seed"]).reset_index(drop=True)


def aggregate(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: the newest cell's description, the mean of every score over its seeds,
    ``uf1_sd`` / ``uar_sd`` / ``bte_uf1_sd`` (standard deviation over seeds, n - 1; NaN for one seed),
    ``n_seeds``, ``seeds``, ``gap_uf1`` / ``gap_uar`` (best-test-epoch minus honest), summed minutes; then
    the newest setting of each dataset / protocol / preset / profile / fold count."""
    out = []
    for _, g in cells.sort_values("end_time", ascending=False).groupby("setting", sort=False):
        row = g.iloc[0].to_dict()
        for name in _score_columns():
            row[name] = g[name].mean()
        for name in ("uf1", "uar", "bte_uf1", "bte_uar"):
            row[f"{name}_sd"] = g[name].std(ddof=1) if len(g) > 1 else np.nan
        row["members_uf1_mean"], row["members_uar_mean"] = g["members_uf1_mean"].mean(), g["members_uar_mean"].mean()
        row["gap_uf1"], row["gap_uar"] = row["bte_uf1"] - row["uf1"], row["bte_uar"] - row["uar"]
        row["n_seeds"], row["seeds"] = len(g), ",".join(str(s) for s in sorted(g["seed"]))
        row["wall_minutes"], row["train_minutes"] = g["wall_minutes"].sum(), g["train_minutes"].sum()
        out.append(row)
    df = pd.DataFrame(out)
    return df.sort_values("end_time", ascending=False).drop_duplicates(KEY).reset_index(drop=True)


def _fmt(mean, sd=np.nan) -> str:
    if mean is None or pd.isna(mean):
        return ""
    return f"{mean:.4f}" + ("" if pd.isna(sd) else f" ± {sd:.4f}")


def _md(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.4f}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    return head + "".join("| " + " | ".join(cell(v) for v in r) + " |\n" for r in df.itertuples(index=False))


def _order(df: pd.DataFrame) -> pd.DataFrame:
    names = list(reversed(LADDER)) + [p for p in PRESETS if p not in LADDER]  # epir first, as the paper lists it
    rank = {p: i for i, p in enumerate(names)}
    return df.assign(_r=df["preset"].map(rank)).sort_values(["dataset", "_r", "profile"]).drop(columns="_r")


def _notes(df: pd.DataFrame) -> str:
    lines = []
    if df["demo"].any():
        lines.append("**DEMO DATA**: synthetic motion on one photograph, not a micro-expression dataset; these numbers "
                     "only show that the pipeline runs end to end.")
    if df["peeks_at_test"].any():
        lines.append("**BEST-TEST-EPOCH rows peek at each fold's test subject** (HTNet's public code); they are not "
                     "honest LOSO scores and exist only to compare with published numbers.")
    if df["partial"].any():
        lines.append("**PARTIAL rows** evaluate only some LOSO folds; they are not the dataset's score.")
    lines.append("Scores: UF1 and UAR on predictions pooled over all folds of a cell (MEGC convention), each fold "
                 "predicting with its LAST epoch; `mean ± sd` over the row's seeds (sd with n - 1), one seed: the score.")
    if df["bte_uf1"].notna().any():
        lines.append("Columns marked **PEEKS** score the same trainings at the epoch each fold's TEST subject scored "
                     "best (HTNet's `main_HTNet.py`): not an honest result; `gap` = PEEKS minus honest, the inflation "
                     "that choice adds.")
    if (df["ensemble"] > 1).any():
        lines.append("A softmax ensemble row averages the probabilities of S models of different seeds in every fold; "
                     "`single members` scores each of those models alone (mean ± sd over the S seeds).")
    lines.append("Full provenance of every row: `runs.csv` (one line per seed) and the MLflow parent runs named below.")
    prov = pd.DataFrame({
        "row": [_label(r) for _, r in df.iterrows()], "dataset": df["dataset"], "protocol": df["protocol"],
        "seeds": df["seeds"], "width": df["dim"], "blocks": df["depth"], "epochs": df["epochs"], "lr": df["lr"],
        "batch": df["batch_size"], "lr schedule": df["schedule"], "mirroring": df["hflip"],
        "standardised": df["standardize"], "folds": df["folds"],
        "wall (min, all seeds)": df["wall_minutes"].round(1).astype(str),
        "training (min, all seeds)": df["train_minutes"].round(1).astype(str),
        "commit": df["commit"].str[:12], "newest MLflow run": df["run_id"]})
    return "\n".join(f"- {ln}" for ln in lines) + "\n\n### Runs behind these rows\n\n" + _md(prov)


class Predictions:
    """Reads (once) the pooled predictions of every seed of a table row, by setting id: an own row's from its
    MLflow parent runs, a row beside (:func:`read_beside`) from its kept files (:data:`KEPT`), whose true labels
    are this experiment's own for the same samples (a row beside with no own row of its dataset and protocol,
    or with a sample or class the own rows lack, cannot be paired)."""

    def __init__(self, client, exp_id: str, cells: pd.DataFrame, beside: pd.DataFrame | None = None):
        self.client, self.exp_id, self.cells, self._cache = client, exp_id, cells, {}
        self.beside = beside if beside is not None else pd.DataFrame(columns=["setting"])

    def of(self, setting: str) -> tuple[dict[int, pd.DataFrame], list[str]]:
        """seed -> predictions of the row's cells (class indices), and the class names; ``({}, [])`` for a
        row that cannot be read (then :func:`grid.compare.paired_difference` pairs nothing)."""
        if setting not in self._cache:
            self._cache[setting] = self._beside(setting) if setting.startswith("beside:") else self._own(setting)
        return self._cache[setting]

    def _own(self, setting: str) -> tuple[dict[int, pd.DataFrame], list[str]]:
        preds, classes = {}, []
        for _, c in self.cells[self.cells["setting"] == setting].iterrows():
            run = self.client.get_run(c["run_id"])
            preds[int(c["seed"])] = tracking.read_pooled_predictions(self.client, self.exp_id, run)
            classes = run.data.params.get("classes", "").split(",")
        return preds, classes

    def _truth(self, dataset: str, protocol: str) -> tuple[pd.Series, list[str]] | None:
        """(source dataset, subject, sample hash (:func:`sample_hash`)) -> true class index, from an own cell of
        the same dataset and protocol. A sample name alone is not unique: CASME II's EP02_01 is a sample of
        several subjects."""
        own = self.cells[(self.cells["dataset"] == dataset) & (self.cells["protocol"] == protocol)]
        if own.empty:
            return None
        preds, classes = self.of(own["setting"].iloc[0])
        first = next(iter(preds.values()))
        keys = pd.MultiIndex.from_arrays([first["group"], first["subject"], first["sample_id"].map(sample_hash)])
        return pd.Series(first["y_true"].to_numpy(), index=keys), classes

    def _beside(self, setting: str) -> tuple[dict[int, pd.DataFrame], list[str]]:
        rows = self.beside[self.beside["setting"] == setting]
        if rows.empty or not rows["pairable"].all():
            return {}, []
        truth = self._truth(rows["dataset"].iloc[0], rows["protocol"].iloc[0])
        if truth is None:
            return {}, []
        y_true, classes = truth
        index = {c: i for i, c in enumerate(classes)}
        preds = {}
        for _, r in rows.iterrows():
            df = pd.read_csv(r["predictions"], dtype=str, keep_default_na=False)
            keys = pd.MultiIndex.from_frame(df[["group", "subject", "sample_hash"]])
            if not keys.isin(y_true.index).all() or not set(df["y_pred"]) <= set(index):
                return {}, []
            df["y_true"] = y_true.loc[keys].to_numpy().astype(int)
            for col in ("y_pred", "y_pred_best_test_epoch"):
                df[col] = df[col].map(lambda v: index.get(v, -1)).astype(int)
            for col in [c for c in prob_columns(classes) if c in df]:
                df[col] = pd.to_numeric(df[col], errors="coerce")
            preds[int(r["seed"])] = df
        return preds, classes


def keep_predictions(preds: Predictions, cells: pd.DataFrame, out: Path) -> None:
    """Write every own cell's pooled predictions to ``out/predictions/<cell_id>.csv`` (:data:`KEPT_COLUMNS`:
    subject, :func:`sample_hash`, source dataset, predicted class names; then the honest probabilities
    ``prob_<class>`` where the cell kept them; no true labels and no sample names), the files
    :func:`read_beside` pairs with later."""
    folder = Path(out) / KEPT
    folder.mkdir(parents=True, exist_ok=True)
    for _, c in cells.iterrows():
        seeds, classes = preds.of(c["setting"])
        df = seeds[int(c["seed"])].copy()
        df["sample_hash"] = df["sample_id"].map(sample_hash)
        for col in ("y_pred", "y_pred_best_test_epoch"):
            df[col] = df[col].map(lambda i: classes[i] if 0 <= i < len(classes) else "")
        probs = [p for p in prob_columns(classes) if p in df and df[p].notna().all()]
        df[KEPT_COLUMNS + probs].to_csv(folder / f"{c['cell_id']}.csv", index=False, float_format="%.5f")


def compare(preds: Predictions, row_a, row_b, key: list[str] = PAIR_KEY) -> dict[str, Paired] | None:
    """Row A minus row B, paired (:mod:`grid.compare`), for UF1 and UAR; None when they cannot be paired
    (they differ in a column of ``key``, or in their subjects, seeds or samples)."""
    if any(row_a[k] != row_b[k] for k in key) or row_a["setting"] == row_b["setting"] or not same_data(row_a, row_b):
        return None
    a, classes = preds.of(row_a["setting"])
    b, classes_b = preds.of(row_b["setting"])
    if classes != classes_b:
        return None
    out = {m: paired_difference(a, b, len(classes), m) for m in METRICS}
    return None if any(v is None for v in out.values()) else out


def same_data(row_a, row_b) -> bool:
    """False when both rows name their data fingerprint (runs.csv's ``data_fingerprint``, cells of id version 3)
    and the two differ: they trained on different data, and their predictions cannot be paired. A row without
    one (written before fingerprints) is taken to be on the same data as its key says."""
    a, b = (r.get("data_fingerprint", "") for r in (row_a, row_b))
    a, b = ("" if pd.isna(v) else str(v) for v in (a, b))
    return not (a and b and a != b)


def named_flow(flow) -> str:
    """The flow as a table names it: ``""`` for a dataset's only, unnamed flow (:data:`UNNAMED_FLOWS`: a raw
    dataset's Farneback, a composite's published maps; older runs.csv files call the latter "farneback", so
    the two are one flow for labels and pairing), else the flow's name (e.g. ``tvl1``)."""
    return "" if pd.isna(flow) or flow in UNNAMED_FLOWS else str(flow)


def ladder_pairs(df: pd.DataFrame) -> list[tuple[int, str, int]]:
    """(row, "previous" | "baseline" | "reference" | "farneback", the row it is compared with) for every row of
    ``df`` (aggregated rows): each ladder rung against the rung before it (the nearest lower rung with a row) and
    against ``baseline``; a model outside the ladder (a peer, a user's model) against ``baseline`` and against
    :data:`REFERENCE` (``epir``), whatever their profiles (:data:`CROSS_KEY`); all of the same flow; and a row of
    another flow than Farneback against the same preset's Farneback row of the same raw dataset. Ladder rows are
    matched on :data:`PAIR_KEY`; where a preset has an own row and a row beside (:func:`read_beside`), the own row is the
    one compared with."""
    out = []
    if "beside" in df:  # own rows first, so that each match below takes the own row of a preset
        df = df.iloc[np.argsort(df["beside"].notna().to_numpy(), kind="stable")]
    for i, r in df.iterrows():
        alike = df[(df[PAIR_KEY] == r[PAIR_KEY]).all(axis=1)]
        if named_flow(r["flow"]):
            hit = alike[(alike["flow"] == "farneback") & (alike["preset"] == r["preset"])]
            if not hit.empty:
                out.append((i, "farneback", hit.index[0]))
        same = alike[alike["flow"].map(named_flow) == named_flow(r["flow"])]
        targets = []
        if r["preset"] in LADDER:  # the nearest lower rung that has a row (the one before, in a full ladder)
            lower = [p for p in LADDER[: LADDER.index(r["preset"])] if p in set(same["preset"])]
            if lower:
                targets.append(("previous", lower[-1]))
        else:  # another model: paired with the ladder's rows whatever their profile (its recipe is its own)
            across = df[(df[CROSS_KEY] == r[CROSS_KEY]).all(axis=1)]
            same = across[across["flow"].map(named_flow) == named_flow(r["flow"])]
            targets.append(("reference", REFERENCE))
        if r["preset"] != "baseline":
            targets.append(("baseline", "baseline"))
        for kind, preset in targets:
            hit = same[same["preset"] == preset]
            if not hit.empty:
                out.append((i, kind, hit.index[0]))
    return out


def asked_pairs(df: pd.DataFrame, asked: list[tuple[str, str]]) -> list[tuple[int, str, int]]:
    """``(row, "asked", row)`` for each pair of setting ids asked for (``report --pair A:B``; a row beside is
    found by its own experiment's setting id too, an own row first).

    Raises:
        ValueError: a setting id that no row of ``df`` has (the message lists the rows' ids).
    """
    out = []
    for pair in asked:
        idx = []
        for setting in pair:
            hit = df.index[df["setting"] == setting].tolist() + df.index[df["setting"] == f"beside:{setting}"].tolist()
            if not hit:
                have = "; ".join(f"{str(r['setting']).removeprefix('beside:')} = {r['preset']} ({r['profile']})"
                                 for _, r in df.iterrows())
                raise ValueError(f"--pair: no row has the setting id {setting!r} (runs.csv's 'setting' column); "
                                 f"the rows: {have}")
            idx.append(hit[0])
        out.append((idx[0], "asked", idx[1]))
    return out


def paired_table(preds: Predictions, cells: pd.DataFrame, df: pd.DataFrame,
                 asked: list[tuple[str, str]] = ()) -> pd.DataFrame:
    """The paired comparisons of the ladder's rows (:func:`ladder_pairs`; rows beside with kept predictions
    too) and of the pairs asked for (:func:`asked_pairs`: any two rows of one dataset, protocol, epoch
    selection and folds, e.g. two search designs, whose profiles differ), one line per pair and metric, each
    logged on the parent runs of the row compared, when it is an own row (``paired.vs_<kind>.<metric>_*``).

    Raises:
        ValueError: as :func:`asked_pairs`; or a pair asked for that cannot be paired (other subjects, seeds
            or samples, or no kept predictions).
    """
    lines, done = [], {}
    for i, kind, j in ladder_pairs(df) + asked_pairs(df, list(asked)):
        a, b = df.loc[i], df.loc[j]
        if kind == "asked":
            result = compare(preds, a, b, CROSS_KEY)
            if result is None:
                raise ValueError(f"--pair {str(a['setting']).removeprefix('beside:')}:"
                                 f"{str(b['setting']).removeprefix('beside:')}: {a['preset']} ({a['profile']}) and "
                                 f"{b['preset']} ({b['profile']}) cannot be paired: they need the same dataset, "
                                 "protocol, epoch selection, folds, subjects, samples and at least one seed, and "
                                 "a row beside needs its predictions/ files")
        else:
            key = PAIR_KEY if a["preset"] in LADDER else CROSS_KEY
            result = done[(i, j)] if (i, j) in done else compare(preds, a, b, key)  # "before" may be the baseline
        done[(i, j)] = result
        if result is None:
            continue
        flows = kind == "farneback"
        flows = flows or (kind == "asked" and a["flow"] != b["flow"])
        name = {k: r["preset"] + (f" [{r['flow']}]" if flows else "")
                + (f" ({r['profile']})" if kind == "asked" or a["preset"] not in LADDER else "")
                + (f" [from {r['beside']}]" if isinstance(r.get("beside"), str) else "") for k, r in (("a", a), ("b", b))}
        for m, p in result.items():
            lines.append({"dataset": a["dataset"], "protocol": a["protocol"], "row": name["a"], "vs": kind,
                          "against": name["b"], "metric": m.upper(), "difference": p.diff, "ci_low": p.ci_low,
                          "ci_high": p.ci_high, "excludes_zero": p.excludes_zero, "seeds_agree": p.agree,
                          "seed_pairs": len(p.seeds), "subjects": p.subjects, "setting": a["setting"]})
        run_ids = cells.loc[cells["setting"] == a["setting"], "run_id"].tolist()
        if run_ids:
            tracking.log_comparison(preds.client, run_ids, f"vs_{kind}", name["b"], result)
    return pd.DataFrame(lines, columns=PAIRED_COLUMNS)


def _paired_columns(pairs: pd.DataFrame, setting: str) -> dict:
    """Table 4's paired columns of one row: text for Markdown and numbers for CSV."""
    md, csv = {}, {}
    for kind, title in (("previous", "vs rung before"), ("baseline", "vs baseline"), ("reference", f"vs {REFERENCE}"),
                        ("farneback", "vs Farneback flow")):
        for m in ("UF1", "UAR"):
            hit = pairs[(pairs["setting"] == setting) & (pairs["vs"] == kind) & (pairs["metric"] == m)] \
                if not pairs.empty else pairs
            key = f"Δ{m} {title}"
            if hit.empty:
                md[f"{key} [95% CI]"] = ""
                csv.update({key: np.nan, f"{key} CI low": np.nan, f"{key} CI high": np.nan, f"{key} seeds agree": ""})
                continue
            h = hit.iloc[0]
            star = " *" if h["excludes_zero"] else ""
            md[f"{key} [95% CI]"] = (f"{h['difference']:+.4f} [{h['ci_low']:+.4f}, {h['ci_high']:+.4f}]{star} "
                                     f"({h['seeds_agree']}/{h['seed_pairs']})")
            csv.update({key: h["difference"], f"{key} CI low": h["ci_low"], f"{key} CI high": h["ci_high"],
                        f"{key} seeds agree": f"{h['seeds_agree']}/{h['seed_pairs']}"})
    return {"md": md, "csv": csv}


PAIRED_NOTE = ("Paired columns: the difference in Full UF1 / UAR from the rung before and from `baseline` (and, for "
               "a model outside the ladder, from `epir`, whatever the profiles; same folds, seeds and data), averaged over the seed pairs, with a 95 % percentile interval from a paired "
               "bootstrap over SUBJECTS (9,999 resamples of the subjects with replacement, the same resample for "
               "both rows; `scipy.stats.bootstrap`); `*` marks an interval that excludes 0; `(k/n)`: seed pairs "
               "whose difference has the same sign.")


def paired_lines(results: Path) -> list[str]:
    """One console line per paired comparison written by :func:`write_tables` (empty when none)."""
    path = Path(results) / f"{PAIRED}.csv"
    if not path.is_file():
        return []
    pairs = pd.read_csv(path).drop_duplicates(["dataset", "protocol", "row", "against", "metric"])
    return [f"{r['row']:>9} - {r['against']:<9} {r['metric']}: {r['difference']:+.4f} "
            f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]{' *' if r['excludes_zero'] else '  '} "
            f"{r['seeds_agree']}/{r['seed_pairs']} seeds agree  ({r['dataset']}/{r['protocol']})"
            for _, r in pairs.iterrows()]


def read_beside(path: Path, presets: list[str] | None = None) -> pd.DataFrame:
    """Rows of another experiment's ``runs.csv`` (one line per cell and seed, as :func:`write_tables` writes it) to
    show beside this experiment's rows: scored as they were, labelled with their folder. A row whose every
    seed's predictions were kept beside the file (``predictions/<cell_id>.csv``, :func:`keep_predictions`) is
    ``pairable``: it is paired like an own row, with this experiment's true labels for the same samples
    (:class:`Predictions`); any other row is labelled ``not paired``.

    Args:
        path: a ``results/<experiment>/runs.csv`` file.
        presets: keep only these presets (default: every row).

    Raises:
        ValueError: the file is missing or lacks a column the tables need, or a preset asked for has no row.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--beside: no runs.csv at {path}")
    rows = pd.read_csv(path)
    if "flow" not in rows:  # written before TV-L1: every computed flow was Farneback's
        rows["flow"] = "farneback"
    missing = [c for c in KEY + ["seed", "setting", "run_id", "uf1", "uar"] if c not in rows]
    if missing:
        raise ValueError(f"--beside: {path} lacks the column(s) {', '.join(missing)}; is it a runs.csv of results/?")
    if presets:
        absent = [p for p in presets if p not in set(rows["preset"])]
        if absent:
            raise ValueError(f"--beside: {path} has no row of preset(s) {', '.join(absent)} "
                             f"(it has {', '.join(sorted(set(rows['preset'])))})")
        rows = rows[rows["preset"].isin(presets)]
    kept = [path.parent / KEPT / f"{c}.csv" for c in rows.get("cell_id", pd.Series("", index=rows.index)).astype(str)]
    rows = rows.assign(predictions=[str(k) if k.is_file() else "" for k in kept])
    rows["pairable"] = rows.groupby("setting")["predictions"].transform(lambda v: bool(v.astype(bool).all()))
    return rows.assign(setting="beside:" + rows["setting"].astype(str), beside=path.parent.name,
                       end_time=pd.Timestamp(0))


def write_tables(client, exp_id: str, experiment: str, results_dir: Path, beside: list[pd.DataFrame] = (),
                 asked: list[tuple[str, str]] = ()) -> Path | None:
    """Write the tables of an experiment's finished cells; returns the folder, or None when none finished.

    ``beside``: rows of other experiments (:func:`read_beside`) added to the tables (not to ``runs.csv``), paired
    where their predictions were kept. Every own cell's predictions are kept in ``predictions/`` (no true labels).
    ``asked``: pairs of setting ids to compare too (:func:`paired_table`), in ``paired_comparisons``.

    Raises:
        ValueError: a pair asked for names no row or cannot be paired (raised before any file is written).
    """
    cells = collect(client, exp_id)
    if cells.empty:
        return None
    preds = Predictions(client, exp_id, cells, pd.concat(beside, ignore_index=True) if len(beside) else None)
    df = _order(pd.concat([aggregate(cells), *(aggregate(b) for b in beside)], ignore_index=True)).reset_index(drop=True)
    pairs = paired_table(preds, cells, df, asked)
    out = Path(results_dir) / experiment
    out.mkdir(parents=True, exist_ok=True)
    _order(cells).drop(columns=["end_time"]).to_csv(out / "runs.csv", index=False)
    keep_predictions(preds, cells, out)
    pairs.drop(columns=["setting"], errors="ignore").to_csv(out / f"{PAIRED}.csv", index=False)
    if not pairs.empty:
        (out / f"{PAIRED}.md").write_text(f"# {experiment}: paired comparisons\n\n" + PAIRED_NOTE + "\n\n"
                                          + _md(pairs.drop(columns=["setting"])))
    header = f"# {experiment}\n\n"
    cde, sde = df[df["protocol"] == "CDE"], df[df["protocol"] == "SDE"]
    if not cde.empty:
        _table1(cde, out, header)
        _table4(cde, pairs, out, header)
    if not sde.empty:
        _tables23(sde, out, header)
    return out


def _table1(cde: pd.DataFrame, out: Path, header: str) -> None:
    """``table1_cde``: CDE Full, SAMM, CASME II, SMIC (UF1, UAR), the published figures beside."""
    rows, csv_rows = [], []
    for _, r in cde.iterrows():
        row = {"dataset": r["dataset"], "method": _label(r), "seeds": r["seeds"]}
        csv = dict(row)
        for g, name in CDE_GROUPS:
            suffix = "" if g == "full" else f"_{g}"
            for k, label in (("uf1", "UF1"), ("uar", "UAR")):
                sd = r.get(f"{k}_sd") if g == "full" else np.nan
                row[f"{name} {label}"] = _fmt(r.get(f"{k}{suffix}"), sd)
                csv[f"{name} {label}"] = r.get(f"{k}{suffix}")
        for k, label in (("uf1", "UF1"), ("uar", "UAR")):
            row[f"Full {label} best test epoch (PEEKS)"] = _fmt(r.get(f"bte_{k}"), r.get(f"bte_{k}_sd"))
            csv[f"Full {label} sd"] = r.get(f"{k}_sd")
            csv[f"Full {label} best test epoch (PEEKS)"] = r.get(f"bte_{k}")
        rows.append(row)
        csv_rows.append(csv)
    for method, vals in published_cde().items():
        row = {"dataset": "MEGC2019 composite", "method": method, "seeds": ""}
        for g, name in CDE_GROUPS:
            row[f"{name} UF1"], row[f"{name} UAR"] = vals.get(g, (np.nan,) * 2)
        row["published: peeks at test"] = vals["peeks"]
        rows.append(row)
        csv_rows.append(dict(row))
    pd.DataFrame(csv_rows).to_csv(out / "table1_cde.csv", index=False)
    (out / "table1_cde.md").write_text(header + "## Table 1: composite dataset evaluation (CDE), UF1 / UAR\n\n"
                                      + _md(pd.DataFrame(rows).fillna("")) + "\n" + _notes(cde))


def _table4(cde: pd.DataFrame, pairs: pd.DataFrame, out: Path, header: str) -> None:
    """``table4_ablation``: the ladder and peers on CDE Full, with each row's paired differences."""
    t4, t4_csv = [], []
    for _, r in cde.iterrows():
        pub = PRESETS[r["preset"]].figure("CDE", "full") if r["preset"] in PRESETS else None
        paired = _paired_columns(pairs, r["setting"])
        t4.append({"dataset": r["dataset"], "preset": r["preset"], "method": _label(r), "seeds": r["seeds"],
                   "UF1": r["uf1"], "UF1 sd": r["uf1_sd"], "UAR": r["uar"], "UAR sd": r["uar_sd"],
                   "UF1 best test epoch (PEEKS)": r["bte_uf1"], "UAR best test epoch (PEEKS)": r["bte_uar"],
                   "gap UF1": r["gap_uf1"], "gap UAR": r["gap_uar"],
                   "single members UF1 (mean ± sd)": _fmt(r["members_uf1_mean"], r["members_uf1_sd"]),
                   "published UF1": pub.uf1 if pub else np.nan, "published UAR": pub.uar if pub else np.nan,
                   "params (M)": r["params_M"], "MACs (M)": r["macs_M"]})
        t4_csv.append({**t4[-1], **paired["csv"]})
        t4[-1].update(paired["md"])
    pd.DataFrame(t4_csv).to_csv(out / "table4_ablation.csv", index=False)
    md = pd.DataFrame(t4)
    md = md.drop(columns=[c for c in md.columns if c.startswith("Δ") and not md[c].astype(bool).any()])
    (out / "table4_ablation.md").write_text(
        header + "## Table 4: ablation ladder (and peers), CDE Full, UF1 / UAR\n\n"
        "`published`: the paper's Table 4 for the ladder (EPIR, arXiv 2604.08106), the source's own figure for "
        "a peer.\n\n" + _md(md) + "\n" + ("- " + PAIRED_NOTE + "\n" if not pairs.empty else "") + _notes(cde))


def _tables23(sde: pd.DataFrame, out: Path, header: str) -> None:
    """``table2_3_sde``: SDE per dataset, the paper's figures beside."""
    t2 = pd.DataFrame([{"dataset": r["dataset"], "method": _label(r), "seeds": r["seeds"],
                        "UF1": r["uf1"], "UF1 sd": r["uf1_sd"], "UAR": r["uar"], "UAR sd": r["uar_sd"],
                        "UF1 best test epoch (PEEKS)": r["bte_uf1"],
                        "single members UF1 (mean ± sd)": _fmt(r["members_uf1_mean"], r["members_uf1_sd"]),
                        "paper UF1": paper_sde(r["dataset"])[0], "paper UAR": paper_sde(r["dataset"])[1]}
                       for _, r in sde.iterrows()])
    t2.to_csv(out / "table2_3_sde.csv", index=False)
    (out / "table2_3_sde.md").write_text(header + "## Tables 2 and 3: single dataset evaluation (SDE), UF1 / UAR\n\n"
                                        + _md(t2) + "\n" + _notes(sde))
