"""The honest MER leaderboard (``results/<experiment>/leaderboard.md`` and ``.csv``, ``report --leaderboard``):
one row per model and protocol, every row paired with ``epir`` on the same subjects and seeds, plus one row fixed
before any run was made: the ENSEMBLE.

The ensemble row (fixed in advance, commit of this docstring): for each seed k and each sample, the mean of the
honest (last-epoch) softmax probabilities that the CPU-trained leaderboard models' seed-k cells gave it
(:data:`ENSEMBLE_MEMBERS` that ran on that protocol, each with equal weight), and its predicted class is the
arg-max. It is scored and paired like any other row: the same subjects, the same seeds.

(A row whose predictions were kept before they held probabilities cannot take part; the row's note names the
members that did.)

Pure: it reads rows (:func:`grid.report.aggregate`) and predictions (:class:`grid.kept.Predictions`), and
writes files; MLflow is reached only through those.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from epir.metrics import score
from epir.registry import PRESETS

from .compare import METRICS, paired_difference
from .kept import Predictions, sample_hash
from .pairing import CROSS_KEY, REFERENCE, compare
from .predictions import prob_columns
from .report import PEEKS_TEXT, PUBLISHED_DATASET, _fmt, _md, aggregate, collect

# the CPU-trained models whose probabilities the ensemble averages (those with cells on a protocol take part)
ENSEMBLE_MEMBERS = ("epir", "baseline", "sssnet", "ststnet", "rcn-a")
ENSEMBLE = "ensemble"  # the row's name
# models whose published recipe exceeds the CPU budget: their rows wait for a GPU (issue "On a GPU", #33)
WAITING = {"offapexnet": "3000 epochs a fold: waits for a GPU", "htnet": "140 M parameters, 800 epochs: waits for a GPU"}
COLUMNS = ["dataset", "protocol", "model", "seeds", "UF1", "UAR", "ΔUF1 vs epir [95% CI] (seeds)",
           "ΔUAR vs epir [95% CI] (seeds)", "PEEKS UF1", "PEEKS inflation (UF1)", "published UF1 / UAR",
           "published peeks", "params (M)", "MACs (M)", "training min per cell", "note"]


def _published(preset: str, dataset: str, protocol: str) -> tuple[str, str]:
    """(``UF1 / UAR``, peeks text) of a preset's published figure on this dataset and protocol, or ("", "")."""
    p = PRESETS.get(preset)
    f = p.figure(protocol, PUBLISHED_DATASET.get(dataset, dataset)) if p else None
    if f is None:
        return "", ""
    return f"{f.uf1:.4f} / " + ("-" if f.uar is None else f"{f.uar:.4f}"), PEEKS_TEXT[f.peeks]


def _diff(p) -> str:
    return "" if p is None else f"{p.diff:+.4f} [{p.ci_low:+.4f}, {p.ci_high:+.4f}]{' *' if p.excludes_zero else ''} " \
                               f"({p.agree}/{len(p.seeds)})"


def _recipe_note(r) -> str:
    """For a peer's row trained on another recipe than the one it registers now (its own published recipe): which
    fields differ, e.g. ``trained with schedule=step (registered: constant)``; else empty."""
    p = PRESETS.get(r["preset"])
    if p is None or p.profiled:
        return ""
    want = {"schedule": "constant", **{k: v for k, v in p.recipe.items() if k in ("epochs", "lr", "batch_size", "schedule")}}
    diff = [f"{k}={r[k]} (registered: {v})" for k, v in want.items()
            if k in r and not pd.isna(r[k]) and str(r[k]) != str(v)]
    return f"trained with {', '.join(diff)}; " if diff else ""


def _row(r, ref, preds) -> dict:
    """One model's leaderboard row: its scores over seeds and its paired difference from ``ref`` (epir's row)."""
    paired = compare(preds, r, ref, CROSS_KEY) if ref is not None and r["setting"] != ref["setting"] else None
    pub, peeks = _published(r["preset"], r["dataset"], r["protocol"])
    n = int(r["n_seeds"])
    return {"dataset": r["dataset"], "protocol": r["protocol"], "model": r["preset"], "seeds": r["seeds"],
            "UF1": _fmt(r["uf1"], r["uf1_sd"]), "UAR": _fmt(r["uar"], r["uar_sd"]),
            "ΔUF1 vs epir [95% CI] (seeds)": _diff(paired and paired["uf1"]),
            "ΔUAR vs epir [95% CI] (seeds)": _diff(paired and paired["uar"]),
            "PEEKS UF1": _fmt(r["bte_uf1"]), "PEEKS inflation (UF1)": _fmt(r["bte_uf1"] - r["uf1"]),
            "published UF1 / UAR": pub, "published peeks": peeks,
            "params (M)": _fmt(r.get("params_M")), "MACs (M)": _fmt(r.get("macs_M")),
            "training min per cell": f"{r['train_minutes'] / n:.1f}" if n else "",
            "note": (_recipe_note(r)
                     + ("" if r.get("beside", "") in ("", None) or pd.isna(r.get("beside")) else f"from {r['beside']}; ")
                     + ("" if paired or r["preset"] == REFERENCE else "not paired")).strip().rstrip(";")}


def ensemble_predictions(members: list[dict[int, pd.DataFrame]], classes: list[str]) -> dict[int, pd.DataFrame]:
    """Seed -> the ensemble's pooled predictions: the mean of the members' honest probabilities per sample
    (matched by source dataset, subject and sample), arg-max. Only seeds every member ran, with probabilities.

    Args:
        members: per member, seed -> its pooled predictions (``subject``, ``group``, ``y_true``, ``sample_id`` or
            ``sample_hash``, ``prob_<class>``).

    Raises:
        ValueError: members that do not score the same samples.
    """
    cols = prob_columns(classes)
    seeds = sorted(set.intersection(*(set(m) for m in members))) if members else []
    out = {}
    for s in seeds:
        frames = [m[s] for m in members]
        if not all(set(cols) <= set(f) and f[cols].notna().all().all() for f in frames):
            continue
        keyed = [f.assign(sample_hash=f["sample_id"].map(sample_hash) if "sample_id" in f else f["sample_hash"])
                 .set_index(["group", "subject", "sample_hash"]).sort_index() for f in frames]
        if any(not k.index.equals(keyed[0].index) for k in keyed):
            raise ValueError(f"ensemble seed {s}: its members do not score the same samples")
        probs = np.mean([k[cols].to_numpy(float) for k in keyed], axis=0)  # (N, C)
        first = keyed[0].reset_index()
        out[s] = pd.DataFrame({"subject": first["subject"], "group": first["group"], "sample_hash": first["sample_hash"],
                               "y_true": first["y_true"],
                               "y_pred": probs.argmax(1), "y_pred_best_test_epoch": -1})
    return out


def _ensemble_row(g: pd.DataFrame, ref, preds) -> dict | None:
    """The ensemble's row of one dataset and protocol, or None with fewer than two members."""
    members = g[g["preset"].isin(ENSEMBLE_MEMBERS)]
    if members.empty:
        return None
    classes = preds.of(members["setting"].iloc[0])[1]
    cols = prob_columns(classes)
    with_probs = [s for s in members["setting"]  # a row kept before probabilities were cannot take part
                  if preds.of(s)[0] and all(set(cols) <= set(d) and d[cols].notna().all().all() for d in preds.of(s)[0].values())]
    members = members[members["setting"].isin(with_probs)]
    if len(members) < 2:
        return None
    ens = ensemble_predictions([preds.of(s)[0] for s in members["setting"]], classes)
    if not ens:
        return None
    scores = [score(d["y_true"].to_numpy(), d["y_pred"].to_numpy(), len(classes))["all"] for d in ens.values()]
    paired = {m: paired_difference(ens, preds.of(ref["setting"])[0], len(classes), m) for m in METRICS} \
        if ref is not None else {m: None for m in METRICS}
    uf1, uar = [np.array([s[m] for s in scores]) for m in METRICS]
    return {"dataset": g["dataset"].iloc[0], "protocol": g["protocol"].iloc[0], "model": ENSEMBLE,
            "seeds": ",".join(str(s) for s in ens), "UF1": _fmt(uf1.mean(), uf1.std(ddof=1) if len(uf1) > 1 else np.nan),
            "UAR": _fmt(uar.mean(), uar.std(ddof=1) if len(uar) > 1 else np.nan),
            "ΔUF1 vs epir [95% CI] (seeds)": _diff(paired["uf1"]), "ΔUAR vs epir [95% CI] (seeds)": _diff(paired["uar"]),
            "note": "softmax mean of " + ", ".join(members["preset"]) + " (fixed before any run)"}


def leaderboard(df: pd.DataFrame, preds) -> pd.DataFrame:
    """The leaderboard of aggregated rows (:func:`grid.report.aggregate`, own and beside), honest rows only: per
    dataset and protocol, ``epir`` first, the models by honest UF1, the ensemble, then the models waiting for a
    GPU (:data:`WAITING`) with their cells marked as not run."""
    rows = []
    honest = df[df["epoch_selection"] == "last"]
    for (dataset, protocol), g in honest.groupby(["dataset", "protocol"], sort=True):
        g = g.drop_duplicates("preset")  # the newest setting of each model (aggregate's order)
        refs = g[g["preset"] == REFERENCE]
        ref = refs.iloc[0] if len(refs) else None
        order = sorted(g.to_dict("records"), key=lambda r: (r["preset"] != REFERENCE, -r["uf1"]))
        rows += [_row(r, ref, preds) for r in order]
        ens = _ensemble_row(g, ref, preds)
        rows += [ens] if ens else []
        for preset, why in WAITING.items():
            if preset not in set(g["preset"]):
                pub, peeks = _published(preset, dataset, protocol)
                rows.append({"dataset": dataset, "protocol": protocol, "model": preset, "seeds": "not run",
                             "published UF1 / UAR": pub, "published peeks": peeks, "note": why})
    return pd.DataFrame(rows, columns=COLUMNS).fillna("")


NOTE = ("Honest scores: each fold predicts with its LAST epoch; UF1 / UAR pooled over the folds, mean ± sd over the "
        "seeds. `ΔUF1 vs epir`: the row minus `epir`'s, paired seed by seed, 95 % subject-bootstrap interval, `*` "
        "when it excludes 0, (k/n) seed pairs of the same sign. PEEKS UF1: the same trainings scored at the epoch "
        "each test subject liked best (not a result: the inflation it measures is what a best-test-epoch paper "
        "adds). `published peeks`: whether the source chose epochs or settings on its test subjects. Training "
        "minutes: the sum of a cell's fold trainings on the 2-core CPU machine, per cell.")


def write_leaderboard(df: pd.DataFrame, preds, out: Path, experiment: str) -> pd.DataFrame:
    """``out/leaderboard.csv`` and ``.md`` (:func:`leaderboard`); returns the table."""
    table = leaderboard(df, preds)
    table.to_csv(Path(out) / "leaderboard.csv", index=False)
    (Path(out) / "leaderboard.md").write_text(f"# {experiment}: the honest leaderboard\n\n{NOTE}\n\n" + _md(table))
    return table


def report_leaderboard(client, exp_id: str, experiment: str, results_dir: Path, beside: list[pd.DataFrame] = (),
                       labels: dict | None = None) -> Path | None:
    """``report --leaderboard``: the leaderboard of an experiment's finished cells and the rows beside it
    (:func:`grid.kept.read_beside`; ``labels`` as :func:`grid.report.write_tables`), written to
    ``results_dir/experiment/``; None when no cell finished."""
    cells = collect(client, exp_id)
    if cells.empty:
        return None
    preds = Predictions(client, exp_id, cells, pd.concat(beside, ignore_index=True) if len(beside) else None, labels)
    df = pd.concat([aggregate(cells), *(aggregate(b) for b in beside)], ignore_index=True)
    out = Path(results_dir) / experiment
    out.mkdir(parents=True, exist_ok=True)
    write_leaderboard(df, preds, out, experiment)
    return out
