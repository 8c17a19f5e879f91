"""The floor a model must beat: logistic regression on the raw flow pixels of the REAL MEGC2019 composite.

Each leave-one-subject-out fold standardises the 28 x 28 x 3 flow pixels (u, v, optical strain) with the
training subjects' statistics and fits scikit-learn's ``LogisticRegression``. Its inverse regularisation
C is fixed (``--C``, default 1.0, scikit-learn's default) or, with ``--inner-cv``, chosen per fold by a
5-fold group split of the training subjects only (slow: 20 fits per fold). Either way the test subject
never takes part in any choice. Prints UF1 / UAR on the predictions
pooled over all folds (MEGC convention), per source dataset, and on the K largest subjects' folds (the
folds ``benchmarks/loso_profile.py`` uses by default).

    uv run python benchmarks/pixel_logreg.py                 # scikit-learn's default C = 1.0
    uv run python benchmarks/pixel_logreg.py --inner-cv      # C chosen on the training subjects of every fold
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epir.metrics import score, uar, uf1
from preprocess.megc2019 import load_composite

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "megc2019_composite"
CS = [1e-3, 1e-2, 1e-1, 1.0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MEGC2019 composite root")
    p.add_argument("--C", type=float, default=1.0, help="fixed inverse regularisation (default 1.0)")
    p.add_argument("--inner-cv", action="store_true",
                   help=f"choose C from {CS} in every fold by a 5-fold group split of its training subjects")
    p.add_argument("--largest", type=int, default=6, help="also report the K largest subjects' folds (default 6)")
    args = p.parse_args(argv)
    if not (args.data / "combined_3class_gt.csv").is_file():
        print(f"real MEGC2019 composite absent: {args.data}", file=sys.stderr)
        return 2
    df, flows = load_composite(args.data)
    x = flows.reshape(len(flows), -1)
    y = df["label"].to_numpy()
    subjects = df["subject"].astype(str).to_numpy()
    order = df["subject"].astype(str).value_counts().index.tolist()
    pred = np.empty_like(y)
    chosen = []
    start = time.perf_counter()
    for i, s in enumerate(order, 1):
        test = subjects == s
        if args.inner_cv:
            inner = list(GroupKFold(n_splits=5).split(x[~test], y[~test], subjects[~test]))
            clf = LogisticRegressionCV(Cs=CS, cv=inner, scoring="f1_macro", max_iter=2000)
        else:
            clf = LogisticRegression(C=args.C, max_iter=2000)
        model = make_pipeline(StandardScaler(), clf).fit(x[~test], y[~test])
        pred[test] = model.predict(x[test])
        if args.inner_cv:
            chosen.append(float(clf.C_[0]))
        print(f"\r  fold {i}/{len(order)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    what = f"C = {args.C}" if not args.inner_cv else (
        "C per fold from the training subjects: " + ", ".join(f"{c:g} x{chosen.count(c)}" for c in sorted(set(chosen))))
    print(f"logistic regression on raw flow pixels, {len(order)} LOSO folds, {what}; {time.perf_counter() - start:.0f} s")
    scores = score(y, pred, int(y.max()) + 1, df["dataset"].to_numpy())
    for name in ["all", *sorted(k for k in scores if k != "all")]:
        s = scores[name]
        print(f"  {'Full' if name == 'all' else name} ({s['n']} samples): UF1 {s['uf1']:.4f}  UAR {s['uar']:.4f}")
    m = np.isin(subjects, order[: args.largest])
    print(f"  {args.largest} largest subjects ({m.sum()} samples): UF1 {uf1(y[m], pred[m]):.4f}  UAR {uar(y[m], pred[m]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
