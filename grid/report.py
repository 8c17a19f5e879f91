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

from pathlib import Path

import numpy as np
import pandas as pd

from epir.presets import LADDER, PRESETS
from epir.registry import UNIMPLEMENTED

from . import schema, tracking
from .kept import Predictions, keep_predictions
from .pairing import KEY, PAIRED, PAIRED_NOTE, REFERENCE, _paired_columns, named_flow, paired_table


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


# a dataset of the grid -> the dataset name of published figures (epir.registry.Published.dataset): the composite is
# the paper's Full CDE set, its SMIC-HS part the paper's SMIC SDE set (same samples and 3 classes); its CASME II and
# SAMM parts keep the composite's 3 classes, so they are NOT the paper's 5-class SDE rows and map to nothing
PUBLISHED_DATASET = {"megc2019": "full", "megc2019-smic": "smic", "megc2019-casme2": "", "megc2019-samm": ""}


def paper_sde(dataset: str) -> tuple[float, float]:
    """EPIR's published SDE figure (Tables 2-3) on ``dataset`` (:data:`PUBLISHED_DATASET`), from the registry; NaNs
    where it has none."""
    f = PRESETS[REFERENCE].figure("SDE", PUBLISHED_DATASET.get(dataset, dataset))
    return (f.uf1, f.uar) if f else (np.nan, np.nan)


CDE_GROUPS = [("full", "Full"), ("samm", "SAMM"), ("casme2", "CASME II"), ("smic", "SMIC")]
PEEK = tracking.PEEK
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
CONFIG_PARAMS = {k: schema.param(schema.MODEL if k in ("dim", "depth") else schema.RECIPE, k)
                 for k in ("dim", "depth", "epochs", "lr", "batch_size", "hflip", "schedule", "standardize")}


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
        if schema.UF1 not in m:
            continue
        tags, run = schema.decode_cell(t), schema.decode_cell_run(p, m)
        row = dict({k: tags[k] for k in ("dataset", "protocol", "preset", "flow", "profile", "epoch_selection",
                                          "peeks_at_test", "demo", "folds", "partial")},
                   seed=tags["seed"] if tags["seed"] is not None else run["recipe_seed"],
                   setting=tags["setting"],
                   **{k: v for k, v in run.items() if k != "recipe_seed"},
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


def write_tables(client, exp_id: str, experiment: str, results_dir: Path, beside: list[pd.DataFrame] = (),
                 asked: list[tuple[str, str]] = (), labels: dict | None = None) -> Path | None:
    """Write the tables of an experiment's finished cells; returns the folder, or None when none finished.

    ``beside``: rows of other experiments (:func:`grid.kept.read_beside`) added to the tables (not to ``runs.csv``), paired
    where their predictions were kept. Every own cell's predictions are kept in ``predictions/`` (no true labels).
    ``asked``: pairs of setting ids to compare too (:func:`paired_table`), in ``paired_comparisons``.
    ``labels``: the true labels of datasets (:func:`grid.kept.labels_of`) for rows beside of a dataset and protocol
    that has no own cell here.

    Raises:
        ValueError: a pair asked for names no row or cannot be paired (raised before any file is written).
    """
    cells = collect(client, exp_id)
    if cells.empty:
        return None
    preds = Predictions(client, exp_id, cells, pd.concat(beside, ignore_index=True) if len(beside) else None, labels)
    df = _order(pd.concat([aggregate(cells), *(aggregate(b) for b in beside)], ignore_index=True)).reset_index(drop=True)
    pairs = paired_table(preds, cells, df, asked,
                         on_pair=lambda ids, name, against, res: tracking.log_comparison(client, ids, name, against, res))
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
