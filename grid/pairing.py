"""Which table rows are compared and how (pure: pandas and the paired bootstrap of :mod:`grid.compare`, no MLflow):
the pairing rules (a ladder rung against the rung before and ``baseline``; another model against ``baseline`` and
``epir`` whatever their profiles; another flow against Farneback; pairs asked for), the paired table, and Table 4's
paired columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from epir.presets import LADDER

from .compare import METRICS, Paired, paired_difference
from .data import UNNAMED_FLOWS

REFERENCE = "epir"  # the row every other model's row is also compared with, paired (when it has one)
# what makes a table row: one setting of a dataset under a protocol, pooled over its seeds
KEY = ["dataset", "protocol", "flow", "preset", "profile", "epoch_selection", "folds", "demo"]


def named_flow(flow) -> str:
    """The flow as a table names it: ``""`` for a dataset's only, unnamed flow (:data:`UNNAMED_FLOWS`: a raw
    dataset's Farneback, a composite's published maps; older runs.csv files call the latter "farneback", so
    the two are one flow for labels and pairing), else the flow's name (e.g. ``tvl1``)."""
    return "" if pd.isna(flow) or flow in UNNAMED_FLOWS else str(flow)


# rows that may be paired share these (and then their subjects and seeds, checked on the predictions); a
# ladder's rungs share their flow too, and two flows of one raw dataset are compared rung by rung
PAIR_KEY = ["dataset", "protocol", "profile", "epoch_selection", "folds", "demo"]
# another model than the ladder's (a peer, a user's model) pairs with the ladder's rows of any profile
CROSS_KEY = [k for k in PAIR_KEY if k != "profile"]
PAIRED = "paired_comparisons"  # paired_comparisons.csv / .md in results/<experiment>/
PAIRED_COLUMNS = ["dataset", "protocol", "row", "vs", "against", "metric", "difference", "ci_low", "ci_high",
                  "excludes_zero", "seeds_agree", "seed_pairs", "subjects", "setting"]
def compare(preds, row_a, row_b, key: list[str] = PAIR_KEY) -> dict[str, Paired] | None:
    """Row A minus row B, paired (:mod:`grid.compare`), for UF1 and UAR, from their predictions (``preds``:
    :class:`grid.kept.Predictions`); None when they cannot be paired
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


def paired_table(preds, cells: pd.DataFrame, df: pd.DataFrame, asked: list[tuple[str, str]] = (),
                 on_pair=None) -> pd.DataFrame:
    """The paired comparisons of the ladder's rows (:func:`ladder_pairs`; rows beside with kept predictions
    too) and of the pairs asked for (:func:`asked_pairs`: any two rows of one dataset, protocol, epoch
    selection and folds, e.g. two search designs, whose profiles differ), one line per pair and metric.
    ``on_pair(run_ids, name, against, result)`` receives each pair whose row is an own row (its cells' parent runs),
    for the caller to log (:func:`grid.tracking.log_comparison`: ``paired.vs_<kind>.<metric>_*``).

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
        if run_ids and on_pair:
            on_pair(run_ids, f"vs_{kind}", name["b"], result)
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


