"""A search's space and settings (pure: no Ray, MLflow or Optuna at import): the ``FIELD=DIST`` syntax
(``uniform:LO:HI``, ``loguniform:LO:HI``, ``int:LO:HI``, ``choice:A,B,...``), the default space (EPIR's
contrastive margin alpha, eq. 23; the initial ITALS temperature, eqs. 10-16; the merge count K, eqs. 5-9), the
check of a space against a preset's fields, and :class:`SearchConfig`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from epir.presets import family_fields
from epir.train import TrainRecipe

from .config import SAMPLERS, Sampler

KINDS = ("uniform", "loguniform", "int", "choice")
@dataclass(frozen=True)
class Dist:
    """One searched field: ``uniform`` / ``loguniform`` floats or ``int`` in [low, high], or ``choice``."""

    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"distribution must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices:
                raise ValueError("a choice needs at least one value")
        elif self.low is None or self.high is None or self.low > self.high or (self.kind == "loguniform" and self.low <= 0):
            raise ValueError(f"{self.kind} needs low <= high (and low > 0 for loguniform), got {self.low}, {self.high}")

    def tune(self):
        """The Ray Tune search-space object (OptunaSearch converts it to an Optuna distribution)."""
        from ray import tune  # only the search's Ray run asks for it

        if self.kind == "choice":
            return tune.choice(list(self.choices))
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(self.low, self.high)

    def describe(self) -> str:
        """``kind:low:high`` or ``choice:a,b``: the form ``--space`` takes."""
        if self.kind == "choice":
            return "choice:" + ",".join(json.dumps(c) if not isinstance(c, str) else c for c in self.choices)
        return f"{self.kind}:{self.low:g}:{self.high:g}"


def parse_dist(text: str) -> Dist:
    """``uniform:LO:HI``, ``loguniform:LO:HI``, ``int:LO:HI`` or ``choice:A,B,...`` -> :class:`Dist`.
    Choice values are read as JSON where they parse (``true``, ``3``, ``0.1``), else kept as text.

    Raises:
        ValueError: for a malformed text.
    """
    kind, _, rest = text.partition(":")
    if kind == "choice":
        values = []
        for v in rest.split(","):
            try:
                values.append(json.loads(v))
            except json.JSONDecodeError:
                values.append(v)
        return Dist("choice", choices=tuple(values))
    lo, _, hi = rest.partition(":")
    try:
        return Dist(kind, float(lo), float(hi))
    except ValueError as e:
        raise ValueError(f"search space {text!r}: expected {'|'.join(KINDS[:3])}:LOW:HIGH or choice:A,B ({e})") from None


DEFAULT_SPACE = {"alpha": Dist("uniform", 0.0, 0.8), "temperature": Dist("loguniform", 1.0, 16.0),
                 "merge_k": Dist("int", 0, 2)}


def parse_space(items: list[str] | dict | None) -> dict[str, Dist]:
    """``["FIELD=DIST", ...]`` or ``{FIELD: DIST}`` (TOML) -> ``{field: Dist}``; empty -> ``DEFAULT_SPACE``.

    Raises:
        ValueError: for a malformed item.
    """
    if not items:
        return dict(DEFAULT_SPACE)
    pairs = items.items() if isinstance(items, dict) else [i.partition("=")[::2] for i in items]
    out = {}
    for k, v in pairs:
        if not k or not v:
            raise ValueError(f"search space item {k}={v}: expected FIELD=DIST")
        out[k.strip()] = v if isinstance(v, Dist) else parse_dist(str(v).strip())
    return out


@dataclass
class SearchConfig:
    """What a search runs (see the module docstring). ``trials`` is the study's target size."""

    trials: int = 20
    space: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))
    groups: int = 5
    sampler: Sampler = "random"
    fold_parallel: int = 0
    concurrent_trials: int = 1
    study: str | None = None
    storage: str | None = None
    seed: int = 0
    evaluate: bool = True
    final_model: bool = True

    def __post_init__(self):
        if self.trials < 1 or self.groups < 3 or self.fold_parallel < 0 or self.concurrent_trials < 1:
            raise ValueError("trials >= 1, groups >= 3 (nesting holds out two groups at once), fold_parallel >= 0, "
                             "concurrent_trials >= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "grid" and any(d.kind != "choice" for d in self.space.values()):
            raise ValueError("the grid sampler needs every searched field as choice:A,B,...")


def check_space(space: dict, model: dict) -> None:
    """Refuse a searched field that neither TrainRecipe nor the preset's model family has, or the seed.

    Raises:
        ValueError: naming the fields.
    """
    known = set(TrainRecipe.__dataclass_fields__) | family_fields(model["family"])
    bad = sorted(set(space) - known)
    if bad:
        raise ValueError(f"cannot search {bad}: not a TrainRecipe field nor a field of the {model['family']} model")
    if "seed" in space or "flow_range" in space:
        raise ValueError("seed and flow_range are not hyper-parameters (the seed: --seeds on the grid)")


