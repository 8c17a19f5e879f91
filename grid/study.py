"""The search's Optuna study (its database is the search's memory): the sampler that draws candidates without
looking at a score, the candidates an uninterrupted run would draw (replayed when a random-sampler study is
resumed), how many trials it completed, and a trial's params typed back from MLflow's text."""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from .space import Dist, SearchConfig


def planned_candidates(scfg: SearchConfig, n: int) -> list[dict]:
    """The first ``n`` candidates the search's sampler draws in an uninterrupted run: the same distributions as
    Ray Tune's ``OptunaSearch`` builds, asked of a fresh sampler of the same seed, one trial after another."""
    space = OptunaSearch.convert_search_space({k: v.tune() for k, v in scfg.space.items()})
    plan = optuna.create_study(sampler=sampler(scfg))
    out = []
    for _ in range(n):
        t = plan.ask(fixed_distributions=space)
        out.append(t.params)
        plan.tell(t, 0.0)
    return out


def replay_interrupted(study, scfg: SearchConfig, log=print) -> int:
    """A random-sampler study resumed after an interruption would draw its sampler's sequence again from the
    start (Optuna's ``RandomSampler`` keeps its generator in memory), repeating candidates; instead, the
    candidates an uninterrupted run would have drawn next are enqueued (``study.enqueue_trial``), so that a
    resumed search tries what the uninterrupted one would have. Returns how many were enqueued (0 for a new
    study, another sampler, or completed trials that do not follow the seeded sequence, which is said)."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    if scfg.sampler != "random" or not complete or waiting:
        return 0
    planned = planned_candidates(scfg, scfg.trials)
    if [t.params for t in sorted(complete, key=lambda t: t.number)] != planned[:len(complete)]:
        log("  the study's trials do not follow its sampler's seeded sequence: resuming draws anew")
        return 0
    for p in planned[len(complete):]:
        study.enqueue_trial(p)
    return len(planned) - len(complete)


def completed(s) -> int:
    """Trials the study has completed so far (0 for a new study)."""
    try:
        study = optuna.load_study(study_name=s.study, storage=optuna.storages.RDBStorage(s.storage_url))
    except KeyError:
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def sampler(scfg: SearchConfig):
    """The candidates' sampler: none of them looks at a score."""
    if scfg.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=scfg.seed, scramble=True, warn_independent_sampling=False)
    if scfg.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in scfg.space.items()}, seed=scfg.seed)
    return optuna.samplers.RandomSampler(seed=scfg.seed)


def typed(text: str, dist: Dist):
    """An MLflow param (text) back to the value the trial used."""
    if dist.kind == "int":
        return int(text)
    if dist.kind in ("uniform", "loguniform"):
        return float(text)
    for c in dist.choices:
        if str(c) == text:
            return c
    return text
