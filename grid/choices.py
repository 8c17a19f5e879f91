"""A search's result files: ``<study>.choices.json`` (each validation group's choice with its complete resolved
model and recipe, which a ``--choices`` run replays exactly, :func:`grid.cells.fold_settings`) and
``<study>.best.json`` (the candidate best on all groups, for new data)."""

from __future__ import annotations

import json
from pathlib import Path

from epir.presets import family_fields

from . import tracking
from .cells import split_params

CHOICES_FORMAT = 2  # choices files that hold each group's resolved model and recipe (replayed exactly)


def resolved_choice(s, params: dict) -> dict:
    """What a group's choice trains, complete: the model config dict and TrainRecipe fields (a replay trains
    exactly these, whatever the profiles say later), and which of the model's fields the search set."""
    model, recipe = split_params(params, s.plan.model, s.plan.recipe)
    return {"model": model, "recipe": {k: v for k, v in recipe.items() if k != "seed"},
            "searched_model_fields": sorted(set(params) & family_fields(model["family"]))}


def write_choices(s, trials: list[dict], choices: dict, overall: dict, value: float) -> tuple[Path, Path]:
    """``<study>.choices.json`` (each group's resolved choice, the commit) and ``<study>.best.json``."""
    out = s.cfg.results_dir / s.cfg.experiment
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": CHOICES_FORMAT, "study": s.study, "optuna_storage": s.storage_url,
            "trials_completed": len(trials), "dataset": s.data.key, "shards": s.data.config_id, "preset": s.preset,
            "profile": s.label, "base": s.cfg.overrides, "sampler": s.scfg.sampler, "design": "nested pairs",
            "space": {k: v.describe() for k, v in s.scfg.space.items()}, "val_groups": s.scfg.groups,
            "seed": s.scfg.seed, "commit": tracking.git_commit()}
    groups = {str(g): {**c, **resolved_choice(s, c["params"])} for g, c in choices.items()}
    choices_path = out / f"{s.study}.choices.json"
    choices_path.write_text(json.dumps({
        **meta, "groups": groups, "subjects": s.plan.groups,
        "note": "each group's configuration maximises its inner validation UF1: the other groups' subjects, each "
                "predicted by a model trained without that group and this one. No model behind a test subject's "
                "choice saw its labels. 'model' and 'recipe' are what a --choices run trains."}, indent=2))
    best_path = out / f"{s.study}.best.json"
    best_path.write_text(json.dumps({
        **meta, "overrides": {**s.cfg.overrides, **overall["params"]}, "validation_uf1": value,
        **resolved_choice(s, overall["params"]),
        "note": "best mean inner validation UF1 over ALL groups: for NEW data; on this dataset every subject's "
                "labels took part in this choice (evaluate it here with --choices on the .choices.json instead)"},
        indent=2))
    return choices_path, best_path


