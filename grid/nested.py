"""The strictly nested scoring of a search (pure: NumPy and the training library, no Ray, MLflow or Optuna):
the subjects dealt into validation groups, one training per unordered pair of groups {g, h} (on every other
group, predicting both), group g's inner validation score of a candidate pooled over the models that never saw g,
each group's choice and the candidate best on all groups (:mod:`grid.search` runs it on Ray)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from epir.metrics import uf1
from epir.presets import config_from_dict
from epir.train import TrainRecipe, fit_all, predict, to_model_input


@dataclass(frozen=True)
class SearchPlan:
    """What every trial of a search needs (the typed spec its Ray trainable receives).

    Attributes:
        model, recipe: the base model config dict and TrainRecipe fields the searched values go into.
        space: the searched fields.
        groups: subject -> validation group; k: the number of groups.
        cpus, gpus, threads: resources and torch threads of one training.
        model_modules: a user's model modules (``--model-file`` stems) the trial and its trainings import first.
    """

    model: dict
    recipe: dict
    space: tuple[str, ...]
    groups: dict[str, int]
    k: int
    cpus: float
    gpus: float
    threads: int
    model_modules: tuple[str, ...] = ()

    def pairs(self) -> list[tuple[tuple[int, int], list[str]]]:
        """Every unordered pair of groups {g, h} and the subjects it holds out."""
        return [((g, h), sorted(s for s, x in self.groups.items() if x in (g, h)))
                for g, h in itertools.combinations(range(self.k), 2)]


def validation_groups(subjects, strata, k: int, seed: int) -> dict[str, int]:
    """Deal the subjects into ``k`` validation groups: shuffled (seeded) within each stratum (source
    dataset), then dealt in turn over the groups, so each group holds a share of every stratum and the
    group sizes differ by at most one.

    Args:
        subjects: (N,) subject of each sample; strata: (N,) its stratum (e.g. source dataset).

    Returns:
        subject -> group index in 0..k-1.

    Raises:
        ValueError: fewer subjects than groups.
    """
    stratum = {}
    for s, g in zip(np.asarray(subjects).astype(str), np.asarray(strata).astype(str)):
        stratum.setdefault(s, g)
    if len(stratum) < k:
        raise ValueError(f"{len(stratum)} subjects cannot fill {k} validation groups (--val-groups)")
    rng = np.random.default_rng(seed)
    order = []
    for g in sorted(set(stratum.values())):
        members = sorted(s for s, t in stratum.items() if t == g)
        order += [members[i] for i in rng.permutation(len(members))]
    return {s: i % k for i, s in enumerate(order)}


def group_fold(flows: np.ndarray, labels: np.ndarray, subjects: np.ndarray, held: list[str], model: dict,
               recipe: dict) -> dict:
    """One validation training: fit on every subject not in ``held``, predict the ``held`` subjects.

    Args:
        flows, labels, subjects: (N, H, W, 3), (N,), (N,) of the whole dataset.
        held: the validation group's subjects.
        model, recipe: model config dict (:func:`epir.presets.config_to_dict`) and TrainRecipe fields.

    Returns:
        ``{"held", "subjects", "y_true", "y_pred", "train_seconds"}`` for the held samples.

    Raises:
        ValueError: no held or no training sample.
    """
    subjects = np.asarray([str(s) for s in subjects])
    is_held = np.isin(subjects, held)
    if not is_held.any() or is_held.all():
        raise ValueError(f"validation group {held} leaves no held or no training sample")
    rec = TrainRecipe(**recipe)
    config = config_from_dict(model)
    start = time.perf_counter()
    net, _ = fit_all(config, rec, flows[~is_held], labels[~is_held])  # an ensemble as train_fold makes it
    probs = predict(net, to_model_input(flows[is_held], config, rec.flow_range), rec.batch_size)
    return {"held": sorted(held), "subjects": subjects[is_held].tolist(), "y_true": labels[is_held].tolist(),
            "y_pred": probs.argmax(-1).tolist(), "train_seconds": time.perf_counter() - start}


def evaluate_candidate(plan: SearchPlan, train) -> list[dict]:
    """A candidate's nested evaluation: for every pair {g, h}, ``train(held)`` fits on every subject outside g
    and h and predicts them (:func:`group_fold`'s dict); each result gains ``pair`` = [g, h]."""
    return [{**fold, "pair": list(pair)} for (pair, _), fold in zip(plan.pairs(), train([h for _, h in plan.pairs()]))]


def inner_scores(folds: list[dict], groups: dict[str, int], k: int) -> dict[int, float]:
    """Each group g's inner validation UF1 of one candidate: the predictions of the subjects of every other
    group h, made by the model trained without {g, h}, pooled.

    Raises:
        ValueError: for folds of the earlier design (one held-out group, no ``pair``).
    """
    if any("pair" not in f for f in folds):
        raise ValueError("this trial was evaluated by the earlier design (models trained on the group they chose "
                         "for); start a new study (--study NAME)")
    out = {}
    for g in range(k):
        yt, yp = [], []
        for f in folds:
            if g not in f["pair"]:
                continue
            for s, a, b in zip(f["subjects"], f["y_true"], f["y_pred"]):
                if groups[s] != g:  # g's own subjects: never scored for g
                    yt.append(a)
                    yp.append(b)
        out[g] = uf1(yt, yp) if yt else 0.0
    return out


def choose(trials: list[dict], groups: dict[str, int], k: int) -> dict[int, dict]:
    """Each validation group's configuration: the candidate with the best inner validation score of the group
    (:func:`inner_scores`), so that no model behind it was trained on the group.

    Args:
        trials: completed trials, each ``{"number", "params", "folds"}`` with ``folds`` as
            :func:`evaluate_candidate` returns them (``invalid`` trials, without folds, are skipped).
        groups: subject -> group; k: number of groups.

    Returns:
        group -> ``{"trial", "params", "validation_uf1" (its inner score), "runner_up" (trial, score) or None,
        "subjects"}``. Ties go to the earlier trial.

    Raises:
        ValueError: no valid trial, or trials of the earlier design.
    """
    valid = [t for t in trials if t["folds"]]
    if not valid:
        raise ValueError("no valid trial to choose from")
    scores = {t["number"]: inner_scores(t["folds"], groups, k) for t in valid}
    out = {}
    for g in range(k):
        ranked = sorted(valid, key=lambda t: (scores[t["number"]][g], -t["number"]), reverse=True)
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        out[g] = {"trial": best["number"], "params": best["params"], "validation_uf1": scores[best["number"]][g],
                  "runner_up": (second["number"], scores[second["number"]][g]) if second else None,
                  "subjects": sorted(s for s, x in groups.items() if x == g)}
    return out


def best_on_all(trials: list[dict], groups: dict[str, int], k: int) -> tuple[dict, float]:
    """The candidate best on all groups (for NEW data): the best mean of the k inner validation scores; and that
    mean. Ties go to the earlier trial.

    Raises:
        ValueError: no valid trial.
    """
    valid = [t for t in trials if t["folds"]]
    if not valid:
        raise ValueError("no valid trial to choose from")
    mean = {t["number"]: float(np.mean(list(inner_scores(t["folds"], groups, k).values()))) for t in valid}
    best = max(valid, key=lambda t: (mean[t["number"]], -t["number"]))
    return best, mean[best["number"]]


